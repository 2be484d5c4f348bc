"""Image transforms used while optimising an image: the regularisers that make results
look natural (Yosinski et al., 2015; Mordvintsev et al., 2015). Tensors (B,3,H,W) in, out."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF


class PixelModel(torch.nn.Module):
    """A classifier over pixels in [0,1]: normalises with the weights' mean/std, then runs it.

    The toolbox optimises images in pixel space, so budgets (an adversarial epsilon of 4
    grey levels) and clipping to the valid range mean what they say.
    """

    def __init__(self, model: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def jitter(x: torch.Tensor, pixels: int, generator: torch.Generator) -> tuple[torch.Tensor, tuple[int, int]]:
    """Roll the image by a random offset in [-pixels, pixels]; returns it and the offset."""
    if pixels <= 0:
        return x, (0, 0)
    dy, dx = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3)), (dy, dx)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with a kernel of about 4 sigma."""
    if sigma <= 0:
        return x
    size = 2 * math.ceil(2 * sigma) + 1
    return TF.gaussian_blur(x, kernel_size=size, sigma=sigma)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def octave_sizes(height: int, width: int, octaves: int, scale: float) -> list[tuple[int, int]]:
    """Smallest first: (H, W) divided by scale^(octaves-1), ..., scale, 1."""
    return [(max(8, round(height / scale ** k)), max(8, round(width / scale ** k))) for k in range(octaves - 1, -1, -1)]
