"""What each unit responds to: `featscope units render` and `featscope units label`.

`render`: feature visualisations (Olah et al. 2017, "Feature Visualization"; `--diversity`
adds that paper's diverse variants). Feature visualisations (`kernels.render.feature_visualisations`, Lucid's recipe) of a
layer's units, many in one batch (one image per unit), written as a PNG per unit, a contact
sheet and a Parquet table that checks them against the dataset:

- `activation`: the unit's activation on its visualisation (shown to the model at its input
  size, no transforms), measured as the dataset's top-k measures it (the spatial maximum of
  a conv channel, the value of a vector unit);
- `top1`: the unit's largest activation over the dataset (the top-k stage's rank 0), and
  `ratio` = activation / top1: above 1, the made image drives the unit harder than any real one;
- `rank`: where the unit stands among all the layer's units on its own visualisation, each
  unit's activation divided by its dataset maximum; 1 means the image is specific to it.

`label`: each unit named by the dataset label it separates best (ROC AUC of its per-image
maximum, one label against the rest, in the spirit of NetDissect's unit labels, Bau et al.
2017) and the classes it supports (classifier weights, or mean class-logit gradients deeper in).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.objectives import layer_outputs
from featscope.kernels.render import feature_visualisations
from featscope.kernels.transforms import PixelModel
from featscope.kernels.unit_objectives import channels, diversity
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, withdraw
from featscope.pipelines.core.device import (
    render_dtype,
    render_precision,
    render_precision_option,
    slow_render_precision,
)
from featscope.pipelines.core.lanes import chunks_of, lane_plan, map_in_lanes
from featscope.pipelines.core.options import Command, Options, option, parse_units, seed_option
from featscope.pipelines.core.progress import progress_bar
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import write_table
from featscope.pipelines.core.text import plural, rate
from featscope.pipelines.core.trust import dataset_stamp, features_stamp
from featscope.pipelines.core.workers import model_ref, visualisation_layer, worker_model
from featscope.pipelines.render.panels import to_image

TABLE = pa.schema([
    pa.field("unit", pa.int32()),
    pa.field("objective", pa.float32()),  # the channel's mean activation at the last step, transformed
    pa.field("activation", pa.float32()),
    pa.field("top1", pa.float32()),
    pa.field("ratio", pa.float32()),
    pa.field("rank", pa.int32()),
])


@dataclass(frozen=True)
class RenderOptions(Options):
    layer: str = option(help="a layer of the model, e.g. block13 or pool", required=True)
    units: str = option("0-63", help="units rendered, e.g. 0-63 or 3,7,10-12", pattern=r"^[0-9][0-9,\- ]*$")
    size: int = option(128, help="side of each image in pixels (upsampled to the model's input size)", min=16,
                       max=512)
    steps: int = option(256, help="optimisation steps (Lucid's default 512)", min=1)
    batch: int = option(16, help="units rendered together, one image each", min=1, max=1024)
    lr: float = option(0.05, help="Adam's learning rate on the image's spectrum", min=0)
    seed: int = seed_option(0, help="seed of the starting images and the random transforms")
    diversity: int = option(0, help="also render this many different images per unit, optimised together with "
                                    "Lucid's diversity objective (0: none)", min=0, max=16)
    diversity_weight: float = option(100.0, help="weight of the diversity term (Lucid's tutorial: 100)", min=0)
    precision: str = render_precision_option()
    device: str = option("auto", help="where the model runs", choices=("auto", "cpu", "cuda"))


@dataclass
class RenderSummary:
    layer: str
    units: int
    seconds: float
    wins: float | None
    median_ratio: float | None
    specific: float | None
    slow: str = ""  # why its precision ran slowly here (`slow_render_precision`), or ""

    def warning(self) -> str:
        return self.slow

    def line(self) -> str:
        text = (f"units render {self.layer}: {plural(self.units, 'unit')} in {self.seconds:.1f}s "
                f"({rate(self.units, self.seconds, 'units')}) into units/{self.layer}/")
        if self.wins is not None:
            text += (f"; the visualisation drives its unit harder than the dataset's top image for "
                     f"{self.wins:.0%} of units (median ratio {self.median_ratio:.2f}); ")
        if self.specific is not None:
            text += f"it ranks its own unit first (activation / dataset max) for {self.specific:.0%}"
        return text


def dataset_maxima(rd: RunDir, layer: str) -> dict[int, float]:
    """unit -> its largest activation over the dataset (the top-k stage's rank 0), or {}."""
    path = rd.topk(layer)
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["channel", "rank", "value"]).to_pylist()
    return {r["channel"]: r["value"] for r in table if r["rank"] == 0}


def render(rd: RunDir, options: RenderOptions, progress: bool = True) -> RenderSummary:
    start = time.perf_counter()
    loaded, device, _ = worker_model(model_ref(rd, options.device))
    options = replace(options, precision=render_precision(options.precision, device))  # as its table records it
    spec = loaded.layer(options.layer)
    if spec.kind == "pixels" or spec.grid:
        raise FeatscopeError(f"layer '{options.layer}' has no units to visualise: give a conv or vector layer")
    with one_writer(rd.units_dir(options.layer), f"units render {options.layer}"):  # its table vouches for its pictures
        return _render(rd, options, loaded, device, spec, progress, start)


def _render(rd: RunDir, options: RenderOptions, loaded, device: torch.device, spec, progress: bool,
            start: float) -> RenderSummary:
    prep = loaded.preprocessing
    model, module = visualisation_layer(loaded, spec, device)
    probe = layer_outputs(model, torch.full((1, 3, prep.crop, prep.crop), 0.5, device=device), [module])[0]
    count = probe.shape[1]
    units = parse_units(options.units) or list(range(count))
    if max(units) >= count:
        raise FeatscopeError(f"layer '{options.layer}' has {count} units (0-{count - 1}); got unit {max(units)}")
    maxima = dataset_maxima(rd, options.layer)
    rows = []
    rd.units_dir(options.layer).mkdir(parents=True, exist_ok=True)
    withdraw(rd.units_table(options.layer), rd.units_sheet(options.layer))  # written again last
    with tqdm(total=len(units), unit="unit", desc=f"units render {options.layer}", disable=not progress) as bar:
        for chosen, images, trajectory, measured in render_units(loaded, spec, device, units, options, (model, module)):
            for b, unit in enumerate(chosen):
                with atomic_path(rd.unit_visualisation(options.layer, unit)) as tmp:
                    to_image(images[b]).save(tmp, format="PNG")
                rows.append(_row(unit, float(trajectory[-1, b]), measured[b], maxima))
            bar.update(len(chosen))
    for unit in progress_bar(units if options.diversity else [], unit="unit", desc="diverse variants",
                             progress=progress):
        for k, image in enumerate(diverse_variants(model, module, unit, options, prep.crop), start=1):
            with atomic_path(rd.unit_variant(options.layer, unit, k)) as tmp:
                to_image(image).save(tmp, format="PNG")
    for unit in units:  # variants of an earlier render with more of them
        for stale in rd.unit_variants(options.layer, unit)[options.diversity:]:
            stale.unlink()
    table = pa.Table.from_pylist(rows, schema=TABLE)
    write_table(table, rd.units_table(options.layer), {"layer": options.layer, "size": str(options.size),
                                                       "steps": str(options.steps), "seed": str(options.seed),
                                                       "precision": options.precision,
                                                       "dataset": dataset_stamp(rd, options.layer)})
    _sheet(rd, options.layer, units)
    with_top1 = [r for r in rows if r["top1"] is not None and r["top1"] > 0]
    return RenderSummary(
        options.layer, len(units), time.perf_counter() - start,
        float(np.mean([r["ratio"] > 1 for r in with_top1])) if with_top1 else None,
        float(np.median([r["ratio"] for r in with_top1])) if with_top1 else None,
        float(np.mean([r["rank"] == 1 for r in rows if r["rank"] is not None])) if maxima else None,
        slow_render_precision(options.precision, device))


Lane = tuple[PixelModel, torch.nn.Module]  # a visualisation model and the module of it that the layer taps


def render_units(loaded, spec, device: torch.device, units: list[int], options: RenderOptions,
                 made: Lane | None = None) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(units, their images, objective trajectory, activations of all the layer's units on
    each image) for chunks of `units`, in order, rendered at once on the CPU's lanes
    (`pipelines.core.lanes`); `made`, a lane's model already made, serves one lane."""
    side = loaded.preprocessing.crop
    lanes, threads, size = lane_plan(len(units), options.batch, device)
    spare = [made] if made is not None else []

    def lane_model() -> Lane:
        return spare.pop() if spare else visualisation_layer(loaded, spec, device)

    def render_chunk(lane: Lane, chosen: list[int]):
        own, module = lane
        images, trajectory = feature_visualisations(
            own, channels(module, torch.tensor(chosen, device=device)), [options.seed * 1_000_003 + u for u in chosen],
            size=options.size, steps=options.steps, lr=options.lr, seed=options.seed, model_size=side,
            dtype=render_dtype(options.precision, device))
        return chosen, images, trajectory, _activations(own, module, images, side)

    return map_in_lanes(render_chunk, chunks_of(list(units), size), lane_model, lanes=lanes, threads=threads)


def diverse_variants(model: PixelModel, module: torch.nn.Module, unit: int, options: RenderOptions,
                     model_size: int) -> torch.Tensor:
    """`options.diversity` images of one unit optimised together: its channel objective plus
    `diversity_weight` x Lucid's diversity term (Olah et al. 2017, "Feature Visualization":
    the batch's Gram matrices pushed apart), so they show different facets of the unit."""
    n = options.diversity
    objective = channels(module, torch.full((n,), unit, device=model.mean.device)) \
        + options.diversity_weight * diversity(module)
    seeds = [options.seed * 1_000_003 + unit * 64 + k + 1 for k in range(n)]
    images, _ = feature_visualisations(model, objective, seeds, size=options.size, steps=options.steps,
                                       lr=options.lr, seed=options.seed, model_size=model_size,
                                       dtype=render_dtype(options.precision, model.mean.device))
    return images


def _activations(model: PixelModel, module: torch.nn.Module, images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, units): each unit's activation on each image as the top-k stage measures it."""
    with torch.no_grad():
        x = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=True)
        out = layer_outputs(model, x, [module])[0].float()
    return out.flatten(2).amax(2) if out.dim() == 4 else out


def _row(unit: int, objective: float, measured: torch.Tensor, maxima: dict[int, float]) -> dict:
    activation = float(measured[unit])
    top1 = maxima.get(unit)
    rank = None
    if maxima:
        scale = torch.tensor([maxima.get(u, float("nan")) for u in range(len(measured))])
        relative = torch.where(scale > 0, measured.cpu() / scale, torch.full_like(scale, -float("inf")))
        rank = int((relative > relative[unit]).sum()) + 1
    return {"unit": unit, "objective": objective, "activation": activation, "top1": top1,
            "ratio": activation / top1 if top1 else None, "rank": rank}


def _sheet(rd: RunDir, layer: str, units: list[int], columns: int = 16) -> None:
    """Every rendered unit of the layer in a grid, in unit order (Microscope's layout)."""
    present = [u for u in units if rd.unit_visualisation(layer, u).exists()]
    tiles = [Image.open(rd.unit_visualisation(layer, u)).convert("RGB") for u in present]
    side = tiles[0].width
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * (side + 2), rows * (side + 2)), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * (side + 2), (k // columns) * (side + 2)))
    with atomic_path(rd.units_sheet(layer)) as tmp:
        sheet.save(tmp, format="PNG")


# ---- unit labels ------------------------------------------------------------------------------

LABELS = pa.schema([
    pa.field("unit", pa.int32()),
    pa.field("label", pa.string()),  # the label whose images the unit separates best
    pa.field("auc", pa.float32()),  # of the unit's per-image maximum against that label (one vs rest)
    pa.field("purity", pa.float32()),  # share of the unit's top-k images with that label
    pa.field("classes", pa.list_(pa.string())),  # the classes it supports most, best first
    pa.field("class_weights", pa.list_(pa.float32())),  # the classifier's weights or the mean gradients
    pa.field("classes_from", pa.string()),  # which of the two: "classifier weights" / "mean gradient over N images"
])


@dataclass(frozen=True)
class LabelOptions(Options):
    layer: str = option(help="a layer with extracted features, e.g. block13 or pool", required=True)
    classes: int = option(3, help="classes listed per unit: those it supports most (0: none)", min=0)
    gradient_images: int = option(64, help="images (seeded sample) whose mean gradient of each class logit gives "
                                           "the classes of units the classifier does not read directly (0: skip)",
                                  min=0)
    seed: int = seed_option(0, help="seed of that sample")
    device: str = option("auto", help="where the model runs for the gradients", choices=("auto", "cpu", "cuda"))


@dataclass
class LabelSummary:
    layer: str
    units: int
    labels: int
    images: int
    median_auc: float
    classes_from: str | None

    def line(self) -> str:
        return (f"units label {self.layer}: {plural(self.units, 'unit')} against {plural(self.labels, 'label')} "
                f"over {self.images} labelled images; median best AUC {self.median_auc:.3f}"
                + (f"; supported classes from the {self.classes_from}" if self.classes_from else "")
                + f" -> units/{self.layer}/labels.parquet")


def label_aucs(values: np.ndarray, labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """values (N, U) per-image unit activations, labels (N,) -> (names, (L, U) AUCs): each
    unit's ROC AUC for telling each label's images from the rest (Mann-Whitney from average
    ranks, ties counted half, as scikit-learn's `roc_auc_score`)."""
    from scipy.stats import rankdata

    ranks = rankdata(values, axis=0)
    names = sorted(set(labels.tolist()))
    aucs = np.empty((len(names), values.shape[1]))
    for k, name in enumerate(names):
        positive = labels == name
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        aucs[k] = (ranks[positive].sum(0) - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1)
    return names, aucs


def label(rd: RunDir, options: LabelOptions, progress: bool = True) -> LabelSummary:
    """Name each unit of a layer by the label it separates best, from the stored per-image
    maxima (conv channels) or values (vector units); no model pass."""
    from featscope.pipelines.core.store import RunIdentity, iter_features

    features = features_stamp(rd, options.layer)  # before they are read: one written meanwhile makes it stale
    parts = manifest.feature_parts(rd, options.layer)
    if not parts:
        raise FeatscopeError(f"no features of layer '{options.layer}' in {rd.root}: run `featscope extract` first")
    column = "max" if "max" in pq.read_schema(parts[0]).names else "feature"
    rows = manifest.read(rd).select(["image_id", "label"]).to_pylist()
    label_of = {r["image_id"]: r["label"] for r in rows if r["label"] is not None}
    ids, chunks = [], []
    for batch_ids, values in iter_features(parts, RunIdentity.of_run(rd.read_config()), column=column):
        keep = np.array([i in label_of for i in batch_ids.tolist()], dtype=bool)
        ids.append(batch_ids[keep])
        chunks.append(np.asarray(values, dtype=np.float32)[keep])
    image_ids, values = np.concatenate(ids), np.concatenate(chunks)
    labels = np.array([label_of[int(i)] for i in image_ids], dtype=object)
    if len(set(labels.tolist())) < 2:
        raise FeatscopeError(f"units label needs images of at least two labels; run {rd.root} has "
                             f"{len(set(labels.tolist()))}")
    names, aucs = label_aucs(values, labels)
    best = aucs.argmax(0)
    top = _topk_images(rd, options.layer)
    classes, weights, source = _supported_classes(rd, options, values.shape[1], progress)
    table = []
    for unit in range(values.shape[1]):
        name = names[best[unit]]
        shown = top.get(unit, [])
        purity = float(np.mean([label_of.get(i) == name for i in shown])) if shown else None
        table.append({"unit": unit, "label": name, "auc": float(aucs[best[unit], unit]), "purity": purity,
                      "classes": classes[unit] if classes else None,
                      "class_weights": weights[unit] if weights else None,
                      "classes_from": source})
    write_table(pa.Table.from_pylist(table, schema=LABELS), rd.units_labels(options.layer),
                {"layer": options.layer, "column": column, "dataset": dataset_stamp(rd, options.layer, labels=True),
                 "features": features})
    return LabelSummary(options.layer, values.shape[1], len(names), len(image_ids),
                        float(np.median(aucs.max(0))), source)


def _topk_images(rd: RunDir, layer: str) -> dict[int, list[int]]:
    if not rd.topk(layer).exists():
        return {}
    found: dict[int, list[int]] = {}
    for r in pq.read_table(rd.topk(layer), columns=["channel", "image_id"]).to_pylist():
        found.setdefault(r["channel"], []).append(r["image_id"])
    return found


def _supported_classes(rd: RunDir, options: LabelOptions, units: int,
                       progress: bool = False) -> tuple[list | None, list | None, str | None]:
    """Each unit's `options.classes` best-supported classes with their support, and where the
    support comes from: the classifier's weights for the vector a Linear classifier reads
    (exact and free); deeper in, the mean gradient of each class logit over a seeded sample
    of images (`kernels.class_attribution`). (None, None, None) for a model without class
    outputs, or when skipped."""
    if options.classes == 0:
        return None, None, None
    loaded, device, categories = worker_model(model_ref(rd, options.device))
    spec = loaded.layer(options.layer)
    linear = _classifier_reading(loaded, options.layer, units)
    if linear is not None:
        support, source = linear.weight.detach().float().T, "classifier weights"  # (units, classes)
    elif options.gradient_images and spec.kind != "pixels" and not spec.grid:
        support, used = _mean_gradients(rd, loaded, device, spec, options, progress)
        if support is None:
            return None, None, None
        source = f"mean gradient over {used} images"
    else:
        return None, None, None
    values, order = support.topk(min(options.classes, support.shape[1]), dim=1)
    name = (lambda c: categories[c] if categories and c < len(categories) else str(c))
    return ([[name(int(c)) for c in row] for row in order], [[round(float(v), 4) for v in row] for row in values],
            source)


def _classifier_reading(loaded, layer: str, units: int) -> torch.nn.Linear | None:
    """The model's Linear classifier if it reads `layer` directly (the `pool` vector), else None."""
    if layer != "pool" or "fc" not in _aliases(loaded):
        return None
    linear = loaded.module.get_submodule(loaded.layer("fc").module_path)
    return linear if isinstance(linear, torch.nn.Linear) and linear.in_features == units else None


def _mean_gradients(rd: RunDir, loaded, device: torch.device, spec, options: LabelOptions,
                    progress: bool = False) -> tuple[torch.Tensor | None, int]:
    """(units, classes) mean class-logit gradients over a seeded sample of the live images with
    features, and how many images it averaged (unreadable ones are skipped); None if no image could be
    read or the model's output is no (B, classes) score."""
    from featscope.kernels.class_attribution import mean_class_gradients
    from featscope.pipelines.core.images import BadImage, read_pixels

    featureless = set(manifest.featureless(rd).tolist())  # extract could not read them, or got NaN from them
    rows = [r for r in manifest.read(rd).select(["image_id", "path"]).to_pylist() if r["image_id"] not in featureless]
    rng = np.random.default_rng(options.seed)
    chosen = sorted(rng.choice(len(rows), size=min(options.gradient_images, len(rows)), replace=False).tolist())
    prep = loaded.preprocessing
    pixels = []
    for i in chosen:
        try:
            pixels.append(prep.to_uint8(read_pixels(rows[i]["path"], min_size=prep.resize)))
        except BadImage:
            continue
    if not pixels:
        return None, 0
    x = prep.normalize(torch.stack(pixels).to(device))
    with torch.no_grad():
        probe = loaded.module(x[:1])
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2:
        return None, 0
    with tqdm(total=len(x), desc=f"units label {options.layer}: class gradients", unit="img",
              disable=not progress) as bar:
        support = mean_class_gradients(loaded.module, loaded.module.get_submodule(spec.module_path), x,
                                       on_images=bar.update)
    return support.cpu(), len(x)


def _aliases(loaded) -> set[str]:
    from featscope.kernels.architectures import profile_of_model

    profile = profile_of_model(loaded.module)
    return set(profile.aliases(loaded.module)) if profile else set()


COMMANDS = [
    Command("units label", LabelOptions, label,
            help="name each unit of a layer by the label it separates best, and the classes it supports",
            description="For each unit, the ROC AUC of its per-image maximum (stored by extract) against each "
                        "label, one vs rest; the best label, its AUC and the share of the unit's top-k images "
                        "with it (purity); and the classes the unit supports most: for `pool`, by the "
                        "classifier's weights, deeper in by the mean gradient of each class logit over a seeded "
                        "sample of images. Writes units/<layer>/labels.parquet."),
    Command("units render", RenderOptions, render,
            help="feature visualisations of a layer's units, many at once, checked against the dataset",
            description="An image per unit that maximises the unit's mean activation (Lucid's Fourier, colour-"
                        "decorrelated parameterisation and transformation robustness, Adam), rendered --batch units "
                        "at a time. Writes units/<layer>/unit-NNNN.png, sheet.png and visualisations.parquet: each "
                        "unit's activation on its image against its dataset top-1 (from `featscope topk`), and where "
                        "the unit ranks on its own image (activation / dataset maximum)."),
]
