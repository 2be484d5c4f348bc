"""What a feature visualisation maximises, per image of a batch (Lucent's objectives).

An `Objective` maps the captured layer outputs to one value per image, (B,), to be
maximised. Objectives compose: `a + b`, `2.0 * a`, `a - 0.1 * diversity(layer)`. The unit
objectives take one unit per image, so a batch of B images renders B units at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Outputs = dict[nn.Module, torch.Tensor]


class Objective:
    """A function of the layer outputs giving (B,) values to maximise; `layers` are the
    modules whose outputs it reads."""

    def __init__(self, function: Callable[[Outputs], torch.Tensor], layers: tuple[nn.Module, ...], name: str):
        self.function, self.layers, self.name = function, layers, name

    def __call__(self, outputs: Outputs) -> torch.Tensor:
        return self.function(outputs)

    def __add__(self, other: Objective) -> Objective:
        return Objective(lambda o: self(o) + other(o), _union(self.layers, other.layers), f"{self.name} + {other.name}")

    def __sub__(self, other: Objective) -> Objective:
        return self + (-1.0) * other

    def __rmul__(self, weight: float) -> Objective:
        return Objective(lambda o: weight * self(o), self.layers, f"{weight:g} * {self.name}")

    __mul__ = __rmul__


def _union(a: tuple, b: tuple) -> tuple:
    return tuple(dict.fromkeys(a + b))


def _conv(activation: torch.Tensor) -> torch.Tensor:
    """A conv map (B,C,h,w) as it is; a vector (B,C) as a 1x1 map."""
    return activation if activation.dim() == 4 else activation[:, :, None, None]


def channels(layer: nn.Module, units: torch.Tensor) -> Objective:
    """Image b maximises the mean activation of channel units[b] over all positions."""
    def value(outputs: Outputs) -> torch.Tensor:
        a = _conv(outputs[layer]).float()
        return a[torch.arange(len(units)), units.to(a.device)].mean(dim=(1, 2))
    return Objective(value, (layer,), "channel")


def neurons(layer: nn.Module, units: torch.Tensor, y: int | None = None, x: int | None = None) -> Objective:
    """Image b maximises channel units[b] at one position (default: the centre)."""
    def value(outputs: Outputs) -> torch.Tensor:
        a = _conv(outputs[layer]).float()
        row = a.shape[2] // 2 if y is None else y
        col = a.shape[3] // 2 if x is None else x
        return a[torch.arange(len(units)), units.to(a.device), row, col]
    return Objective(value, (layer,), "neuron")


def directions(layer: nn.Module, vectors: torch.Tensor) -> Objective:
    """Image b maximises the mean over positions of the cosine between the activation vector
    and vectors[b] (B,C) (Lucent's `direction`; the activation atlas renders cells with it)."""
    def value(outputs: Outputs) -> torch.Tensor:
        a = _conv(outputs[layer]).float()
        v = vectors.to(a.device).float()[:, :, None, None]
        return F.cosine_similarity(a, v.expand_as(a), dim=1).mean(dim=(1, 2))
    return Objective(value, (layer,), "direction")


def diversity(layer: nn.Module) -> Objective:
    """Minus each image's mean cosine similarity between its Gram matrix at `layer` and the
    other images' (Lucent's `diversity`): subtracted, it pushes a batch apart."""
    def value(outputs: Outputs) -> torch.Tensor:
        a = _conv(outputs[layer]).float().flatten(2)
        gram = F.normalize((a @ a.transpose(1, 2)).flatten(1), dim=1)
        similarity = gram @ gram.T
        others = (similarity.sum(1) - similarity.diagonal()) / max(len(a) - 1, 1)
        return -others
    return Objective(value, (layer,), "diversity")
