"""Saliency maps: which input pixels matter for a class score.

One verb, `attribute(model, images, target, method, **options)`, in Captum's manner; each
method below is only what differs. All take preprocessed images (B,3,H,W) and class ids
(B,) and return maps (B,H,W) float32 at input resolution, larger = more important:

- gradient    |d score / d pixel|, max over colour channels (Simonyan et al., 2014)
- guided      the same through guided-backprop rectifiers (Springenberg et al., 2015)
- smoothgrad  the gradient map averaged over noisy copies of the image (Smilkov et al., 2017)
- gradcam     ReLU(sum_c mean(dS/dA_c) * A_c) at a conv layer, upsampled (Selvaraju et al., 2017)
- occlusion   the drop of the score when a window is covered (Zeiler & Fergus, 2014); see
              `featscope.kernels.occlusion`
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.guided import guided_relus
from featscope.kernels.occlusion import occlusion
from featscope.kernels.scoring import class_score, like_model


def _input_gradient(model: nn.Module, images: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    x = like_model(images.detach().float(), model).requires_grad_(True)
    with torch.enable_grad():
        total = class_score(model(x), target, score).sum()
        (grad,) = torch.autograd.grad(total, x)
    return grad


def gradient(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, score: str = "logit") -> torch.Tensor:
    """Vanilla backprop saliency: max over channels of |d score / d x|."""
    return _input_gradient(model, images, target, score).abs().amax(dim=1).contiguous()


def guided(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, score: str = "logit") -> torch.Tensor:
    """Guided backprop saliency: `gradient` with negative gradients stopped at every rectifier."""
    with guided_relus(model):
        return gradient(model, images, target, score=score)


def smoothgrad(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, samples: int = 16,
               noise: float = 0.15, seed: int = 0, score: str = "logit", batch: int = 32) -> torch.Tensor:
    """SmoothGrad: the mean `gradient` map of `samples` copies with Gaussian noise of standard
    deviation noise * (max - min) of each image. Noise is drawn from `seed`, so maps repeat."""
    if samples < 1:
        raise FeatscopeError(f"smoothgrad needs samples >= 1, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    images = images.detach().float()
    spread = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(-1, 1, 1, 1) * noise
    total = torch.zeros(images.shape[0], *images.shape[2:])
    for b in range(images.shape[0]):
        draws = torch.randn((samples, *images.shape[1:]), generator=generator) * spread[b].cpu()
        for start in range(0, samples, batch):
            chunk = images[b:b + 1] + draws[start:start + batch].to(images.device)
            maps = gradient(model, chunk, target[b:b + 1].expand(len(chunk)), score=score)
            total[b] += maps.sum(0).cpu()
    return (total / samples).to(images.device)


def gradcam(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, layer: nn.Module,
            score: str = "logit") -> torch.Tensor:
    """Grad-CAM at `layer` (a module whose output is (B,C,h,w)), bilinearly upsampled to (H,W)."""
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        captured.append(output)

    x = like_model(images.detach().float(), model)
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            total = class_score(model(x), target, score).sum()
    finally:
        handle.remove()
    if len(captured) != 1 or captured[0].dim() != 4:
        raise FeatscopeError("the Grad-CAM layer must run once per forward pass and give a (B,C,h,w) map")
    activation = captured[0]
    (grad,) = torch.autograd.grad(total, activation)
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach().float()).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False).squeeze(1)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "occlusion": occlusion,
    "gradient": gradient,
    "guided": guided,
    "smoothgrad": smoothgrad,
    "gradcam": gradcam,
}


def attribute(model: nn.Module, images: torch.Tensor, target: torch.Tensor, method: str,
              **options) -> torch.Tensor:
    """Saliency maps (B,H,W) of `method` for images (B,3,H,W) and class ids target (B,)."""
    if method not in METHODS:
        raise FeatscopeError(f"unknown saliency method '{method}': use one of {', '.join(METHODS)}")
    if images.dim() != 4 or target.shape != images.shape[:1]:
        raise FeatscopeError(f"images must be (B,3,H,W) with one target each; got {tuple(images.shape)} "
                             f"and {tuple(target.shape)} targets")
    return METHODS[method](model, images, target, **options)
