"""The model registry: a torchvision architecture plus a weights source.

Weights are `imagenet` (torchvision's IMAGENET1K_V1 files through its own cache,
$TORCH_HOME), a local checkpoint path (loaded with weights_only=True), or `random` (seeded,
for tests). Each model comes with the preprocessing that belongs to its weights and a
fingerprint of the exact tensors, which every output file records.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF2

from featscope.kernels.architectures import profile_for, tested_architectures
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import LayerSpec, resolve_layer
from featscope.kernels.params import ParamError
from featscope.pipelines.core.store import no_features

TESTED_ARCHITECTURES = tested_architectures()
IMAGENET_WEIGHTS = "IMAGENET1K_V1"  # the one file every tested architecture has


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side, centre-crop, scale to [0,1], normalise (torchvision's recipe)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        fields = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def to_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3,H,W) uint8 RGB -> (3, crop, crop) uint8: the shorter side resized (antialiased)
        and centre-cropped, as torchvision's `ImageClassification` transform does.

        torchvision's v2 kernel resizes uint8 natively (on x86 with AVX2/AVX-512 and on ARM):
        5x faster here than v1's float round trip, and the same as Pillow's resize, with
        which the ImageNet weights were trained, on 99.9% of pixels (v1: 85%); no pixel
        differs by more than one level from either."""
        resized = TF2.resize(pixels, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF2.center_crop(resized, [self.crop])

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the shorter side is resized, by torchvision's own rule."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def to_original(self, boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """(N,4) inclusive boxes x0,y0,x1,y1 in model-input pixels -> the same region in the
        original (upright) image of width x height, undoing the centre crop and the resize."""
        new_w, new_h = self.resized_size(width, height)
        left, top = int(round((new_w - self.crop) / 2.0)), int(round((new_h - self.crop) / 2.0))
        sx, sy = width / new_w, height / new_h
        b = boxes.double()
        x0 = torch.floor((b[:, 0] + left) * sx)
        y0 = torch.floor((b[:, 1] + top) * sy)
        x1 = torch.ceil((b[:, 2] + 1 + left) * sx) - 1
        y1 = torch.ceil((b[:, 3] + 1 + top) * sy) - 1
        out = torch.stack([x0, y0, x1, y1], dim=1).long()
        return out.clamp(min=torch.zeros(4, dtype=torch.long),
                         max=torch.tensor([width - 1, height - 1, width - 1, height - 1]))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) uint8 -> float32 model input, on the batch's device."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1)
        return (batch.float() / 255.0 - mean) / std


@dataclass
class LoadedModel:
    arch: str
    weights: str
    module: nn.Module
    preprocessing: Preprocessing
    weights_sha256: str
    class_names: list[str] | None = None  # the run's own names for its classes (a fine-tuned model)

    def layer(self, name: str) -> LayerSpec:
        return resolve_layer(self.arch, self.module, name)

    @property
    def categories(self) -> list[str] | None:
        """Class names of the model's outputs: the run's own, else ImageNet's for `imagenet`
        weights, else None."""
        return self.class_names or class_names(self.arch, self.weights)


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file (one per line) or a JSON list, in class-id order."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ParamError("classes", f"cannot be read from {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ParamError("classes", f"cannot be read from {path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as e:
            raise ParamError("classes", f"file {path} is not a JSON list: {e}") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(n, str) for n in names):
        raise ParamError("classes", f"file {path} holds no class names (one per line, or a JSON list)")
    return names


def checked_class_names(loaded: LoadedModel, names: list[str] | None) -> list[str] | None:
    """The run's class names, refused in one line if their count is not the model's."""
    if not names:
        return None
    with torch.no_grad():
        size = loaded.preprocessing.crop
        outputs = loaded.module(torch.zeros(1, 3, size, size)).shape[-1]
    if outputs != len(names):
        raise ParamError("classes", f"names {len(names)} classes, but the model has {outputs} outputs")
    return list(names)


def class_names(arch: str, weights: str) -> list[str] | None:
    """The one category lookup: ImageNet's class names for torchvision's ImageNet weights,
    None for other weights (class ids are then shown as numbers)."""
    if weights != "imagenet":
        return None
    return list(torchvision.models.get_model_weights(arch)[IMAGENET_WEIGHTS].meta["categories"])


def check_arch(arch: str) -> None:
    """A one-line error unless torchvision has a classification model of that name."""
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise FeatscopeError(
            f"unknown architecture '{arch}': use one of {', '.join(TESTED_ARCHITECTURES)} "
            "(or another torchvision classification model)"
        )


def _build_options(arch: str) -> dict:
    """Constructor arguments the architecture's profile asks for (e.g. GoogLeNet's weight init)."""
    profile = profile_for(arch)
    return dict(profile.build_options) if profile else {}


def check_weights(weights: str) -> None:
    """A one-line error unless `weights` is imagenet, random or an existing file."""
    if weights not in ("imagenet", "random") and not Path(weights).is_file():
        raise ParamError("weights", f"must be imagenet, random or a checkpoint file; '{weights}' is none of them")


def load_problem(e: Exception) -> str:
    """What `torch.load` found wrong with a file, in one line: its own message runs to many
    lines and, for any file it cannot unpickle, opens with advice about `weights_only`."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    detail = "" if not first or first.startswith("Weights only load failed") else f": {first[:100]}"
    return f"not a file torch.save wrote, or damaged ({type(e).__name__}{detail})"


def check_checkpoint(arch: str, weights: str) -> None:
    """A one-line error unless a checkpoint file loads into `arch` with finite values: said
    when the run is made, not at its first extraction, after the workflow has planned it."""
    _check_finite(_from_checkpoint(arch, Path(weights)), arch, weights)


def _classifier_path(arch: str) -> str | None:
    """The module path of the architecture's final classifier layer (its profile's `fc`)."""
    profile = profile_for(arch)
    if profile is None:
        return None
    with torch.device("meta"):
        skeleton = torchvision.models.get_model(arch, weights=None, **_build_options(arch))
    return profile.aliases(skeleton).get("fc")


def _from_checkpoint(arch: str, path: Path) -> nn.Module:
    """`arch` with the state dict saved at `path`; the number of classes is read from the
    checkpoint's classifier, so a fine-tuned model of any class count loads."""
    check_weights(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable or unsafe checkpoint is the user's file, not a bug
        if "Unsupported global" in str(e):  # a class pickled with it: torch.save(model) rather than its weights
            raise FeatscopeError(f"{path} holds a pickled model, not a state dict: save the weights with "
                                 "torch.save(model.state_dict(), path) and pass that file") from None
        raise FeatscopeError(f"cannot load checkpoint {path}: {load_problem(e)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeatscopeError(f"{path} is not a state dict of tensors: save the weights with "
                             "torch.save(model.state_dict(), path)")
    options = _build_options(arch)
    classifier = _classifier_path(arch)
    if classifier and f"{classifier}.weight" in state:
        options["num_classes"] = int(state[f"{classifier}.weight"].shape[0])
    module = torchvision.models.get_model(arch, weights=None, **options)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{wrong[0]} is {found[wrong[0]]} in the file but {expected[wrong[0]]} in {arch}")
        if missing:
            parts.append(f"{len(missing)} keys missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
        raise FeatscopeError(f"checkpoint {path} does not fit {arch}: " + "; ".join(parts))
    module.load_state_dict(state)
    return module


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_finite(module: nn.Module, arch: str, weights: str) -> None:
    """Refuse weights holding NaN or inf (what a training run that diverged saves): every
    feature, map and answer computed through them would be NaN, yet look finished."""
    for name, tensor in module.state_dict().items():
        # a NaN or inf makes the sum one (25x faster than isfinite(tensor).all() on VGG16)
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
            continue
        bad = int((~torch.isfinite(tensor)).sum())  # 0: a finite sum past float32's range
        if bad:
            raise FeatscopeError(f"the weights '{weights}' of {arch} hold NaN or inf in {name} ({bad} of "
                                 f"{tensor.numel()} values): a training run that diverged saves such weights, "
                                 "and every feature computed through them would be NaN")


def load_model(arch: str, weights: str = "imagenet", *, seed: int = 0) -> LoadedModel:
    """Build `arch` with `weights` ("imagenet" | "random" | a checkpoint path), in eval mode."""
    check_arch(arch)
    preprocessing = Preprocessing()
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch)
        if not hasattr(enum, IMAGENET_WEIGHTS):
            raise FeatscopeError(f"torchvision has no {IMAGENET_WEIGHTS} weights for {arch}")
        tv_weights = enum[IMAGENET_WEIGHTS]
        try:
            module = torchvision.models.get_model(arch, weights=tv_weights)
        except (urllib.error.URLError, OSError) as e:
            raise FeatscopeError(
                f"ImageNet weights for {arch} are not in torchvision's cache ({torch.hub.get_dir()}"
                f"/checkpoints) and cannot be downloaded ({e}); run `featscope weights fetch {arch}` "
                "or pass a local checkpoint path"
            ) from None
        t = tv_weights.transforms()
        preprocessing = Preprocessing(
            resize=t.resize_size[0], crop=t.crop_size[0], mean=tuple(t.mean), std=tuple(t.std),
            interpolation=t.interpolation.value,
        )
    elif weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = torchvision.models.get_model(arch, weights=None, **_build_options(arch))
    else:
        module = _from_checkpoint(arch, Path(weights))
    module.eval()
    _check_finite(module, arch, weights)
    return LoadedModel(arch, weights, module, preprocessing, state_fingerprint(module))


def load_run_model(config: dict, *, require_features: bool = False) -> LoadedModel:
    """The model a run's run.json names, checked against the weights fingerprint recorded
    when its features were extracted (required if `require_features`)."""
    if not config.get("model"):
        raise FeatscopeError("this run records no model: run `featscope manifest --model ...` first")
    if require_features and "weights_sha256" not in config:
        raise no_features(config)
    weights = config.get("weights") or "imagenet"
    loaded = load_model(config["model"], weights, seed=int(config.get("seed", 0)))
    loaded.class_names = checked_class_names(loaded, config.get("class_names"))
    if config.get("weights_sha256") not in (None, loaded.weights_sha256):
        raise FeatscopeError(f"the weights '{weights}' no longer match the ones this run's features were "
                             "extracted with")
    return loaded
