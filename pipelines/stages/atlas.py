"""A layer's activation atlas (Carter et al. 2019, "Activation Atlas"): `featscope units atlas`.

A unit's page shows one direction of a layer; the atlas shows the space the layer's
activations actually fill. The recipe, as in the paper:

1. sample spatial activation vectors over the dataset: a seeded sample of images, and at
   most `--per-image` random positions of each (one per image for a vector layer);
2. lay them out in 2-D. The paper uses UMAP; here openTSNE (cosine distance), already the
   project's t-SNE for the feature maps, so no new dependency (umap-learn pulls numba). The
   atlas only bins the layout, and t-SNE keeps the local neighbourhoods that binning needs;
3. bin the layout into a `--grid` x `--grid` grid and average the vectors of each cell;
4. render each cell holding at least `--min-count` vectors with the direction objective
   (Lucid's recipe, `kernels.render.feature_visualisations`), all cells in batches.

Per cell it records its count, the most common label and model class of the images whose
activations landed there (with their shares) and those images, so the report can link a
cell to its examples. Outputs go to units/<layer>/atlas/.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.objectives import layer_outputs
from featscope.kernels.render import feature_visualisations
from featscope.kernels.transforms import PixelModel
from featscope.kernels.unit_objectives import directions
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, withdraw
from featscope.pipelines.core.device import (
    render_dtype,
    render_precision,
    render_precision_option,
    slow_render_precision,
)
from featscope.pipelines.core.images import BadImage, read_pixels
from featscope.pipelines.core.lanes import chunks_of, lane_plan, map_in_lanes
from featscope.pipelines.core.options import Command, Options, option, seed_option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import read_predictions, write_table
from featscope.pipelines.core.text import plural
from featscope.pipelines.core.trust import dataset_stamp
from featscope.pipelines.core.workers import model_ref, visualisation_layer, worker_model
from featscope.pipelines.render.grid_layout import normalise
from featscope.pipelines.render.panels import to_image

CELLS = pa.schema([
    pa.field("gy", pa.int32()), pa.field("gx", pa.int32()),  # the cell, row and column
    pa.field("count", pa.int32()),  # activation vectors that landed in it
    pa.field("label", pa.string()), pa.field("label_share", pa.float32()),  # most common label of their images
    pa.field("class", pa.string()), pa.field("class_share", pa.float32()),  # most common top-1 class
    pa.field("rendered", pa.bool_()),  # count >= min_count: its mean direction was rendered
    pa.field("image_ids", pa.list_(pa.int64())),  # the images, most vectors first
])
SAMPLES = pa.schema([
    pa.field("image_id", pa.int64()), pa.field("y", pa.int16()), pa.field("x", pa.int16()),  # position in the map
    pa.field("px", pa.float32()), pa.field("py", pa.float32()),  # the 2-D layout, each axis in [0, 1]
    pa.field("gy", pa.int32()), pa.field("gx", pa.int32()),
])


@dataclass(frozen=True)
class AtlasOptions(Options):
    layer: str = option(help="a conv layer (or a vector layer: one vector per image), e.g. block13", required=True)
    grid: int = option(20, help="cells per side of the atlas", min=2, max=100)
    images: int = option(2000, help="images sampled from the dataset (seeded)", min=2)
    per_image: int = option(3, help="random positions sampled per image (conv layers)", min=1)
    min_count: int = option(3, help="cells with fewer vectors are left empty (too few to average)", min=1)
    size: int = option(64, help="side of each cell's rendering in pixels", min=16, max=512)
    steps: int = option(128, help="optimisation steps per cell rendering", min=1)
    batch: int = option(16, help="cells rendered together", min=1, max=1024)
    model_size: int | None = option(help="side the renderings are shown to the model at while optimised (default: "
                                         "its input size; half of it renders 4x faster)", min=16, max=1024)
    lr: float = option(0.05, help="Adam's learning rate on the image's spectrum", min=0)
    perplexity: float = option(30.0, help="t-SNE perplexity (smaller with few vectors)", min=1)
    seed: int = seed_option(0, help="seed of the image and position sample, the layout and the renderings")
    precision: str = render_precision_option()
    device: str = option("auto", help="where the model runs", choices=("auto", "cpu", "cuda"))


@dataclass
class AtlasSummary:
    layer: str
    vectors: int
    images: int
    cells: int
    rendered: int
    seconds: float
    slow: str = ""  # why its precision ran slowly here (`slow_render_precision`), or ""

    def warning(self) -> str:
        return self.slow

    def line(self) -> str:
        return (f"units atlas {self.layer}: {plural(self.vectors, 'activation vector')} from "
                f"{plural(self.images, 'image')} laid out by t-SNE into {plural(self.cells, 'cell')}, "
                f"{self.rendered} rendered, in {self.seconds:.1f}s -> units/{self.layer}/atlas/")


def sample_activations(loaded, module: torch.nn.Module, device: torch.device, rows: list[dict], per_image: int,
                       seed: int, batch: int = 32, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) activation vectors and (N, 3) int (image_id, y, x): `per_image` distinct random
    positions of each image's map, drawn from (seed, image_id) so a vector does not depend
    on which other images were sampled. Unreadable images are skipped."""
    prep = loaded.preprocessing
    vectors, where = [], []
    for first in tqdm(range(0, len(rows), batch), desc="atlas sample", unit="batch", disable=not progress):
        chunk, pixels = [], []
        for r in rows[first:first + batch]:
            try:
                pixels.append(prep.to_uint8(read_pixels(r["path"], min_size=prep.resize)))
                chunk.append(r["image_id"])
            except BadImage:
                continue
        if not chunk:
            continue
        with torch.inference_mode():
            out = layer_outputs(loaded.module, prep.normalize(torch.stack(pixels).to(device)), [module])[0].float()
        out = out if out.ndim == 4 else out.flatten(1)[:, :, None, None]
        _, c, h, w = out.shape
        for b, image_id in enumerate(chunk):
            rng = np.random.default_rng([seed, image_id])
            cells = rng.choice(h * w, size=min(per_image, h * w), replace=False)
            ys, xs = cells // w, cells % w
            vectors.append(out[b, :, ys, xs].T.cpu().numpy())
            where += [(image_id, int(y), int(x)) for y, x in zip(ys, xs)]
    if not vectors:
        raise FeatscopeError("no image of the sample could be read")
    return np.concatenate(vectors), np.asarray(where, dtype=np.int64)


def layout(vectors: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """(N, 2) in [0, 1]: openTSNE of the vectors by cosine distance."""
    from openTSNE import TSNE

    perplexity = min(perplexity, max(1.0, (len(vectors) - 1) / 3))
    tsne = TSNE(perplexity=perplexity, metric="cosine", random_state=seed, n_jobs=-1,
                negative_gradient_method="fft" if len(vectors) >= 1000 else "bh")
    return normalise(np.asarray(tsne.fit(vectors.astype(np.float32))))


def bin_cells(points: np.ndarray, grid: int) -> np.ndarray:
    """(N, 2) layout in [0, 1] -> (N, 2) int (gy, gx) cells of a grid x grid binning."""
    cells = np.minimum((points * grid).astype(np.int64), grid - 1)
    return np.stack([cells[:, 1], cells[:, 0]], axis=1)


def cell_table(cells: np.ndarray, where: np.ndarray, label_of: dict[int, str | None],
               class_of: dict[int, str], min_count: int) -> list[dict]:
    """One row per occupied cell: count, most common label and class (with shares), images."""
    rows = []
    keys = cells[:, 0] * 100_000 + cells[:, 1]
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        ids = where[members, 0].tolist()
        labels = Counter(label_of.get(i) for i in ids if label_of.get(i) is not None)
        classes = Counter(class_of[i] for i in ids if i in class_of)
        label, label_n = labels.most_common(1)[0] if labels else (None, 0)
        cls, class_n = classes.most_common(1)[0] if classes else (None, 0)
        rows.append({"gy": int(key // 100_000), "gx": int(key % 100_000), "count": len(members),
                     "label": label, "label_share": label_n / len(members) if label else None,
                     "class": cls, "class_share": class_n / len(members) if cls else None,
                     "rendered": len(members) >= min_count,
                     "image_ids": [i for i, _ in Counter(ids).most_common()]})
    return rows


def atlas(rd: RunDir, options: AtlasOptions, progress: bool = True) -> AtlasSummary:
    start = time.perf_counter()
    loaded, device, categories = worker_model(model_ref(rd, options.device))
    options = replace(options, precision=render_precision(options.precision, device))  # as its tables record it
    spec = loaded.layer(options.layer)
    if spec.kind == "pixels" or spec.grid:
        raise FeatscopeError(f"layer '{options.layer}' has no activation vectors to map: give a conv or vector layer")
    module = loaded.module.get_submodule(spec.module_path)
    featureless = set(manifest.featureless(rd).tolist())  # no slot of the sample for an image extract could not read
    live = [r for r in manifest.read(rd).select(["image_id", "path", "label"]).to_pylist()
            if r["image_id"] not in featureless]
    if len(live) < 2:
        raise FeatscopeError(f"an atlas needs at least 2 images; run {rd.root} has {len(live)}")
    rng = np.random.default_rng(options.seed)
    chosen = sorted(rng.choice(len(live), size=min(options.images, len(live)), replace=False).tolist())
    rows = [live[i] for i in chosen]
    vectors, where = sample_activations(loaded, module, device, rows, options.per_image, options.seed,
                                        progress=progress)
    if len(vectors) < 4:
        raise FeatscopeError(f"only {len(vectors)} activation vectors: sample more images or positions")
    points = layout(vectors, options.perplexity, options.seed)
    cells = bin_cells(points, options.grid)
    name = (lambda c: categories[c] if categories and c < len(categories) else str(c))
    class_of = {i: name(p[0][0]) for i, p in read_predictions(rd).items() if p}
    table = cell_table(cells, where, {r["image_id"]: r["label"] for r in live}, class_of, options.min_count)
    to_render = [r for r in table if r["rendered"]]
    keys = cells[:, 0] * 100_000 + cells[:, 1]
    means = torch.stack([torch.from_numpy(vectors[keys == r["gy"] * 100_000 + r["gx"]].mean(0)) for r in to_render]) \
        if to_render else torch.zeros(0)
    pictures = _render(loaded, spec, device, means, to_render, options, progress)
    with one_writer(rd.atlas_dir(options.layer), f"units atlas {options.layer}"):  # its tables vouch for its cells
        # the tables and the picture of the atlas before are written again last
        withdraw(rd.atlas_table(options.layer), rd.atlas_samples(options.layer), rd.atlas_image(options.layer))
        for stale in rd.atlas_dir(options.layer).glob("cell-*.png"):
            stale.unlink()
        for r, picture in zip(to_render, pictures):
            with atomic_path(rd.atlas_cell(options.layer, r["gy"], r["gx"])) as tmp:
                picture.save(tmp, format="PNG")
        _mosaic(rd, options, to_render, pictures)
        meta = {"layer": options.layer, "grid": str(options.grid), "layout": "openTSNE (cosine)",
                "images": str(len(rows)), "per_image": str(options.per_image), "seed": str(options.seed),
                "precision": options.precision,
                "dataset": dataset_stamp(rd, options.layer, labels=True)}
        write_table(pa.Table.from_pylist(
            [{"image_id": int(i), "y": int(y), "x": int(x), "px": float(p[0]), "py": float(p[1]), "gy": int(c[0]),
              "gx": int(c[1])} for (i, y, x), p, c in zip(where, points, cells)], schema=SAMPLES),
            rd.atlas_samples(options.layer), meta)
        write_table(pa.Table.from_pylist(table, schema=CELLS), rd.atlas_table(options.layer), meta)
        return AtlasSummary(options.layer, len(vectors), len(set(where[:, 0].tolist())), len(table), len(to_render),
                            time.perf_counter() - start, slow_render_precision(options.precision, device))


def _render(loaded, spec, device: torch.device, means: torch.Tensor, cells: list[dict], options: AtlasOptions,
            progress: bool) -> list[Image.Image]:
    """Each cell's mean activation vector rendered with the direction objective, in batches
    split over the CPU's lanes (`pipelines.core.lanes`)."""
    model_size = options.model_size or loaded.preprocessing.crop
    lanes, threads, size = lane_plan(len(cells), options.batch, device)

    def render_chunk(lane: tuple[PixelModel, torch.nn.Module], rows: list[int]) -> torch.Tensor:
        model, module = lane
        seeds = [options.seed * 1_000_003 + cells[i]["gy"] * options.grid + cells[i]["gx"] for i in rows]
        images, _ = feature_visualisations(model, directions(module, means[rows].to(device)), seeds, size=options.size,
                                           steps=options.steps, lr=options.lr, seed=options.seed, model_size=model_size,
                                           dtype=render_dtype(options.precision, device))
        return images

    pictures = []
    with tqdm(total=len(cells), unit="cell", desc=f"atlas {options.layer}", disable=not progress) as bar:
        for images in map_in_lanes(render_chunk, chunks_of(list(range(len(cells))), size),
                                   lambda: visualisation_layer(loaded, spec, device), lanes=lanes,
                                   threads=threads):
            pictures += [to_image(image) for image in images]
            bar.update(len(images))
    return pictures


def _mosaic(rd: RunDir, options: AtlasOptions, cells: list[dict], pictures: list[Image.Image]) -> None:
    """The atlas as one picture: each rendered cell at its place, empty cells left light grey."""
    side = options.size
    mosaic = Image.new("RGB", (options.grid * side, options.grid * side), (238, 238, 238))
    for r, picture in zip(cells, pictures):
        mosaic.paste(picture, (r["gx"] * side, r["gy"] * side))
    with atomic_path(rd.atlas_image(options.layer)) as tmp:
        mosaic.save(tmp, format="PNG")


COMMANDS = [
    Command("units atlas", AtlasOptions, atlas,
            help="an activation atlas of a layer: its activation space laid out in 2-D, each cell rendered",
            description="Carter et al. 2019: spatial activation vectors sampled over the dataset (--images, "
                        "--per-image, seeded), laid out by openTSNE, binned into a --grid x --grid grid; each cell "
                        "with --min-count vectors or more is rendered from its mean vector with the direction "
                        "objective. Writes units/<layer>/atlas/: atlas.png, cell-GY-GX.png, cells.parquet (count, "
                        "most common label and class, the images) and samples.parquet (each vector's image, "
                        "position and place in the layout)."),
]
