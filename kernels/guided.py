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

from featscope.kernels.errors import FeatscopeError

RECTIFIERS = (nn.ReLU, nn.ReLU6)


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
    """Within the block, every nn.ReLU / nn.ReLU6 of `model` back-propagates guided.

    Yields the number of rectifier modules guided. Rectifiers called as functions
    (`F.relu` inside a forward) cannot be seen; a model with no rectifier modules is refused.
    """
    rectifiers = [m for m in model.modules() if isinstance(m, RECTIFIERS)]
    if not rectifiers:
        raise FeatscopeError(f"{type(model).__name__} has no nn.ReLU/nn.ReLU6 modules to guide")
    handles = []
    try:
        for module in rectifiers:
            handles.append(module.register_forward_hook(_guide))
        yield len(rectifiers)
    finally:
        for handle in handles:
            handle.remove()
