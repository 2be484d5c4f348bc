# featscope workflow: one rule per stage, one job per shard (never per image).
#   snakemake --cores 2 --configfile config/demo.yaml  # the demo run (make demo does this)
#   snakemake --cores 2 --configfile my.yaml           # your own dataset and model
# The config given is the whole config: only the schema's defaults are added to it.
# Every rule is one `featscope <stage>` call, so each step also runs by hand. Each command
# line is built from the config section's values by the command's own options declaration
# (`command(...)` below), never written out here.

import json
import shlex
import sys
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError

if not config:
    raise SystemExit("featscope: error: no config: pass --configfile FILE (config/demo.yaml is the demo's; "
                     "`featscope config schema` lists every key)")

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.spaces import PIXELS
from featscope.pipelines.app import clean as fsclean
from featscope.pipelines.app import cli as fscli
from featscope.pipelines.app import config as fsconfig
from featscope.pipelines.app.workflow_cache import WorkflowCache, default_directory
from featscope.pipelines.core import history as fshistory
from featscope.pipelines.core import manifest as fsmanifest
from featscope.pipelines.core import options as fsoptions
from featscope.pipelines.core import rule_settings as fsrule_settings
from featscope.pipelines.core.rundir import UNREADABLE_AT, RunDir, read_record

# Snakemake reads a config file as YAML does, keeping the last of a key given twice: each
# file is read again here, where that is an error (a second `extract:` replaced the first unseen).
for configfile in workflow.configfiles:
    try:
        fsconfig.read(configfile)
    except FeatscopeError as e:
        raise SystemExit(f"featscope: error: {e}")

# The validated config and every job's command line are kept between starts (see
# workflow_cache): working them out imports every stage module, torch included.
CACHE = WorkflowCache(default_directory(), config, code=(Path(workflow.main_snakefile),))
try:
    CFG = CACHE.get("config", None, lambda: fsconfig.validate(config))
except FeatscopeError as e:
    raise SystemExit(f"featscope: error: {e}")


RD = RunDir(Path(CFG["runs_dir"]) / CFG["run"])
LAYERS = CFG["layers"]
MODEL = CFG["model"]
EXTRACT = CFG["extract"]
INDEX = CFG["index"]
EXTRACT_LAYERS = LAYERS + ([PIXELS] if INDEX["pixels"] else [])
TOPK = CFG["topk"]
TOPK_LAYERS = TOPK.get("layers", LAYERS) if TOPK["k"] else []
EMBED = CFG["embed"]
EMBED_LAYERS = EMBED.get("layers", LAYERS)
SALIENCY = CFG["saliency"]
EVALUATE = SALIENCY.get("evaluate")  # None: the maps' faithfulness is not measured
SANITY = SALIENCY.get("sanity")  # None: no model-randomisation test
EXPLAIN = CFG.get("explain")  # None: the neighbour queries' pairs are not explained
UNITS = CFG.get("units") or {}  # each of render / label / atlas: None, or its options and layers
UNITS_RENDER, UNITS_LABEL, UNITS_ATLAS = (UNITS.get(part) for part in ("render", "label", "atlas"))
RENDER_LAYERS = UNITS_RENDER.get("layers", TOPK_LAYERS) if UNITS_RENDER is not None else []
LABEL_LAYERS = UNITS_LABEL.get("layers", TOPK_LAYERS) if UNITS_LABEL is not None else []
ATLAS_LAYERS = UNITS_ATLAS["layers"] if UNITS_ATLAS is not None else []
EXPLAIN_LAYERS = [layer for layer in LAYERS if layer != PIXELS] if EXPLAIN is not None and INDEX["queries"] else []
VIZ = CFG["viz"]
STYLE_NET = CFG.get("style_net")
# Cluster resources per rule (Snakemake's mem_mb / runtime in minutes, and `gpu` for the SLURM
# executor plugin), sized from measurements on this project's 2-core CPU machine with generous
# headroom: extracting a 1,000-image shard peaked at 1.9 GB RSS and took 8 s (MobileNet-V2,
# CPU, 3 layers); the demo's index build, top-k merge, t-SNE of 5k points and report each
# stay under 1.5 GB and a minute. Extraction, saliency and style training ask for one GPU.
# Override any of them in the config: `resources: {extract: {gpu: 0, mem_mb: 8000}}`.
DEFAULT_RESOURCES = {
    "manifest": {"mem_mb": 2000, "runtime": 30},
    "extract": {"mem_mb": 4000, "runtime": 60, "gpu": 1},
    "index": {"mem_mb": 8000, "runtime": 120},
    "evaluate": {"mem_mb": 4000, "runtime": 30},
    "neighbours": {"mem_mb": 2000, "runtime": 15},
    "topk_merge": {"mem_mb": 4000, "runtime": 30},
    "topk_render": {"mem_mb": 2000, "runtime": 30},
    "embed": {"mem_mb": 16000, "runtime": 180},
    "mosaic": {"mem_mb": 4000, "runtime": 60},
    "saliency": {"mem_mb": 8000, "runtime": 240, "gpu": 1},
    "saliency_evaluate": {"mem_mb": 8000, "runtime": 240, "gpu": 1},
    "saliency_sanity": {"mem_mb": 4000, "runtime": 60},
    "explain": {"mem_mb": 4000, "runtime": 30},
    "units_label": {"mem_mb": 4000, "runtime": 30},
    "units_render": {"mem_mb": 4000, "runtime": 120, "gpu": 1},
    "units_atlas": {"mem_mb": 6000, "runtime": 120, "gpu": 1},
    "viz": {"mem_mb": 4000, "runtime": 60},
    "style_train": {"mem_mb": 8000, "runtime": 240, "gpu": 1},
    "report": {"mem_mb": 4000, "runtime": 60},
}


def all_cores(per_job=4):
    """Every core of a local run; on a cluster (no total number of cores) `per_job` threads."""
    try:
        return workflow.cores
    except WorkflowError:
        return per_job


unknown = sorted(set(CFG["resources"]) - set(DEFAULT_RESOURCES))
if unknown:
    raise SystemExit(f"featscope: error: config error at resources.{unknown[0]}: no such rule; rules with "
                     f"resources are {', '.join(DEFAULT_RESOURCES)}")


def res(rule):
    """The resources of `rule`: the defaults above, updated by the config's `resources`."""
    return DEFAULT_RESOURCES[rule] | CFG["resources"].get(rule, {})


q = shlex.quote
# The featscope installed beside the Python running Snakemake, so jobs need no activated venv.
_beside = Path(sys.executable).with_name("featscope")
FEATSCOPE = q(str(_beside)) if _beside.exists() else "featscope"
RUN_ARG = q(str(RD.root))



def command(name, section=None, quiet=True, **fixed):
    """The shell command of featscope command `name`: the config section's options of that
    command plus the values the workflow fixes (layer, shard, method, ...)."""
    return CACHE.get("command", [name, section, quiet, fixed], lambda: _command(name, section, quiet, fixed))


def _command(name, section, quiet, fixed):
    spec = fscli.commands(name.split()[0])[name]
    options = fsconfig.options_for(section or {}, spec, **fixed)
    flags = {"run": RUN_ARG} if spec.needs_run else {}
    if quiet and "progress" in fscli.inspect.signature(spec.run).parameters:
        flags["quiet"] = ""
    return fscli.command_line(name, options, executable=FEATSCOPE, **flags)


# Saliency runs on `workers` local Dask processes (Snakemake schedules the job by them), unless
# the config names a scheduler or SLURM workers.
SALIENCY_THREADS = SALIENCY.get("workers") or 2
REMOTE = SALIENCY.get("scheduler") or SALIENCY.get("slurm_jobs")
LOCAL_WORKERS = lambda threads: {} if REMOTE else {"workers": threads}


_SHARDS = {}


def shards():
    """The run's shards, known once the manifest checkpoint has run (read once per version of
    the manifest: every rule's input asks)."""
    checkpoints.manifest.get()
    version = RD.manifest.stat().st_mtime_ns
    if version not in _SHARDS:
        _SHARDS[version] = fsmanifest.shards(RD)
    return _SHARDS[version]


def live_ids(wildcards=None):
    """The live-id list: rewritten by the manifest only when images are added, removed or
    edited, so the rules that describe the whole dataset rerun then, and only then (it is not
    a declared output, so its time, not the manifest job's running, decides)."""
    checkpoints.manifest.get()
    return str(RD.live_ids)


def live_labels(wildcards=None):
    """A digest of the live images' labels: rewritten by the manifest only when the source
    relabels an image (ids kept), so the rules whose outputs show or use labels rerun then."""
    checkpoints.manifest.get()
    return str(RD.live_labels)


# Each workflow run leaves one line in the run's history (history.jsonl): when, what the
# manifest changed, which jobs ran, how long, and whether it succeeded.
STARTED = time.time()


# Jobs killed outright (SIGKILL, the OOM killer, a lost node) leave hidden temporaries: half
# feature parts, whole index versions. A run that has work deletes those where the large files
# go, idle for `clean.idle_hours`, before its first job (never in a dry run), as
# `featscope clean` does: months of scheduled and requeued runs would otherwise fill the disk.
CLEAN = CFG.get("clean")


onstart:
    if CLEAN is not None and RD.run_json.exists():  # a new run has nothing to clean
        try:
            cleaned = fsclean.clean(RD, idle_hours=CLEAN["idle_hours"], everywhere=False)
            if cleaned.deleted or cleaned.kept:
                print(f"featscope {cleaned.line()}", file=sys.stderr)
        except OSError as e:  # housekeeping: it never stops the work
            print(f"featscope: warning: leftovers of stopped jobs not cleaned ({e})", file=sys.stderr)


onsuccess:
    fshistory.record_run(RD, STARTED, "ok")


onerror:
    fshistory.record_run(RD, STARTED, "failed")


# What the image source holds now (paths and stats, as `check_images` compares them), looked
# at on every invocation of the workflow (not in its jobs): the manifest rule reruns when it
# changed, whatever `.snakemake/` remembers. It is an observation, so a dry run records it too.
# Under `check_images: content` it changes every time, so every run reads every image.
if workflow.is_main_process:
    try:
        fsconfig.check_against_run(CFG, RD.run_json)
        fsmanifest.write_listing(RD, CFG["images"], CFG["check_images"])
    except FeatscopeError as e:
        raise SystemExit(f"featscope: error: {e}")


def deciding(name, section=None, leave_out=(), **fixed):
    """What decides the outputs of command `name`, as JSON: its options but the tuning ones
    (threads, workers, batch size, ...) and `leave_out`: those that name which files it
    makes (Snakemake sees a change of those itself: a file added is missing, and one dropped
    leaves the others as they are), and those the run pins (a change is refused when the
    workflow starts: `config.check_against_run`)."""
    def values():
        spec = fscli.commands(name.split()[0])[name]
        chosen = fsoptions.deciding(fsconfig.options_for(section or {}, spec, **fixed))
        return json.dumps({key: value for key, value in chosen.items() if key not in leave_out}, sort_keys=True)
    return CACHE.get("deciding", [name, section, leave_out, fixed], values)


# Snakemake records no params for a job whose params function takes `threads`, so a change of
# `topk.k` or of a saliency option in the config used to rerun nothing: these rules take the
# record of what decides their outputs as an input instead, rewritten (and so newer than
# their outputs) when it changes. See core.rule_settings.
DECIDING = {
    "extract": deciding("extract", EXTRACT, leave_out=("layers", "precision", "seed"), layers=EXTRACT_LAYERS,
                        seed=MODEL["seed"], topk=TOPK["k"]),
    **{f"saliency-{method}": deciding("saliency compute", SALIENCY, method=method) for method in SALIENCY["methods"]},
    **({"saliency_evaluate": deciding("saliency evaluate", EVALUATE, leave_out=("methods",),
                                      methods=SALIENCY["methods"], select=SALIENCY["select"])}
       if EVALUATE is not None else {}),
}
# what outputs say of the settings they were made with, asked when a record is first written
MADE_SO = {"extract": lambda: fsrule_settings.candidates_are(RD, TOPK_LAYERS, TOPK["k"])}
if workflow.is_main_process:
    for rule_name, settings in DECIDING.items():
        fsrule_settings.record(RD, rule_name, settings, made_so=MADE_SO.get(rule_name, lambda: True))


def unreadable_met(record):
    """A params value for a rule whose jobs can meet images they cannot read now (a share
    away): when one last did, as the job's bookkeeping `record` keeps it. A job that meets
    one changes it, so Snakemake's params trigger runs the rule again on the next invocation,
    and again while the image stays unreadable; a job that meets none keeps it, so the rule
    then rests. (Grey tiles and patches stand in for such images meanwhile.)"""
    return str(read_record(record).get(UNREADABLE_AT) or "")


def parts_of(layers):
    """Every shard's feature part of `layers`."""
    return [str(RD.feature_part(layer, shard)) for shard in shards() for layer in layers]


def index_meta(layer):
    """The stamp an index build leaves (not meta.json: Snakemake deletes a job's outputs
    before it runs, and an update starts from the previous index)."""
    return str(RD.index_stamp(layer))


def viz_outputs(part=None):
    """The toolbox pictures the config asks for (of one part, or all)."""
    out = {
        "filters": [str(RD.viz_filters(layer)) for layer in VIZ.get("filters", [])],
        "activations": [str(RD.viz_activations(layer, i)) for layer in VIZ.get("activations", {}).get("layers", [])
                        for i in VIZ.get("activations", {}).get("ids", [])],
        "class_models": [str(RD.viz_class_models)] if "class_models" in VIZ else [],
        "adversarial": [str(RD.viz_adversarial(i, str(VIZ["adversarial"].get("target", "untargeted"))))
                        for i in VIZ.get("adversarial", {}).get("ids", [])],
        "dream": [str(RD.viz_dream(i)) for i in VIZ.get("dream", {}).get("ids", [])],
        "inversion": [str(RD.viz_inversion(i)) for i in VIZ.get("inversion", {}).get("ids", [])],
        "texture": [str(RD.viz_texture(Path(p).stem)) for p in VIZ.get("texture", {}).get("images", [])],
        "style_transfer": [str(RD.viz_style(i, Path(VIZ["style_transfer"]["style"]).stem))
                           for i in VIZ.get("style_transfer", {}).get("images", [])],
        "style_net": [str(RD.viz_style_switch(Path(STYLE_NET["image"]).stem)), str(RD.style_net_dir / "net.onnx")]
                     if STYLE_NET else [],
    }
    return out[part] if part else [path for paths in out.values() for path in paths]


localrules: all


wildcard_constraints:
    layer=r"[^/]+",
    method=r"[a-z_]+",  # saliency methods (the command checks the name)


def shown(wildcards=None):
    """What the report shows: every stage's outputs but the features (known once the manifest
    has run: `parts_of`) and those in between (`between`)."""
    return [
        *[index_meta(layer) for layer in EXTRACT_LAYERS],
        str(RD.index_evaluation),
        *([str(RD.neighbour_sheet(layer)) for layer in LAYERS] if INDEX["queries"] else []),
        *[str(RD.patch_sheet(layer)) for layer in TOPK_LAYERS],
        *[str(RD.mosaic(layer, kind, suffix)) for layer in EMBED_LAYERS
          for kind, suffix in (("grid", "jpg"), ("scatter", "jpg"), ("plot", "png"))],
        *[str(RD.saliency_summary(method)) for method in SALIENCY["methods"]],
        *([str(RD.faithfulness(method)) for method in SALIENCY["methods"]] if EVALUATE is not None else []),
        *([str(RD.sanity_verdicts)] if SANITY is not None and SALIENCY["methods"] else []),
        *[str(RD.explained_queries(layer)) for layer in EXPLAIN_LAYERS],
        *[str(RD.units_table(layer)) for layer in RENDER_LAYERS],
        *[str(RD.units_labels(layer)) for layer in LABEL_LAYERS],
        *[str(RD.atlas_table(layer)) for layer in ATLAS_LAYERS],
        *viz_outputs(),
    ]


def between(wildcards=None):
    """The outputs that only later stages read: each layer's merged top-k and 2-D map, and
    the mosaic's cells (and each shard's top-k candidates, listed in `all`)."""
    return [
        *[str(RD.topk(layer)) for layer in TOPK_LAYERS],
        *[str(RD.embedding(layer)) for layer in EMBED_LAYERS],
        *[str(RD.mosaic(layer, "grid", "parquet")) for layer in EMBED_LAYERS],
    ]


# Every output, not only the report: Snakemake does not make a missing file again while
# what was made from it is there and newer than the rest of its inputs (it treats it as it
# would a temporary file). A stage's output deleted, or removed by Snakemake when a rerun of
# its job failed, then stayed missing for good while every later run said "Nothing to be done".
rule all:
    input:
        str(RD.report_dir / "index.html"),
        shown,
        between,
        lambda wildcards: parts_of(EXTRACT_LAYERS),
        lambda wildcards: [str(RD.topk_candidates_part(layer, shard)) for shard in shards() for layer in TOPK_LAYERS],


# The report comes last: it shows whatever the stages above produced.
rule report:
    input:
        live_ids,
        live_labels,
        lambda wildcards: parts_of(EXTRACT_LAYERS),
        shown,
    output:
        str(RD.report_dir / "index.html"),
    priority: 10  # on the longest path of a rerun (extract, embed, mosaic, report): first when ready
    resources:
        **res("report"),
    params:
        cmd=lambda wildcards: command("report"),
        unreadable=lambda wildcards: unreadable_met(RD.report_unreadable),
    shell:
        "{params.cmd}"


# Reruns whenever the image source changed (listing.sha256, see above). `update`: Snakemake
# must not delete the old manifest first, since it holds the ids that must stay stable. A
# shard that lost images has its extracted files deleted by the manifest, so extract below
# redoes exactly those shards.
checkpoint manifest:
    input:
        RD.listing,
    output:
        update(RD.manifest),
    resources:
        **res("manifest"),
    params:
        cmd=command("manifest", images=CFG["images"], shard_size=CFG["shard_size"], model=MODEL["arch"],
                    weights=MODEL["weights"], check=CFG["check_images"]),
    shell:
        "{params.cmd}"


# `ancient`: a manifest updated for new images must not make finished shards look stale.
rule extract:
    input:
        ancient(RD.manifest),
        lambda wildcards: fsrule_settings.as_input(RD, "extract"),
    output:
        [RD.feature_part_template(layer) for layer in EXTRACT_LAYERS],
        [RD.topk_candidates_template(layer) for layer in TOPK_LAYERS],
    wildcard_constraints:
        shard=r"\d{5}",
    threads: EXTRACT.get("threads") or all_cores()
    priority: 20  # every later job but saliency waits for the features: first when ready
    resources:
        **res("extract"),
    params:
        cmd=lambda wildcards, threads: command("extract", EXTRACT | {"threads": threads}, layers=EXTRACT_LAYERS,
                                               seed=MODEL["seed"], topk=TOPK["k"], shard=int(wildcards.shard)),
    shell:
        "{params.cmd}"


# One index per layer (and pixel space), rebuilt when the dataset changes.
rule index:
    input:
        live_ids,
        lambda wildcards: parts_of([wildcards.layer]),
    output:
        index_meta("{layer}"),
    resources:
        **res("index"),
    params:
        cmd=lambda wildcards: command("index build", INDEX, layer=wildcards.layer),
    shell:
        "{params.cmd}"


rule evaluate:
    input:
        [index_meta(layer) for layer in EXTRACT_LAYERS],
        live_labels,  # same-label precision
    output:
        RD.index_evaluation,
    resources:
        **res("evaluate"),
    params:
        cmd=lambda wildcards: command("index evaluate"),
    shell:
        "{params.cmd}"


rule neighbours:
    input:
        index_meta("{layer}"),
        live_labels,  # each tile's caption
        [index_meta(PIXELS)] if INDEX["pixels"] else [],
    output:
        str(RD.neighbour_sheet("{layer}")),
    resources:
        **res("neighbours"),
    params:
        cmd=lambda wildcards: command("neighbours", layer=wildcards.layer, ids=INDEX["queries"], k=INDEX["k"]),
        unreadable=lambda wildcards: unreadable_met(RD.neighbour_greys(wildcards.layer)),
    shell:
        "{params.cmd}"


# The dataset's top-k per unit from every shard's candidates; then the patch PNGs.
rule topk_merge:
    input:
        live_ids,
        lambda wildcards: [str(RD.topk_candidates_part(wildcards.layer, s)) for s in shards()],
    output:
        str(RD.topk("{layer}")),
    resources:
        **res("topk_merge"),
    params:
        cmd=lambda wildcards: command("topk merge", layer=wildcards.layer),
    shell:
        "{params.cmd}"


rule topk_render:
    input:
        str(RD.topk("{layer}")),
    output:
        str(RD.patch_sheet("{layer}")),
    resources:
        **res("topk_render"),
    params:
        cmd=lambda wildcards: command("topk render", TOPK, layer=wildcards.layer, k=None),  # k: extraction's
        unreadable=lambda wildcards: unreadable_met(RD.patches_record(wildcards.layer)),
    shell:
        "{params.cmd}"


rule embed:
    input:
        live_ids,
        live_labels,  # the map's same-label accuracy
        lambda wildcards: parts_of([wildcards.layer]),
    output:
        str(RD.embedding("{layer}")),
    # a fit uses every core; placing a rerun's new images into the previous map is mostly one
    # thread's work, and the other cores serve the rerun's other jobs meanwhile
    threads: lambda wildcards: 1 if RD.embedding_pca(wildcards.layer).exists() else all_cores()
    priority: 10  # on the longest path of a rerun (extract, embed, mosaic, report): first when ready
    resources:
        **res("embed"),
    params:
        cmd=lambda wildcards: command("embed", EMBED, layer=wildcards.layer),
    shell:
        "{params.cmd}"


rule mosaic:
    input:
        str(RD.embedding("{layer}")),
        live_labels,  # the plot's colours
    output:
        grid=str(RD.mosaic("{layer}", "grid")),
        cells=str(RD.mosaic("{layer}", "grid", "parquet")),
        scatter=str(RD.mosaic("{layer}", "scatter")),
        plot=str(RD.mosaic("{layer}", "plot", "png")),
    priority: 10  # on the longest path of a rerun (extract, embed, mosaic, report): first when ready
    resources:
        **res("mosaic"),
    params:
        cmd=lambda wildcards: command("mosaic all", layer=wildcards.layer, side=EMBED["grid_side"],
                                      tile=EMBED["tile"], seed=EMBED["seed"]),
        unreadable=lambda wildcards: " ".join(unreadable_met(RD.mosaic_unreadable(wildcards.layer, kind))
                                              for kind in ("grid", "scatter")),
    shell:
        "{params.cmd}"


# Saliency maps of the selected images, one job per method, on a local Dask cluster of
# `workers` processes (or the cluster at saliency.scheduler). Finished images are skipped,
# maps of images that left the dataset deleted. `overwrite`: the config says what the maps
# are made with, so a change of an option there remakes the maps made with the old one (by
# hand, the command refuses to without --overwrite).
rule saliency:
    input:
        live_ids,
        live_labels,  # select: label=NAME
        lambda wildcards: fsrule_settings.as_input(RD, f"saliency-{wildcards.method}"),
    output:
        str(RD.saliency_summary("{method}")),
    threads: SALIENCY_THREADS
    priority: 10  # it needs only the manifest: started early, it never holds up the report at the end
    resources:
        **res("saliency"),
    params:
        cmd=lambda wildcards, threads: command("saliency compute", SALIENCY, method=wildcards.method,
                                               overwrite=True, **LOCAL_WORKERS(threads)),
        unreadable=lambda wildcards: unreadable_met(RD.saliency_unreadable(wildcards.method)),
    shell:
        "{params.cmd}"


# The maps' faithfulness (deletion and insertion curves against random and centre maps) of
# every method in one job on the same Dask workers as the maps, so each image's baselines are
# computed once; only maps it has not measured yet.
rule saliency_evaluate:
    input:
        [str(RD.saliency_summary(method)) for method in SALIENCY["methods"]],
        lambda wildcards: fsrule_settings.as_input(RD, "saliency_evaluate"),
    output:
        [str(RD.faithfulness(method)) for method in SALIENCY["methods"]],
    threads: SALIENCY_THREADS
    resources:
        **res("saliency_evaluate"),
    params:
        cmd=lambda wildcards, threads: command("saliency evaluate", EVALUATE, methods=SALIENCY["methods"],
                                               select=SALIENCY["select"], **LOCAL_WORKERS(threads),
                                               **({"scheduler": SALIENCY["scheduler"]} if SALIENCY.get("scheduler")
                                                  else {})),
    shell:
        "{params.cmd}"


# Each unit of a layer named by the label it separates best (from the stored features and the
# merged top-k), with the classes it supports (classifier weights or averaged gradients).
rule units_label:
    input:
        lambda wildcards: parts_of([wildcards.layer]),
        live_labels,
        lambda wildcards: [str(RD.topk(wildcards.layer))] if wildcards.layer in TOPK_LAYERS else [],
    output:
        str(RD.units_labels("{layer}")),
    resources:
        **res("units_label"),
    params:
        cmd=lambda wildcards: command("units label", UNITS_LABEL, layer=wildcards.layer),
    shell:
        "{params.cmd}"


# A feature visualisation per unit, checked against the dataset's top-k where the layer has one.
rule units_render:
    input:
        live_ids,
        lambda wildcards: [str(RD.topk(wildcards.layer))] if wildcards.layer in TOPK_LAYERS else [],
    output:
        str(RD.units_table("{layer}")),
    resources:
        **res("units_render"),
    params:
        cmd=lambda wildcards: command("units render", UNITS_RENDER, layer=wildcards.layer),
    shell:
        "{params.cmd}"


# An activation atlas of a layer: its own pass over a sample of the dataset (after extraction,
# whose predictions name each cell's most common class).
rule units_atlas:
    input:
        lambda wildcards: parts_of(EXTRACT_LAYERS),
        live_labels,  # each cell's most common label
    output:
        str(RD.atlas_table("{layer}")),
    resources:
        **res("units_atlas"),
    params:
        cmd=lambda wildcards: command("units atlas", UNITS_ATLAS, layer=wildcards.layer),
    shell:
        "{params.cmd}"


# Why each configured query matches its nearest images in a layer: the pairs the report's image
# pages show from disk.
rule explain:
    input:
        lambda wildcards: index_meta(wildcards.layer),
    output:
        str(RD.explained_queries("{layer}")),
    resources:
        **res("explain"),
    params:
        cmd=lambda wildcards: command("explain", EXPLAIN, layer=wildcards.layer, queries=INDEX["queries"]),
    shell:
        "{params.cmd}"


# The model-randomisation test of every configured method, on a small sample of images.
rule saliency_sanity:
    input:
        [str(RD.saliency_summary(method)) for method in SALIENCY["methods"]],
    output:
        str(RD.sanity_verdicts),
    resources:
        **res("saliency_sanity"),
    params:
        cmd=lambda wildcards: command("saliency sanity", SANITY, methods=SALIENCY["methods"]),
    shell:
        "{params.cmd}"


# The visualisation toolbox: one job per configured part, every target of a part in one batch.
def viz_command(method, part, **fixed):
    return command(f"viz {method}", part, **fixed)


VIZ_COMMANDS = {"filters": "filters", "activations": "activations", "class_models": "class-model",
                "adversarial": "adversarial", "dream": "dream", "inversion": "invert"}
OPTIMISING = ("class-model", "dream", "invert")  # these optimise images: every core helps

for part, method in VIZ_COMMANDS.items():
    if not VIZ.get(part):
        continue

    rule:
        name:
            f"viz_{part}"
        input:
            ancient(RD.manifest),
        output:
            viz_outputs(part),
        threads: all_cores() if method in OPTIMISING else 1
        resources:
            **res("viz"),
        params:  # evaluated now; a shell expression would be evaluated at run time, after the loop
            cmd=viz_command(method, {}, layers=VIZ[part]) if part == "filters" else viz_command(method, VIZ[part]),
        shell:
            "{params.cmd}"


if "texture" in VIZ:
    rule viz_texture:
        input:
            ancient(RD.manifest),
            image=lambda wildcards: next(p for p in VIZ["texture"]["images"] if Path(p).stem == wildcards.name),
        output:
            str(RD.viz_texture("{name}")),
        threads: all_cores()
        resources:
            **res("viz"),
        params:
            cmd=lambda wildcards, input: viz_command("texture", VIZ["texture"], image=input.image),
        shell:
            "{params.cmd}"


if "style_transfer" in VIZ:
    rule viz_style_transfer:
        input:
            ancient(RD.manifest),
            VIZ["style_transfer"]["style"],
        output:
            viz_outputs("style_transfer"),
        threads: all_cores()
        resources:
            **res("viz"),
        run:
            for image_id in VIZ["style_transfer"]["images"]:
                shell(viz_command("style", VIZ["style_transfer"], id=image_id))


# Fast style transfer: train one network for every style (resumable), then draw the
# switch/mix strip and export the network to ONNX.
if STYLE_NET:
    rule style_train:
        input:
            STYLE_NET["styles"],
        output:
            str(RD.style_net_dir / "net.pt"),
        threads: all_cores()
        resources:
            **res("style_train"),
        params:
            cmd=command("style train", STYLE_NET, out=RD.style_net_dir),
        shell:
            "{params.cmd}"

    rule style_outputs:
        input:
            str(RD.style_net_dir / "net.pt"),
        output:
            strip=str(RD.viz_style_switch(Path(STYLE_NET["image"]).stem)),
            onnx=str(RD.style_net_dir / "net.onnx"),
        resources:
            **res("viz"),
        params:
            cmd=lambda wildcards, input, output: " && ".join([
                command("style strip", checkpoint=input[0], image=STYLE_NET["image"], out=output.strip),
                command("style export", checkpoint=input[0], out=output.onnx),
            ]),
        shell:
            "{params.cmd}"
