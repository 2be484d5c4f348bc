"""The visualisation toolbox stage: `featscope viz <method>` for a run's model and images.

Each method reads the run's model (run.json) and, where it needs them, the run's images
(the model's own 224-px view: resize and centre crop), calls its kernel with every target
in one batch, and writes captioned PNGs (plus JSON with the numbers) under <run>/viz/:

  filters/<layer>.png                      the layer's conv filters
  activations/<layer>/<image_id>.png       every channel's activation map for an image
  class-models.png, class-models/<class>.png, class-models.json   gradient-ascent class models
  adversarial/<image_id>-<target>.png (+ -adv.png, the 8-bit adversarial image, and .json)
  dream/<image_id>.png                     the image amplified at each layer, side by side
  inversion/<image_id>.png (+ .json)       the image reconstructed from each layer's features
  texture/<name>.png (+ .json)             a texture synthesised from an example, and from each layer alone
  style/<content>-<style>.png (+ .json)    neural style transfer, with its loss curve
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from featscope.kernels.adversarial import pgd
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.filters import activation_grid, filter_grid
from featscope.kernels.objectives import layer_energy, layer_outputs, relative_error
from featscope.kernels.params import ParamError
from featscope.kernels.render import class_models, deepdream, invert, layer_features
from featscope.kernels.texture import Term, gram, match, noise_like, targets_at
from featscope.kernels.transforms import PixelModel
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, write_json_atomic
from featscope.pipelines.core.cpus import usable_cpus
from featscope.pipelines.core.images import MAX_SIDE, BadImage, read_pixels
from featscope.pipelines.core.models import LoadedModel, load_run_model
from featscope.pipelines.core.options import Command, Options, option, seed_option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.runtime import keep_freed_memory
from featscope.pipelines.core.text import plural
from featscope.pipelines.core.workers import visualisation_model
from featscope.pipelines.render.panels import curves, enlarge, panel, stack, to_image

TILE = 160  # side of each picture in the galleries


@dataclass
class VizSummary:
    method: str
    written: list[Path]
    seconds: float

    def line(self) -> str:
        where = self.written[0].parent if self.written else "-"
        return f"viz {self.method}: {plural(len(self.written), 'picture')} in {self.seconds:.1f}s under {where}"


# ---- the run's model and images ------------------------------------------------------------

@dataclass
class _Context:
    rd: RunDir
    loaded: LoadedModel
    pixel_model: PixelModel
    categories: list[str] | None

    def name(self, class_id: int) -> str:
        return self.categories[class_id] if self.categories else f"class {class_id}"

    def module(self, layer: str) -> tuple[str, nn.Module]:
        spec = self.loaded.layer(layer)
        if spec.kind == "pixels":
            raise FeatscopeError("`pixels` is the input itself, not a layer of the model")
        return spec.module_path, self.loaded.module.get_submodule(spec.module_path)

    def optimised_through(self, layers: list[str]) -> tuple[PixelModel, list[nn.Module]]:
        """The model as images are optimised through it (`visualisation_model`: batch norms
        folded except where that would change one of `layers`, channels-last weights; the same
        function of the image, fewer passes over memory), and the modules of `layers` in it.
        Attacks, filters and activation maps keep the model as loaded."""
        for layer in layers:
            self.module(layer)  # a one-line error for `pixels`
        specs = [self.loaded.layer(layer) for layer in layers]
        model = visualisation_model(self.loaded, specs)
        return model, [model.model.get_submodule(spec.module_path) for spec in specs]

    def images(self, images: list[int | str]) -> tuple[torch.Tensor, list[dict]]:
        """The model's view of each image, (B,3,crop,crop) in [0,1] on the 8-bit grid. An image
        is a run's image id, or any image file (its pictures are then named by its stem)."""
        rows = {r["image_id"]: r for r in manifest.read(self.rd).to_pylist()}
        chosen = []
        for ref in images:
            if isinstance(ref, int) or str(ref).isdigit():
                if int(ref) not in rows:
                    raise ParamError("ids", f"holds {ref}, which is no image id of run {self.rd.root} (nor a file)")
                chosen.append(rows[int(ref)])
            elif Path(ref).is_file():
                chosen.append({"image_id": Path(ref).stem, "path": str(ref), "label": None})
            else:
                raise ParamError("ids", f"holds '{ref}': neither an image id of the run nor an image file")
        views = []
        for row in chosen:
            try:
                views.append(self.loaded.preprocessing.to_uint8(read_pixels(row["path"])))
            except BadImage as e:
                raise FeatscopeError(f"image {row['image_id']} ({row['path']}) cannot be read: {e}") from None
        return torch.stack(views).float() / 255, chosen


def _context(rd: RunDir, threads: int | None = None) -> _Context:
    keep_freed_memory()
    torch.set_num_threads(threads or usable_cpus())
    config = rd.read_config()
    loaded = load_run_model(config)
    for p in loaded.module.parameters():
        p.requires_grad_(False)  # only images are optimised
    prep = loaded.preprocessing
    return _Context(rd, loaded, PixelModel(loaded.module, prep.mean, prep.std), loaded.categories)


def _save_png(picture: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def _one_writer(rd: RunDir, kind: str) -> AbstractContextManager[None]:
    """The writer lock of a method's folder (viz/<kind>/; viz/ itself for the class models,
    whose gallery and record are there): two jobs of one method at once leave each picture
    beside its own record, not another job's numbers."""
    return one_writer(rd.viz_dir if kind == "class-models" else rd.viz_dir / kind, f"viz {kind}")


def _conv_weight(ctx: _Context, layer: str) -> tuple[str, torch.Tensor]:
    """The conv that makes `layer`: the first Conv2d inside it, or (for an alias that names
    the ReLU after a conv) the last Conv2d before it in the model."""
    path, module = ctx.module(layer)
    inside = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if inside:
        name, conv = inside[0]
        return f"{path}.{name}" if name else path, conv.weight
    before = None
    for name, m in ctx.loaded.module.named_modules():
        if name == path:
            break
        if isinstance(m, nn.Conv2d):
            before = (name, m.weight)
    if before is None:
        raise FeatscopeError(f"layer '{layer}' has no convolution to draw")
    return before


# ---- methods ------------------------------------------------------------------------------

def filters(rd: RunDir, layers: list[str]) -> VizSummary:
    """One PNG per layer: RGB tiles for a first layer, a row of grayscale tiles per filter deeper."""
    start = time.perf_counter()
    ctx = _context(rd)
    written = []
    for layer in layers:
        path, weight = _conv_weight(ctx, layer)
        o, i, kh, kw = weight.shape
        zoom = max(1, 12 // kh)
        picture = to_image(filter_grid(weight, zoom=zoom))
        how = ("RGB, each filter min-max scaled" if i == 3 else
               "one row per filter, one tile per input channel; grey = 0, scaled per filter")
        title = f"{layer} = {path}: {o} filters x {i} channels x {kh}x{kw} ({how})"
        written.append(_save_png(panel([enlarge(picture, 240)], [""], title), rd.viz_filters(layer)))
    return VizSummary("filters", written, time.perf_counter() - start)


def activations(rd: RunDir, layers: list[str], image_ids: list[int]) -> VizSummary:
    """Per layer and image: the image, and every channel's map as a grayscale tile."""
    start = time.perf_counter()
    ctx = _context(rd)
    images, rows = ctx.images(image_ids)
    modules = [ctx.module(layer) for layer in layers]
    with torch.no_grad():
        outputs = layer_outputs(ctx.pixel_model, images, [m for _, m in modules])
    written = []
    for layer, (path, _), output in zip(layers, modules, outputs):
        if output.dim() != 4:
            raise FeatscopeError(f"layer '{layer}' gives vectors {tuple(output.shape[1:])}, not activation maps")
        for b, row in enumerate(rows):
            a = output[b]
            grid = to_image(activation_grid(a, zoom=max(1, 24 // a.shape[-1])))
            title = (f"{layer} = {path}: {a.shape[0]} maps of {a.shape[1]}x{a.shape[2]} for image {row['image_id']}; "
                     f"black = 0, white = the layer's max {float(a.max()):.3g}")
            picture = panel([to_image(images[b]), enlarge(grid, 224)], [str(row["label"] or row["image_id"]), ""],
                            title)
            written.append(_save_png(picture, rd.viz_activations(layer, row["image_id"])))
    return VizSummary("activations", written, time.perf_counter() - start)


def class_model(rd: RunDir, classes: list[int], *, size: int = 224, steps: int = 150, lr: float = 0.02,
                l2: float = 3e-3, jitter: int = 16, blur_every: int = 4, blur_sigma: float = 0.7,
                clip_percentile: float = 20.0, octaves: int = 3, noise: float = 0.0, seed: int = 0,
                progress: bool = True) -> VizSummary:
    """All classes in one batch; a gallery with final scores and the score curves."""
    start = time.perf_counter()
    ctx = _context(rd)
    n_classes = ctx.loaded.module(torch.zeros(1, 3, 64, 64)).shape[1]
    bad = [c for c in classes if not 0 <= c < n_classes]
    if bad:
        raise FeatscopeError(f"class ids must be in 0..{n_classes - 1}; got {bad}")
    target = torch.tensor(classes)
    model, _ = ctx.optimised_through([])  # the logits as loaded, to 1e-4
    with tqdm(total=1, desc="class models", disable=not progress):
        images, scores = class_models(model, target, size=size, steps=steps, lr=lr, l2=l2,
                                      jitter_pixels=jitter, blur_every=blur_every, blur_sigma=blur_sigma,
                                      clip_percentile=clip_percentile, octaves=octaves, noise=noise, seed=seed)
    with torch.no_grad():
        logits = ctx.pixel_model(images)  # the final images as saved, without jitter
    probabilities = logits.softmax(1)
    with _one_writer(rd, "class-models"):  # the gallery, its record and each class's picture
        written, pictures, captions, record = [], [], [], []
        for b, c in enumerate(classes):
            picture = to_image(images[b])
            written.append(_save_png(picture, rd.viz_class_model(c)))
            p, final = float(probabilities[b, c]), float(logits[b, c])
            pictures.append(picture.resize((TILE, TILE), Image.Resampling.BICUBIC))
            captions.append(f"{ctx.name(c)} ({c})\nscore {final:.1f}, p={p:.2f}")
            record.append({"class": c, "name": ctx.name(c), "final_score": final, "probability": p,
                           "scores": scores[:, b].tolist()})
        curve = curves({f"{ctx.name(c)}": scores[:, b].tolist() for b, c in enumerate(classes)}, xlabel="step",
                       ylabel="class score (logit)", title="score during gradient ascent")
        gallery = stack([panel(pictures, captions, f"class models of {ctx.loaded.arch}: argmax_x score_c(x) - "
                                                   f"{l2:g} ||x||^2, {steps} steps, {octaves} octaves"),
                         panel([curve], [""])])
        written.insert(0, _save_png(gallery, rd.viz_class_models))
        write_json_atomic(rd.viz_class_models.with_suffix(".json"), record)
    return VizSummary("class-model", written, time.perf_counter() - start)


def adversarial(rd: RunDir, image_ids: list[int], *, target: int | None = None, epsilon: int = 4,
                method: str = "pgd", steps: int = 20, step: int = 1) -> VizSummary:
    """Targeted (or untargeted) attacks on the images' model view, checked by re-reading
    the saved 8-bit PNG: original, amplified perturbation and adversarial image, with the
    predictions and probabilities of both."""
    start = time.perf_counter()
    if method not in ("pgd", "fgsm"):
        raise ParamError("attack", f"must be pgd or fgsm, not '{method}'")
    if method == "fgsm" and target is not None:
        raise ParamError("attack", "fgsm here is the untargeted one-step attack; use pgd with a target")
    ctx = _context(rd)
    images, rows = ctx.images(image_ids)
    model = ctx.pixel_model
    with torch.no_grad():
        before = model(images).softmax(1)
    labels = before.argmax(1)
    if target is not None and target >= before.shape[1]:
        raise ParamError("target", f"must be one of the model's classes, 0..{before.shape[1] - 1}; got {target}")
    if method == "fgsm":
        steps, step = 1, epsilon
    goal = torch.full_like(labels, target) if target is not None else None
    adv, _history = pgd(model, images, epsilon=epsilon, target=goal, labels=None if goal is not None else labels,
                        steps=steps, step=step)
    with _one_writer(rd, "adversarial"):  # each picture, then its record
        written = []
        for b, row in enumerate(rows):
            name = str(target) if target is not None else "untargeted"
            adv_path = _save_png(to_image(adv[b]), rd.viz_adversarial(row["image_id"], name, "-adv"))
            reread = torch.from_numpy(np.array(Image.open(adv_path).convert("RGB"))).permute(2, 0, 1)[None]
            with torch.no_grad():
                after = model(reread.float() / 255).softmax(1)[0]
            predicted, was = int(after.argmax()), int(labels[b])
            success = predicted == target if target is not None else predicted != was
            difference = adv[b] - images[b]
            amplified = (difference / max(epsilon / 255, 1e-12) * 0.5 + 0.5).clamp(0, 1)
            goal_text = f"target {ctx.name(target)}" if target is not None else "untargeted"
            title = (f"{method.upper()} {goal_text}, L-inf budget {epsilon}/255 ({steps} steps): "
                     f"{'fooled' if success else 'not fooled'} (checked on the saved 8-bit PNG)")
            picture = panel(
                [to_image(images[b]).resize((224, 224)), to_image(amplified), to_image(adv[b])],
                [f"original: {ctx.name(was)}\np={float(before[b, was]):.3f}",
                 f"perturbation x{255 / (2 * epsilon):.0f}\nmax |d| = {float(difference.abs().max() * 255):.0f}/255",
                 f"adversarial: {ctx.name(predicted)}\np={float(after[predicted]):.3f}"
                 + (f", {ctx.name(was)} p={float(after[was]):.3f}" if predicted != was else "")],
                title)
            written.append(_save_png(picture, rd.viz_adversarial(row["image_id"], name)))
            write_json_atomic(rd.viz_adversarial(row["image_id"], name, "", ".json"), {
                "image_id": row["image_id"], "method": method, "epsilon": epsilon, "steps": steps, "step": step,
                "target": target, "original_class": was, "original_probability": float(before[b, was]),
                "adversarial_class": predicted, "adversarial_probability": float(after[predicted]),
                "target_probability": float(after[target]) if target is not None else None,
                "max_abs_change": float(difference.abs().max() * 255), "fooled": bool(success)})
    return VizSummary("adversarial", written, time.perf_counter() - start)


def dream(rd: RunDir, image_ids: list[int], layers: list[str], *, octaves: int = 3, steps: int = 10,
          lr: float = 0.01, jitter: int = 16, seed: int = 0, progress: bool = True) -> VizSummary:
    """Each image amplified at each layer (all pairs in one batch), side by side."""
    start = time.perf_counter()
    ctx = _context(rd)
    images, rows = ctx.images(image_ids)
    model, modules = ctx.optimised_through(layers)
    batch = images.repeat_interleave(len(layers), dim=0)
    with tqdm(total=1, desc="dream", disable=not progress):
        dreamed, _energies = deepdream(model, batch, modules * len(rows), octaves=octaves, steps=steps,
                                      lr=lr, jitter_pixels=jitter, seed=seed)
    per_image = modules * len(rows)
    with torch.no_grad():  # each layer's energy on the full-size image, before and after
        before = [layer_energy(o[n:n + 1])[0] for n, o in enumerate(layer_outputs(model, batch, per_image))]
        after = [layer_energy(o[n:n + 1])[0] for n, o in enumerate(layer_outputs(model, dreamed, per_image))]
    written = []
    for b, row in enumerate(rows):
        pictures, captions = [to_image(images[b])], [f"image {row['image_id']}"]
        for k, layer in enumerate(layers):
            n = b * len(layers) + k
            pictures.append(to_image(dreamed[n]))
            captions.append(f"{layer}\nenergy x{float(after[n] / before[n].clamp_min(1e-12)):.1f}")
        title = f"feature amplification (DeepDream): ascend mean squared activation, {octaves} octaves x {steps} steps"
        written.append(_save_png(panel(pictures, captions, title), rd.viz_dream(row["image_id"])))
    return VizSummary("dream", written, time.perf_counter() - start)


def inversion(rd: RunDir, image_ids: list[int], layers: list[str], *, steps: int = 200, lr: float = 0.05,
              tv: float = 0.5, beta: float = 2.0, seed: int = 0, progress: bool = True) -> VizSummary:
    """Each image reconstructed from each layer's features (all in one batch), side by side
    with the relative feature error and the pixel error of each."""
    start = time.perf_counter()
    ctx = _context(rd)
    images, rows = ctx.images(image_ids)
    model, modules = ctx.optimised_through(layers)
    batch = images.repeat_interleave(len(layers), dim=0)
    per_image = modules * len(rows)
    reference = layer_features(model, batch, per_image)
    with tqdm(total=1, desc="inversion", disable=not progress):
        recon, errors = invert(model, reference, per_image, tuple(images.shape[2:]), steps=steps, lr=lr,
                               tv=tv, beta=beta, seed=seed)
    with _one_writer(rd, "inversion"):  # each picture, then its record
        written = []
        for b, row in enumerate(rows):
            pictures, captions, record = [to_image(images[b])], [f"image {row['image_id']}"], []
            for k, layer in enumerate(layers):
                n = b * len(layers) + k
                pixel_error = float(relative_error(recon[n:n + 1], images[b:b + 1])[0])
                feature_error = float(errors[-1, n])
                pictures.append(to_image(recon[n]))
                captions.append(f"{layer}\nfeature err {feature_error:.3f}\npixel err {pixel_error:.3f}")
                record.append({"layer": layer, "feature_error": feature_error, "pixel_error": pixel_error,
                               "feature_errors": errors[:, n].tolist()})
            title = (f"feature inversion: argmin ||Phi(x)-Phi0||^2/||Phi0||^2 + {tv:g} R_TV^{beta:g}(x)/HW, {steps} "
                     "steps (errors relative: ||d||^2/||ref||^2)")
            written.append(_save_png(panel(pictures, captions, title), rd.viz_inversion(row["image_id"])))
            write_json_atomic(rd.viz_inversion(row["image_id"]).with_suffix(".json"),
                              {"image_id": row["image_id"], "tv": tv, "beta": beta, "steps": steps, "layers": record})
    return VizSummary("inversion", written, time.perf_counter() - start)


def _example(path: str | Path, size: int) -> torch.Tensor:
    """An image file (a texture, a style) as (1,3,h,w) in [0,1], shorter side `size`."""
    from torchvision.transforms import functional as TF

    try:
        pixels = read_pixels(path)
    except BadImage as e:
        raise FeatscopeError(f"cannot read {path}: {e}") from None
    return TF.resize(pixels, [size], antialias=True)[None].float() / 255


def texture(rd: RunDir, image: str | Path, layers: list[str], *, layer_weights: list[float] | None = None,
            size: int = 160, steps: int = 300, lr: float = 0.02, seed: int = 0, progress: bool = True) -> VizSummary:
    """Synthesise a texture from `image` by matching Gram matrices at all `layers`, and in
    the same batch one texture per layer matching that layer alone (what each layer holds)."""
    start = time.perf_counter()
    ctx = _context(rd)
    layer_weights = layer_weights or [1.0] * len(layers)
    if len(layer_weights) != len(layers):
        raise FeatscopeError(f"give one weight per layer: {len(layers)} layers, {len(layer_weights)} weights")
    if min(layer_weights) < 0 or sum(layer_weights) <= 0:  # the terms are divided by the sum
        raise ParamError("weights", f"must be 0 or more, one of them above 0; got {layer_weights}")
    model, modules = ctx.optimised_through(layers)
    example = _example(image, size)
    grams = [gram(f) for f in targets_at(model, example, modules)]
    all_layers = [Term(k, grams[k], w / sum(layer_weights)) for k, w in enumerate(layer_weights)]
    terms = [all_layers] + [[Term(k, grams[k], 1.0)] for k in range(len(layers))]
    init = noise_like((len(terms), 3, size, size), seed)
    with tqdm(total=1, desc="texture", disable=not progress):
        images, losses = match(model, modules, terms, init, steps=steps, lr=lr)
    name = Path(image).stem
    captions = [f"example\n{name}", f"all layers\nGram err {float(losses[-1, 0]):.3f}"]
    captions += [f"{layer} only\nGram err {float(losses[-1, k + 1]):.3f}" for k, layer in enumerate(layers)]
    pictures = [to_image(example[0, :, :size, :size])] + [to_image(x) for x in images]
    title = f"Gram-matrix texture synthesis from noise, {steps} Adam steps (errors: ||G-G0||^2/||G0||^2)"
    with _one_writer(rd, "texture"):  # the picture, then its record
        written = [_save_png(panel(pictures, captions, title), rd.viz_texture(name))]
        write_json_atomic(rd.viz_texture(name).with_suffix(".json"), {
            "image": str(image), "layers": layers, "weights": layer_weights, "steps": steps,
            "loss_all_layers": losses[:, 0].tolist(),
            "loss_single_layer": {layer: losses[:, k + 1].tolist() for k, layer in enumerate(layers)}})
    return VizSummary("texture", written, time.perf_counter() - start)


def style_transfer(rd: RunDir, content_id: int, style: str | Path, *, content_layer: str, style_layers: list[str],
                   content_weight: float = 1.0, style_weight: float = 20.0, tv: float = 0.5, init: str = "content",
                   steps: int = 300, lr: float = 0.02, seed: int = 0, progress: bool = True) -> VizSummary:
    """Gatys et al.'s optimisation: the content image's features at one layer, the style
    image's Gram matrices at several, a TV prior; from the content, the style or noise."""
    start = time.perf_counter()
    if init not in ("content", "style", "noise"):
        raise ParamError("init", f"must be content, style or noise, not '{init}'")
    ctx = _context(rd)
    content, rows = ctx.images([content_id])
    model, modules = ctx.optimised_through([content_layer, *style_layers])
    style_image = _example(style, content.shape[2])
    content_features = targets_at(model, content, modules[:1])[0]
    style_grams = [gram(f) for f in targets_at(model, style_image, modules[1:])]
    terms = [[Term(0, content_features, content_weight, "content")]
             + [Term(k + 1, g, style_weight / len(style_grams)) for k, g in enumerate(style_grams)]]
    h, w = content.shape[2:]
    start_image = {"content": content, "noise": noise_like((1, 3, h, w), seed),
                   "style": torch.nn.functional.interpolate(style_image, size=(h, w), mode="bilinear")}[init]
    with tqdm(total=1, desc="style transfer", disable=not progress):
        images, losses = match(model, modules, terms, start_image, steps=steps, lr=lr, tv=tv)
    name = Path(style).stem
    curve = curves({"total loss": losses[:, 0].tolist()}, xlabel="step", ylabel="loss", title="style transfer loss",
                   size=(3.2, 2.24))
    title = (f"neural style transfer: content {content_layer} (w {content_weight:g}), style "
             f"{','.join(style_layers)} (w {style_weight:g}), TV {tv:g}, from the {init}")
    picture = panel([to_image(content[0]), to_image(style_image[0, :, :h, :w]), to_image(images[0]), curve],
                    [f"content {rows[0]['image_id']}", f"style {name}", "stylised", ""], title)
    path = rd.viz_style(content_id, name)
    with _one_writer(rd, "style"):  # the picture, then its record
        written = [_save_png(picture, path)]
        write_json_atomic(path.with_suffix(".json"), {"content_id": content_id, "style": str(style), "losses":
                                                      losses[:, 0].tolist(), "init": init, "steps": steps})
    return VizSummary("style", written, time.perf_counter() - start)


# ---- commands: one per method, all pictures under <run>/viz/ ---------------------------------

LAYERS_HELP = "comma-separated aliases or module paths, e.g. block3,block13"
IDS_HELP = "comma-separated image ids of the run, or image files"


@dataclass(frozen=True)
class FiltersOptions(Options):
    layers: list[str] = option(help=LAYERS_HELP, required=True)


@dataclass(frozen=True)
class ActivationsOptions(Options):
    layers: list[str] = option(help=LAYERS_HELP, required=True)
    ids: list[str] = option(help=IDS_HELP, required=True, json_type=("integer", "string"))


@dataclass(frozen=True)
class ClassModelOptions(Options):
    classes: list[int] = option(help="comma-separated class ids, e.g. 130,309,417,980", required=True)
    size: int = option(224, help="image side in pixels", min=16, max=MAX_SIDE)
    steps: int = option(150, help="gradient-ascent steps", min=1)
    lr: float = option(0.02, help="step size (the gradient is normalised per image)", min=0)
    l2: float = option(3e-3, help="weight of ||I||^2 (I: image minus the mean colour)", min=0)
    jitter: int = option(16, help="random shift in pixels at each step", min=0)
    blur_every: int = option(4, help="Gaussian blur every N steps (0: never)", min=0)
    blur_sigma: float = option(0.7, help="sigma of that blur", min=0)
    clip_percentile: float = option(20.0, help="reset pixels whose norm is below this percentile to the mean "
                                               "colour (0: off)", min=0, max=100)
    octaves: int = option(3, help="optimise at this many growing scales", min=1)
    noise: float = option(0.0, help="start from the mean colour plus noise of this sd", min=0)
    seed: int = seed_option(0, help="random seed")


@dataclass(frozen=True)
class AdversarialOptions(Options):
    ids: list[str] = option(help=IDS_HELP, required=True, json_type=("integer", "string"))
    target: int | None = option(help="class to reach (targeted PGD); without it, untargeted", min=0)
    epsilon: int = option(4, help="L-inf budget in grey levels (0-255)", min=1, max=255)
    attack: str = option("pgd", help="pgd, or fgsm: one untargeted step", choices=("pgd", "fgsm"))
    steps: int = option(20, help="PGD steps", min=1)
    step: int = option(1, help="PGD step in grey levels", min=1)


@dataclass(frozen=True)
class DreamOptions(Options):
    layers: list[str] = option(help=LAYERS_HELP, required=True)
    ids: list[str] = option(help=IDS_HELP, required=True, json_type=("integer", "string"))
    octaves: int = option(3, help="scales, smallest first", min=1)
    steps: int = option(10, help="steps per octave", min=1)
    lr: float = option(0.01, help="step size", min=0)
    jitter: int = option(16, help="random shift in pixels at each step", min=0)
    seed: int = seed_option(0, help="random seed")


@dataclass(frozen=True)
class InvertOptions(Options):
    layers: list[str] = option(help=LAYERS_HELP, required=True)
    ids: list[str] = option(help=IDS_HELP, required=True, json_type=("integer", "string"))
    steps: int = option(200, help="Adam steps", min=1)
    lr: float = option(0.05, help="Adam learning rate (cosine decay)", min=0)
    tv: float = option(0.5, help="weight of the TV prior R_TV^beta / (H*W)", min=0)
    beta: float = option(2.0, help="TV exponent beta", min=1)
    seed: int = seed_option(0, help="random seed")


@dataclass(frozen=True)
class TextureOptions(Options):
    layers: list[str] = option(help=LAYERS_HELP, required=True)
    image: Path = option(help="the example texture", required=True)
    weights: list[float] | None = option(help="one weight per layer (default: equal)", min=0)
    size: int = option(160, help="side of the synthesised texture", min=16, max=MAX_SIDE)
    steps: int = option(300, help="Adam steps", min=1)
    lr: float = option(0.02, help="Adam learning rate", min=0)
    seed: int = seed_option(0, help="random seed")


@dataclass(frozen=True)
class StyleTransferOptions(Options):
    id: str = option(help="content image: an image id of the run, or an image file", required=True,
                     json_type=("integer", "string"))
    style: Path = option(help="style image", required=True)
    content_layer: str = option(help="layer whose activations the result keeps", required=True)
    style_layers: list[str] = option(help="comma-separated layers whose Gram matrices the result matches",
                                     required=True)
    content_weight: float = option(1.0, help="weight of the content loss", min=0)
    style_weight: float = option(20.0, help="weight of the style loss", min=0)
    tv: float = option(0.5, help="weight of the total-variation prior", min=0)
    init: str = option("content", help="starting image", choices=("content", "style", "noise"))
    steps: int = option(300, help="Adam steps", min=1)
    lr: float = option(0.02, help="Adam learning rate", min=0)
    seed: int = seed_option(0, help="random seed")


def _filters(rd: RunDir, o: FiltersOptions) -> VizSummary:
    return filters(rd, o.layers)


def _activations(rd: RunDir, o: ActivationsOptions) -> VizSummary:
    return activations(rd, o.layers, o.ids)


def _class_model(rd: RunDir, o: ClassModelOptions, progress: bool = True) -> VizSummary:
    return class_model(rd, o.classes, size=o.size, steps=o.steps, lr=o.lr, l2=o.l2, jitter=o.jitter,
                       blur_every=o.blur_every, blur_sigma=o.blur_sigma, clip_percentile=o.clip_percentile,
                       octaves=o.octaves, noise=o.noise, seed=o.seed, progress=progress)


def _adversarial(rd: RunDir, o: AdversarialOptions) -> VizSummary:
    return adversarial(rd, o.ids, target=o.target, epsilon=o.epsilon, method=o.attack, steps=o.steps, step=o.step)


def _dream(rd: RunDir, o: DreamOptions, progress: bool = True) -> VizSummary:
    return dream(rd, o.ids, o.layers, octaves=o.octaves, steps=o.steps, lr=o.lr, jitter=o.jitter, seed=o.seed,
                 progress=progress)


def _invert(rd: RunDir, o: InvertOptions, progress: bool = True) -> VizSummary:
    return inversion(rd, o.ids, o.layers, steps=o.steps, lr=o.lr, tv=o.tv, beta=o.beta, seed=o.seed,
                     progress=progress)


def _texture(rd: RunDir, o: TextureOptions, progress: bool = True) -> VizSummary:
    return texture(rd, o.image, o.layers, layer_weights=o.weights, size=o.size, steps=o.steps, lr=o.lr, seed=o.seed,
                   progress=progress)


def _style(rd: RunDir, o: StyleTransferOptions, progress: bool = True) -> VizSummary:
    return style_transfer(rd, o.id, o.style, content_layer=o.content_layer, style_layers=o.style_layers,
                          content_weight=o.content_weight, style_weight=o.style_weight, tv=o.tv, init=o.init,
                          steps=o.steps, lr=o.lr, seed=o.seed, progress=progress)


def _command(name: str, options: type, run, text: str) -> Command:
    return Command(f"viz {name}", options, run, help=text, description=text + " Pictures go to <run>/viz/.")


COMMANDS = [
    _command("filters", FiltersOptions, _filters,
             "Conv filters of layers as tiles: RGB for a first layer, grayscale per input channel deeper."),
    _command("activations", ActivationsOptions, _activations,
             "Every channel's activation map of an image at a layer, as grayscale tiles."),
    _command("class-model", ClassModelOptions, _class_model,
             "Class models by gradient ascent on score_c(I) - l2 ||I||^2, all classes in one batch."),
    _command("adversarial", AdversarialOptions, _adversarial,
             "Adversarial examples within an L-inf budget, checked on the saved 8-bit PNG."),
    _command("dream", DreamOptions, _dream, "Feature amplification (DeepDream) of images at layers, side by side."),
    _command("invert", InvertOptions, _invert,
             "Feature inversion with a total-variation prior, from each layer, side by side."),
    _command("texture", TextureOptions, _texture,
             "Texture synthesis by matching Gram matrices at several layers, and at each alone."),
    _command("style", StyleTransferOptions, _style,
             "Neural style transfer by optimisation (Gatys et al.), with its loss curve."),
]
