"""Layer names and layer taps.

The pseudo-layer `pixels` names the model input itself (see `summary.pixel_thumbnail`),
so pixel-space and feature-space neighbours come from the same pass and the same code.

Users name layers by the field's aliases (alexnet `fc7`, vgg16 `conv5_3`, resnet `layer4`,
mobilenet_v2 `block13`; each family's are in `kernels.architectures`) or by a raw module path
(`classifier.4`). An alias always means the
output *after* the non-linearity, as in the papers. A conv layer with a grid suffix,
`block13@2x2`, is that layer's output average-pooled to a 2x2 grid and flattened: a vector
that keeps coarse layout (where in the image each channel fired), which global pooling
throws away; spatial-pyramid features for retrieval do the same (He et al., 2014).

`LayerTap` hooks the resolved modules for the duration of a `with` block and hands each
output to a callback at once, before an in-place ReLU further down can overwrite it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from featscope.kernels.architectures import profile_for
from featscope.kernels.errors import FeatscopeError


@dataclass(frozen=True)
class LayerSpec:
    """A layer resolved to a module: `kind` is "conv" (B,C,H,W), "vector" (B,D), "auto"
    (a raw module path: decided by its output) or "pixels". `grid` (rows, cols) means the
    output is average-pooled to that grid and flattened channel-major into a vector."""

    name: str
    module_path: str
    kind: str
    grid: tuple[int, int] | None = None


def layer_aliases(arch: str, model: nn.Module) -> dict[str, tuple[str, str]]:
    """Alias -> (module path, kind) for a torchvision architecture (empty if its family has
    no profile in `kernels.architectures`)."""
    profile = profile_for(arch)
    if profile is None:
        return {}
    return {name: (path, "vector" if name in profile.vector_aliases else "conv")
            for name, path in profile.aliases(model).items()}


from featscope.kernels.spaces import PIXELS  # noqa: E402  (the pseudo-layer, named where torch is not needed)

GRID_SUFFIX = re.compile(r"^(?P<base>.+)@(?P<rows>[1-9]\d*)x(?P<cols>[1-9]\d*)$")


def resolve_layer(arch: str, model: nn.Module, name: str) -> LayerSpec:
    """Resolve an alias, raw module path or `<conv layer>@<rows>x<cols>` to a `LayerSpec`,
    or raise a one-line error."""
    grid = GRID_SUFFIX.match(name)
    if grid:
        base = resolve_layer(arch, model, grid["base"])
        if base.kind not in ("conv", "auto"):
            raise FeatscopeError(f"layer '{name}': only conv layers have a spatial grid to pool, "
                                 f"'{grid['base']}' is a {base.kind} layer")
        return LayerSpec(name, base.module_path, "vector", (int(grid["rows"]), int(grid["cols"])))
    if "@" in name:
        raise FeatscopeError(f"cannot read layer '{name}': a pooled layer is written <conv layer>@<rows>x<cols>, "
                             "e.g. block13@2x2")
    if name == PIXELS:
        return LayerSpec(PIXELS, "", "pixels")
    aliases = layer_aliases(arch, model)
    if name in aliases:
        path, kind = aliases[name]
        return LayerSpec(name, path, kind)
    modules = dict(model.named_modules())
    if name and name in modules:
        return LayerSpec(name, name, "auto")
    known = ", ".join([*aliases, PIXELS])
    raise FeatscopeError(
        f"unknown layer '{name}' for {arch}: use one of {known}, or a module path such as "
        f"'{next(n for n in modules if n)}'"
    )


@contextmanager
def LayerTap(
    model: nn.Module, layers: list[LayerSpec], on_output: Callable[[LayerSpec, torch.Tensor], None]
) -> Iterator[None]:
    """Call `on_output(spec, output)` for each layer during forward passes inside the block.

    Hooks are removed on exit, also on error, so the model is left as it was found. Each
    module is found by its path (`get_submodule`), not in a map of all modules: an extraction
    or an upload enters this once a forward pass, and listing MobileNet-V2's 200-odd modules
    cost 0.5 ms of Python a pass, held under the GIL the query service's threads share.
    """
    handles = []
    try:
        for spec in layers:
            if spec.kind == "pixels":
                continue
            def hook(_module, _inputs, output, spec=spec):
                on_output(spec, output)

            handles.append(model.get_submodule(spec.module_path).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
