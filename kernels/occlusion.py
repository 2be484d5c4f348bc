"""Occlusion sensitivity (Zeiler & Fergus, 2014): cover a window, see how far the score drops.

For each window position p the image is filled with a baseline inside the window and the
target's score s_p is compared with the clean score s; a pixel's map value is the mean drop
s - s_p over every window that covers it (Captum's `Occlusion` convention). Windows slide
by `stride`; a last row/column of windows is added at the far edge when the stride does not
land there, so every pixel is covered. All windows of an image are evaluated in a few large
batches, not one forward pass per position.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.scoring import class_score, like_model


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, ... and the far edge if not reached."""
    window = min(window, length)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def window_masks(height: int, width: int, window: int, stride: int) -> torch.Tensor:
    """(P,1,H,W) float masks, 1 inside window p, in row-major order of positions."""
    if window < 1 or stride < 1:
        raise FeatscopeError(f"occlusion window and stride must be >= 1, got {window} and {stride}")
    wy, wx = min(window, height), min(window, width)
    ys, xs = window_starts(height, window, stride), window_starts(width, window, stride)
    masks = torch.zeros(len(ys) * len(xs), 1, height, width)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            masks[i * len(xs) + j, 0, y:y + wy, x:x + wx] = 1.0
    return masks


@torch.no_grad()
def occlusion(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, window: int = 32, stride: int = 16,
              baseline: torch.Tensor | float = 0.0, score: str = "logit", batch: int = 128,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean drop in class score when each window is covered with `baseline`.

    images (B,3,H,W) preprocessed; target (B,) class ids; baseline a scalar or a tensor that
    broadcasts to images (e.g. a blurred copy) -> (B,H,W) float32 score drops.
    dtype: autocast dtype (torch.bfloat16) for the forward passes, or None for float32.
    """
    b, _, height, width = images.shape
    device = images.device
    masks = window_masks(height, width, window, stride).to(device)
    count = masks.sum(0)  # (1,H,W): how many windows cover each pixel, >= 1 everywhere
    flat_masks = masks.view(len(masks), -1)
    base = torch.as_tensor(baseline, dtype=torch.float32, device=device).expand_as(images)
    chunks = math.ceil(len(masks) / batch)
    per_chunk = math.ceil(len(masks) / chunks)
    maps = torch.empty(b, height, width, device=device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        clean = class_score(model(like_model(images.float(), model)), target, score)
        for i in range(b):
            image, fill, t = images[i:i + 1].float(), base[i:i + 1], target[i:i + 1]
            drops = []
            for start in range(0, len(masks), per_chunk):
                m = masks[start:start + per_chunk]
                covered = like_model(image * (1 - m) + fill * m, model)
                drops.append(clean[i] - class_score(model(covered), t.expand(len(m)), score))
            drop = torch.cat(drops).float()
            maps[i] = (flat_masks.T @ drop).view(1, height, width).div(count)[0]
    return maps
