"""Fast style transfer: train, extend, apply and export a multi-style `StyleNet`.

Training (Johnson et al., 2016, with Dumoulin et al.'s conditional instance norm): each
step takes a batch of random crops of the content images and gives each a random style;
the loss is the relative feature error at the loss network's content layer, plus the
relative Gram error at its style layers against that style's image, plus total variation.
The loss network is any torchvision classifier of the registry (mobilenet_v2 ImageNet by
default, vgg16's ReLU layers where its weights are available).

A checkpoint (`net.pt`, loaded with weights_only=True) holds the network, the optimiser,
the step, the loss log and the settings; training resumes from it. `losses.csv` beside it
logs every step.
"""

from __future__ import annotations

import csv
import hashlib
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

from featscope.kernels.architectures import profile_for
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.objectives import layer_outputs, total_variation
from featscope.kernels.params import ParamError
from featscope.kernels.style_net import StyleNet, mix, one_hot
from featscope.kernels.texture import gram
from featscope.pipelines.core import derived
from featscope.pipelines.core.atomic import atomic_path, one_writer
from featscope.pipelines.core.images import MAX_SIDE, BadImage, is_image_name, read_pixels
from featscope.pipelines.core.models import load_model, load_problem
from featscope.pipelines.core.options import Command, Group, Options, option, seed_option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.runtime import keep_freed_memory
from featscope.pipelines.core.workers import visualisation_model


@dataclass(frozen=True)
class TrainOptions(Options):
    """How the fast style network is trained (Johnson et al. 2016; Dumoulin et al. 2017)."""

    size: int = option(128, help="crop size (256 on a GPU)", min=16, max=MAX_SIDE)
    steps: int = option(300, help="total steps (a rerun continues up to this)", min=1)
    batch: int = option(4, help="content crops per step", min=1, max=1024)
    lr: float = option(2e-3, help="Adam learning rate", min=0)
    content_weight: float = option(1.0, help="weight of the content loss", min=0)
    style_weight: float = option(4.0, help="weight of the style loss", min=0)
    tv_weight: float = option(1e-2, help="weight of the total-variation loss", min=0)
    width: int = option(16, help="channels of the first layer (Johnson et al.: 32)", min=1)
    blocks: int = option(3, help="residual blocks (Johnson et al.: 5)", min=0)
    model: str = option("mobilenet_v2", help="loss network")
    weights: str = option("imagenet", help="loss network weights: imagenet | random | checkpoint path")
    content_layer: str | None = option(help="default: by architecture (mobilenet_v2 block6, vgg16 conv2_2)")
    style_layers: list[str] = option([], help="comma-separated; default by architecture")
    checkpoint_every: int = option(100, help="save a checkpoint every N steps", min=1)
    seed: int = seed_option(0, help="random seed")


@dataclass
class TrainSummary:
    checkpoint: Path
    steps_done: int
    new_steps: int
    first_loss: float
    last_loss: float
    seconds: float

    def line(self) -> str:
        rate = self.new_steps / self.seconds if self.seconds else 0.0
        return (f"style train: step {self.steps_done} ({self.new_steps} new, {rate:.2f} steps/s); loss "
                f"{self.first_loss:.3f} at the start -> {self.last_loss:.3f} (mean of the last 20); {self.checkpoint}")


def _image_files(content: Path) -> list[Path]:
    files = sorted(p for p in Path(content).rglob("*") if p.is_file() and is_image_name(p))
    if not files:
        raise FeatscopeError(f"no images under {content}")
    return files


def _pixels(path: Path, size: int) -> torch.Tensor:
    """(3,h,w) in [0,1], shorter side resized to size."""
    try:
        pixels = read_pixels(path)
    except BadImage as e:
        raise FeatscopeError(f"cannot read {path}: {e}") from None
    return TF.resize(pixels, [size], antialias=True).float() / 255


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _LossNetwork:
    """Features of the loss network at the content and style layers, and the style targets."""

    def __init__(self, options: TrainOptions, styles: list[Path], trained: list[int] | None = None):
        loaded = load_model(options.model, options.weights)
        profile = profile_for(options.model)
        content = options.content_layer or (profile.content_layer if profile else None)
        style = options.style_layers or (list(profile.style_layers) if profile else [])
        if not content or not style:
            raise ParamError("content_layer", f"and <style_layers> are needed: {options.model} has no default loss "
                             "layers")
        self.names = [content, *style]
        # the model with its batch norms folded (the same function of the image, fewer passes
        # over memory): each training step runs it forward and back twice over
        specs = [loaded.layer(n) for n in self.names]
        self.model = visualisation_model(loaded, specs)
        self.layers = [self.model.model.get_submodule(spec.module_path) for spec in specs]
        self.targets = []  # per style: its Gram matrices, or None for a frozen style (not trained on)
        for i, path in enumerate(styles):
            if trained is not None and i not in trained:
                self.targets.append(None)
                continue
            image = _pixels(path, options.size)[None]
            with torch.no_grad():
                self.targets.append([gram(f) for f in layer_outputs(self.model, image, self.layers[1:])])

    def losses(self, stylised: torch.Tensor, content: torch.Tensor, styles: list[int]) -> tuple[torch.Tensor, ...]:
        """Per image: relative content error, mean relative Gram error, TV per pixel."""
        out = layer_outputs(self.model, stylised, self.layers)
        with torch.no_grad():
            reference = layer_outputs(self.model, content, self.layers[:1])[0]
        c = (out[0] - reference).pow(2).flatten(1).sum(1) / reference.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        s = torch.zeros(len(styles))
        for k, feature in enumerate(out[1:]):
            g = gram(feature)
            target = torch.cat([self.targets[i][k] for i in styles])
            s = s + (g - target).pow(2).flatten(1).sum(1) / target.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        tv = total_variation(stylised) / (stylised.shape[2] * stylised.shape[3])
        return c, s / (len(out) - 1), tv


def _crops(files: list[Path], size: int, batch: int, rng: random.Random) -> torch.Tensor:
    crops = []
    for path in rng.sample(files, k=min(batch, len(files))) if len(files) >= batch else rng.choices(files, k=batch):
        pixels = _pixels(path, size)
        top = rng.randint(0, pixels.shape[1] - size)
        left = rng.randint(0, pixels.shape[2] - size)
        crops.append(pixels[:, top:top + size, left:left + size])
    return torch.stack(crops)


def _cut_log(log: Path, last_step: int) -> None:
    """Drop the loss rows past the checkpoint's step: a run stopped between a row and the next
    checkpoint left rows that the resumed run writes again."""
    with open(log, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    if len(kept) != len(rows):
        with atomic_path(log) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)


def _save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FeatscopeError(f"no checkpoint at {path}: run `featscope style train` first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unreadable or unsafe file is the user's, not a bug
        raise FeatscopeError(f"cannot load checkpoint {path}: {load_problem(e)}") from None
    if not isinstance(state, dict) or not {"net", "styles", "settings", "step"} <= state.keys():
        raise FeatscopeError(f"{path} is not a style network `featscope style train` wrote")
    return state


def network(state: dict) -> StyleNet:
    settings = state["settings"]
    net = StyleNet(len(state["styles"]), width=settings["width"], blocks=settings["blocks"])
    net.load_state_dict(state["net"])
    return net.eval()


def train(out: str | Path, styles: list[str | Path], content: str | Path, options: TrainOptions, *,
          progress: bool = True) -> TrainSummary:
    """Train (or resume) the network in `out`/net.pt for `options.steps` steps in all.

    Two trainings of one network take turns (a requeued job beside its first copy would mix
    its loss rows and checkpoints with the other's); the second then resumes where it stopped.
    """
    with one_writer(Path(out), "style train"):
        return _train_network(Path(out), styles, content, options, progress)


# Settings a resumed training may change: how far it goes and how often it saves.
RESUMABLE = ("steps", "checkpoint_every")


def _style_path(path: str | Path) -> str:
    """A style image as the checkpoint records it: absolute, so that a training resumed or
    given a style from another directory finds the same files."""
    return str(Path(path).resolve())


def _check_same_training(state: dict, styles: list[str], options: TrainOptions) -> None:
    """Resume only the training the checkpoint began: its styles (paths and bytes) and
    settings. Otherwise the network, its loss log and its summary would mix two trainings
    under one name, the second's options silently replaced by the first's."""
    recorded = [s["path"] for s in state["styles"]]
    if [_style_path(s) for s in styles] != [_style_path(s) for s in recorded]:
        raise ParamError("out", f"holds a network trained on styles {recorded}; use another one to train others")
    changed = [s["path"] for s in state["styles"] if Path(s["path"]).is_file() and _sha(Path(s["path"])) != s["sha256"]]
    if changed:
        raise ParamError("styles", f"<styles> {', '.join(changed)} changed since the network in <out> was trained "
                                   f"on {'them' if len(changed) > 1 else 'it'}: train on them as they are now into "
                                   "another <out>")
    then = state.get("settings", {})
    differ = [name for name, value in then.items() if name not in RESUMABLE and getattr(options, name, value) != value]
    if differ:
        raise ParamError("out", "<out> holds a network trained with " + ", ".join(
            f"<{name}> {then[name]} (asked: {getattr(options, name)})" for name in differ)
            + ": resume it with those settings, or train another one into another <out>")


def _train_network(out: Path, styles: list[str | Path], content: str | Path, options: TrainOptions,
                   progress: bool, added: dict | None = None) -> TrainSummary:
    """added: the checkpoint's state with a new style last (`add_style`): only that style is
    trained, and saved once, at the end: net.pt never holds a style that was not trained."""
    start = time.perf_counter()
    train_style = None if added is None else len(added["styles"]) - 1
    keep_freed_memory()
    checkpoint = out / "net.pt"
    files = _image_files(Path(content))
    if added is not None:
        state = added
        styles = [s["path"] for s in state["styles"]]
        net = network(state).train()
    elif checkpoint.exists():
        state = load_checkpoint(checkpoint)
        _check_same_training(state, [str(s) for s in styles], options)
        styles = [s["path"] for s in state["styles"]]
        options = TrainOptions(**state["settings"] | {name: getattr(options, name) for name in RESUMABLE})
        net = network(state).train()
    else:
        if not styles:
            raise ParamError("styles", "needs at least one image")
        state = {"step": 0, "losses": [], "styles": [{"path": _style_path(s), "sha256": _sha(Path(s))}
                                                     for s in styles]}
        torch.manual_seed(options.seed)
        net = StyleNet(len(styles), width=options.width, blocks=options.blocks).train()
    loss_network = _LossNetwork(options, [Path(s) for s in styles], None if train_style is None else [train_style])
    if train_style is not None:
        net.freeze_for_new_style(train_style)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=options.lr)
    if "optimizer" in state and train_style is None and state.get("train_style") is None:
        optimiser.load_state_dict(state["optimizer"])
    rng = random.Random(options.seed + state["step"])
    first_step = state["step"]
    log = out / "losses.csv"
    out.mkdir(parents=True, exist_ok=True)
    new_log = not log.exists() or first_step == 0
    if not new_log:
        _cut_log(log, first_step)
    with open(log, "w" if new_log else "a", newline="") as f, \
            tqdm(total=options.steps, initial=first_step, desc="style train", disable=not progress) as bar:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["step", "loss", "content", "style", "tv"])
        for step in range(first_step, options.steps):
            content_batch = _crops(files, options.size, options.batch, rng)
            chosen = [train_style if train_style is not None else rng.randrange(len(styles))
                      for _ in range(options.batch)]
            weights = torch.stack([one_hot(i, len(styles))[0] for i in chosen])
            stylised = net(content_batch, weights)
            c, s, tv = loss_network.losses(stylised, content_batch, chosen)
            loss = (options.content_weight * c + options.style_weight * s + options.tv_weight * tv).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            state["losses"].append(float(loss.detach()))
            writer.writerow([step + 1, f"{loss.item():.5f}", f"{c.mean().item():.5f}", f"{s.mean().item():.5f}",
                             f"{tv.mean().item():.5f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            state["step"] = step + 1
            if (state["step"] % options.checkpoint_every == 0 and added is None) or state["step"] == options.steps:
                f.flush()
                _save(checkpoint, state | {"net": net.state_dict(), "optimizer": optimiser.state_dict(),
                                           "settings": asdict(options), "train_style": train_style})
    losses = state["losses"]
    return TrainSummary(checkpoint, state["step"], state["step"] - first_step, losses[0] if losses else float("nan"),
                        sum(losses[-20:]) / max(1, len(losses[-20:])), time.perf_counter() - start)


def add_style(checkpoint: str | Path, style: str | Path, content: str | Path, *, steps: int,
              init_from: int | None = 0, progress: bool = True) -> tuple[int, TrainSummary]:
    """Append a style to a trained network (its gamma/beta copied from style `init_from`) and
    train only those for `steps` steps; the other styles stay as they are. net.pt is written
    once, when the new style is trained: a bad style image or a stopped job leaves it as it
    was, never with a style that `style apply` would draw as a copy of another.
    Returns the new style's index and the training's summary."""
    out = Path(checkpoint).parent
    with one_writer(out, "style train"):  # not while a training saves over it
        state = load_checkpoint(checkpoint)
        net = network(state)
        index = net.add_style(init_from)
        state["styles"].append({"path": _style_path(style), "sha256": _sha(Path(style))})
        state["net"] = net.state_dict()
        state.pop("optimizer", None)
        options = TrainOptions(**state["settings"] | {"steps": state["step"] + steps})
        return index, _train_network(out, [], content, options, progress, added=state)


def stylise(checkpoint: str | Path, images: list[str | Path], *, style: int | None = None,
            weights: list[float] | None = None, size: int = 256) -> torch.Tensor:
    """Images (shorter side `size`, centre-cropped square) stylised with one style or a mix."""
    state = load_checkpoint(checkpoint)
    net = network(state)
    n = len(state["styles"])
    if (style is None) == (weights is None):
        raise ParamError("style", "or <mix>: give one of them")
    if style is not None and not 0 <= style < n:
        raise ParamError("style", f"must be in 0..{n - 1}")
    if weights is not None and len(weights) != n:
        raise ParamError("mix", f"needs {n} weights, one per style, got {len(weights)}")
    try:
        w = one_hot(style, n) if style is not None else mix(weights)
    except ValueError as e:
        raise FeatscopeError(str(e)) from None
    batch = torch.stack([TF.center_crop(_pixels(Path(p), size), [size]) for p in images])
    with torch.no_grad():
        return net(batch, w.expand(len(batch), -1))


def save_images(images: torch.Tensor, paths: list[Path]) -> list[Path]:
    for image, path in zip(images, paths):
        with atomic_path(path) as tmp:
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp, format="PNG")
    return paths


def run_of(checkpoint: str | Path) -> RunDir | None:
    """The run whose style network `checkpoint` is (`<run>/style-net/net.pt`), if it is one."""
    folder = Path(checkpoint).resolve().parent
    run = RunDir(folder.parent)
    return run if folder == run.style_net_dir and run.run_json.exists() else None


def _stamp_of(checkpoint: str | Path) -> list[str] | None:
    """The run's checkpoint as it is now, for the record of what is drawn or exported from it."""
    run = run_of(checkpoint)
    return derived.stamp(run, [Path(checkpoint).resolve()]) if run else None


@contextmanager
def _recorded(out: Path, made_from: list[str] | None, job: str) -> Iterator[Path]:
    """Write `out` from a run's network with a record of the checkpoint it came from, so that
    `featscope status` and the report can tell a strip or an ONNX file of an earlier network
    (trained on, or given a style, since) from a current one. One job at a time per folder.
    A network outside a run is written plainly: nothing looks for a record there."""
    if made_from is None:
        with atomic_path(out) as tmp:
            yield tmp
        return
    with one_writer(out.parent, job):
        derived.forget(out)
        with atomic_path(out) as tmp:
            yield tmp
        derived.remember(out, made_from)


def strip(checkpoint: str | Path, image: str | Path, out: str | Path, *, size: int = 192) -> Path:
    """The image, each style alone, then mixes of styles 0 and 1 (0.25, 0.5, 0.75): switching
    and mixing in one picture."""
    from featscope.pipelines.render.panels import panel, to_image

    made_from = _stamp_of(checkpoint)  # before it is read
    state = load_checkpoint(checkpoint)
    n = len(state["styles"])
    settings = [(f"style {i}\n{Path(state['styles'][i]['path']).stem}", one_hot(i, n)[0]) for i in range(n)]
    if n >= 2:
        for a in (0.75, 0.5, 0.25):
            w = torch.zeros(n)
            w[0], w[1] = a, 1 - a
            settings.append((f"mix {a:g} / {1 - a:g}", w))
    net = network(state)
    x = TF.center_crop(_pixels(Path(image), size), [size])[None]
    with torch.no_grad():
        y = net(x.expand(len(settings), -1, -1, -1), torch.stack([w for _, w in settings]))
    picture = panel([to_image(x[0])] + [to_image(v) for v in y], ["content"] + [c for c, _ in settings],
                    f"one network, {n} styles (conditional instance norm), {state['step']} training steps: "
                    "switch and mix by the style weights")
    out = Path(out)
    with _recorded(out, made_from, "style strip") as tmp:
        picture.save(tmp, format="PNG")
    return out


def export_onnx(checkpoint: str | Path, out: str | Path, *, size: int = 256) -> Path:
    """The network as ONNX (inputs `image` (B,3,H,W) in [0,1] and `style` (B,N) weights;
    batch, height and width dynamic), by torch's TorchScript-based exporter."""
    import warnings

    made_from = _stamp_of(checkpoint)  # before it is read
    net = network(load_checkpoint(checkpoint))
    n = net.styles
    example = (torch.rand(1, 3, size, size), one_hot(0, n))
    out = Path(out)
    with _recorded(out, made_from, "style export") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, str(tmp), input_names=["image", "style"], output_names=["stylised"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "style": {0: "batch"},
                                        "stylised": {0: "batch", 2: "height", 3: "width"}},
                          dynamo=False, opset_version=17)
    return out


# ---- commands -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StyleTrainOptions(TrainOptions):
    styles: list[str] = option(help="style images, one per style index", required=True, spaced=True)
    content: Path = option(help="folder of content images (random crops)", required=True)
    out: Path = option(help="output folder: net.pt, losses.csv", required=True)


@dataclass(frozen=True)
class StyleAddOptions(Options):
    checkpoint: Path = option(help="a trained network (net.pt)", required=True)
    style: Path = option(help="the new style image", required=True)
    content: Path = option(help="folder of content images (random crops)", required=True)
    steps: int = option(200, help="steps that train only the new style's gamma and beta", min=1)


@dataclass(frozen=True)
class StyleApplyOptions(Options):
    checkpoint: Path = option(help="a trained network (net.pt)", required=True)
    style: int | None = option(help="one style, by index", min=0)
    mix: list[float] | None = option(help="one weight per style, e.g. 0.3,0.7")
    images: list[Path] = option(help="images to stylise", required=True, spaced=True)
    out: Path = option(help="output folder", required=True)
    size: int = option(256, help="shorter side of the output", min=16, max=MAX_SIDE)


@dataclass(frozen=True)
class StyleStripOptions(Options):
    checkpoint: Path = option(help="a trained network (net.pt)", required=True)
    image: Path = option(help="the image drawn through every style and mix", required=True)
    out: Path = option(help="output PNG", required=True)
    size: int = option(192, help="side of each picture", min=16, max=MAX_SIDE)


@dataclass(frozen=True)
class StyleExportOptions(Options):
    checkpoint: Path = option(help="a trained network (net.pt)", required=True)
    out: Path = option(help="output .onnx file", required=True)
    size: int = option(256, help="example size (height and width stay dynamic)", min=16, max=MAX_SIDE)


def _train(o: StyleTrainOptions, progress: bool = True) -> TrainSummary:
    training = TrainOptions(**{f.name: getattr(o, f.name) for f in fields(TrainOptions)})
    return train(o.out, o.styles, o.content, training, progress=progress)


def _add(o: StyleAddOptions, progress: bool = True) -> str:
    index, summary = add_style(o.checkpoint, o.style, o.content, steps=o.steps, progress=progress)
    return f"style add: style {index} ({o.style}); " + summary.line()


def _apply(o: StyleApplyOptions) -> str:
    images = stylise(o.checkpoint, o.images, style=o.style, weights=o.mix, size=o.size)
    tag = ",".join(f"{w:g}" for w in o.mix) if o.mix else o.style
    outs = [Path(o.out) / f"{Path(p).stem}-{tag}.png" for p in o.images]
    save_images(images, outs)
    return f"style apply: {len(outs)} images in {o.out}"


def _strip(o: StyleStripOptions) -> str:
    return f"style strip: {strip(o.checkpoint, o.image, o.out, size=o.size)}"


def _export(o: StyleExportOptions) -> str:
    return f"style export: {export_onnx(o.checkpoint, o.out, size=o.size)}"


COMMANDS = [
    Command("style train", StyleTrainOptions, _train, needs_run=False,
            help="train (or resume) one network for several styles",
            description="Checkpoints to OUT/net.pt every --checkpoint-every steps and resumes from it; "
                        "OUT/losses.csv logs every step."),
    Command("style add", StyleAddOptions, _add, needs_run=False,
            help="add a style to a trained network, training only its gamma and beta"),
    Command("style apply", StyleApplyOptions, _apply, needs_run=False,
            help="stylise images with one style (--style N) or a mix (--mix 0.3,0.7)",
            groups=(Group(("style", "mix"), required=True),)),
    Command("style strip", StyleStripOptions, _strip, needs_run=False,
            help="one image through every style and mixes of the first two, as one PNG"),
    Command("style export", StyleExportOptions, _export, needs_run=False,
            help="export the network to ONNX (inputs: image, style weights)"),
]
