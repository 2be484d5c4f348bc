"""Faithfulness of a saliency map: does the model's class score follow the pixels it ranks?

Deletion (Petsiuk et al. 2018, RISE; "pixel flipping", Bach et al. 2015): replace the image's
pixels by a reference image in the order the map ranks them, most important first, in
`steps` equal parts, and track the target's score. A faithful map makes it fall fast: low
area under the curve. Insertion: start from the reference and reveal the pixels in the same
order; a faithful map makes the score rise fast: high area.

Every perturbed copy of every image goes through the model in large batches: that, not the
curve arithmetic, is where the time goes. Two reference maps say what "better than nothing"
means on the same images: a seeded uniform random map and a centred Gaussian (the photographer's
prior: the object is in the middle).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from featscope.kernels import baselines
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.scoring import class_score, like_model

MODES = ("deletion", "insertion")


def ranks(maps: torch.Tensor) -> torch.Tensor:
    """maps (B,H,W) -> (B,H*W) int64: each pixel's place in its map's order, 0 = largest.
    Ties keep pixel order (a stable sort), so a flat map ranks row by row."""
    flat = maps.flatten(1).float()
    order = torch.argsort(-flat, dim=1, stable=True)
    out = torch.empty_like(order)
    out.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return out


def cutoffs(pixels: int, steps: int) -> torch.Tensor:
    """(steps+1,) pixels perturbed after step k = 0..steps: round(k * pixels / steps)."""
    return torch.div(torch.arange(steps + 1) * pixels + steps // 2, steps, rounding_mode="floor")


def perturbation_curves(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *,
                        mode: str = "deletion", steps: int = 20, replacement: str | float = "blur",
                        score: str = "probability", batch: int = 64,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """Deletion or insertion curves.

    images (B,3,H,W) preprocessed; maps (B,H,W) at the images' size, larger = more important;
    target (B,) class ids -> (B, steps+1) float32 scores of the target after 0, 1/steps, ..., 1
    of the pixels were perturbed. `replacement`: what a deleted (or not yet inserted) pixel
    shows, a `baselines` kind (zeros | mean | blur | a number). `dtype`: autocast for the
    forward passes (None: float32).
    """
    if mode not in MODES:
        raise FeatscopeError(f"unknown perturbation mode '{mode}': use {' or '.join(MODES)}")
    if steps < 1:
        raise FeatscopeError(f"steps must be at least 1, got {steps}")
    if maps.shape != (images.shape[0], *images.shape[2:]):
        raise FeatscopeError(f"maps must be (B,H,W) {(images.shape[0], *images.shape[2:])}, got {tuple(maps.shape)}")
    images = images.detach().float()
    reference = baselines.reference(images, replacement)
    order = ranks(maps.to(images.device))
    cut = cutoffs(order.shape[1], steps).to(images.device)
    height, width = images.shape[2:]
    pairs, inputs = _distinct_inputs(images, reference, mode, steps)
    logits = []
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype is not None else nullcontext()
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        b_index = torch.tensor([b for b, _ in chunk], device=images.device)
        k_index = torch.tensor([k for _, k in chunk], device=images.device)
        perturbed = (order[b_index] < cut[k_index, None]).view(-1, 1, height, width)
        if mode == "deletion":
            x = torch.where(perturbed, reference[b_index], images[b_index])
        else:
            x = torch.where(perturbed, images[b_index], reference[b_index])
        with torch.no_grad(), autocast:
            logits.append(model(like_model(x, model)).float())
    scores = class_score(torch.cat(logits)[pairs.to(images.device)],
                         target.repeat_interleave(steps + 1).to(images.device), score)
    return scores.view(images.shape[0], steps + 1).cpu()


def _distinct_inputs(images: torch.Tensor, reference: torch.Tensor, mode: str,
                     steps: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The (image, step) inputs that differ: step 0 (nothing perturbed) shows the image (deletion)
    or the reference (insertion) whatever the map, and the last step the other, so equal images
    (an image's several maps, `saliency evaluate`'s case) and equal references (zeros, a
    number) share those forward passes. Returns, for each (image, step) in row order, the
    index of its input, and the inputs as (image, step) pairs."""
    same_image, same_reference = _first_equal(images), _first_equal(reference)
    shown = {0: same_image if mode == "deletion" else same_reference,
             steps: same_reference if mode == "deletion" else same_image}
    index: dict[tuple, int] = {}
    inputs, pairs = [], []
    for b in range(images.shape[0]):
        for k in range(steps + 1):
            key = ("shared", k, shown[k][b]) if k in shown else (b, k)
            if key not in index:
                index[key] = len(inputs)
                inputs.append((b, k))
            pairs.append(index[key])
    return torch.tensor(pairs), inputs


def _first_equal(batch: torch.Tensor) -> list[int]:
    """For each item, the first item equal to it (itself if none before)."""
    if batch.shape[0] and batch.stride(0) == 0:  # one tensor expanded: all equal
        return [0] * batch.shape[0]
    sums = batch.flatten(1).sum(1).tolist()  # only items with equal sums are compared whole
    first, kept = [], []
    for b in range(batch.shape[0]):
        match = next((a for a in kept if sums[a] == sums[b] and torch.equal(batch[a], batch[b])), None)
        if match is None:
            kept.append(b)
        first.append(b if match is None else match)
    return first


def area_under_curve(curves: torch.Tensor) -> torch.Tensor:
    """(B, S+1) curves sampled at fractions 0, 1/S, ..., 1 -> (B,) areas by the trapezoid rule,
    on the fraction axis (so a curve that stays at 1 has area 1)."""
    return torch.trapezoid(curves.float(), dx=1.0 / (curves.shape[1] - 1), dim=1)


def random_map(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """(H,W) uniform noise from `seed`: the baseline that ranks pixels by chance."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator)


def centre_map(shape: tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    """(H,W) Gaussian centred on the image, standard deviation `sigma` x the side: the
    baseline that ranks pixels by their distance from the centre."""
    height, width = shape
    y = (torch.arange(height, dtype=torch.float32) + 0.5 - height / 2) / (sigma * height)
    x = (torch.arange(width, dtype=torch.float32) + 0.5 - width / 2) / (sigma * width)
    return torch.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))
