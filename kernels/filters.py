"""Filter and activation pictures as tile grids (tensors only; the PNG is the stage's job).

Grids are (C, H, W) float tensors in [0,1] with NaN in the gaps between tiles, so a
renderer can colour the gaps apart from any value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def tile_grid(tiles: torch.Tensor, columns: int, pad: int = 1) -> torch.Tensor:
    """(N,C,h,w) tiles -> (C, rows*(h+pad)+pad, columns*(w+pad)+pad), row-major, NaN gaps."""
    n, c, h, w = tiles.shape
    rows = math.ceil(n / columns)
    grid = torch.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), float("nan"))
    for i in range(n):
        r, k = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, y:y + h, x:x + w] = tiles[i]
    return grid


def _zoom(tiles: torch.Tensor, zoom: int) -> torch.Tensor:
    return F.interpolate(tiles, scale_factor=zoom, mode="nearest") if zoom > 1 else tiles


def filter_grid(weight: torch.Tensor, *, zoom: int = 1) -> torch.Tensor:
    """Conv weights (O,I,kh,kw) -> a picture of the filters.

    I == 3 (a first layer): one RGB tile per filter, min-max scaled per filter, in a
    near-square grid -> (3, H, W). Otherwise one grayscale tile per input channel, one row
    per filter, scaled per filter so that 0 is mid-grey and +-max|w| are white/black ->
    (1, H, W).
    """
    w = weight.detach().float().cpu()
    if w.dim() != 4:
        raise ValueError(f"expected conv weights (O,I,kh,kw), got shape {tuple(w.shape)}")
    out_channels, in_channels = w.shape[:2]
    if in_channels == 3:
        low = w.flatten(1).amin(1).view(-1, 1, 1, 1)
        high = w.flatten(1).amax(1).view(-1, 1, 1, 1)
        tiles = (w - low) / (high - low).clamp_min(1e-12)
        return tile_grid(_zoom(tiles, zoom), columns=math.ceil(math.sqrt(out_channels)))
    extent = w.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    tiles = (w / extent + 1) / 2  # (O, I, kh, kw): one row of I tiles per filter
    tiles = tiles.reshape(out_channels * in_channels, 1, *w.shape[2:])
    return tile_grid(_zoom(tiles, zoom), columns=in_channels)


def activation_grid(activation: torch.Tensor, *, zoom: int = 1) -> torch.Tensor:
    """One image's activations (C,h,w) -> (1, H, W): every channel a grayscale tile, scaled
    by the layer's maximum so that 0 is black (negative values, in layers without a ReLU,
    are clipped to black too)."""
    a = activation.detach().float().cpu()
    if a.dim() != 3:
        raise ValueError(f"expected one image's activations (C,h,w), got shape {tuple(a.shape)}")
    tiles = (a / a.max().clamp_min(1e-12)).clamp(0, 1).unsqueeze(1)
    return tile_grid(_zoom(tiles, zoom), columns=math.ceil(math.sqrt(a.shape[0])))
