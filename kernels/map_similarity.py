"""How alike two saliency maps are, as the model-randomisation test measures it (Adebayo et
al. 2018): the Spearman rank correlation of their absolute values, and SSIM.

Both work on batches of map pairs (B,H,W), on any device, and agree with scipy's `spearmanr`
and scikit-image's `structural_similarity` (default window) on the same arrays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N,) float64 ranks 1..N, ties given their average rank (scipy's 'average')."""
    unique, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).double()
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,...) x (B,...) -> (B,) Spearman correlation of each pair, flattened; NaN where a
    map is constant (its ranks have no spread)."""
    out = torch.empty(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        ra, rb = average_ranks(a[i].flatten()), average_ranks(b[i].flatten())
        ra, rb = ra - ra.mean(), rb - rb.mean()
        out[i] = (ra * rb).sum() / torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    return out


def spearman_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of |a| and |b|: the paper's measure, blind to a signed method's sign flips."""
    return spearman(a.abs(), b.abs())


def unit_range(maps: torch.Tensor) -> torch.Tensor:
    """(B,H,W) -> each map's absolute value scaled to [0, 1] by its maximum (0 stays 0)."""
    magnitude = maps.abs().float()
    top = magnitude.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return magnitude / top


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window: int = 7) -> torch.Tensor:
    """(B,H,W) x (B,H,W) -> (B,) mean structural similarity (Wang et al. 2004) over a uniform
    `window` with the sample covariance, on the positions where the window fits: scikit-image's
    default. Maps are compared as given; `unit_range` them first to compare shapes, not scales."""
    x, y = a.double().unsqueeze(1), b.double().unsqueeze(1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, stride=1)

    mx, my = mean(x), mean(y)
    unbiased = window * window / (window * window - 1)
    vx = unbiased * (mean(x * x) - mx * mx)
    vy = unbiased * (mean(y * y) - my * my)
    vxy = unbiased * (mean(x * y) - mx * my)
    index = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return index.flatten(1).mean(1)
