"""The static report: one folder of HTML that opens from disk and shows what a run holds.

`build(rd)` writes runs/<name>/report/: the pages (one shell, report_assets/page.html,
rendered by report_assets/report.js), small JPEG thumbnails made once per image
(report/thumbs/, lazy-loaded by the pages), and the data as JavaScript files loaded with
<script> tags (browsers refuse fetch() from file://):

  data/run.js             summary, bad inputs, stage timings, run history, layers, mosaics, toolbox
  data/topk-<layer>.js    each unit's top-k images and values
  data/images-NNNN.js     per 1,000 images: label, path name, the model's top classes, neighbours
                          per space, saliency methods
  data/mosaic-<layer>.js  the grid mosaic's cell -> image_id table, for click-through
  data/atlas-<layer>.js   the activation atlas's cells: counts, labels, classes, images
  pictures/               the run's pictures the pages show, kept as they were (report_pictures)

Pages read only what they show (an image page loads one 1,000-image shard), so a report of
100k images opens as fast as one of 100. Stages a run did not produce are left out.

A build computes all the pages show before it writes any of it (thumbnails aside), so that
it can refuse, leaving the report before whole, where a table it read changed meanwhile.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from featscope.index import recall_shortfall
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.spaces import PIXELS
from featscope.pipelines.app.report_lists import neighbour_lists, save_state
from featscope.pipelines.app.report_pictures import KeptPictures
from featscope.pipelines.core import derived, manifest
from featscope.pipelines.core.atomic import (
    atomic_path,
    file_digest,
    one_writer,
    reading,
    withdraw,
    write_bytes_atomic,
)
from featscope.pipelines.core.history import read_history
from featscope.pipelines.core.options import Command, Options, option
from featscope.pipelines.core.progress import progress_bar
from featscope.pipelines.core.rundir import THUMB_FOLDER, RunDir, record_unreadable
from featscope.pipelines.core.store import read_errors, read_predictions
from featscope.pipelines.core.text import listed, plural
from featscope.pipelines.core.timings import read_timings
from featscope.pipelines.core.trust import (
    BASELINES,
    CURVES,
    current_evaluation,
    current_strips,
    current_unit_table,
    read_sanity,
)
from featscope.pipelines.render.overlay import map_picture
from featscope.pipelines.render.thumbnails import ensure_thumbnail, is_grey, stored_thumbnails

ASSETS = Path(__file__).resolve().parent / "report_assets"
SHARD = THUMB_FOLDER  # images per data file, as per thumbnail folder (the pages compute both)
PAGES = ("index", "image", "layer", "unit", "trust", "atlas")


@dataclass
class ReportSummary:
    path: Path
    images: int
    thumbnails_made: int
    seconds: float
    chunks_written: int = 0
    chunks: int = 0
    lists_recomputed: dict[str, int] = field(default_factory=dict)  # space -> neighbour lists computed afresh
    stale: list[str] = field(default_factory=list)  # outputs made from earlier ones: a notice stands for them

    def line(self) -> str:
        lists = ", ".join(f"{n} {space}" for space, n in self.lists_recomputed.items())
        return (f"report: {self.path} ({self.images} images, {self.thumbnails_made} new thumbnails, "
                f"neighbour lists recomputed: {lists or 'none'}, "
                f"{self.chunks_written} of {self.chunks} image data files changed) in "
                f"{self.seconds:.1f}s; open it in a browser, or `featscope serve --run {self.path.parent.parent}`"
                + (f"; made from earlier outputs, so shown with a notice: {', '.join(self.stale)} (`featscope "
                   "status` says what makes them again)" if self.stale else ""))


def _drop_retired(rd: RunDir, live: set[int], thumbnails: set[int]) -> None:
    """Delete thumbnails (of `thumbnails`, the stored ones) and per-image data files that only
    hold images no longer in the dataset: the report must not show an image that was removed
    or replaced."""
    for image_id in thumbnails - live:
        rd.thumbnail(image_id).unlink(missing_ok=True)
        rd.thumbnail(image_id).with_suffix(".unreadable").unlink(missing_ok=True)
    shards = {i // SHARD for i in live}
    for path in (rd.report_dir / "data").glob("images-*.js"):
        number = path.stem.removeprefix("images-")
        if number.isdigit() and int(number) not in shards:
            path.unlink()


Scripts = dict[str, tuple[str, object]]  # data file name -> (the window variable it sets, its value)


def _script(path: Path, variable: str, value: object) -> bool:
    """A data file the pages load with <script src>: it adds `value` to window[variable].
    Left untouched when its bytes would not change (a rerun rewrites only changed chunks);
    returns whether it was written."""
    body = json.dumps(value, separators=(",", ":"))
    data = f"window.{variable} = Object.assign(window.{variable} || {{}}, {body});\n".encode()
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    write_bytes_atomic(path, data)
    return True


def _saliency(rd: RunDir, pictures: KeptPictures) -> dict[int, list[str]]:
    """image_id -> its methods with overlays (and both pictures kept); the map-alone picture
    of each is made here where an older saliency run did not write one."""
    methods: dict[int, list[str]] = {}
    for method in rd.saliency_methods():
        for image_id, overlay in rd.saliency_overlays(method).items():
            if not rd.saliency_map_picture(method, image_id).exists() and rd.saliency_map(method, image_id).exists():
                with np.load(rd.saliency_map(method, image_id)) as stored:
                    heat = stored["saliency"].astype(np.float32)
                with atomic_path(rd.saliency_map_picture(method, image_id)) as tmp:
                    map_picture(heat, diverging=bool((heat < 0).any()), title=method).save(tmp, format="PNG")
            methods.setdefault(image_id, []).append(method)
            pictures.keep(overlay)
            if rd.saliency_map_picture(method, image_id).exists():
                pictures.keep(rd.saliency_map_picture(method, image_id))
    return methods


def _aucs(rd: RunDir) -> tuple[dict[int, dict], dict]:
    """Per image, each method's current [deletion, insertion] AUCs and its baselines'; and per
    method, the means with 95% confidence intervals (Student's t over images) of the method,
    the baselines and the paired differences method - random."""
    per_image: dict[int, dict] = {}
    summary = {}
    for method in rd.saliency_methods():
        rows = current_evaluation(rd, method)
        if not rows:
            continue
        for image_id, r in rows.items():
            per_image.setdefault(image_id, {})[method] = [round(r[f"{p}{c}_auc"], 4) for p in ("", "random_", "centre_")
                                                          for c in CURVES]
        columns = {name: np.array([r[f"{name}_auc"] for r in rows.values()], dtype=np.float64)
                   for name in ("deletion", "insertion", *(f"{b}_{c}" for b in BASELINES for c in CURVES))}
        for c in CURVES:
            columns[f"{c}_minus_random"] = columns[c] - columns[f"random_{c}"]
        summary[method] = {"images": len(rows)} | {name: _mean_interval(v) for name, v in columns.items()}
    return per_image, summary


def _mean_interval(values: np.ndarray) -> list[float]:
    """[mean, low, high]: the mean and its 95% confidence interval (Student's t)."""
    from scipy.stats import t

    mean = float(values.mean())
    if len(values) < 2:
        return [round(mean, 4)] * 3
    half = float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return [round(mean, 4), round(mean - half, 4), round(mean + half, 4)]


def _sanity(rd: RunDir, verdicts: dict[str, dict], pictures: KeptPictures) -> dict:
    return {m: v | {"plot": pictures.keep(rd.sanity_plot(m))} for m, v in verdicts.items()
            if rd.sanity_plot(m).exists()}


def _explained(rd: RunDir, live: set[int], pictures: KeptPictures) -> tuple[dict[int, dict], list[str], list[str]]:
    """image_id -> {layer: [[neighbour, similarity, method], ...]} of the pairs `featscope
    explain --queries` wrote (the pictures the image pages show from disk), leaving out
    neighbours that left the dataset since (until explain runs again on the new index); then
    the layers shown, and the layers left out because their pairs were chosen by an earlier
    index (their neighbours are no longer the query's, their stored similarities perhaps not
    the stored vectors')."""
    found: dict[int, dict] = {}
    layers, stale = [], []
    for layer in rd.explain_layers():
        path = rd.explained_queries(layer)
        if not path.exists():
            continue
        if not derived.current(rd, path, derived.explain_sources(rd, layer)):
            stale.append(layer)
            continue
        layers.append(layer)
        for query, pairs in json.loads(path.read_text())["pairs"].items():
            kept = [p for p in pairs if p[0] in live and rd.explained_pair(layer, int(query), p[0]).exists()]
            for p in kept:
                pictures.keep(rd.explained_pair(layer, int(query), p[0]))
            found.setdefault(int(query), {})[layer] = kept
    return found, layers, stale


def _layers(rd: RunDir, pictures: KeptPictures, scripts: Scripts) -> list[dict]:
    """Layers with merged top-k: units, k, and which units have patch PNGs (kept) and
    visualisations; each one's units' top-k and histograms go to data/topk-<layer>.js."""
    layers = []
    for layer in rd.topk_layers():
        table = pq.read_table(rd.topk(layer), columns=["channel", "rank", "value", "image_id"])
        channels = table["channel"].to_numpy()
        units: dict[int, list] = {}
        for c, v, i in zip(channels, table["value"].to_numpy(), table["image_id"].to_numpy()):
            units.setdefault(int(c), []).append([int(i), round(float(v), 4)])
        # a strip drawn from another top-k (the dataset changed since) shows other images than
        # the unit's page lists: only strips of the current top-k are shown
        rendered, _ = current_strips(rd, layer)
        for unit in rendered:
            pictures.keep(rd.unit_patches(layer, unit))
        stale = None if derived.current(rd, rd.topk(layer), derived.topk_sources(rd, layer)) else (
            f"This top-k was merged before the dataset or a shard's candidates last changed: it may show images "
            f"retired since and miss stronger ones. The workflow's next run merges it again (or `featscope topk merge "
            f"--run {rd.root} --layer {layer}`, then `featscope report`).")
        layers.append({"name": layer, "stale": stale, "units": int(channels.max()) + 1 if len(channels) else 0,
                       "k": max((len(v) for v in units.values()), default=0), "rendered": rendered,
                       "shown": _patches_show(rd, layer), "visualised": _visualised(rd, layer, pictures),
                       "labels": _unit_labels(rd, layer), "atlas": current_unit_table(
                           rd, rd.atlas_table(layer), layer) is not None and rd.atlas_image(layer).exists()})
        scripts[f"topk-{layer}.js"] = ("FS_TOPK", {layer: units, f"{layer}:histograms": _histograms(rd, layer)})
    return layers


def _patches_show(rd: RunDir, layer: str) -> str | None:
    """What the patch strips show: "mask" (NetDissect's activation masks) or "field"."""
    drawn = rd.read_patches_record(layer)
    return drawn.get("show", "field") if drawn else None


def _histograms(rd: RunDir, layer: str, bins: int = 48) -> dict[int, list] | None:
    """unit -> [low, high, counts over `bins` equal bins from low to high, mask threshold]:
    each unit's activations over the whole dataset, from the sketch `topk merge` wrote,
    trimmed to the range its values span."""
    path = rd.topk_sketch(layer)
    if not path.exists():
        return None
    table = pq.read_table(path)
    counts = np.stack(table["counts"].to_numpy(zero_copy_only=False))
    out = {}
    for unit, scale, row, threshold in zip(table["channel"].to_pylist(), table["scale"].to_pylist(), counts,
                                           table["threshold"].to_pylist()):
        filled = np.flatnonzero(row)
        if not len(filled):
            continue
        edges = np.linspace(-scale, scale, len(row) + 1)
        lo, hi = filled[0], filled[-1] + 1
        groups = np.array_split(row[lo:hi], min(bins, hi - lo))
        out[unit] = [round(float(edges[lo]), 5), round(float(edges[hi]), 5), [int(g.sum()) for g in groups],
                     None if threshold is None else round(float(threshold), 5)]
    return out


def _atlases(rd: RunDir, pictures: KeptPictures, scripts: Scripts) -> list[dict]:
    """Layers with a current activation atlas; each one's cells go to data/atlas-<layer>.js,
    their pictures are kept."""
    found = []
    for path in sorted((rd.root / "units").glob("*/atlas/cells.parquet")):
        layer = path.parent.parent.name
        cells = current_unit_table(rd, path, layer)
        if cells is None or not rd.atlas_image(layer).exists():
            continue
        for cell in (rd.atlas_cell(layer, c["gy"], c["gx"]) for c in cells if c["rendered"]):
            if cell.exists():  # (one deleted by hand shows as a broken picture; verify names it)
                pictures.keep(cell)
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
        grid = int(meta.get("grid", 0))
        scripts[f"atlas-{layer}.js"] = ("FS_ATLAS", {"layer": layer, "grid": grid, "cells": [
            [c["gy"], c["gx"], c["count"], c["label"], c["label_share"], c["class"], c["class_share"], c["rendered"],
             c["image_ids"][:60]] for c in cells]})
        found.append({"layer": layer, "grid": grid, "layout": meta.get("layout"), "images": meta.get("images"),
                      "cells": len(cells), "rendered": sum(c["rendered"] for c in cells)})
    return found


def _visualised(rd: RunDir, layer: str, pictures: KeptPictures) -> dict[int, list]:
    """unit -> [activation on its visualisation, dataset top-1, rank, diverse variants] where `units render`
    drew it (and its PNG is there, kept with its variants), from a table made on the dataset as it is now."""
    found = {}
    for r in current_unit_table(rd, rd.units_table(layer), layer) or []:
        if rd.unit_visualisation(layer, r["unit"]).exists():
            variants = rd.unit_variants(layer, r["unit"])
            for picture in (rd.unit_visualisation(layer, r["unit"]), *variants):
                pictures.keep(picture)
            found[r["unit"]] = [round(r["activation"], 4), None if r["top1"] is None else round(r["top1"], 4),
                                r["rank"], len(variants)]
    return found


def _unit_labels(rd: RunDir, layer: str) -> dict[int, list]:
    """unit -> [best label, its AUC, top-k purity, supported classes] where `units label` ran
    on the dataset as it is now (an older table's labels are not shown)."""
    rows = current_unit_table(rd, rd.units_labels(layer), layer)
    return {r["unit"]: [r["label"], round(r["auc"], 3), None if r["purity"] is None else round(r["purity"], 3),
                        r["classes"], r.get("classes_from")] for r in rows or []}


def _evaluation(rd: RunDir) -> dict | None:
    """precision@k per space (`index evaluate`), or {"stale": why} where it was measured on an
    earlier index or other labels: its figures are not shown then."""
    if not rd.index_evaluation.exists():
        return None
    measured = json.loads(rd.index_evaluation.read_text())
    if derived.evaluation_current(rd, measured):
        return measured
    return {"stale": "precision@k was measured on an earlier index or other labels, so it is not shown: the "
                     f"workflow's next run measures it again (or `featscope index evaluate --run {rd.root}`, then "
                     "`featscope report`)."}


def _mosaics(rd: RunDir, live: np.ndarray, featured: np.ndarray, pictures: KeptPictures,
             scripts: Scripts) -> list[dict]:
    """The grid mosaics with their cell tables (data/mosaic-<layer>.js), a notice in place of one drawn from an earlier
    map or from a map made before the dataset last changed (its tiles would open pages of
    retired images), and the scatter and plot where they are current."""
    mosaics = []
    for layer in rd.mosaic_layers():
        table = pq.read_table(rd.mosaic(layer, "grid", "parquet"))
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        picture = rd.mosaic(layer, "grid")
        if "grid_sha256" in meta and (not picture.exists() or file_digest(picture) != meta["grid_sha256"]):
            raise FeatscopeError(f"{picture} is not the picture {rd.mosaic(layer, 'grid', 'parquet').name} describes "
                                 f"(a mosaic run stopped between its two files?): rerun `featscope mosaic grid --run "
                                 f"{rd.root} --layer {layer}`")
        if not derived.current(rd, picture, derived.mosaic_sources(rd, layer, "grid")):
            # drawn from an earlier map: it shows images retired since and not those added
            mosaics.append({"layer": layer, "stale": f"The grid mosaic of {layer} was drawn from an earlier map, "
                                                     "so it is not shown: the workflow's next run draws it again "
                                                     f"(or `featscope mosaic all --run {rd.root} --layer {layer}`, "
                                                     "then `featscope report`)."})
            continue
        if any(behind := derived.map_behind(rd, layer, live, featured)):
            mosaics.append({"layer": layer, "stale": f"The grid mosaic of {layer} was drawn from a map made before the "
                                                     f"dataset last changed ({plural(behind[0], 'retired image')} in "
                                                     f"it, {plural(behind[1], 'live image')} missing), so it is not "
                                                     "shown: the workflow's next run draws it again (or `featscope "
                                                     f"embed --run {rd.root} --layer {layer}` and `featscope mosaic "
                                                     "all`, then `featscope report`)."})
            continue
        side = int(meta.get("side", 0))
        grid = [[-1] * side for _ in range(side)]
        for r, c, i in zip(table["cell_row"].to_pylist(), table["cell_col"].to_pylist(), table["image_id"].to_pylist()):
            grid[r][c] = i
        scripts[f"mosaic-{layer}.js"] = ("FS_MOSAIC", {layer: grid})
        entry = {"layer": layer, "side": side, "grid": pictures.keep(picture)}
        for kind, suffix in (("scatter", "jpg"), ("plot", "png")):
            if derived.current(rd, rd.mosaic(layer, kind, suffix), derived.mosaic_sources(rd, layer, kind)):
                entry[kind] = pictures.keep(rd.mosaic(layer, kind, suffix))
        mosaics.append(entry)
    return mosaics


TOOLBOX = {  # folder (or file stem) under viz/ -> heading, in the order the gallery shows them
    "filters": "Filters", "activations": "Activations", "class-models": "Class models",
    "adversarial": "Adversarial examples", "dream": "DeepDream", "inversion": "Feature inversion",
    "texture": "Texture synthesis", "style": "Style transfer",
}


def _toolbox_item(rd: RunDir, path: Path, pictures: KeptPictures) -> dict:
    """A gallery picture: its link (kept), its caption in words, and the image it shows (if one)."""
    parts = path.relative_to(rd.viz_dir).with_suffix("").parts
    kind, name = parts[0], parts[-1]
    item = {"src": pictures.keep(path), "caption": name}
    first, _, rest = name.partition("-")
    image = rd.viz_image(path)
    if image is not None:
        item["image"] = image
    if kind == "activations" and image is not None:
        item["caption"] = f"layer {parts[1]}, image {name}"
    elif kind == "filters":
        item["caption"] = f"layer {name}"
    elif kind == "adversarial" and image is not None:
        item["caption"] = f"image {first}, " + ("untargeted" if rest == "untargeted" else f"target class {rest}")
    elif kind in ("dream", "inversion") and image is not None:
        item["caption"] = f"image {name}"
    elif kind == "style" and first == "switch":
        item["caption"] = f"style switching and mixing: {rest}" + (
            " (drawn from an earlier training of the network: `featscope style strip` draws it again)"
            if derived.changed(rd, path, [rd.style_net_dir / "net.pt"]) else "")
    elif kind == "style" and image is not None:
        item["caption"] = f"image {first} in the style of {rest}"
    elif kind == "class-models":
        item["caption"] = ""
    return item


def _toolbox(rd: RunDir, live: set[int], pictures: KeptPictures) -> list[dict]:
    """The toolbox pictures grouped under TOOLBOX headings (single-class models and the bare
    adversarial images are left out: the galleries show them; so are pictures of images that
    left the dataset since they were drawn, which status names)."""
    groups: dict[str, list[dict]] = {}
    for path in rd.viz_pictures():
        kind = path.relative_to(rd.viz_dir).with_suffix("").parts[0]
        if path.name.endswith("-adv.png") or path.parent.name == "class-models":
            continue
        image = rd.viz_image(path)
        if image is None or image in live:
            groups.setdefault(kind, []).append(_toolbox_item(rd, path, pictures))
    order = list(TOOLBOX)
    return [{"heading": TOOLBOX.get(kind, kind), "items": items}
            for kind, items in sorted(groups.items(), key=lambda g: order.index(g[0]) if g[0] in order else 99)]


def _predictions(rd: RunDir, config: dict, top: int = 3) -> dict[int, list]:
    """image_id -> [[class name, probability], ...] of the model's top classes (from extract)."""
    predicted = read_predictions(rd)
    if not predicted:
        return {}
    names = config.get("class_names") or config.get("categories")  # recorded by extract
    if not names and config.get("weights") == "imagenet":  # extracted before categories were recorded
        from featscope.pipelines.core.models import class_names  # torchvision's list: imported only here

        names = class_names(config.get("model"), config.get("weights"))
    name = (lambda c: names[c] if names and c < len(names) else f"class {c}")
    return {i: [[name(c), round(p, 3)] for c, p in found[:top]] for i, found in predicted.items()}


def build(rd: RunDir, *, k: int = 8, threads: int = 4, progress: bool = True) -> ReportSummary:
    """Write (or refresh) runs/<name>/report/ from whatever stages the run has. Two builds of
    one run at once (the workflow's and one by hand, overlapping cluster jobs) take turns: each
    would remove the pictures the other keeps, and write its data files over the other's."""
    with one_writer(rd.report_dir, "report"):
        built = _build(rd, k=k, threads=threads, progress=progress)
    derived.write_outputs_script(rd)
    return built


def _build(rd: RunDir, *, k: int, threads: int, progress: bool) -> ReportSummary:
    start = time.perf_counter()
    sources = derived.stamp(rd, derived.report_sources(rd))  # before they are read: see derived
    config = rd.read_config()
    table = manifest.read(rd)
    rows = table.to_pylist()
    if not rows:
        raise FeatscopeError(f"run {rd.root} has no images")
    out = rd.report_dir
    stored, grey = stored_thumbnails(rd)
    missing = [r for r in rows if r["image_id"] not in stored or r["image_id"] in grey]  # grey: read again
    with ThreadPoolExecutor(threads) as pool:
        made = sum(progress_bar(pool.map(lambda r: ensure_thumbnail(rd, r["image_id"], r["path"]), missing),
                                total=len(missing), desc="thumbnails", unit="img", progress=progress))
    # grey squares of images that could not be read: status names them, the workflow builds again
    record_unreadable(rd.report_unreadable, [r["image_id"] for r in missing if is_grey(rd, r["image_id"])])
    ids = np.array([r["image_id"] for r in rows], dtype=np.int64)
    neighbours, recomputed, lists_state, absent = neighbour_lists(rd, ids, k, progress)
    featureless = manifest.featureless(rd)  # images no index or map can hold: extraction failed on them
    # an index that lacks images added since it was built (it holds none retired: open_index
    # refuses those) gives them no list, and may leave a nearer one out of every other list
    lacking = {layer: set(np.setdiff1d(missing, featureless).tolist()) for layer, missing in absent.items()}
    unindexed = {layer: len(missing) for layer, missing in lacking.items() if missing}
    # what the pages show is computed first, without writing: the pictures to keep, the data files
    pictures, scripts = KeptPictures(rd), {}
    saliency = _saliency(rd, pictures)
    aucs, trust = _aucs(rd)
    explained, explained_layers, explained_stale = _explained(rd, set(ids.tolist()), pictures)
    verdicts = read_sanity(rd)
    sanity_stale = None if derived.sanity_current(rd, verdicts) else (
        "These verdicts were reached on maps made again since (for other images or with other options): the "
        "workflow's next run checks them again (or `featscope saliency sanity`, then `featscope report`).")
    predictions = _predictions(rd, config)
    by_chunk: dict[int, dict[int, dict]] = {}
    for r in rows:
        i = r["image_id"]
        by_chunk.setdefault(i // SHARD, {})[i] = {
            "label": r["label"], "name": posixpath.basename(r["path"]), "shard": r["shard"],
            "neighbours": {space: found[i] for space, found in neighbours.items() if i in found},
            "saliency": saliency.get(i, []), "prediction": predictions.get(i)}
        if i in aucs:
            by_chunk[i // SHARD][i]["auc"] = aucs[i]
        if i in explained:
            by_chunk[i // SHARD][i]["explained"] = explained[i]
        if missing_from := [space for space in unindexed if i in lacking[space]]:
            by_chunk[i // SHARD][i]["unindexed"] = missing_from  # added since the index was built
    scripts |= {f"images-{chunk:04d}.js": ("FS_IMAGES", entries) for chunk, entries in sorted(by_chunk.items())}
    errors = read_errors(rd.errors_dir)
    errors = errors.filter(pc.or_kleene(pc.is_null(errors["image_id"]), pc.is_in(errors["image_id"], pa.array(ids))))
    labels = table["label"].to_pylist()
    summary = {
        "name": rd.name, "built": time.strftime("%Y-%m-%d %H:%M:%S %z"),  # what it shows is as of then
        "images": len(rows), "labels": len({x for x in labels if x is not None}),
        "dataset": config.get("images"), "model": config.get("model"), "weights": config.get("weights"),
        "weights_sha256": config.get("weights_sha256"), "featscope_version": config.get("featscope_version"),
        "layers": sorted({p.name for p in (rd.root / "features").iterdir()}) if (rd.root / "features").is_dir() else [],
        "spaces": list(neighbours), "pixels": PIXELS, "shard": SHARD, "k": k, "live_stamp": rd.live_stamp(),
        "sources": sources,  # what a page opened from disk compares with outputs-live.js
        "space_warnings": {layer: f"the '{layer}' index's {said}" for layer in neighbours
                           if (said := recall_shortfall(json.loads(rd.index_meta(layer).read_text())))},
        "unindexed": unindexed,
        "bad_inputs": errors.num_rows,
        "errors": errors.slice(0, 200).to_pylist(),
        "timings": read_timings(rd),
        "history": read_history(rd)[-50:],
        "topk": _layers(rd, pictures, scripts), "atlases": _atlases(rd, pictures, scripts),
        "mosaics": _mosaics(rd, ids, np.setdiff1d(ids, featureless), pictures, scripts),
        "toolbox": _toolbox(rd, set(ids.tolist()), pictures),
        "saliency_methods": sorted({m for ms in saliency.values() for m in ms}),
        "trust": {"faithfulness": trust, "sanity": _sanity(rd, verdicts, pictures), "sanity_stale": sanity_stale}
        if trust or rd.sanity_verdicts.exists() else None,
        "explained_layers": explained_layers, "explained_stale": explained_stale,
        "evaluation": _evaluation(rd),
    }
    # then written, while no stage rewrites a set of pictures kept, and only if nothing read
    # changed since it was stamped: a table rewritten meanwhile would not be the one its
    # pictures are kept with (a refusal leaves the report before as it was)
    with reading(pictures.folders(), "report"):
        if moved := derived.since(rd, sources, derived.report_sources(rd)):
            raise FeatscopeError(f"{listed(moved)} changed while the report was built: run `featscope report` again")
        # run.js (the summary every page starts from) vouches for the rest: withdrawn first and
        # written again last, so the pages of a build stopped half way say so instead of
        # mixing two builds
        withdraw(out / "data" / "run.js")
        derived.forget(out / "data" / "run.js")
        written = _write(rd, scripts, pictures)
        _drop_retired(rd, set(ids.tolist()), stored)
        save_state(rd, lists_state)
        _script(out / "data" / "run.js", "FS_RUN", summary)
        derived.remember(out / "data" / "run.js", sources)
    stale = ([f"neighbours {layer}" for layer in unindexed]
             + [f"top-k {layer['name']}" for layer in summary["topk"] if layer["stale"]]
             + [f"mosaic {m['layer']}" for m in summary["mosaics"] if "stale" in m]
             + (["precision@k"] if (summary["evaluation"] or {}).get("stale") else [])
             + (["sanity verdicts"] if (summary["trust"] or {}).get("sanity_stale") else [])
             + [f"explained pairs {layer}" for layer in explained_stale])
    return ReportSummary(out / "index.html", len(rows), made, time.perf_counter() - start, written, len(by_chunk),
                         recomputed, stale)


def _write(rd: RunDir, scripts: Scripts, pictures: KeptPictures) -> int:
    """The pages, the data files and the kept pictures; returns how many image data files
    changed (a rerun rewrites only those)."""
    out = rd.report_dir
    out.mkdir(parents=True, exist_ok=True)
    for asset in ("report.js", "report.css"):  # registered, so verify finds one damaged since
        write_bytes_atomic(out / asset, (ASSETS / asset).read_bytes())
    shell = (ASSETS / "page.html").read_text()
    for page in PAGES:  # every page is the same shell; report.js renders it by name
        write_bytes_atomic(out / f"{page}.html", shell.replace("{page}", page).encode())
    changed = [name for name, (variable, value) in scripts.items() if _script(out / "data" / name, variable, value)]
    for old in (out / "data").glob("atlas-*"):  # cell copies of builds from before pictures/ was kept
        if old.is_dir():
            shutil.rmtree(old)
    for old in (out / "data").glob("mosaic-*-grid.jpg"):
        old.unlink()
    pictures.write()  # the pictures the data were computed with, kept beside them
    return sum(name.startswith("images-") for name in changed)


# ---- the command ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ReportOptions(Options):
    k: int = option(8, help="neighbours shown per image and space", min=1, max=100)


def run(rd: RunDir, options: ReportOptions, progress: bool = True) -> ReportSummary:
    return build(rd, k=options.k, progress=progress)


COMMANDS = [
    Command("report", ReportOptions, run, records_timing=False,
            help="a static HTML report of a run (open report/index.html from disk)",
            description="Summary, bad inputs, stage timings, unit galleries with top-k patches, clickable t-SNE "
                        "mosaics, per-image neighbours and saliency, the toolbox gallery. Thumbnails are made once "
                        "and lazy-loaded."),
]
