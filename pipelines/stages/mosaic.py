"""Stage `mosaic`: the images themselves drawn on a layer's 2-D map.

`grid`: every cell of a side x side grid holds one image, similar images in neighbouring
cells (cover sample + linear assignment, see grid_layout), plus a Parquet of
(cell_row, cell_col, image_id) so a browser can link tiles to images. `scatter`:
thumbnails at their t-SNE positions on a canvas sized to the number of images (see
scatter_layout). `plot`: the t-SNE and PCA maps as labelled scatter plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.core import derived, manifest
from featscope.pipelines.core.atomic import atomic_path, file_digest, one_writer
from featscope.pipelines.core.options import Command, Options, option, seed_option
from featscope.pipelines.core.rundir import RunDir, record_unreadable
from featscope.pipelines.core.store import read_embedding
from featscope.pipelines.core.text import plural
from featscope.pipelines.render.grid_layout import (
    assign,
    assign_exact,
    cell_centres,
    cover_sample,
    normalise,
    total_cost,
)
from featscope.pipelines.render.scatter_layout import fit
from featscope.pipelines.render.thumbnails import square_tiles

EXACT_RATIO_MAX_CELLS = 1024  # above this the exact optimum costs too long to report
MAX_TILE = 256  # thumbnails are stored at 128 px: a larger tile only enlarges them
MAX_CANVAS = 16_384  # a mosaic's side at most: 805 MB of RGB while it is drawn (a larger one ran out of memory)


@dataclass
class MosaicSummary:
    path: Path
    images: int
    seconds: float
    detail: str = ""

    def line(self) -> str:
        return f"mosaic: {self.images} images -> {self.path} ({self.detail}{self.seconds:.1f}s)"


def _number(text: str | None) -> str:
    """A metadata figure for a title: three decimals, or '-' where there is none."""
    try:
        return f"{float(text):.3f}"
    except (TypeError, ValueError):
        return "-"


def _save_jpeg(img: Image.Image, path: Path) -> str:
    """Write the picture; returns the sha256 of the bytes this call wrote (the file in place may
    already be another's: a job drawing the same mosaic at once)."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG", quality=88)
        digest = file_digest(tmp)
    return digest


def _positions(rd: RunDir, layer: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    table = read_embedding(rd, layer)
    paths = {r["image_id"]: r["path"] for r in manifest.read(rd).to_pylist()}
    ids = table["image_id"].to_numpy()
    keep = np.array([int(i) in paths for i in ids], dtype=bool)
    # y is negated so that images are drawn with the map's y axis pointing up, as in the plots
    xy = np.stack([table["tsne_x"].to_numpy(), -table["tsne_y"].to_numpy()], axis=1)[keep]
    return ids[keep], xy, paths


def grid(rd: RunDir, layer: str, *, side: int = 40, tile: int = 48, seed: int = 0,
         progress: bool = True) -> MosaicSummary:
    start = time.perf_counter()
    sources = derived.stamp(rd, derived.mosaic_sources(rd, layer, "grid"))
    ids, xy, paths = _positions(rd, layer)
    side = min(side, int(np.sqrt(len(ids))))
    if side < 1:
        raise FeatscopeError("no images to place")
    if side * tile > MAX_CANVAS:
        raise ParamError("side", f"<side> {side} x <tile> {tile} px is a {side * tile:,} px canvas; at most "
                                 f"{MAX_CANVAS:,}: lower one of them")
    chosen = cover_sample(xy, side * side, seed=seed)
    points = normalise(xy[chosen])
    cells = assign(points, side, side)
    cost = total_cost(points, cells, side, side)
    detail = f"{side}x{side} grid, assignment cost {cost:.2f}"
    if side * side <= EXACT_RATIO_MAX_CELLS:
        optimum = total_cost(points, assign_exact(points, cell_centres(side, side)), side, side)
        detail += f" ({cost / optimum:.3f} x the exact optimum)" if optimum else ""
    canvas = Image.new("RGB", (side * tile, side * tile), (255, 255, 255))
    tiles = square_tiles(rd, [(int(ids[c]), paths[int(ids[c])], tile) for c in chosen])
    unreadable = []  # left out: the workflow's next run draws the mosaic again (see rundir.UNREADABLE_AT)
    for i, thumb in enumerate(tqdm(tiles, desc=f"grid {layer}", unit="img", disable=not progress)):
        if thumb is None:
            unreadable.append(int(ids[chosen[i]]))
            continue
        row, col = divmod(int(cells[i]), side)
        canvas.paste(thumb, (col * tile, row * tile))
    rows, cols = np.divmod(cells, side)
    table = pa.table({"cell_row": pa.array(rows, pa.int32()), "cell_col": pa.array(cols, pa.int32()),
                      "image_id": pa.array(ids[chosen], pa.int64())})
    with one_writer(rd.root / "mosaic", f"mosaic grid {layer}"):  # the picture, then the table that describes it
        derived.forget(rd.mosaic(layer, "grid"))
        drawn = _save_jpeg(canvas, rd.mosaic(layer, "grid"))
        record_unreadable(rd.mosaic_unreadable(layer, "grid"), unreadable)
        meta = {"side": str(side), "tile": str(tile), "cost": str(cost),
                "grid_sha256": drawn}  # the picture this table describes
        with atomic_path(rd.mosaic(layer, "grid", "parquet")) as tmp:
            pq.write_table(table.replace_schema_metadata(meta), tmp)
        derived.remember(rd.mosaic(layer, "grid"), sources)
    return MosaicSummary(rd.mosaic(layer, "grid"), len(chosen), time.perf_counter() - start, detail + ", ")


def scatter(rd: RunDir, layer: str, *, size: int | None = None, tile: int | None = None, max_cover: float = 0.5,
            max_images: int = 60_000, seed: int = 0, progress: bool = True) -> MosaicSummary:
    """Thumbnails at their t-SNE positions (see scatter_layout: a covered spot moves a
    thumbnail nearby or halves it before it is skipped). Sizes left out are chosen so that at
    most 2% of the images are skipped; above `max_images` an even-cover sample is drawn."""
    start = time.perf_counter()
    sources = derived.stamp(rd, derived.mosaic_sources(rd, layer, "scatter"))
    ids, xy, paths = _positions(rd, layer)
    if not len(ids):
        raise FeatscopeError("no images to place")
    chosen = cover_sample(xy, max_images, seed=seed)
    chosen = chosen[np.random.default_rng(seed).permutation(len(chosen))]  # drawing order
    size, tile, layout = fit(normalise(xy[chosen]), size=size, tile=tile, max_cover=max_cover)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    pasted, unreadable = 0, []  # left out: the workflow's next run draws the mosaic again
    shown = np.flatnonzero(layout.side)
    tiles = square_tiles(rd, [(int(ids[chosen[i]]), paths[int(ids[chosen[i]])], int(layout.side[i])) for i in shown],
                         keep_as=f"scatter-{layer}")
    for i, thumb in zip(tqdm(shown, desc=f"scatter {layer}", unit="img", disable=not progress), tiles):
        if thumb is None:
            unreadable.append(int(ids[chosen[i]]))
            continue
        canvas.paste(thumb, (int(layout.x[i]), int(layout.y[i])))
        pasted += 1
    with one_writer(rd.root / "mosaic", f"mosaic scatter {layer}"):  # the picture and its records: one job's
        derived.forget(rd.mosaic(layer, "scatter"))
        _save_jpeg(canvas, rd.mosaic(layer, "scatter"))
        record_unreadable(rd.mosaic_unreadable(layer, "scatter"), unreadable)
        derived.remember(rd.mosaic(layer, "scatter"), sources)
    left_out = [f"{layout.skipped} ({layout.skipped / len(chosen):.1%}) skipped as hidden"]
    if len(chosen) < len(ids):
        left_out.append(f"{len(ids) - len(chosen)} left out of the sample of {len(chosen)}")
    if unreadable:
        left_out.append(f"{len(unreadable)} unreadable")
    return MosaicSummary(rd.mosaic(layer, "scatter"), pasted, time.perf_counter() - start,
                         f"{size} px canvas, {tile} px thumbnails; {', '.join(left_out)}; ")


def plot(rd: RunDir, layer: str) -> MosaicSummary:
    """t-SNE and PCA maps side by side, coloured by label, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    path = rd.mosaic(layer, "plot", "png")
    sources = derived.stamp(rd, derived.mosaic_sources(rd, layer, "plot"))
    table = read_embedding(rd, layer)
    labels_by_id = {r["image_id"]: r["label"] for r in manifest.read(rd).to_pylist()}
    labels = np.array([str(labels_by_id.get(int(i))) for i in table["image_id"].to_numpy()])
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
    names = sorted(set(labels))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    marker = float(np.clip(20 * (150 / max(len(labels), 1)) ** 0.5, 1, 20))  # 20 at 150 points, 3.5 at 5,000
    for ax, (x, y, title) in zip(axes, (("tsne_x", "tsne_y", "t-SNE"), ("pca_x", "pca_y", "PCA"))):
        for n, name in enumerate(names):
            mask = labels == name
            ax.scatter(table[x].to_numpy()[mask], table[y].to_numpy()[mask], s=marker, color=colours(n % 20),
                       label=name if name != "None" else "(no label)")
        ax.set_title(f"{title} of {layer}")
        ax.set_xticks([]), ax.set_yticks([])
    axes[1].legend(markerscale=max(1.0, 12 / marker), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{rd.name}: {plural(len(labels), 'image')}; trustworthiness {_number(meta.get('trustworthiness'))}, "
                 f"10-NN label accuracy in 2-D {_number(meta.get('knn_accuracy_2d'))}")
    fig.tight_layout()
    with one_writer(rd.root / "mosaic", f"mosaic plot {layer}"):  # the picture and its record: one job's
        derived.forget(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        derived.remember(path, sources)
    plt.close(fig)
    return MosaicSummary(path, len(labels), time.perf_counter() - start)


# ---- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GridOptions(Options):
    layer: str = option(help="an embedded layer", required=True)
    side: int = option(40, help="cells per side", min=1)
    tile: int = option(48, help="thumbnail size", min=8, max=MAX_TILE)
    seed: int = seed_option(0, help="seed of the cover sample")


@dataclass(frozen=True)
class ScatterOptions(Options):
    layer: str = option(help="an embedded layer", required=True)
    size: int | None = option(help="canvas side in pixels (default: grows until at most 2% of the images are "
                                   "hidden, up to 8192)", min=64, max=MAX_CANVAS)
    tile: int | None = option(help="thumbnail side (default: 96 px at 150 images, 40 at 5,000, 22 at 50,000)",
                              min=8, max=MAX_TILE)
    seed: int = seed_option(0, help="seed of the sample and the drawing order")


@dataclass(frozen=True)
class PlotOptions(Options):
    layer: str = option(help="an embedded layer", required=True)


def _grid(rd: RunDir, options: GridOptions, progress: bool = True) -> MosaicSummary:
    return grid(rd, options.layer, side=options.side, tile=options.tile, seed=options.seed, progress=progress)


def _scatter(rd: RunDir, options: ScatterOptions, progress: bool = True) -> MosaicSummary:
    return scatter(rd, options.layer, size=options.size, tile=options.tile, seed=options.seed, progress=progress)


def _plot(rd: RunDir, options: PlotOptions) -> MosaicSummary:
    return plot(rd, options.layer)


@dataclass(frozen=True)
class AllOptions(Options):
    layer: str = option(help="an embedded layer", required=True)
    side: int = option(40, help="grid cells per side", min=1)
    tile: int = option(48, help="grid thumbnail size", min=8, max=MAX_TILE)
    seed: int = seed_option(0, help="seed of the samples and the scatter's drawing order")


def _all(rd: RunDir, options: AllOptions, progress: bool = True) -> str:
    """The three pictures in one process (the workflow's mosaic job: one start-up, not three)."""
    return "\n".join(summary.line() for summary in (
        grid(rd, options.layer, side=options.side, tile=options.tile, seed=options.seed, progress=progress),
        scatter(rd, options.layer, seed=options.seed, progress=progress),
        plot(rd, options.layer)))


COMMANDS = [
    Command("mosaic grid", GridOptions, _grid, help="every cell of a grid filled with an image, neighbours alike"),
    Command("mosaic scatter", ScatterOptions, _scatter, help="thumbnails at their t-SNE positions on a large canvas"),
    Command("mosaic plot", PlotOptions, _plot, help="t-SNE and PCA scatter plots coloured by label"),
    Command("mosaic all", AllOptions, _all, help="the grid, the scatter mosaic and the plots, in one process"),
]
