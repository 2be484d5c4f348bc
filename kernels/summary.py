"""Compact per-image summaries of conv activations.

A dataset's whole activation maps never fit anywhere, so conv layers are stored as the
per-channel spatial mean (the usual global-average-pool descriptor), the spatial max and
the cell where that max sits (what the top-k patches and receptive fields need).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ConvSummary(NamedTuple):
    mean: torch.Tensor  # (B, C) float32
    max: torch.Tensor  # (B, C) float32
    argmax_y: torch.Tensor  # (B, C) int16
    argmax_x: torch.Tensor  # (B, C) int16


def conv_summary(activation: torch.Tensor) -> ConvSummary:
    """Summarise a (B,C,H,W) activation map per channel.

    -> mean, max (B,C) float32 and the (y, x) cell of the max (B,C) int16. Ties go to the
    first cell in row-major order, so the result is deterministic.
    """
    if activation.ndim != 4:
        raise ValueError(f"conv_summary expects (B,C,H,W), got shape {tuple(activation.shape)}")
    b, c, h, w = activation.shape
    flat = activation.float().reshape(b, c, h * w)
    where = flat.argmax(dim=2)
    peak = flat.gather(2, where.unsqueeze(2)).squeeze(2)
    return ConvSummary(
        mean=flat.mean(dim=2),
        max=peak,
        argmax_y=torch.div(where, w, rounding_mode="floor").to(torch.int16),
        argmax_x=(where % w).to(torch.int16),
    )


def pixel_thumbnail(pixels: torch.Tensor, side: int = 32) -> torch.Tensor:
    """(B,3,H,W) uint8 model input -> (B, 3*side*side) float32 in [0,1], area-averaged.

    The pixel-space descriptor: neighbours in this space look alike pixel by pixel, the
    contrast to neighbours in a CNN's feature space (which are alike in kind).
    """
    small = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), side) / 255.0
    return small.flatten(1)
