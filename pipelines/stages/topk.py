"""Stages `topk merge` and `topk render`: each unit's top-k images and image patches.

The extraction pass leaves per-shard candidates (topk/candidates/<layer>/); `merge` takes
the global top-k per unit from them (same tie rule: the smaller image_id wins), maps each
conv unit's strongest cell to its receptive field and that box through the crop and resize
back to the original image, and writes topk/<layer>.parquet. `render` crops those boxes
(each image read once) into one PNG per unit and a contact sheet, as in Zeiler & Fergus.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError

if TYPE_CHECKING:
    import torch
from featscope.pipelines.core import derived, manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, withdraw, write_json_atomic
from featscope.pipelines.core.images import BadImage, image_size, open_image
from featscope.pipelines.core.options import Command, Options, option, parse_units
from featscope.pipelines.core.progress import progress_bar
from featscope.pipelines.core.rundir import GREY_PATCH, UNREADABLE_AT, RunDir
from featscope.pipelines.core.store import (
    TOPK_MAX,
    RunIdentity,
    candidates_run_short,
    file_metadata,
    write_table,
    write_topk,
)
from featscope.pipelines.core.text import plural

MASK_QUANTILE = 0.995  # NetDissect's: a unit's mask is where it is in its top 0.5% over the dataset


@dataclass
class MergeSummary:
    layer: str
    units: int
    k: int
    images: int
    seconds: float
    unsketched: list[int] = field(default_factory=list)  # live shards without a sketch: no thresholds

    def line(self) -> str:
        text = (f"topk merge {self.layer}: top-{self.k} of {self.units} units from {self.images} distinct images "
                f"in {self.seconds:.1f}s")
        if self.unsketched:
            text += (f"; no activation thresholds (masks): {plural(len(self.unsketched), 'shard')} "
                     f"({', '.join(map(str, self.unsketched[:5]))}) were extracted before featscope kept "
                     "sketches; extract them again for masks")
        return text


def merge(rd: RunDir, layer: str, *, k: int | None = None, quantile: float = MASK_QUANTILE) -> MergeSummary:
    """Merge every shard's candidates of `layer` into topk/<layer>.parquet with boxes."""
    import torch  # here, not at the top: `topk render` runs without torch

    from featscope.kernels.topk import merge_topk

    start = time.perf_counter()
    sources = derived.stamp(rd, derived.topk_sources(rd, layer))
    config = rd.read_config()
    identity = RunIdentity.of_run(config)
    parts = rd.topk_candidate_parts(layer)
    present = manifest.read(rd)
    shards = sorted(set(present["shard"].to_pylist()))
    have = {int(p.stem.split("-")[1]) for p in parts}
    if not parts or not set(shards) <= have:
        raise FeatscopeError(f"top-k candidates of layer '{layer}' are missing for {len(set(shards) - have)} shards: "
                             f"run `featscope extract --run {rd.root} --layers {layer} --topk K` first")
    shard_k = {int(file_metadata(p)["k"]) for p in parts}
    k = k or min(shard_k)
    if k > min(shard_k):
        raise FeatscopeError(f"the shards kept only the top {min(shard_k)} per unit; ask for at most that")
    tables, short = [], []
    for p in parts:
        meta = file_metadata(p)
        identity.check(p, meta)
        part = pq.read_table(p)
        if not pc.all(pc.is_finite(part["value"])).as_py():  # written before extract checked its values
            raise FeatscopeError(f"{p} holds top-k values that are NaN or inf: delete it and its shard's feature "
                                 f"parts, then run `featscope extract --run {rd.root} --layers {layer} --topk K` again "
                                 "(such images are recorded as errors now)")
        live = pc.is_in(part["image_id"], present["image_id"])
        ids = part["image_id"].to_numpy()
        if len(candidates_run_short(part["channel"].to_numpy(), ids, ids[~live.to_numpy(zero_copy_only=False)], k,
                                    int(meta.get("depth", meta["k"])))):
            short.append(int(meta.get("shard", p.stem.split("-")[1])))
        tables.append(part.filter(live))
    if short:  # the manifest re-extracts such shards; this guards runs it did not update
        raise FeatscopeError(f"the candidates of {plural(len(short), 'shard')} ({', '.join(map(str, short[:5]))}) lost "
                             f"too many retired images to give an exact top-{k}: rerun `featscope manifest`, "
                             "then extract them again")
    table = pa.concat_tables(tables)
    cols = {name: torch.from_numpy(table[name].to_numpy().copy()) for name in table.column_names}  # Arrow arrays are read-only
    keep = merge_topk(cols["channel"].long(), cols["value"], cols["image_id"], k)
    out = {name: col[keep] for name, col in cols.items()}
    channel = out["channel"].long()
    first = torch.searchsorted(channel, channel)
    out["rank"] = (torch.arange(len(channel)) - first).to(torch.int16)
    boxes = _boxes(rd, config, layer, out)
    columns = {name: t.numpy() for name, t in out.items()} | {n: boxes[:, i].numpy() for i, n in
                                                             enumerate(("x0", "y0", "x1", "y1"))}
    with one_writer(rd.topk(layer).parent, f"topk merge {layer}"):  # the table and its record: one job's pair
        derived.forget(rd.topk(layer))
        write_topk(rd.topk(layer), columns, identity, layer=layer, k=k)
        unsketched = merge_sketches(rd, layer, identity, present["image_id"].to_numpy(), shards, quantile)
        derived.remember(rd.topk(layer), sources)
    return MergeSummary(layer, len(torch.unique(channel)), k, len(torch.unique(out["image_id"])),
                        time.perf_counter() - start, unsketched)


SKETCH_SCHEMA = pa.schema([
    pa.field("channel", pa.int32()),
    pa.field("scale", pa.float64()),
    pa.field("counts", pa.list_(pa.int64())),
    pa.field("threshold", pa.float32()),  # the unit's `quantile` over every cell of every live image
    pa.field("low", pa.float32()),  # bounds on it, whatever values the retired images had
    pa.field("high", pa.float32()),
])


def merge_sketches(rd: RunDir, layer: str, identity: RunIdentity, live_ids, shards: list[int],
                   quantile: float) -> list[int]:
    """Sum the shards' activation histograms into topk/sketches/<layer>.parquet with each
    unit's mask threshold. Counts of images retired since extraction cannot be taken out
    (their values were not kept), so the threshold comes with the bounds they allow; the
    manifest re-extracts a shard before its retired share makes those wide. If a live shard
    has no sketch (extracted by an older featscope), no thresholds are written (a quantile
    of part of the dataset would pass for the whole's) and those shards are returned."""
    import numpy as np

    from featscope.pipelines.core.store import read_sketch  # imports torch: not at the top (see merge)

    parts = rd.topk_sketch_parts(layer)
    unsketched = sorted(set(shards) - {int(p.stem.split("-")[1]) for p in parts})
    if unsketched:
        rd.topk_sketch(layer).unlink(missing_ok=True)
        return unsketched
    merged, removed, counted = None, 0, 0
    for part in parts:
        sketch, meta = read_sketch(part)
        identity.check(part, meta)
        ids = np.asarray(json.loads(meta["image_ids"]), dtype=np.int64)
        gone = int((~np.isin(ids, live_ids)).sum())
        if gone == len(ids):
            continue  # a shard with no live image left
        removed += gone * int(meta["cells"])
        counted += len(ids) - gone
        merged = sketch if merged is None else merged.merge(sketch)
    if merged is None:
        return []
    threshold = merged.quantile(quantile)
    low, high = merged.bracket(quantile, removed)
    if removed == 0:
        low = high = threshold
    table = pa.table({"channel": pa.array(np.arange(len(merged.scale)), pa.int32()),
                      "scale": pa.array(merged.scale.numpy()),
                      "counts": pa.array(list(merged.counts.numpy()), pa.list_(pa.int64())),
                      "threshold": pa.array(threshold.float().numpy()),
                      "low": pa.array(low.float().numpy()), "high": pa.array(high.float().numpy())},
                     schema=SKETCH_SCHEMA)
    write_table(table, rd.topk_sketch(layer), {"quantile": str(quantile), "images": str(counted),
                                               "retired_values": str(removed), "layer": layer})
    return []


def read_thresholds(rd: RunDir, layer: str) -> dict[int, float] | None:
    """unit -> its mask threshold from topk merge, or None without a sketch."""
    path = rd.topk_sketch(layer)
    if not path.exists():
        return None
    table = pq.read_table(path, columns=["channel", "threshold"])
    return dict(zip(table["channel"].to_pylist(), table["threshold"].to_pylist()))


def _boxes(rd: RunDir, config: dict, layer: str, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boxes in original-image pixels: the receptive field of each conv cell; whole images for
    vector units (pooled grids such as `block13@2x2` included)."""
    import torch
    import torchvision

    from featscope.kernels.layers import resolve_layer
    from featscope.kernels.receptive_field import receptive_field
    from featscope.pipelines.core.models import Preprocessing

    with torch.device("meta"):
        skeleton = torchvision.models.get_model(config["model"], weights=None)
    spec = resolve_layer(config["model"], skeleton, layer)
    prep = Preprocessing.from_json(RunIdentity.of_run(config).preprocessing)
    rf = receptive_field(skeleton, spec.module_path)
    input_boxes = rf.box(out["fy"], out["fx"], prep.crop, prep.crop)
    paths = {r["image_id"]: r["path"] for r in manifest.read(rd).to_pylist()}
    boxes = torch.empty_like(input_boxes)
    for image_id in torch.unique(out["image_id"]).tolist():
        rows = out["image_id"] == image_id
        try:
            width, height = image_size(paths[image_id])
        except BadImage as e:
            raise FeatscopeError(f"{paths[image_id]} changed since extraction: {e}") from None
        if rf.is_global or spec.kind == "vector":
            boxes[rows] = torch.tensor([0, 0, width - 1, height - 1])
        else:
            boxes[rows] = prep.to_original(input_boxes[rows], width, height)
    return boxes


@dataclass
class RenderSummary:
    layer: str
    units: int
    images: int
    sheet: Path
    seconds: float
    drawn: int | None = None  # strips drawn anew (the others' top-k did not change)
    show: str = "field"

    def line(self) -> str:
        fresh = f" ({self.drawn} drawn anew, the others unchanged)" if self.drawn not in (None, self.units) else ""
        shown = "activation masks" if self.show == "mask" else "receptive fields"
        return (f"topk render {self.layer}: {self.units} unit PNGs of {shown}{fresh} from {self.images} images "
                f"read once, contact sheet {self.sheet}, {self.seconds:.1f}s")


SHOW = ("auto", "mask", "field")


def render(rd: RunDir, layer: str, *, units: list[int] | None = None, k: int | None = None, tile: int = 96,
           show: str = "auto", progress: bool = True) -> RenderSummary:
    """patches/<layer>/unit-NNNN.png per unit (k patches with their activation) and a contact
    sheet. `show`: `field` crops each image to the receptive field of the unit's strongest
    cell; `mask` to where the unit is above its dataset-wide threshold (NetDissect), drawn
    on the image; `auto`: the mask for conv layers whose field spans half the input or more."""
    start = time.perf_counter()
    if not rd.topk(layer).exists():
        raise FeatscopeError(f"no top-k for layer '{layer}': run `featscope topk merge --run {rd.root} --layer {layer}`")
    show = _resolve_show(rd, layer, show)
    table = pq.read_table(rd.topk(layer)).to_pylist()
    k = k or max(r["rank"] for r in table) + 1
    all_units = sorted({r["channel"] for r in table})
    available = set(all_units)
    units = [u for u in (units if units is not None else all_units) if u in available]
    if not units:
        raise FeatscopeError(f"none of the requested units is in topk/{layer}.parquet (units 0-{all_units[-1]})")
    with one_writer(rd.patches_dir(layer), f"topk render {layer}"):  # the record vouches for its strips
        record = rd.read_patches_record(layer)
        drawn = _drawn(record, k, tile, show)
        met_unreadable = record.get(UNREADABLE_AT)  # kept until a render greys again
        rows_of = defaultdict(list)
        for r in table:
            if r["rank"] < k:
                rows_of[r["channel"]].append([r["rank"], r["image_id"], r["x0"], r["y0"], r["x1"], r["y1"],
                                              round(r["value"], 6)])
        thresholds = (read_thresholds(rd, layer) or {}) if show == "mask" else {}
        # what a strip shows: its rows, and with masks the threshold they were cut at
        signature = {unit: sorted(rows_of[unit]) + ([[round(thresholds[unit], 6)]] if unit in thresholds else [])
                     for unit in available}
        current = {u for u in available if drawn.get(str(u)) == signature[u] and rd.unit_patches(layer, u).exists()}
        kept = current & set(units)
        chosen = set(units) - kept
        if chosen:  # the record and the sheet vouch for the strips: written again last
            withdraw(rd.patches_record(layer), rd.patch_sheet(layer))
        wanted = [r for r in table if r["channel"] in chosen and r["rank"] < k]
        by_image = defaultdict(list)
        for r in wanted:
            by_image[r["image_id"]].append(r)
        paths = {r["image_id"]: r["path"] for r in manifest.read(rd, include_removed=True).to_pylist()}
        masks = _UnitMasks(rd, layer) if show == "mask" else None
        patches: dict[tuple[int, int], Image.Image] = {}
        greyed: set[int] = set()  # units with a grey patch: an image that could not be read
        for image_id, rows in progress_bar(by_image.items(), desc=f"patches {layer}", unit="img",
                                           progress=progress):
            try:
                img = open_image(paths[image_id])
            except BadImage:
                img = None
                greyed.update(r["channel"] for r in rows)
            drawn_masks = (masks.patches(img, paths[image_id], [r["channel"] for r in rows], tile)
                           if masks and img else {})
            for r in rows:
                box = (r["x0"], r["y0"], r["x1"] + 1, r["y1"] + 1)
                patch = drawn_masks.get(r["channel"])
                if patch is None:  # the receptive field (also where a mask came out empty)
                    patch = img.crop(box) if img is not None else Image.new("RGB", (tile, tile), (90, 90, 90))
                    patch = ImageOps.pad(patch, (tile, tile), color=(255, 255, 255))
                patches[(r["channel"], r["rank"])] = patch
        values = {(r["channel"], r["rank"]): r["value"] for r in wanted}
        font = ImageFont.load_default(size=10)
        strips = {}
        for unit in units:
            if unit in kept:  # its top-k did not change since it was drawn
                with Image.open(rd.unit_patches(layer, unit)) as png:
                    strips[unit] = png.convert("RGB")
                continue
            strip = _strip(unit, k, tile, patches, values, font)
            strips[unit] = strip
            with atomic_path(rd.unit_patches(layer, unit)) as tmp:
                strip.save(tmp, format="PNG")
        # the strips drawn before of units not asked for this time stay listed while still current
        listed = sorted(set(units) | current)
        # a strip with a grey patch is recorded apart from its signature, so the next render draws it
        # again; UNREADABLE_AT: when a render last drew one (kept after)
        write_json_atomic(rd.patches_record(layer), {
            "k": k, "tile": tile, "show": show,
            "units": {str(u): signature[u] + ([[GREY_PATCH]] if u in greyed else []) for u in listed},
            UNREADABLE_AT: time.time_ns() if greyed else met_unreadable})
        sheet = _contact_sheet([strips[u] for u in units])
        with atomic_path(rd.patch_sheet(layer)) as tmp:
            sheet.save(tmp, format="PNG")
        return RenderSummary(layer, len(units), len(by_image), rd.patch_sheet(layer), time.perf_counter() - start,
                             len(units) - len(kept), show)


def _resolve_show(rd: RunDir, layer: str, show: str) -> str:
    """`auto` -> `mask` where it says more than the field (conv layers whose field spans half
    the input or more) and a sketch exists; `mask` without a sketch is an error."""
    if show not in SHOW:
        raise ParamError("show", f"must be one of {', '.join(SHOW)}; got '{show}'")
    if show == "field":
        return show
    has_sketch = rd.topk_sketch(layer).exists()
    if show == "mask":
        if not has_sketch:
            raise FeatscopeError(f"no activation thresholds for layer '{layer}': extract it with "
                                 f"`featscope extract --topk K`, then rerun `featscope topk merge --run {rd.root} "
                                 f"--layer {layer}`")
        if not _is_conv(rd, layer):
            raise ParamError("show", f"cannot be mask: layer '{layer}' has no spatial map to mask")
        return show
    return "mask" if has_sketch and _is_conv(rd, layer) and _field_fraction(rd, layer) >= 0.5 else "field"


def _skeleton(rd: RunDir, layer: str):
    import torch
    import torchvision

    from featscope.kernels.layers import resolve_layer

    config = rd.read_config()
    with torch.device("meta"):
        skeleton = torchvision.models.get_model(config["model"], weights=None)
    return skeleton, resolve_layer(config["model"], skeleton, layer), config


def _is_conv(rd: RunDir, layer: str) -> bool:
    """True for a layer with a spatial map per unit (not a vector, a pooled grid or a global field)."""
    from featscope.kernels.receptive_field import receptive_field

    skeleton, spec, _ = _skeleton(rd, layer)
    if spec.grid or spec.kind == "vector":
        return False
    return not receptive_field(skeleton, spec.module_path).is_global


def _field_fraction(rd: RunDir, layer: str) -> float:
    """The receptive field's side as a share of the model's input side."""
    from featscope.kernels.receptive_field import receptive_field
    from featscope.pipelines.core.models import Preprocessing

    skeleton, spec, config = _skeleton(rd, layer)
    rf = receptive_field(skeleton, spec.module_path)
    crop = Preprocessing.from_json(RunIdentity.of_run(config).preprocessing).crop
    return 1.0 if rf.is_global else min(rf.size) / crop


class _UnitMasks:
    """The run's model up to `layer`, and each unit's threshold: masks of units on images."""

    def __init__(self, rd: RunDir, layer: str):
        from featscope.pipelines.core.workers import model_ref, worker_model

        self.thresholds = read_thresholds(rd, layer) or {}
        self.loaded, self.device, _ = worker_model(model_ref(rd))
        self.module = self.loaded.module.get_submodule(self.loaded.layer(layer).module_path)

    def patches(self, image: Image.Image, path: str, units: list[int], tile: int) -> dict[int, Image.Image]:
        """unit -> the image's patch around that unit's mask (units whose mask is empty: absent)."""
        import torch

        from featscope.kernels.objectives import layer_outputs
        from featscope.pipelines.core.images import read_pixels
        from featscope.pipelines.render.unit_masks import input_masks, masked_patch, original_mask

        prep = self.loaded.preprocessing
        pixels = prep.to_uint8(read_pixels(path, min_size=prep.resize))[None]
        with torch.inference_mode():
            out = layer_outputs(self.loaded.module, prep.normalize(pixels.to(self.device)), [self.module])[0][0]
        chosen = torch.tensor(units)
        thresholds = torch.tensor([self.thresholds.get(u, float("inf")) for u in units])
        masks = input_masks(out[chosen].cpu(), thresholds, prep.crop).numpy()
        crop_box = prep.to_original(torch.tensor([[0, 0, prep.crop - 1, prep.crop - 1]]), image.width,
                                    image.height)[0].tolist()
        drawn = {}
        for unit, mask in zip(units, masks):
            patch = masked_patch(image, original_mask(mask, tuple(int(v) for v in crop_box), image.size), tile)
            if patch is not None:
                drawn[unit] = patch
        return drawn


def _drawn(record: dict, k: int, tile: int, show: str) -> dict[str, list]:
    """unit -> the rows its strip was drawn from (from the render's record), when drawn with
    this k, tile size and show."""
    return record.get("units", {}) if (record.get("k"), record.get("tile"), record.get("show")) == (k, tile, show) \
        else {}


LABEL_W, CAPTION_H, GAP = 56, 12, 2


def _strip(unit: int, k: int, tile: int, patches: dict, values: dict, font) -> Image.Image:
    """One unit: its number, then its k patches left to right with the activation under each."""
    strip = Image.new("RGB", (LABEL_W + k * (tile + GAP), tile + CAPTION_H), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((4, tile // 2 - 6), f"unit {unit}", fill="black", font=font)
    for rank in range(k):
        if (unit, rank) not in patches:
            continue
        x = LABEL_W + rank * (tile + GAP)
        strip.paste(patches[(unit, rank)], (x, 0))
        draw.text((x + 2, tile), f"{values[(unit, rank)]:.2f}", fill="black", font=font)
    return strip


SHEET_MAX_WIDTH = 2000


def sheet_columns(count: int, strip_width: int, strip_height: int, max_width: int = SHEET_MAX_WIDTH) -> int:
    """Columns of strips for a sheet about as tall as it is wide, never wider than max_width
    (unless one strip is)."""
    square = round(math.sqrt(count * strip_height / strip_width))
    return max(1, min(square, max_width // (strip_width + 8), count))


def _contact_sheet(strips: list[Image.Image]) -> Image.Image:
    w, h = strips[0].size
    columns = sheet_columns(len(strips), w, h + 4)
    rows = -(-len(strips) // columns)
    sheet = Image.new("RGB", (columns * (w + 8), rows * (h + 4)), "white")
    for i, strip in enumerate(strips):
        sheet.paste(strip, ((i % columns) * (w + 8), (i // columns) * (h + 4)))
    return sheet


# ---- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TopkMergeOptions(Options):
    layer: str = option(help="a layer extracted with --topk", required=True)
    k: int | None = option(help="keep the top k (default: what extraction kept)", min=1, max=TOPK_MAX)
    quantile: float = option(MASK_QUANTILE, help="each unit's mask threshold: this quantile of its activations "
                                                 "over the dataset (NetDissect: 0.995)", min=0, max=1)


@dataclass(frozen=True)
class TopkRenderOptions(Options):
    layer: str = option(help="a merged layer", required=True)
    units: str | None = option(help="e.g. 0-63 or 3,7,10-12 (default: all)")
    k: int | None = option(help="patches per unit (default: all merged)", min=1, max=TOPK_MAX)
    tile: int = option(96, help="patch size in the PNGs", min=8, max=512)
    show: str = option("auto", help="field: the receptive field of the strongest cell; mask: where the unit is in "
                                    "its dataset-wide top quantile (NetDissect), drawn on the image; auto: mask for "
                                    "conv layers whose field spans half the input or more", choices=SHOW)


def _merge(rd: RunDir, options: TopkMergeOptions) -> MergeSummary:
    return merge(rd, options.layer, k=options.k, quantile=options.quantile)


def _render(rd: RunDir, options: TopkRenderOptions, progress: bool = True) -> RenderSummary:
    return render(rd, options.layer, units=parse_units(options.units), k=options.k, tile=options.tile,
                  show=options.show, progress=progress)


COMMANDS = [
    Command("topk merge", TopkMergeOptions, _merge,
            help="merge the shards' top-k candidates of a layer, with patch boxes",
            description="Needs `featscope extract --topk K`. Writes topk/<layer>.parquet: channel, rank, value, "
                        "image_id, cell (fy, fx) and the box in original-image pixels."),
    Command("topk render", TopkRenderOptions, _render, help="one PNG of top-k patches per unit, and a contact sheet"),
]
