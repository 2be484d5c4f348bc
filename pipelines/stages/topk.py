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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError

if TYPE_CHECKING:
    import torch
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, write_json_atomic
from featscope.pipelines.core.images import BadImage, image_size, open_image
from featscope.pipelines.core.options import Command, Options, option, parse_units
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import RunIdentity, candidates_run_short, file_metadata, write_topk
from featscope.pipelines.core.text import plural


@dataclass
class MergeSummary:
    layer: str
    units: int
    k: int
    images: int
    seconds: float

    def line(self) -> str:
        return (f"topk merge {self.layer}: top-{self.k} of {self.units} units from {self.images} distinct images "
                f"in {self.seconds:.1f}s")


def merge(rd: RunDir, layer: str, *, k: int | None = None) -> MergeSummary:
    """Merge every shard's candidates of `layer` into topk/<layer>.parquet with boxes."""
    import torch  # here, not at the top: `topk render` runs without torch

    from featscope.kernels.topk import merge_topk

    start = time.perf_counter()
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
    write_topk(rd.topk(layer), columns, identity, layer=layer, k=k)
    return MergeSummary(layer, len(torch.unique(channel)), k, len(torch.unique(out["image_id"])),
                        time.perf_counter() - start)


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

    def line(self) -> str:
        fresh = f" ({self.drawn} drawn anew, the others unchanged)" if self.drawn not in (None, self.units) else ""
        return (f"topk render {self.layer}: {self.units} unit PNGs{fresh} from {self.images} images read once, "
                f"contact sheet {self.sheet}, {self.seconds:.1f}s")


def render(rd: RunDir, layer: str, *, units: list[int] | None = None, k: int | None = None, tile: int = 96,
           progress: bool = True) -> RenderSummary:
    """patches/<layer>/unit-NNNN.png per unit (k patches with their activation) and a contact sheet."""
    start = time.perf_counter()
    if not rd.topk(layer).exists():
        raise FeatscopeError(f"no top-k for layer '{layer}': run `featscope topk merge --run {rd.root} --layer {layer}`")
    table = pq.read_table(rd.topk(layer)).to_pylist()
    k = k or max(r["rank"] for r in table) + 1
    all_units = sorted({r["channel"] for r in table})
    available = set(all_units)
    units = [u for u in (units if units is not None else all_units) if u in available]
    if not units:
        raise FeatscopeError(f"none of the requested units is in topk/{layer}.parquet (units 0-{all_units[-1]})")
    drawn = _drawn(rd, layer, k, tile)
    rows_of = defaultdict(list)
    for r in table:
        if r["rank"] < k:
            rows_of[r["channel"]].append([r["rank"], r["image_id"], r["x0"], r["y0"], r["x1"], r["y1"],
                                          round(r["value"], 6)])
    signature = {unit: sorted(rows_of[unit]) for unit in units}
    kept = {u for u in units if drawn.get(str(u)) == signature[u] and rd.unit_patches(layer, u).exists()}
    chosen = set(units) - kept
    wanted = [r for r in table if r["channel"] in chosen and r["rank"] < k]
    by_image = defaultdict(list)
    for r in wanted:
        by_image[r["image_id"]].append(r)
    paths = {r["image_id"]: r["path"] for r in manifest.read(rd, include_removed=True).to_pylist()}
    patches: dict[tuple[int, int], Image.Image] = {}
    for image_id, rows in tqdm(by_image.items(), desc=f"patches {layer}", unit="img", disable=not progress):
        try:
            img = open_image(paths[image_id])
        except BadImage:
            img = None
        for r in rows:
            box = (r["x0"], r["y0"], r["x1"] + 1, r["y1"] + 1)
            patch = img.crop(box) if img is not None else Image.new("RGB", (tile, tile), (90, 90, 90))
            patches[(r["channel"], r["rank"])] = ImageOps.pad(patch, (tile, tile), color=(255, 255, 255))
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
    write_json_atomic(_drawn_path(rd, layer), {"k": k, "tile": tile, "units": {str(u): signature[u] for u in units}})
    sheet = _contact_sheet([strips[u] for u in units])
    with atomic_path(rd.patch_sheet(layer)) as tmp:
        sheet.save(tmp, format="PNG")
    return RenderSummary(layer, len(units), len(by_image), rd.patch_sheet(layer), time.perf_counter() - start,
                         len(units) - len(kept))


def _drawn_path(rd: RunDir, layer: str) -> Path:
    return rd.patches_dir(layer) / ".drawn.json"  # hidden: bookkeeping, not a picture


def _drawn(rd: RunDir, layer: str, k: int, tile: int) -> dict[str, list]:
    """unit -> the rows its strip was drawn from, when drawn with this k and tile size."""
    try:
        drawn = json.loads(_drawn_path(rd, layer).read_text())
    except (OSError, ValueError):
        return {}
    return drawn.get("units", {}) if (drawn.get("k"), drawn.get("tile")) == (k, tile) else {}


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
    k: int | None = option(help="keep the top k (default: what extraction kept)", min=1)


@dataclass(frozen=True)
class TopkRenderOptions(Options):
    layer: str = option(help="a merged layer", required=True)
    units: str | None = option(help="e.g. 0-63 or 3,7,10-12 (default: all)")
    k: int | None = option(help="patches per unit (default: all merged)", min=1)
    tile: int = option(96, help="patch size in the PNGs", min=8)


def _merge(rd: RunDir, options: TopkMergeOptions) -> MergeSummary:
    return merge(rd, options.layer, k=options.k)


def _render(rd: RunDir, options: TopkRenderOptions, progress: bool = True) -> RenderSummary:
    return render(rd, options.layer, units=parse_units(options.units), k=options.k, tile=options.tile,
                  progress=progress)


COMMANDS = [
    Command("topk merge", TopkMergeOptions, _merge,
            help="merge the shards' top-k candidates of a layer, with patch boxes",
            description="Needs `featscope extract --topk K`. Writes topk/<layer>.parquet: channel, rank, value, "
                        "image_id, cell (fy, fx) and the box in original-image pixels."),
    Command("topk render", TopkRenderOptions, _render, help="one PNG of top-k patches per unit, and a contact sheet"),
]
