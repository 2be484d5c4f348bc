"""The saliency stage: maps for a set of a run's images, computed in parallel with Dask.

The client selects images, skips those already done (their .npz exists: files are written
atomically, the map last), splits the rest into tasks of several images and sends them to a
Dask cluster: a local one of worker processes, or an existing one at `scheduler`. Each
worker loads the model once (cached per process), reads its images itself, writes the map,
the overlay and the GrabCut mask into the run directory, and sends back only small summary
rows. A worker that dies mid-task loses nothing: the scheduler reruns its tasks elsewhere.

Model view: the whole image, resized so its shorter side is the model's crop size (224),
not centre-cropped, so the map covers every pixel; the map is then resized to the original
image's size for the .npz.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, make_dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from featscope.kernels.params import Declared, ParamError
from featscope.kernels.saliency import METHODS, attribute, class_score
from featscope.kernels.segment import grabcut_mask
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, write_json_atomic
from featscope.pipelines.core.cpus import split
from featscope.pipelines.core.device import (
    DEVICES,
    PRECISION_CHOICES,
    PRECISIONS,
    resolve_precision,
)
from featscope.pipelines.core.images import BadImage, Unreadable, read_pixels
from featscope.pipelines.core.models import class_names
from featscope.pipelines.core.options import Command, Group, Options, option
from featscope.pipelines.core.rundir import RunDir, record_unreadable
from featscope.pipelines.core.store import FLOAT16_MAX, NON_FINITE, write_errors, write_table
from featscope.pipelines.core.text import plural, rate
from featscope.pipelines.core.workers import (
    ModelRef,
    SlurmWorkers,
    dask_client,
    forward_model,
    model_ref,
    model_view,
    one_task_at_a_time,
    select,
    worker_model,
)
from featscope.pipelines.render.overlay import heat_overlay, map_picture

SEGMENT_MAX_SIDE = 400  # GrabCut runs on the model's view, not on a 20-megapixel original


@dataclass(frozen=True)
class _StageOptions(Options):
    """What the stage itself takes; each method's own parameters are added below."""

    method: str = option(help="the saliency method", choices=tuple(METHODS), required=True)
    select: str = option("all", help="which images: all | label=NAME | ids=1,2,3",
                         pattern=r"^(all|label=.+|ids=[0-9, ]+)$")
    target: str = option("predicted", help="class to explain: predicted | label (the image's label as an ImageNet "
                                           "name or id) | a class id", pattern=r"^(predicted|label|[0-9]+)$")
    score: str = option("logit", help="the class score explained", choices=("logit", "probability"))
    precision: str = option("auto", help="forward passes of methods that only run forward (occlusion); auto: bf16 "
                                         "on CPUs with AVX512-BF16/AMX and on GPUs", choices=PRECISION_CHOICES)
    segment: bool = option(False, help="also a GrabCut foreground mask per image")
    foreground: float = option(95.0, help="GrabCut: sure foreground above this percentile of the map", min=0,
                               max=100)
    background: float = option(30.0, help="GrabCut: sure background below this percentile of the map", min=0,
                               max=100)
    workers: int | None = option(help="local Dask worker processes (default: one per usable CPU, up to 8, each "
                                      "single-threaded)", min=1, tuning=True)
    scheduler: str | None = option(help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786", tuning=True)
    slurm_jobs: int | None = option(help="start Dask workers as this many SLURM jobs (dask-jobqueue)", min=1,
                                    tuning=True)
    # the other slurm options default to None, so that one given without slurm_jobs is told
    # apart from its default and refused (it would change nothing)
    slurm_cores: int | None = option(help="with slurm_jobs: cores per worker job (default 4)", min=1,
                                     tuning=True)
    slurm_memory: str | None = option(help="with slurm_jobs: memory per worker job, e.g. 16GB (the default) or "
                                           "500MiB", pattern=r"(?i)^[0-9]+(\.[0-9]+)? ?[kmgt]i?b$", tuning=True)
    # SLURM's forms: minutes, [days-]hours:minutes[:seconds] and the rest; sbatch refuses any
    # other, and the workers would then never start while the job waits for them
    slurm_walltime: str | None = option(help="with slurm_jobs: time limit per worker job (default 02:00:00)",
                                        pattern=r"^([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}$", tuning=True)
    slurm_gpus: int | None = option(help="with slurm_jobs: GPUs per worker job (gres; default 0)", min=0,
                                    tuning=True)
    slurm_partition: str | None = option(help="with slurm_jobs: partition (queue)", tuning=True)
    slurm_account: str | None = option(help="with slurm_jobs: account", tuning=True)
    images_per_task: int | None = option(help="images per Dask task (default: by method, so a task takes >= "
                                               "~100 ms)", min=1, tuning=True)
    device: str = option("auto", help="where the workers run the model", choices=DEVICES, tuning=True)
    threads: int | None = option(help="torch threads per worker (default: the usable CPUs / workers, 1 if "
                                      "workers is not given)", min=1, tuning=True)
    overwrite: bool = option(False, help="replace the selected images' maps made with other options (each is "
                                         "replaced once its new map is written; other images are left alone)",
                             tuning=True)


def _method_fields() -> list[tuple]:
    """Every method's declared parameters (see `kernels.saliency`), once each: a name two
    methods share must mean the same thing to both."""
    found: dict[str, Declared] = {}
    for name, method in METHODS.items():
        for declared in method.params:
            other = found.setdefault(declared.name, declared)
            if (other.type, other.default) != (declared.type, declared.default):
                raise TypeError(f"saliency parameter '{declared.name}' of {name} clashes with another method's")
    return [(d.name, d.type, option(d.default, param=d.param)) for d in found.values()]


# The stage's options and every method's parameters: one set of names for the command line
# and the config's `saliency:` section.
SaliencyOptions = make_dataclass("SaliencyOptions", _method_fields(), bases=(_StageOptions,), frozen=True)


def recorded_options(options: SaliencyOptions) -> dict:
    """What a stored map of `options.method` depends on (not segmenting, workers and the like)."""
    method = METHODS[options.method]
    names = ["target", "score"] + [d.name for d in method.params]
    if "dtype" in inspect.signature(method.function).parameters:
        names.append("precision")
    return {"method": options.method} | {name: getattr(options, name) for name in names}


def map_options(options: SaliencyOptions, ref: ModelRef) -> str:
    """What one stored map was made with, as the JSON each .npz and summary row records."""
    wanted = recorded_options(options) | {"model": ref.arch, "weights": ref.weights, "model_seed": ref.seed}
    return json.dumps(wanted, sort_keys=True)


# SlurmWorkers' fields and the options that set them
SLURM_JOB_OPTIONS = {"cores": "slurm_cores", "memory": "slurm_memory", "walltime": "slurm_walltime",
                     "gpus": "slurm_gpus", "queue": "slurm_partition", "account": "slurm_account"}


def _check(options: SaliencyOptions) -> None:
    if options.target not in ("predicted", "label") and not options.target.isdigit():
        raise ParamError("target", f"must be predicted, label or a class id, not '{options.target}'")
    if not options.background < options.foreground:
        raise ParamError("background", "must be below <foreground> (both are percentiles of the map)")
    given = [n for n in ("workers", "scheduler", "slurm_jobs") if getattr(options, n) is not None]
    if len(given) > 1:
        raise ParamError(given[1], f"cannot be given with {given[0]}")
    if options.slurm_jobs is None:
        for name in SLURM_JOB_OPTIONS.values():
            if getattr(options, name) is not None:
                raise ParamError(name, "is for SLURM workers, started only with <slurm_jobs>: without it, it would "
                                       "change nothing")


def _kernel_options(options: SaliencyOptions, device: torch.device) -> dict:
    """The method's own parameters from the options, plus score and autocast dtype where it takes them."""
    method = METHODS[options.method]
    values = {d.name: getattr(options, d.name) for d in method.params}
    accepted = inspect.signature(method.function).parameters
    if "score" in accepted:
        values["score"] = options.score
    if "dtype" in accepted:
        values["dtype"] = PRECISIONS[resolve_precision(options.precision, device)]
    return values


@dataclass
class SaliencySummary:
    method: str
    selected: int
    computed: int
    skipped: int
    bad: int
    workers: int
    seconds: float
    out: Path
    retired: int = 0  # maps deleted because their image left the dataset

    @property
    def failed(self) -> bool:
        """Every image it tried failed: the command exits non-zero."""
        return self.bad > 0 and self.computed == 0

    def warning(self) -> str:
        return (f"{plural(self.bad, 'image')} got no map; see {self.out.parent.parent / 'errors.parquet'}"
                if self.bad else "")

    def line(self) -> str:
        text = (f"saliency {self.method}: {plural(self.computed, 'map')} in {self.seconds:.1f}s "
                f"({rate(self.computed, self.seconds)}, "
                f"{f'{self.workers} workers' if self.workers else 'in this process'}) into {self.out}; "
                f"{self.skipped} already done")
        if self.bad:
            text += f"; {plural(self.bad, 'image')} failed (see errors.parquet)"
        if self.retired:
            text += f"; {plural(self.retired, 'map')} of retired images deleted"
        return text


def _check_target(ref: ModelRef, target: str) -> None:
    """A class id past the model's classes is a typo: one line before any work, not an error
    row for every image (where the model's class names say how many there are)."""
    names = ref.class_names or class_names(ref.arch, ref.weights)
    if target.isdigit() and names and int(target) >= len(names):
        raise ParamError("target", f"must be predicted, label or one of the model's classes, 0..{len(names) - 1}; "
                                   f"got {target}")


# ---- the worker side ---------------------------------------------------------------------

def _target_class(options: SaliencyOptions, logits: torch.Tensor, label: str | None,
                  categories: list[str] | None) -> int:
    classes = logits.shape[1]
    if options.target == "predicted":
        return int(logits.argmax(1))
    wanted = label if options.target == "label" else options.target
    if wanted is None:
        raise ValueError("the image has no label")
    if str(wanted).isdigit() and int(wanted) < classes:
        return int(wanted)
    names = {name.lower(): i for i, name in enumerate(categories or [])}
    if str(wanted).lower() in names:
        return names[str(wanted).lower()]
    raise ValueError(f"'{wanted}' is not a class of the model (give a class id below {classes} or a class name)")


def _write_outputs(rd: RunDir, options: SaliencyOptions, image_id: int, view: torch.Tensor, heat: np.ndarray,
                   original: tuple[int, int], facts: dict) -> None:
    """Overlay and mask first, the .npz last: its existence means the image is done."""
    method = options.method
    rgb = view.permute(1, 2, 0).numpy()
    title = f"{method} · {facts['target_name']}"
    signed = bool((heat < 0).any())
    picture = heat_overlay(rgb, heat, diverging=signed, title=title)
    with atomic_path(rd.saliency_overlay(method, image_id)) as tmp:
        picture.save(tmp, format="PNG")
    with atomic_path(rd.saliency_map_picture(method, image_id)) as tmp:
        map_picture(heat, diverging=signed, title=title).save(tmp, format="PNG")
    height, width = original
    if options.segment:
        mask = grabcut_mask(rgb, heat, foreground=options.foreground, background=options.background)
        full = Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST)
        with atomic_path(rd.saliency_mask(method, image_id)) as tmp:
            full.convert("1").save(tmp, format="PNG")
    full_map = F.interpolate(torch.from_numpy(heat)[None, None], size=(height, width), mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    with atomic_path(rd.saliency_map(method, image_id)) as tmp, open(tmp, "wb") as f:
        stored = np.float16 if np.abs(full_map).max() <= FLOAT16_MAX else np.float32  # never an inf for a big value
        np.savez_compressed(f, saliency=full_map.astype(stored), image_id=image_id, method=method,
                            **{k: v for k, v in facts.items()})


def _error(row: dict, method: str, kind: str, why: object) -> dict:
    """An errors.parquet row for an image whose map could not be made."""
    return {"image_id": row["image_id"], "path": row["path"], "stage": f"saliency-{method}", "error": kind,
            "message": str(why)}


@one_task_at_a_time
def explain_batch(root: str, options: SaliencyOptions, ref: ModelRef, rows: list[dict]) -> dict:
    """One Dask task: compute, render and write the maps of `rows`; return small summaries."""
    rd = RunDir(root)
    loaded, device, categories = worker_model(ref)
    model = forward_model(ref) if options.method == "occlusion" else loaded.module
    prep = loaded.preprocessing
    summaries, errors = [], []
    for row in rows:
        start = time.perf_counter()
        try:
            pixels = read_pixels(row["path"])
        except BadImage as e:  # unreadable (a share away): the workflow's next run tries it again
            errors.append(_error(row, options.method, "unreadable" if isinstance(e, Unreadable) else "bad_image", e))
            continue
        view = model_view(pixels, prep)
        x = prep.normalize(view[None].to(device))
        with torch.no_grad():
            logits = model(x.contiguous(memory_format=torch.channels_last)).float()
        if not bool(torch.isfinite(logits).all()):
            errors.append(_error(row, options.method, NON_FINITE, "the model's scores for this image are NaN or inf"))
            continue
        try:
            target = _target_class(options, logits, row.get("label"), categories)
        except ValueError as e:
            errors.append(_error(row, options.method, "no_target", e))
            continue
        t = torch.tensor([target], device=device)
        heat = attribute(model, x, t, options.method, **_kernel_options(options, device))[0]
        if not bool(torch.isfinite(heat).all()):  # an overflow (fp16), not the image's evidence
            errors.append(_error(row, options.method, NON_FINITE, f"its {options.method} map holds NaN or inf"))
            continue
        facts = {
            "target": target,
            "target_name": categories[target] if categories else str(target),
            "predicted": int(logits.argmax(1)),
            "score": float(class_score(logits, t, options.score)),
            "probability": float(class_score(logits, t, "probability")),
        }
        facts["seconds"] = time.perf_counter() - start
        facts["options"] = map_options(options, ref)
        _write_outputs(rd, options, row["image_id"], view, heat.float().cpu().numpy(), tuple(pixels.shape[1:]),
                       facts)
        summaries.append({"image_id": row["image_id"], "method": options.method, **facts,
                          "seconds": time.perf_counter() - start})
    return {"summaries": summaries, "errors": errors}


# ---- the client side ---------------------------------------------------------------------

SUMMARY_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64()),
    pa.field("method", pa.string()),
    pa.field("target", pa.int32()),
    pa.field("target_name", pa.string()),
    pa.field("predicted", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("probability", pa.float32()),
    pa.field("seconds", pa.float32()),
    pa.field("options", pa.string()),  # what the map was made with (map_options)
])


def _summary_from_npz(path: Path) -> dict:
    with np.load(path) as data:
        row = {f.name: data[f.name].item() for f in SUMMARY_SCHEMA if f.name in data.files}
    return row


def _check_options(rd: RunDir, options: SaliencyOptions, made_with: dict[int, str | None], wanted: str,
                   overwrite: bool) -> None:
    """Replacing maps made with other options needs --overwrite, which then recomputes the
    selected images only; nothing is deleted (each map records its own options, and a new
    map replaces the old one only once it is written)."""
    stale = [i for i, made in made_with.items() if made != wanted]
    if stale and not overwrite:
        found, want = json.loads(made_with[stale[0]]), json.loads(wanted)
        changed = ", ".join(f"{k}={found.get(k)!r}->{want.get(k)!r}" for k in want if found.get(k) != want.get(k))
        raise ParamError("overwrite", f"{rd.saliency_dir(options.method)} holds {len(stale)} selected maps made "
                         f"with other options ({changed}); pass <overwrite> to recompute them with these")
    write_json_atomic(rd.saliency_options(options.method), json.loads(wanted))


def run(rd: RunDir, options: SaliencyOptions, progress: bool = True) -> SaliencySummary:
    """Compute the maps of the selected images that are not done yet, on a Dask cluster."""
    start = time.perf_counter()
    _check(options)
    selection, workers, scheduler = options.select, options.workers, options.scheduler
    threads, overwrite, images_per_task = options.threads, options.overwrite, options.images_per_task
    slurm = None
    if options.slurm_jobs:
        given = {field: getattr(options, name) for field, name in SLURM_JOB_OPTIONS.items()}
        slurm = SlurmWorkers(jobs=options.slurm_jobs, **{field: value for field, value in given.items()
                                                         if value is not None})
    _check_target(model_ref(rd), options.target)  # a run without a model fails before the cluster starts
    rows = select(rd, selection)
    live = set(manifest.read(rd)["image_id"].to_pylist())
    with one_writer(rd.saliency_dir(options.method), f"saliency {options.method}"):  # its summary vouches for its maps
        retired = _drop_retired_maps(rd, options.method, live)
        if slurm is not None:
            threads = threads or slurm.cores
        elif not scheduler:
            workers, threads = split(workers, threads)
        ref = model_ref(rd, options.device, threads)
        method = options.method
        made_with = _stored_options(rd, method, rows)
        wanted = map_options(options, ref)
        _check_options(rd, options, made_with, wanted, overwrite)

        def done(row: dict) -> bool:
            """Its map exists, was made with these options, and has its mask if one is wanted."""
            return made_with.get(row["image_id"]) == wanted and (
                not options.segment or rd.saliency_mask(method, row["image_id"]).exists())

        todo = [r for r in rows if not done(r)]
        per_task = images_per_task or METHODS[method].images_per_task
        batches = [todo[i:i + per_task] for i in range(0, len(todo), per_task)]
        summaries, errors, used_workers = [], [], 0
        if len(batches) == 1 and not scheduler and slurm is None:
            # one task's worth (a scheduled rerun's few new images): starting worker processes,
            # each importing torch and loading the model, would cost more than the task (5 s here)
            result = explain_batch(str(rd.root), options, ref, batches[0])
            summaries, errors = result["summaries"], result["errors"]
        elif batches:
            from distributed import as_completed

            with dask_client(workers, scheduler, threads, slurm) as (client, used_workers):
                futures = client.map(explain_batch, [str(rd.root)] * len(batches), [options] * len(batches),
                                     [ref] * len(batches), batches, pure=False, retries=1)
                with tqdm(total=len(todo), unit="img", desc=f"saliency {method}", disable=not progress) as bar:
                    for future in as_completed(futures):
                        result = future.result()
                        summaries += result["summaries"]
                        errors += result["errors"]
                        bar.update(len(result["summaries"]) + len(result["errors"]))
        _write_summary(rd, options, rows, summaries, ref)
        # the workflow's next run tries those again (see rundir.UNREADABLE_AT)
        record_unreadable(rd.saliency_unreadable(method), [e["image_id"] for e in errors if e["error"] == "unreadable"])
        _write_errors(rd, method, live, errors, attempted={r["image_id"] for r in todo})
        return SaliencySummary(method, len(rows), len(summaries), len(rows) - len(todo), len(errors), used_workers,
                               time.perf_counter() - start, rd.saliency_dir(method), retired)


def _drop_retired_maps(rd: RunDir, method: str, live: set[int]) -> int:
    """Delete the maps, overlays and masks of images no longer in the dataset (removed, or
    replaced by an edited file): the summary and the report then never show them."""
    folder = rd.saliency_dir(method)
    dropped = 0
    for npz in folder.glob("*.npz") if folder.is_dir() else []:
        if npz.stem.isdigit() and int(npz.stem) not in live:
            image_id = int(npz.stem)
            for path in (rd.saliency_overlay(method, image_id), rd.saliency_mask(method, image_id),
                         rd.saliency_map_picture(method, image_id), rd.saliency_curves(method, image_id), npz):
                path.unlink(missing_ok=True)
            dropped += 1
    return dropped


def _stored_options(rd: RunDir, method: str, rows: list[dict]) -> dict[int, str | None]:
    """image_id -> the options its stored map was made with (from the summary, else the .npz;
    for maps of featscope before 0.2, which record none, the method's options.json)."""
    legacy = rd.saliency_options(method)
    legacy = json.dumps(json.loads(legacy.read_text()), sort_keys=True) if legacy.exists() else None
    path = rd.saliency_summary(method)
    known = {}
    if path.exists():
        table = pq.read_table(path)
        if "options" in table.column_names:
            known = dict(zip(table["image_id"].to_pylist(), table["options"].to_pylist()))
    found = {}
    for row in rows:
        image_id = row["image_id"]
        if not rd.saliency_map(method, image_id).exists():
            continue
        if known.get(image_id) is None:
            known[image_id] = _summary_from_npz(rd.saliency_map(method, image_id)).get("options")
        found[image_id] = known[image_id] or legacy
    return found


def _write_summary(rd: RunDir, options: SaliencyOptions, rows: list[dict], new: list[dict], ref: ModelRef) -> None:
    """One part per method: earlier rows, this run's rows, and rows read back from any map
    finished by a run that was killed before it wrote its summary."""
    path = rd.saliency_summary(options.method)
    by_id = {}
    if path.exists():
        by_id = {r["image_id"]: r for r in pq.read_table(path).to_pylist()}
    by_id |= {r["image_id"]: r for r in new}
    for row in rows:
        map_path = rd.saliency_map(options.method, row["image_id"])
        if row["image_id"] not in by_id and map_path.exists():
            by_id[row["image_id"]] = _summary_from_npz(map_path) | {"method": options.method}
    ordered = [by_id[k] for k in sorted(by_id) if rd.saliency_map(options.method, k).exists()]
    table = pa.Table.from_pylist(ordered, schema=SUMMARY_SCHEMA)
    write_table(table, path, {"model": ref.arch, "weights": ref.weights,
                              "options": json.dumps(recorded_options(options), sort_keys=True),
                              "select": options.select})  # status: images it chooses now that have no map


def _write_errors(rd: RunDir, method: str, live: set[int], new: list[dict], attempted: set[int]) -> None:
    """Keep earlier error rows of live images not retried this time; replace the rest."""
    path = rd.error_part(f"saliency-{method}", 0)
    old = pq.read_table(path).to_pylist() if path.exists() else []
    kept = [r for r in old if r["image_id"] not in attempted and r["image_id"] in live
            and not rd.saliency_map(method, r["image_id"]).exists()]
    if kept or new or path.exists():
        write_errors(path, kept + new)


def read_summary(rd: RunDir) -> pa.Table:
    """Every method's summary rows, or an empty table."""
    parts = sorted(rd.saliency_summary_dir.glob("*.parquet")) if rd.saliency_summary_dir.is_dir() else []
    if not parts:
        return SUMMARY_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=SUMMARY_SCHEMA) for p in parts])


COMMANDS = [
    Command("saliency compute", SaliencyOptions, run,
            help="which pixels matter: saliency maps of a run's images, with Dask",
            description="Maps for the selected images (float16 .npz at the original size, a PNG overlay, a GrabCut "
                        "mask with --segment) in <run>/saliency/<method>/, and saliency/summary.parquet. Images "
                        "already done are skipped. Runs on a local Dask cluster of --workers processes, on the "
                        "cluster at --scheduler, or on workers started as SLURM jobs.",
            groups=(Group(("workers", "scheduler", "slurm_jobs")),)),
]
