"""The run directory: the one place that knows where each stage's files live.

Layout (see DESIGN.md): run.json, manifest.parquet, errors.parquet/ (a directory dataset
with one part per stage and shard, so parallel jobs never write the same file),
features/<layer>/part-NNNNN.parquet, topk/ (candidates per shard, merged top-k per layer),
patches/, index/<layer>/ (FAISS index), neighbours/<layer>.jpg, saliency/<method>/ (maps,
overlays, masks, deletion/insertion curves), saliency/summary.parquet/ and
saliency/faithfulness.parquet/ (directory datasets, one part per method), saliency/sanity.*
(the model-randomisation test) and viz/ (the toolbox's pictures).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.atomic import holding, write_json_atomic

THUMB_FOLDER = 1000  # thumbnails per folder of the report (the pages compute the same path)
GREY_PATCH = "unreadable"  # a patch record row of a strip with a grey patch (an image that could not be read)
# A stage's record key: when a run of it last met an image it could not read (a share away),
# kept until one does again. The workflow's rule carries it in its params, so Snakemake runs
# the rule again on its next invocation while the image stays unreadable, and then rests.
UNREADABLE_AT = "unreadable_ns"

# What the stages write keyed by image id, or draw from such outputs, relative to the run: a
# manifest made anew would give those ids to other images (`RunDir.id_keyed_outputs`).
# Not here: run.json, the history, timings, the style network, filters, class models, textures.
ID_KEYED = ("features", "predictions", "errors.parquet", "topk", "patches", "embedding", "mosaic", "index",
            "neighbours", "saliency", "explain", "units", "report", "viz/activations", "viz/adversarial",
            "viz/dream", "viz/inversion", "viz/style")


class RunDir:
    """Paths of one dataset x model run; creates nothing until a stage writes."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def id_keyed_outputs(self) -> list[str]:
        """The entries of `ID_KEYED` that hold a file: outputs that name images by id."""
        def holds_a_file(path: Path) -> bool:  # (a lock file names no image: see atomic.one_writer)
            return path.is_file() or (path.is_dir() and any(p.is_file() and p.suffix != ".lock"
                                                             for p in path.rglob("*")))

        return [name for name in ID_KEYED if holds_a_file(self.root / name)]

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def live_ids(self) -> Path:
        """The live image ids, one per line: rewritten only when that set changes, so rules
        that describe the whole dataset rerun on additions, removals and edits, and only then."""
        return self.root / "manifest-live.txt"

    @property
    def live_labels(self) -> Path:
        """A digest of the live images' labels: rewritten only when a label changes, so rules
        whose outputs show or use labels rerun when the source relabels an image."""
        return self.root / "manifest-labels.sha256"

    @property
    def listing(self) -> Path:
        """What the image source held when last looked at (path, size, mtime digest): the
        workflow's manifest rule reruns when it changes, whatever `.snakemake/` remembers."""
        return self.root / "listing.sha256"

    def rule_settings(self, rule: str) -> Path:
        """What decides a workflow rule's outputs (see core.rule_settings): its time reruns
        the rule when the config changes them."""
        return self.root / "settings" / f"{rule}.json"

    def shard_files(self, shard: int) -> list[Path]:
        """Every file extract writes for a shard (of every layer): removed together when the
        shard must be extracted again (see `manifest.shards_to_redo`)."""
        layers = sorted(p for p in (self.root / "features").glob("*") if p.is_dir())
        return ([self.feature_part(layer.name, shard) for layer in layers]
                + [self.topk_candidates_part(layer, shard) for layer in self.topk_candidate_layers()]
                + [self.topk_sketch_part(layer, shard) for layer in self.topk_candidate_layers()]
                + [self.prediction_part(shard), self.error_part("extract", shard)])

    @property
    def history(self) -> Path:
        """One JSON line per workflow run: when, what changed, which jobs ran, how long."""
        return self.root / "history.jsonl"

    @property
    def errors_dir(self) -> Path:
        return self.root / "errors.parquet"

    def error_part(self, stage: str, shard: int) -> Path:
        return self.errors_dir / f"{stage}-{shard:05d}.parquet"

    def features_dir(self, layer: str) -> Path:
        return self.root / "features" / layer

    def feature_part(self, layer: str, shard: int) -> Path:
        return self.features_dir(layer) / f"part-{shard:05d}.parquet"

    def feature_part_template(self, layer: str) -> str:
        """The part path with `{shard}` (5 digits) left for Snakemake to fill."""
        return str(self.features_dir(layer) / "part-{shard}.parquet")

    def feature_parts(self, layer: str) -> list[Path]:
        """Finished parts of a layer, in shard order."""
        return sorted(self.features_dir(layer).glob("part-*.parquet"))

    @property
    def predictions_dir(self) -> Path:
        return self.root / "predictions"

    def prediction_part(self, shard: int) -> Path:
        """The model's top classes for a shard's images, written by extract."""
        return self.predictions_dir / f"part-{shard:05d}.parquet"

    def topk_candidates_part(self, layer: str, shard: int) -> Path:
        return self.root / "topk" / "candidates" / layer / f"part-{shard:05d}.parquet"

    def topk_candidates_template(self, layer: str) -> str:
        """The candidates path with `{shard}` left for Snakemake to fill."""
        return str(self.root / "topk" / "candidates" / layer / "part-{shard}.parquet")

    def topk_candidate_layers(self) -> list[str]:
        """Layers that have top-k candidate folders."""
        return sorted(p.name for p in (self.root / "topk" / "candidates").glob("*") if p.is_dir())

    def topk_candidate_parts(self, layer: str) -> list[Path]:
        return sorted((self.root / "topk" / "candidates" / layer).glob("part-*.parquet"))

    def topk_sketch_part(self, layer: str, shard: int) -> Path:
        """A shard's per-unit activation histograms (conv layers), written beside its candidates."""
        return self.root / "topk" / "candidates" / layer / f"sketch-{shard:05d}.parquet"

    def topk_sketch_parts(self, layer: str) -> list[Path]:
        return sorted((self.root / "topk" / "candidates" / layer).glob("sketch-*.parquet"))

    def topk_sketch(self, layer: str) -> Path:
        """The dataset's merged histograms and mask thresholds of a layer (`topk merge`)."""
        return self.root / "topk" / "sketches" / f"{layer}.parquet"

    def topk(self, layer: str) -> Path:
        return self.root / "topk" / f"{layer}.parquet"

    def topk_layers(self) -> list[str]:
        """Layers with a merged top-k table, sorted."""
        return sorted(p.stem for p in (self.root / "topk").glob("*.parquet"))

    def patches_dir(self, layer: str) -> Path:
        return self.root / "patches" / layer

    def unit_patches(self, layer: str, unit: int) -> Path:
        """The strip of one unit's top-k patches."""
        return self.patches_dir(layer) / f"unit-{unit:04d}.png"

    def patches_record(self, layer: str) -> Path:
        """What `topk render` drew: its options and each strip's rows (hidden: bookkeeping)."""
        return self.patches_dir(layer) / ".drawn.json"

    def read_patches_record(self, layer: str) -> dict:
        """The record a finished `topk render` wrote ({} if there is none or it cannot be read)."""
        return read_record(self.patches_record(layer))

    def drawn_strips(self, layer: str) -> dict[int, list[int]]:
        """unit -> the image ids, by rank, of the patch strip a finished `topk render` drew (in
        its record), for the strips that exist. A strip the record does not list is not vouched
        for: left by a render that was stopped before it wrote the record."""
        drawn = self.read_patches_record(layer).get("units", {})
        # a record row is [rank, image_id, x0, y0, x1, y1, value] (a mask threshold: [value]; a
        # strip with a grey patch: [GREY_PATCH])
        return {int(u): [row[1] for row in sorted(r for r in rows if len(r) > 1)]
                for u, rows in sorted(drawn.items(), key=lambda item: int(item[0]))
                if self.unit_patches(layer, int(u)).exists()}

    def greyed_strips(self, layer: str) -> list[int]:
        """Units whose patch strip holds a grey patch for an image that could not be read when
        it was drawn (the next `topk render` draws them again)."""
        drawn = self.read_patches_record(layer).get("units", {})
        return sorted(int(u) for u, rows in drawn.items() if [GREY_PATCH] in rows)

    def patch_sheet(self, layer: str) -> Path:
        return self.root / "patches" / f"{layer}.png"

    def embedding(self, layer: str) -> Path:
        return self.root / "embedding" / f"{layer}.parquet"

    def embedding_pca(self, layer: str) -> Path:
        """The PCA (mean, components) of a layer's map, so later images are placed into it."""
        return self.root / "embedding" / f"{layer}.pca.npz"

    def mosaic(self, layer: str, kind: str, suffix: str = "jpg") -> Path:
        """mosaic/<layer>-grid.jpg, -grid.parquet (cell -> image), -scatter.jpg, -plot.png."""
        return self.root / "mosaic" / f"{layer}-{kind}.{suffix}"

    def mosaic_unreadable(self, layer: str, kind: str) -> Path:
        """The images the last drawing of a mosaic (`grid` or `scatter`) could not read and left
        out (`record_unreadable`; hidden: bookkeeping)."""
        return self.root / "mosaic" / f".{layer}-{kind}.unreadable.json"

    def mosaic_layers(self) -> list[str]:
        """Layers with a grid mosaic (its cell table), sorted."""
        return sorted(p.name[: -len("-grid.parquet")] for p in (self.root / "mosaic").glob("*-grid.parquet"))

    @property
    def index_root(self) -> Path:
        return self.root / "index"

    def index_dir(self, layer: str) -> Path:
        """index.faiss, ids.parquet and meta.json of one layer (see `featscope.index`)."""
        return self.index_root / layer

    def index_meta(self, layer: str) -> Path:
        """Written last by an index build: its presence means the index is complete."""
        return self.index_dir(layer) / "meta.json"

    def index_stamp(self, layer: str) -> Path:
        """index/<layer>.built: written after each build or update of the layer's index. The
        workflow declares it as the rule's output, not the index's own files: Snakemake
        deletes a job's outputs before it runs, and an update needs the previous index."""
        return self.index_root / f"{layer}.built"

    def index_layers(self) -> list[str]:
        """Layers with a built index, sorted."""
        if not self.index_root.is_dir():
            return []
        return sorted(p.name for p in self.index_root.iterdir()
                      if not p.name.startswith(".") and (p / "meta.json").exists())  # .<layer>.*: versions

    @property
    def index_evaluation(self) -> Path:
        return self.index_root / "evaluation.json"

    @property
    def index_evaluation_lists(self) -> Path:
        """The evaluation's neighbour lists, kept so a rerun recomputes only those a change reaches."""
        return self.index_root / "evaluation-lists.json"

    def neighbour_sheet(self, layer: str) -> Path:
        return self.root / "neighbours" / f"{layer}.jpg"

    def neighbour_greys(self, layer: str) -> Path:
        """The images the last drawing of a neighbour sheet could not read, drawn as grey tiles
        (`record_unreadable`; hidden: bookkeeping)."""
        return self.root / "neighbours" / f".{layer}.grey.json"

    def greyed_neighbours(self, layer: str) -> list[int]:
        """The images a neighbour sheet drew grey, unreadable then (the workflow draws it again)."""
        return read_record(self.neighbour_greys(layer)).get("ids", [])

    def saliency_dir(self, method: str) -> Path:
        return self.root / "saliency" / method

    def saliency_unreadable(self, method: str) -> Path:
        """The selected images the last saliency run could not read (`record_unreadable`;
        hidden: bookkeeping; not in the summary, which Snakemake deletes before the job runs)."""
        return self.saliency_dir(method) / ".unreadable.json"

    def saliency_map(self, method: str, image_id: int) -> Path:
        """The map at the original image's size, float16, with its target and score (.npz)."""
        return self.saliency_dir(method) / f"{image_id}.npz"

    def saliency_overlay(self, method: str, image_id: int) -> Path:
        return self.saliency_dir(method) / f"{image_id}.png"

    def saliency_map_picture(self, method: str, image_id: int) -> Path:
        """The map on its own (grey, or diverging for signed maps), beside the overlay."""
        return self.saliency_dir(method) / f"{image_id}-map.png"

    def saliency_mask(self, method: str, image_id: int) -> Path:
        return self.saliency_dir(method) / f"{image_id}-mask.png"

    def saliency_curves(self, method: str, image_id: int) -> Path:
        """The map's deletion and insertion curves, and its baselines' (`saliency evaluate`)."""
        return self.saliency_dir(method) / f"{image_id}.curves.npz"

    def saliency_methods(self) -> list[str]:
        """Methods with a saliency folder, sorted (the Parquet datasets beside them are none)."""
        root = self.root / "saliency"
        return sorted(p.name for p in root.iterdir() if p.is_dir() and p.suffix != ".parquet") \
            if root.is_dir() else []

    def saliency_maps(self, method: str) -> dict[int, Path]:
        """image_id -> the .npz map of a method."""
        return {int(p.stem): p for p in self.saliency_dir(method).glob("*.npz") if p.stem.isdigit()}

    def saliency_overlays(self, method: str) -> dict[int, Path]:
        """image_id -> overlay PNG of a method."""
        return {int(p.stem): p for p in self.saliency_dir(method).glob("*.png") if p.stem.isdigit()}

    def saliency_options(self, method: str) -> Path:
        return self.saliency_dir(method) / "options.json"

    @property
    def saliency_summary_dir(self) -> Path:
        return self.root / "saliency" / "summary.parquet"

    def saliency_summary(self, method: str) -> Path:
        return self.saliency_summary_dir / f"{method}.parquet"

    @property
    def faithfulness_dir(self) -> Path:
        """Deletion/insertion AUCs: a directory dataset, one part per method."""
        return self.root / "saliency" / "faithfulness.parquet"

    def faithfulness(self, method: str) -> Path:
        return self.faithfulness_dir / f"{method}.parquet"

    @property
    def sanity_table(self) -> Path:
        """The model-randomisation test: one row per method, image and randomisation step."""
        return self.root / "saliency" / "sanity.parquet"

    @property
    def sanity_verdicts(self) -> Path:
        return self.root / "saliency" / "sanity.json"

    def sanity_plot(self, method: str) -> Path:
        return self.root / "saliency" / f"sanity-{method}.png"

    def units_dir(self, layer: str) -> Path:
        """Feature visualisations of a layer's units (`featscope units render`)."""
        return self.root / "units" / layer

    def unit_visualisation(self, layer: str, unit: int) -> Path:
        return self.units_dir(layer) / f"unit-{unit:04d}.png"

    def unit_variant(self, layer: str, unit: int, k: int) -> Path:
        """The k-th (from 1) of a unit's diverse visualisations (`units render --diversity`)."""
        return self.units_dir(layer) / f"unit-{unit:04d}-v{k}.png"

    def unit_variants(self, layer: str, unit: int) -> list[Path]:
        return sorted(self.units_dir(layer).glob(f"unit-{unit:04d}-v*.png"), key=lambda p: int(p.stem.split("-v")[1]))

    def units_sheet(self, layer: str) -> Path:
        return self.units_dir(layer) / "sheet.png"

    def units_labels(self, layer: str) -> Path:
        """unit, best label, its AUC and top-k purity, supported classes (`featscope units label`)."""
        return self.units_dir(layer) / "labels.parquet"

    def units_table(self, layer: str) -> Path:
        """unit, objective, activation on its visualisation, dataset top-1, ratio, rank."""
        return self.units_dir(layer) / "visualisations.parquet"

    def atlas_dir(self, layer: str) -> Path:
        """A layer's activation atlas (`featscope units atlas`)."""
        return self.units_dir(layer) / "atlas"

    def atlas_image(self, layer: str) -> Path:
        return self.atlas_dir(layer) / "atlas.png"

    def atlas_cell(self, layer: str, gy: int, gx: int) -> Path:
        return self.atlas_dir(layer) / f"cell-{gy:03d}-{gx:03d}.png"

    def atlas_table(self, layer: str) -> Path:
        """gy, gx, count, label, class, rendered, image_ids per occupied cell."""
        return self.atlas_dir(layer) / "cells.parquet"

    def atlas_samples(self, layer: str) -> Path:
        """Every sampled activation vector: image, position, 2-D layout, cell."""
        return self.atlas_dir(layer) / "samples.parquet"

    def explain_dir(self, layer: str) -> Path:
        """Why pairs of images match at a layer (`featscope explain`): <a>-<b>.npz and .png."""
        return self.root / "explain" / layer

    def explained_pair(self, layer: str, a: int, b: int, suffix: str = "png") -> Path:
        return self.explain_dir(layer) / f"{a}-{b}.{suffix}"

    def explained_queries(self, layer: str) -> Path:
        """The pairs the last `featscope explain --queries` wrote for a layer (JSON)."""
        return self.explain_dir(layer) / "queries.json"

    def explain_layers(self) -> list[str]:
        root = self.root / "explain"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    @property
    def viz_dir(self) -> Path:
        return self.root / "viz"

    def viz_filters(self, layer: str) -> Path:
        return self.viz_dir / "filters" / f"{layer}.png"

    def viz_activations(self, layer: str, image_id: int) -> Path:
        return self.viz_dir / "activations" / layer / f"{image_id}.png"

    @property
    def viz_class_models(self) -> Path:
        """The gallery (.png) and, beside it, the scores (.json)."""
        return self.viz_dir / "class-models.png"

    def viz_class_model(self, class_id: int) -> Path:
        return self.viz_dir / "class-models" / f"{class_id}.png"

    def viz_adversarial(self, image_id: int, target: str, suffix: str = "", ext: str = ".png") -> Path:
        """<image_id>-<target|untargeted><suffix><ext>: the panel, -adv.png, .json."""
        return self.viz_dir / "adversarial" / f"{image_id}-{target}{suffix}{ext}"

    def viz_dream(self, image_id: int) -> Path:
        return self.viz_dir / "dream" / f"{image_id}.png"

    def viz_inversion(self, image_id: int) -> Path:
        return self.viz_dir / "inversion" / f"{image_id}.png"

    def viz_texture(self, name: str) -> Path:
        return self.viz_dir / "texture" / f"{name}.png"

    def viz_style(self, content_id: int, style: str) -> Path:
        return self.viz_dir / "style" / f"{content_id}-{style}.png"

    def viz_style_switch(self, name: str) -> Path:
        """The fast network's strip for an image: each style alone, then mixes."""
        return self.viz_dir / "style" / f"switch-{name}.png"

    def viz_image(self, picture: Path) -> int | None:
        """The dataset image a toolbox picture shows, by its name (activations/<layer>/<id>,
        adversarial/<id>-<target>, dream/<id>, inversion/<id>, style/<id>-<style>), or None."""
        parts = picture.relative_to(self.viz_dir).with_suffix("").parts
        kind, name = parts[0], parts[-1]
        first = name.partition("-")[0]
        if kind == "activations" and name.isdigit() or kind in ("dream", "inversion") and name.isdigit():
            return int(name)
        if kind in ("adversarial", "style") and first.isdigit():
            return int(first)
        return None

    def viz_pictures(self) -> list[Path]:
        """The toolbox's pictures, sorted (the adversarial images themselves, `-adv.png`, too)."""
        return sorted(self.viz_dir.rglob("*.png")) if self.viz_dir.is_dir() else []

    @property
    def style_net_dir(self) -> Path:
        """The fast style network: net.pt (checkpoint), losses.csv, net.onnx."""
        return self.root / "style-net"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def live_script(self) -> Path:
        """The live images' stamp (`live_stamp`) and count as a script, which a report opened
        from disk loads (../manifest-live.js) to tell whether it still describes the run:
        browsers load scripts from file://, but fetch nothing."""
        return self.root / "manifest-live.js"

    @property
    def outputs_script(self) -> Path:
        """The stamp of every output the report shows, as a script beside `live_script`: a report
        opened from disk compares it with the stamp it was built from, to say which outputs
        changed since (the service asks `derived.report_behind` instead)."""
        return self.root / "outputs-live.js"

    def live_stamp(self) -> str:
        """A digest of the live ids and of their labels' digest ("" before a manifest)."""
        if not self.live_ids.exists():
            return ""
        digest = hashlib.sha256(self.live_ids.read_bytes())
        if self.live_labels.exists():
            digest.update(self.live_labels.read_bytes())
        return digest.hexdigest()[:16]

    @property
    def report_unreadable(self) -> Path:
        """The images the last report build could not read, shown as grey squares
        (`record_unreadable`; hidden: bookkeeping)."""
        return self.report_dir / ".unreadable.json"

    @property
    def thumbnails_dir(self) -> Path:
        return self.report_dir / "thumbs"

    def thumbnail(self, image_id: int) -> Path:
        """The report's thumbnail of an image: thumbs/<image_id // 1000>/<image_id>.jpg."""
        return self.thumbnails_dir / f"{image_id // THUMB_FOLDER:04d}" / f"{image_id}.jpg"

    def thumbnail_tiles(self, name: str) -> Path:
        """Square tiles cut from the thumbnails for one picture, kept for its next drawing."""
        return self.thumbnails_dir / f"tiles-{name}.npz"

    @property
    def timings_dir(self) -> Path:
        return self.root / "timings"

    def read_config(self) -> dict:
        if not self.run_json.exists():
            raise FeatscopeError(f"{self.root} is not a run: no run.json (run `featscope manifest` first)")
        return json.loads(self.run_json.read_text())

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.run_json, config)

    @contextmanager
    def editing_config(self) -> Iterator[dict]:
        """run.json (empty before the first manifest), read under a lock and written back if
        the block changed it. Jobs of one run record in it side by side: each extract job the
        model and the precision, a manifest update its next ids. A write from what was read
        before another job's write would drop that job's record (a second extract job that
        lost the first one's precision would record its own, and the run would mix them)."""
        with holding(self.root / ".run.json.lock"):
            before = json.loads(self.run_json.read_text()) if self.run_json.exists() else {}
            config = copy.deepcopy(before)
            yield config
            if config != before:
                write_json_atomic(self.run_json, config)


def read_record(path: Path) -> dict:
    """A stage's JSON bookkeeping record ({} if there is none or it cannot be read)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record_unreadable(path: Path, ids: list[int]) -> None:
    """Record at `path` the images a job just met and could not read ({"ids": ...,
    UNREADABLE_AT: now}), or that it met none: then the ids are cleared and the time kept
    (see UNREADABLE_AT). Nothing is written for a job that met none after one that met none."""
    before = read_record(path)
    if ids or before.get("ids"):
        met = time.time_ns() if ids else before.get(UNREADABLE_AT)
        write_json_atomic(path, {"ids": sorted(ids), UNREADABLE_AT: met})
