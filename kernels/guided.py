"""Guided backpropagation's modified ReLU backward (Springenberg et al., 2015).

At every rectifier the backward pass keeps a gradient only where the forward input was in
the unit's linear range (the ordinary ReLU / ReLU6 backward) *and* the gradient arriving
from above is positive. The second condition is added here by a forward hook that routes
each rectifier's output through an identity whose backward clamps negative gradients; the
first is the rectifier's own backward. Modules are not swapped and in-place rectifiers need
no change, so the model is exactly as it was once the `with` block ends, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from featscope.kernels.architectures import PROFILES, profile_of_model
from featscope.kernels.errors import FeatscopeError

# Modules whose output is a rectifier's: nn.ReLU / nn.ReLU6, and blocks that end in a
# functional ReLU (GoogLeNet's BasicConv2d), as the architecture profiles list them.
RECTIFIERS = tuple(dict.fromkeys(cls for p in PROFILES for cls in p.rectified))


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


def _guide(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return _PositiveGradient.apply(output)


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Within the block, every rectifier of `model` back-propagates guided.

    Yields the number of rectifier modules guided. Guided backprop is defined for rectifiers
    only: a family whose non-linearities are not ReLUs (ConvNeXt's GELU) is refused in one
    line, never silently given a plain gradient.
    """
    profile = profile_of_model(model)
    if profile is not None and not profile.has_rectifiers:
        raise FeatscopeError(f"guided backprop is not defined for {profile.family}: it needs ReLU rectifiers, "
                             f"and {profile.family} uses {profile.nonlinearity}")
    rectifiers = [m for m in model.modules() if isinstance(m, RECTIFIERS)]
    if not rectifiers:
        raise FeatscopeError(f"guided backprop is not defined for {type(model).__name__}: it has no "
                             "ReLU rectifier modules to guide")
    handles = []
    try:
        for module in rectifiers:
            handles.append(module.register_forward_hook(_guide))
        yield len(rectifiers)
    finally:
        for handle in handles:
            handle.remove()
