"""Which classes a unit supports: the average gradient of each class logit with respect to it.

For the vector a linear classifier reads, a unit's support for class c is the classifier's
weight W[c, u]. Deeper in, the same question is answered by the gradient of logit c with
respect to unit u's activation (summed over the unit's positions: the effect of raising the
whole channel by one), averaged over images, as in the attribution-to-classes views of
Olah et al. 2018 ("The Building Blocks of Interpretability"). At the classifier's input
this gradient is exactly W[c, u], which the tests hold it to.

A layer has far fewer units than the model has classes (96 against 1,000 for MobileNet-V2's
block13), so the (units x classes) Jacobian is computed in forward mode: one tangent per
unit, many units at once by repeating the images after the layer (the layers before it run
once per chunk of units), never one backward pass per class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn


def mean_class_gradients(model: nn.Module, layer: nn.Module, images: torch.Tensor, *, chunk: int = 32,
                         batch: int = 8, on_images: Callable[[int], None] | None = None) -> torch.Tensor:
    """(units, classes): the mean over `images` (normalised model inputs) of d logit_c /
    d unit u, the unit's activation raised by one at every position of its map.
    `on_images(n)` is called after each batch of n images (a progress bar's update)."""
    total: torch.Tensor | None = None
    units = _units(model, layer, images[:1])
    with torch.no_grad():
        for first_image in range(0, len(images), batch):
            x = images[first_image:first_image + batch]
            for first in range(0, units, chunk):
                k = min(chunk, units - first)
                jacobian = _jvp_chunk(model, layer, x, first, k)  # (B, k, classes)
                part = jacobian.sum(0)
                if total is None:
                    total = torch.zeros(units, part.shape[1], dtype=torch.float64, device=part.device)
                total[first:first + k] += part.double()
            if on_images is not None:
                on_images(len(x))
    return (total / len(images)).float()


def _units(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> int:
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _jvp_chunk(model: nn.Module, layer: nn.Module, x: torch.Tensor, first: int, k: int) -> torch.Tensor:
    """(B, k, classes): the logits' derivatives along units first..first+k-1, each image
    repeated k times after `layer`, copy j carrying the tangent of unit first + j."""
    def with_tangents(_module, _inputs, out):
        primal = out.repeat_interleave(k, 0)
        tangent = torch.zeros_like(primal)
        rows = torch.arange(primal.shape[0], device=primal.device)
        tangent[rows, first + rows % k] = 1  # a whole channel (every position), or one vector unit
        return fwAD.make_dual(primal, tangent)

    handle = layer.register_forward_hook(with_tangents)
    try:
        with warnings.catch_warnings(), fwAD.dual_level():
            # torch's first dual tensor loads its forward-AD decompositions through torch.jit.script,
            # which warns of its own deprecation: nothing a featscope user can act on
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            logits = model(x)
            tangent = fwAD.unpack_dual(logits).tangent
    finally:
        handle.remove()
    return tangent.float().view(len(x), k, -1)
