"""Neighbour sheets: for each query image, its nearest images in feature space and, beneath
them, in pixel space — the seed's picture of why CNN features beat raw pixels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.spaces import PIXELS
from featscope.pipelines.core import derived, manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer
from featscope.pipelines.core.images import BadImage, open_image
from featscope.pipelines.core.neighbours import (
    image_rows,
    indexed_ids,
    neighbours_of,
    not_in_index,
    open_index,
    rewritten_note,
    unindexed_note,
)
from featscope.pipelines.core.options import Command, Options, option
from featscope.pipelines.core.rundir import RunDir, record_unreadable
from featscope.pipelines.core.text import plural
from featscope.pipelines.render.thumbnails import PLACEHOLDER

CAPTION = 14
MARGIN = 6
LEGEND = 120
GREY = PLACEHOLDER  # the report's grey for an image that cannot be read


def _tile(path: str, side: int) -> Image.Image | None:
    """The image as a square tile, or None where it cannot be read now (every image in an
    index was read once, at extraction, so this is a share away or a file being replaced)."""
    try:
        return ImageOps.fit(open_image(path, min_size=side), (side, side))
    except BadImage:
        return None


def live_queries(rd: RunDir, image_ids: list[int]) -> tuple[list[int], list[int]]:
    """(queries still in the dataset, queries retired since they were chosen); an id the run
    never had is an error, a retired one is left out so a scheduled run goes on."""
    table = manifest.read(rd, include_removed=True)
    removed = dict(zip(table["image_id"].to_pylist(), table["removed"].to_pylist()))
    for query in image_ids:
        if query not in removed:
            raise FeatscopeError(f"image_id {query} is not in run {rd.root}")
    present = {i for i, gone in removed.items() if not gone}
    live = [q for q in image_ids if q in present]
    if not live:
        raise FeatscopeError(f"every query image ({', '.join(map(str, image_ids))}) has left the dataset of "
                             f"run {rd.root}: choose others")
    return live, [q for q in image_ids if q not in present]


def render(rd: RunDir, layer: str, image_ids: list[int], *, k: int = 8, tile: int = 112,
           out: str | Path | None = None) -> Path:
    """Write a JPEG sheet: per query, a feature-space row and (if indexed) a pixel-space row.
    An image that cannot be read is a grey tile; the run's own sheet records those
    (`RunDir.neighbour_greys`), so status names them and the workflow draws it again."""
    if not image_ids:
        raise FeatscopeError("give at least one query image id")
    path = Path(out) if out else rd.neighbour_sheet(layer)
    own = path == rd.neighbour_sheet(layer)  # the run's own sheet: what status and the workflow read
    sources = derived.stamp(rd, derived.sheet_sources(rd, layer)) if own else []  # before they are read
    spaces = [(layer, open_index(rd, layer))]
    if layer != PIXELS and rd.index_meta(PIXELS).exists():
        spaces.append((PIXELS, open_index(rd, PIXELS)))
    rows = image_rows(rd)
    image_ids, _ = live_queries(rd, image_ids)
    for name, index in spaces:
        if missing := [q for q in image_ids if q not in index]:
            raise not_in_index(rd, name, missing[0])
    font = ImageFont.load_default(size=11)
    row_h = tile + CAPTION + MARGIN
    width = LEGEND + (k + 1) * (tile + MARGIN) + MARGIN
    sheet = Image.new("RGB", (width, MARGIN + len(image_ids) * (len(spaces) * row_h + MARGIN)), "white")
    draw = ImageDraw.Draw(sheet)
    greys: set[int] = set()

    def paste(image_id: int, x: int, y: int) -> None:
        tile_image = _tile(rows[image_id]["path"], tile)
        if tile_image is None:
            greys.add(image_id)
        sheet.paste(tile_image or Image.new("RGB", (tile, tile), GREY), (x, y))

    y = MARGIN
    for query in image_ids:
        for s, (name, index) in enumerate(spaces):
            found = neighbours_of(index, [query], k)
            neighbours = [(int(i), float(d)) for i, d in zip(found.image_ids[0], found.distances[0]) if i >= 0]
            draw.text((MARGIN, y + tile // 2 - 6), "pixel space" if name == PIXELS else f"{name} features",
                      fill="black", font=font)
            x = LEGEND
            if s == 0:
                paste(query, x, y)
                draw.rectangle((x - 2, y - 2, x + tile + 1, y + tile + 1), outline=(220, 40, 40), width=2)
                label = rows[query]["label"]
                draw.text((x, y + tile + 1), f"query {query}" + (f" ({label})" if label else ""), fill="black",
                          font=font)
            x += tile + MARGIN
            for image_id, distance in neighbours:
                paste(image_id, x, y)
                draw.text((x, y + tile + 1), f"{rows[image_id]['label'] or image_id} · d {distance:.2f}",
                          fill="black", font=font)
                x += tile + MARGIN
            y += row_h
        y += MARGIN
    if not own:
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="JPEG", quality=90)
        return path
    with one_writer(path.parent, f"neighbours {layer}"):  # the sheet and its records: one job's
        derived.forget(path)
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="JPEG", quality=90)
        record_unreadable(rd.neighbour_greys(layer), sorted(greys))
        derived.remember(path, sources)
    return path


# ---- the command ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NeighboursOptions(Options):
    layer: str = option(help="an indexed layer", required=True)
    ids: list[int] = option(help="comma-separated query image ids", required=True)
    k: int = option(8, help="neighbours per row", min=1, max=100)
    tile: int = option(112, help="tile size in pixels", min=8, max=512)
    out: Path | None = option(help="output JPEG (default: <run>/neighbours/<layer>.jpg)")


def run(rd: RunDir, options: NeighboursOptions) -> str:
    live, retired = live_queries(rd, options.ids)
    path = render(rd, options.layer, live, k=options.k, tile=options.tile, out=options.out)
    line = f"neighbours: sheet of {plural(len(live), 'query', 'queries')} x {options.k} neighbours at {path}"
    if path == rd.neighbour_sheet(options.layer) and (greys := rd.greyed_neighbours(options.layer)):
        line += (f"; {plural(len(greys), 'image')} could not be read now, grey (ids {', '.join(map(str, greys[:5]))}"
                 f"{', ...' if len(greys) > 5 else ''}; the next workflow run draws the sheet again)")
    if retired:
        line += f"; left out {plural(len(retired), 'query')} no longer in the dataset ({', '.join(map(str, retired))})"
    if again := rewritten_note(rd, options.layer, json.loads(rd.index_meta(options.layer).read_text())):
        line += f"; {again}"
    for space in dict.fromkeys((options.layer, PIXELS)):  # the sheet's rows
        if rd.index_meta(space).exists() and (lacking := unindexed_note(rd, space, indexed_ids(rd, space))):
            line += f"; {lacking}"
    return line


COMMANDS = [
    Command("neighbours", NeighboursOptions, run,
            help="a JPEG sheet of neighbours in feature space and pixel space"),
]
