"""What the toolbox optimises: class scores, a layer's energy, feature distances, and the
total-variation prior. Each returns one value per image of the batch, (B,)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def total_variation(x: torch.Tensor, beta: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """R_V^beta(x) = sum_{c,i,j} ((x[i,j+1] - x[i,j])^2 + (x[i+1,j] - x[i,j])^2)^(beta/2)
    over the pixels that have both neighbours (Mahendran & Vedaldi, 2015, eq. 4), (B,)."""
    dx = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    dy = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    squared = dx.pow(2) + dy.pow(2)
    if beta != 2.0:
        squared = (squared + eps).pow(beta / 2)  # eps: the gradient of |t|^beta at 0 for beta < 2
    return squared.flatten(1).sum(1)


class _Enough(Exception):
    """Raised by a hook once every wanted layer has been seen: the rest of the network is skipped."""


@contextmanager
def capture(model: nn.Module, layers: Sequence[nn.Module]) -> Iterator[list]:
    """Within the block, `run(x)` below fills the yielded list with each layer's output
    (in `layers` order) and stops the forward pass after the last one it needs."""
    outputs: list = [None] * len(layers)
    pending = set(range(len(layers)))
    handles = []

    def make_hook(i):
        def hook(_module, _inputs, output):
            outputs[i] = output
            pending.discard(i)
            if not pending:
                raise _Enough
        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(make_hook(i)))
        yield outputs
    finally:
        for h in handles:
            h.remove()


def layer_outputs(model: nn.Module, x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Outputs of `layers` for input x, running the model only as far as the deepest one."""
    unique = list(dict.fromkeys(layers))
    with capture(model, unique) as outputs:
        try:
            model(x)
        except _Enough:
            pass
    if any(o is None for o in outputs):
        raise RuntimeError("a requested layer did not run in the forward pass")
    found = dict(zip(unique, outputs))
    return [found[layer] for layer in layers]


def layer_energy(activation: torch.Tensor) -> torch.Tensor:
    """Mean squared activation of each image, (B,): DeepDream's objective, whose gradient
    with respect to the activation is the activation itself (up to scale)."""
    return activation.float().pow(2).flatten(1).mean(1)


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||x - x0||^2 / ||x0||^2 per image, (B,): the error relative to the reference, so one
    weight suits every layer (features, Gram matrices and pixels alike)."""
    diff = (x.float() - reference.float()).flatten(1).pow(2).sum(1)
    return diff / reference.float().flatten(1).pow(2).sum(1).clamp_min(1e-12)
