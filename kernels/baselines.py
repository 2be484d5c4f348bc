"""Reference images that stand for "no information": what occlusion covers a window with and
where integrated gradients starts its path.

    zeros  model input 0, i.e. the training mean colour after normalisation
    mean   each image's own mean colour
    blur   a Gaussian-blurred copy (keeps colour and layout, removes detail)
    <x>    a constant, in model-input units
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import functional as TF

from featscope.kernels.params import ParamError

KINDS = ("zeros", "mean", "blur")
HELP = "zeros (model input 0: the training mean colour) | mean (the image's mean colour) | blur | a number"


def check_kind(name: str, kind: str | float) -> None:
    """A one-line error naming the parameter unless `kind` is a known kind or a number."""
    if isinstance(kind, (int, float)) or kind in KINDS:
        return
    try:
        float(kind)
    except (TypeError, ValueError):
        raise ParamError(name, f"must be one of {', '.join(KINDS)} or a number, not {kind!r}") from None


def reference(images: torch.Tensor, kind: str | float | torch.Tensor, *, sigma: float = 8.0) -> torch.Tensor:
    """images (B,3,H,W) -> reference images of the same shape."""
    if isinstance(kind, torch.Tensor):
        return kind.to(images.device, images.dtype).expand_as(images)
    images = images.float()
    if images.shape[0] > 1 and images.stride(0) == 0:  # one image expanded (its several maps): one reference
        return reference(images[:1], kind, sigma=sigma).expand_as(images)
    if kind == "zeros":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    if kind == "blur":
        return TF.gaussian_blur(images, kernel_size=2 * math.ceil(2 * sigma) + 1, sigma=sigma)
    check_kind("baseline", kind)
    return torch.full_like(images, float(kind))
