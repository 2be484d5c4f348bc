"""One profile per architecture family: everything featscope knows about a family's structure.

A profile names the family's layers (aliases), says how its blocks combine branches (for
receptive fields), where occlusion may cut the network, which modules end in a rectifier
(for guided backprop), the Grad-CAM layer and the style-loss layers. Code elsewhere asks
the profile and never tests an architecture's name or class itself, so supporting a new
family is adding a profile here and nothing else.

An alias always means a layer's output *after* its non-linearity, as in the papers
(alexnet `fc7` is the 4,096-d vector after its ReLU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from torchvision import models
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.models.googlenet import BasicConv2d, Inception, InceptionAux
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import Permute
from torchvision.ops.stochastic_depth import StochasticDepth

from featscope.kernels.errors import FeatscopeError


@dataclass(frozen=True)
class Branches:
    """How a block combines its inputs: each branch is its children in forward order; the
    outputs are added or concatenated (either way a cell sees the union of what its
    branches see). `identity`: a shortcut that passes the input unchanged."""

    branches: list[list[tuple[str, nn.Module]]]
    identity: bool = False


@dataclass(frozen=True)
class Profile:
    """What featscope knows about one architecture family."""

    family: str
    model_type: type  # the torchvision class of the family's models
    matches: Callable[[str], bool]  # torchvision architecture name -> in this family?
    aliases: Callable[[nn.Module], dict[str, str]]  # alias -> module path
    vector_aliases: frozenset[str]  # aliases whose output is a vector (B, D), the rest are conv maps
    gradcam_layer: str  # the last conv block: where Grad-CAM looks
    content_layer: str  # style transfer's content layer
    style_layers: tuple[str, ...]  # and its style (Gram) layers
    trunk: Callable[[nn.Module], list[str] | None]  # blocks occlusion may cut after, in forward order
    blocks: dict[type, Callable[[nn.Module], Branches]] = field(default_factory=dict)
    pointwise: tuple[type, ...] = ()  # modules that act on each cell alone (norms, permutes)
    off_path: tuple[type, ...] = ()  # modules the eval forward pass never runs (auxiliary heads)
    rectified: tuple[type, ...] = (nn.ReLU, nn.ReLU6)  # modules whose output is a rectifier's
    nonlinearity: str = "ReLU"  # in words, for errors when a method needs rectifiers
    build_options: dict = field(default_factory=dict)  # extra torchvision constructor arguments
    tested: tuple[str, ...] = ()  # architectures of this family that the test suite runs

    @property
    def has_rectifiers(self) -> bool:
        return bool(self.rectified)


def _children(module: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    return [(n, getattr(module, n)) for n in names]


# ---- AlexNet and VGG: a `features` Sequential, then the classifier --------------------------

def _alexnet_aliases(model: nn.Module) -> dict[str, str]:
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    aliases = {f"conv{n + 1}": f"features.{i + 1}" for n, i in enumerate(convs)}
    return aliases | {"fc6": "classifier.2", "fc7": "classifier.5", "fc8": "classifier.6"}


def _vgg_aliases(model: nn.Module) -> dict[str, str]:
    """conv<block>_<n> -> the ReLU after that conv; blocks end at each max-pool."""
    aliases, block, conv = {}, 1, 0
    modules = list(model.features.named_children())
    for i, (name, module) in enumerate(modules):
        if isinstance(module, nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(module, nn.Conv2d):
            conv += 1
            after = (n for n, m in modules[i + 1:] if isinstance(m, nn.ReLU))
            aliases[f"conv{block}_{conv}"] = f"features.{next(after, name)}"
    return aliases | {"fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}


def _features_trunk(model: nn.Module) -> list[str]:
    return [f"features.{i}" for i in range(len(model.features))]


# ---- ResNet ------------------------------------------------------------------------------------

def _resnet_aliases(model: nn.Module) -> dict[str, str]:
    return {"stem": "relu"} | {f"layer{i}": f"layer{i}" for i in range(1, 5)} | {"pool": "avgpool", "fc": "fc"}


def _resnet_trunk(model: nn.Module) -> list[str]:
    paths = ["conv1", "bn1", "relu", "maxpool"]
    return paths + [f"layer{n}.{i}" for n in range(1, 5) for i in range(len(getattr(model, f"layer{n}")))]


def _residual(block: nn.Module) -> Branches:
    names = ["conv1", "bn1", "relu", "conv2", "bn2"] + (["conv3", "bn3"] if isinstance(block, Bottleneck) else [])
    main = _children(block, names)
    if block.downsample is not None:
        return Branches([main, [("downsample", block.downsample)]])
    return Branches([main], identity=True)


# ---- MobileNet-V2 --------------------------------------------------------------------------------

def _mobilenet_aliases(model: nn.Module) -> dict[str, str]:
    # torchvision pools with a functional call; in eval mode the classifier's Dropout passes
    # the pooled 1280-d vector through unchanged, so it is where `pool` is tapped.
    aliases = {f"block{i}": f"features.{i}" for i in range(len(model.features))}
    return aliases | {"pool": "classifier.0", "fc": "classifier.1"}


def _inverted_residual(block: nn.Module) -> Branches:
    return Branches([[("conv", block.conv)]], identity=block.use_res_connect)


# ---- GoogLeNet (Inception V1): four branches concatenated per block -----------------------------

_INCEPTIONS = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")


def _googlenet_aliases(model: nn.Module) -> dict[str, str]:
    aliases = {name: name for name in ("conv1", "conv2", "conv3")}
    aliases |= {f"inception{n}": f"inception{n}" for n in _INCEPTIONS}
    return aliases | {"pool": "avgpool", "fc": "fc"}


def _googlenet_trunk(model: nn.Module) -> list[str] | None:
    if getattr(model, "transform_input", False):  # the forward rescales its input first: cannot cut
        return None
    return ["conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
            *(f"inception4{c}" for c in "abcde"), "maxpool4", "inception5a", "inception5b"]


def _inception(block: nn.Module) -> Branches:
    return Branches([_children(block, [name]) for name in ("branch1", "branch2", "branch3", "branch4")])


def _basic_conv(block: nn.Module) -> Branches:
    return Branches([_children(block, ["conv", "bn"])])  # its ReLU is functional: element-wise


# ---- ConvNeXt: 7x7 depthwise conv, then per-position LayerNorm and MLP (GELU) -------------------

def _convnext_aliases(model: nn.Module) -> dict[str, str]:
    aliases = {"stem": "features.0"} | {f"stage{n + 1}": f"features.{2 * n + 1}" for n in range(4)}
    return aliases | {"pool": "avgpool", "fc": "classifier.2"}


def _convnext_trunk(model: nn.Module) -> list[str]:
    paths = []
    for i, stage in enumerate(model.features):
        is_blocks = isinstance(stage, nn.Sequential) and all(isinstance(b, CNBlock) for b in stage)
        paths += [f"features.{i}.{j}" for j in range(len(stage))] if is_blocks else [f"features.{i}"]
    return paths


def _cnblock(block: nn.Module) -> Branches:
    # Only the depthwise conv mixes positions; the rest of the branch (permute, LayerNorm,
    # linear layers applied per position, GELU, layer scale) acts on each cell alone.
    return Branches([[("block", block.block[0])]], identity=True)


PROFILES: tuple[Profile, ...] = (
    Profile(
        family="alexnet", model_type=models.AlexNet,
        matches=lambda arch: arch == "alexnet", aliases=_alexnet_aliases,
        vector_aliases=frozenset({"fc6", "fc7", "fc8"}), gradcam_layer="conv5",
        content_layer="conv3", style_layers=("conv1", "conv2", "conv3", "conv4"), trunk=_features_trunk,
        tested=("alexnet",),
    ),
    Profile(
        family="vgg", model_type=models.VGG,
        matches=lambda arch: arch.startswith("vgg"), aliases=_vgg_aliases,
        vector_aliases=frozenset({"fc6", "fc7", "fc8"}), gradcam_layer="conv5_3",
        content_layer="conv2_2", style_layers=("conv1_2", "conv2_2", "conv3_3", "conv4_3"), trunk=_features_trunk,
        tested=("vgg16",),
    ),
    Profile(
        family="resnet", model_type=models.ResNet,
        matches=lambda arch: arch.startswith(("resnet", "resnext", "wide_resnet")),
        aliases=_resnet_aliases,
        vector_aliases=frozenset({"pool", "fc"}), gradcam_layer="layer4",
        content_layer="layer1", style_layers=("stem", "layer1", "layer2", "layer3"), trunk=_resnet_trunk,
        blocks={BasicBlock: _residual, Bottleneck: _residual}, tested=("resnet18", "resnet50"),
    ),
    Profile(
        family="mobilenet_v2", model_type=models.MobileNetV2,
        matches=lambda arch: arch == "mobilenet_v2", aliases=_mobilenet_aliases,
        vector_aliases=frozenset({"pool", "fc"}), gradcam_layer="block18",
        content_layer="block6", style_layers=("block1", "block3", "block6", "block10"), trunk=_features_trunk,
        blocks={InvertedResidual: _inverted_residual}, tested=("mobilenet_v2",),
    ),
    Profile(
        family="googlenet", model_type=models.GoogLeNet,
        matches=lambda arch: arch == "googlenet", aliases=_googlenet_aliases,
        vector_aliases=frozenset({"pool", "fc"}), gradcam_layer="inception5b",
        content_layer="inception3a", style_layers=("conv2", "inception3a", "inception4a", "inception4d"),
        trunk=_googlenet_trunk, blocks={Inception: _inception, BasicConv2d: _basic_conv},
        off_path=(InceptionAux,), rectified=(BasicConv2d,),  # BasicConv2d ends in a functional ReLU
        build_options={"init_weights": True}, tested=("googlenet",),
    ),
    Profile(
        family="convnext", model_type=models.ConvNeXt,
        matches=lambda arch: arch.startswith("convnext"), aliases=_convnext_aliases,
        vector_aliases=frozenset({"pool", "fc"}), gradcam_layer="stage4",
        content_layer="stage1", style_layers=("stem", "stage1", "stage2", "stage3"), trunk=_convnext_trunk,
        blocks={CNBlock: _cnblock}, pointwise=(LayerNorm2d, nn.LayerNorm, Permute, StochasticDepth),
        rectified=(), nonlinearity="GELU", tested=("convnext_tiny",),
    ),
)


def profile_for(arch: str) -> Profile | None:
    """The profile of a torchvision architecture name, or None for a family featscope does not know."""
    return next((p for p in PROFILES if p.matches(arch)), None)


def require_profile(arch: str, what: str) -> Profile:
    """The profile of `arch`, or a one-line error saying `what` needs one."""
    profile = profile_for(arch)
    if profile is None:
        known = ", ".join(p.family for p in PROFILES)
        raise FeatscopeError(f"{what} needs an architecture profile, and '{arch}' has none (families: {known})")
    return profile


def profile_of_model(model: nn.Module) -> Profile | None:
    """The profile of a model by its class (kernels get models, not architecture names)."""
    return next((p for p in PROFILES if isinstance(model, p.model_type)), None)


def block_rule(module: nn.Module) -> Callable[[nn.Module], Branches] | None:
    """How a block of any known family combines branches, if it is such a block."""
    for profile in PROFILES:
        for cls, rule in profile.blocks.items():
            if type(module) is cls:
                return rule
    return None


def is_pointwise(module: nn.Module) -> bool:
    return any(isinstance(module, p.pointwise) for p in PROFILES if p.pointwise)


def is_off_path(module: nn.Module) -> bool:
    return any(isinstance(module, p.off_path) for p in PROFILES if p.off_path)


def tested_architectures() -> tuple[str, ...]:
    return tuple(arch for p in PROFILES for arch in p.tested)
