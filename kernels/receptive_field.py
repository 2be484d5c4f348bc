"""Receptive fields of CNN units by layer arithmetic, and their boxes in the input.

Per axis, a unit at feature-map cell f sees the input interval
    [start + f * jump, start + f * jump + size - 1]
and each layer maps (size, jump, start) forward (Araujo et al., "Computing Receptive
Fields of Convolutional Neural Networks", Distill 2019):
    conv / pool (kernel k, stride s, padding p, dilation d):
        size += (k - 1) * d * jump;  start -= p * jump;  jump *= s
Blocks with branches (residual, inverted-residual, inception) take the union of their
branches, as each architecture's profile (`kernels.architectures`) describes them;
element-wise layers (BN, ReLU, dropout, per-position norms) change nothing; global pooling
and linear layers see everything. The walk follows the module tree in forward order, so it
needs no tracing and no input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featscope.kernels.architectures import Branches, block_rule, is_off_path, is_pointwise
from featscope.kernels.errors import FeatscopeError

_ELEMENTWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout, nn.Identity, nn.LocalResponseNorm,
                nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.Sigmoid)
_GLOBAL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Linear, nn.Flatten)


@dataclass(frozen=True)
class ReceptiveField:
    """(y, x) pairs: `size` in input pixels, `jump` between neighbouring cells, `start` of cell 0."""

    size: tuple[int, int] = (1, 1)
    jump: tuple[int, int] = (1, 1)
    start: tuple[int, int] = (0, 0)
    is_global: bool = False

    def box(self, fy: torch.Tensor, fx: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Cells (N,) -> (N,4) boxes x0, y0, x1, y1 (inclusive) in an input of height x width,
        clipped to it. A global field is the whole input."""
        fy, fx = torch.as_tensor(fy).long(), torch.as_tensor(fx).long()
        if self.is_global:
            whole = torch.tensor([0, 0, width - 1, height - 1])
            return whole.expand(len(fy), 4).clone()
        y0 = self.start[0] + fy * self.jump[0]
        x0 = self.start[1] + fx * self.jump[1]
        boxes = torch.stack([x0, y0, x0 + self.size[1] - 1, y0 + self.size[0] - 1], dim=1)
        limits = torch.tensor([width - 1, height - 1, width - 1, height - 1])
        return boxes.clamp(min=torch.zeros(4, dtype=torch.long), max=limits)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _through(rf: ReceptiveField, module: nn.Module) -> ReceptiveField:
    if rf.is_global:
        return rf
    rule = block_rule(module)
    if rule is not None:
        return _through_branches(rf, rule(module))
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _pair(module.kernel_size), _pair(module.stride), _pair(module.padding)
        d = _pair(getattr(module, "dilation", 1))
        return ReceptiveField(
            size=tuple(rf.size[i] + (k[i] - 1) * d[i] * rf.jump[i] for i in range(2)),
            jump=tuple(rf.jump[i] * s[i] for i in range(2)),
            start=tuple(rf.start[i] - p[i] * rf.jump[i] for i in range(2)),
        )
    if isinstance(module, _ELEMENTWISE) or is_pointwise(module):
        return rf
    if isinstance(module, _GLOBAL):
        return ReceptiveField(is_global=True)
    if isinstance(module, nn.Sequential):
        for child in module:
            rf = _through(rf, child)
        return rf
    raise FeatscopeError(f"cannot compute a receptive field through {type(module).__name__}")


def _walk(rf: ReceptiveField, branch: list[tuple[str, nn.Module]], stop: str | None = None) -> ReceptiveField:
    for name, child in branch:
        if name == stop:
            break
        rf = _through(rf, child)
    return rf


def _through_branches(rf: ReceptiveField, block: Branches) -> ReceptiveField:
    out = rf if block.identity else None
    for branch in block.branches:
        out = _union(_walk(rf, branch), out)
    return out


def _union(a: ReceptiveField, b: ReceptiveField | None) -> ReceptiveField:
    if b is None or a.is_global:
        return a
    if b.is_global:
        return b
    if a.jump != b.jump:
        raise FeatscopeError("branches with different strides cannot be united")
    start = tuple(min(a.start[i], b.start[i]) for i in range(2))
    end = tuple(max(a.start[i] + a.size[i], b.start[i] + b.size[i]) for i in range(2))
    return ReceptiveField(tuple(end[i] - start[i] for i in range(2)), a.jump, start)


def _forward_children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children in the order the model's forward uses them (torchvision registers them so),
    without those the forward pass never runs (auxiliary heads)."""
    return [(n, m) for n, m in model.named_children() if m is not None and not is_off_path(m)]


def receptive_field(model: nn.Module, module_path: str) -> ReceptiveField:
    """The receptive field of the output of `module_path` (e.g. "features.11", "layer3",
    "layer3.1.conv2") in model-input pixels."""
    rf = ReceptiveField()
    parts = module_path.split(".")
    container = model
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        rule = block_rule(container)
        if rule is not None:
            # Inside a block with branches, only the branch holding the named module leads to it.
            branch = next((b for b in rule(container).branches if part in dict(b)), None)
            if branch is None:
                raise FeatscopeError(f"no module '{module_path}' on a known path")
            rf = _walk(rf, branch, part)
            child = dict(branch)[part]
        else:
            children = _forward_children(container)
            names = [n for n, _ in children]
            if part not in names:
                raise FeatscopeError(f"no module '{module_path}' in {type(model).__name__}")
            for name, sibling in children[: names.index(part)]:
                rf = _through(rf, sibling)
            child = dict(children)[part]
        if last:
            return _through(rf, child)
        container = child
    return rf
