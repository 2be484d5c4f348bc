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
- guided_gradcam  guided backprop times the upsampled Grad-CAM map (Selvaraju et al., 2017)
- integrated_gradients  (x - x') times the mean gradient on the path from a baseline x'
              (Sundararajan et al., 2017); signed

Adding a method is writing its function and one line in `METHODS`. A method's tunable
parameters are its keyword arguments annotated `Annotated[T, Param(...)]`: the saliency
stage's options, the command line and the config schema are derived from them. `score`
(logit | probability) and `dtype` (autocast) are passed to every method that takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from featscope.kernels import baselines
from featscope.kernels.architectures import profile_of_model
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.guided import guided_relus
from featscope.kernels.occlusion import occlusion
from featscope.kernels.params import Declared, Param, declared_params
from featscope.kernels.scoring import class_score, like_model


def copies_per_pass(device: torch.device) -> int:
    """Copies of an image per forward and backward pass (SmoothGrad's noisy copies, integrated
    gradients' path points) when not given: 4 on a CPU, where an image costs more in a larger
    batch once its activations leave the cache, 32 on a GPU. One thread (a saliency worker),
    a 224x298 photo: MobileNet-V2 SmoothGrad (16 copies) 1.9-2.0 s at 4 against 3.5-4.7 at
    16, integrated gradients (32 points) 3.5-4.0 s against 7.9-9.0 at 32 (channels-last, as
    the stage runs them: 2.15 against 3.4-4.0 and 4.1 against 7.1-8.6); ResNet-18 3.3-3.7
    against 3.9-4.2 and 7.2-7.6 against 9.6-10.8 (2-core AVX2 machine, interleaved runs)."""
    return 32 if device.type == "cuda" else 4


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


def smoothgrad(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
               samples: Annotated[int, Param("smoothgrad: noisy copies averaged", min=1)] = 16,
               noise: Annotated[float, Param("smoothgrad: noise sd as a fraction of the image's range", min=0)] = 0.15,
               seed: Annotated[int, Param("smoothgrad: noise seed", min=0, max=2**32 - 1)] = 0,
               score: str = "logit", batch: int | None = None) -> torch.Tensor:
    """SmoothGrad: the mean `gradient` map of `samples` copies with Gaussian noise of standard
    deviation noise * (max - min) of each image, `batch` copies a pass (`copies_per_pass`).
    Noise is drawn from `seed`, so maps repeat."""
    if samples < 1:
        raise FeatscopeError(f"smoothgrad needs samples >= 1, got {samples}")
    batch = batch or copies_per_pass(images.device)
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


def gradcam_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """The module Grad-CAM looks at: given, named (alias or module path), or by default the
    last conv block of the model's family (its profile's `gradcam_layer`)."""
    if isinstance(layer, nn.Module):
        return layer
    profile = profile_of_model(model)
    name = layer or (profile.gradcam_layer if profile else None)
    if name is None:
        raise FeatscopeError(f"no default Grad-CAM layer for {type(model).__name__}: give the layer")
    path = profile.aliases(model).get(name, name) if profile else name
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise FeatscopeError(f"unknown Grad-CAM layer '{name}'") from None


def gradcam(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
            layer: Annotated[str | None, Param("Grad-CAM layer (default: the last conv block, e.g. layer4, "
                                               "block18, conv5)")] = None,
            score: str = "logit") -> torch.Tensor:
    """Grad-CAM at `layer` (its output is (B,C,h,w)), bilinearly upsampled to (H,W)."""
    layer = gradcam_layer(model, layer)
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


def integrated_gradients(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
                         steps: Annotated[int, Param("integrated gradients: points on the path from the baseline",
                                                    min=1)] = 32,
                         baseline: Annotated[str, Param("integrated gradients' baseline: " + baselines.HELP,
                                                        validate=baselines.check_kind)] = "zeros",
                         score: str = "logit", batch: int | None = None) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al., 2017): (x - x') * the mean gradient along
    the straight path from the baseline x' to x, by the midpoint rule over `steps` points
    (`batch` a pass: `copies_per_pass`), summed over colour channels. Signed; by completeness
    the map sums to score(x) - score(x') up to the quadrature error."""
    batch = batch or copies_per_pass(images.device)
    images = images.detach().float()
    reference = baselines.reference(images, baseline)
    alphas = (torch.arange(steps, dtype=torch.float32, device=images.device) + 0.5) / steps
    maps = torch.zeros(images.shape[0], *images.shape[2:], device=images.device)
    for b in range(images.shape[0]):
        delta = images[b:b + 1] - reference[b:b + 1]
        total = torch.zeros_like(delta)
        for start in range(0, steps, batch):
            a = alphas[start:start + batch].view(-1, 1, 1, 1)
            grads = _input_gradient(model, reference[b:b + 1] + a * delta, target[b:b + 1].expand(len(a)), score)
            total += grads.sum(0, keepdim=True)
        maps[b] = (delta * total / steps).sum(1)[0]
    return maps


def guided_gradcam(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
                   layer: Annotated[str | None, Param("Grad-CAM layer (default: the last conv block, e.g. layer4, "
                                                      "block18, conv5)")] = None,
                   score: str = "logit") -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al., 2017): the guided-backprop map times the upsampled
    Grad-CAM map, fine detail where the class evidence is."""
    return guided(model, images, target, score=score) * gradcam(model, images, target, layer=layer, score=score)


@dataclass(frozen=True)
class Method:
    """A saliency method: its function, and how many images one Dask task should take so
    that it runs well over ~100 ms on a CPU core."""

    function: Callable[..., torch.Tensor]
    images_per_task: int

    @property
    def params(self) -> list[Declared]:
        return declared_params(self.function)


METHODS: dict[str, Method] = {
    "occlusion": Method(occlusion, images_per_task=1),
    "gradient": Method(gradient, images_per_task=8),
    "guided": Method(guided, images_per_task=8),
    "smoothgrad": Method(smoothgrad, images_per_task=2),
    "gradcam": Method(gradcam, images_per_task=8),
    "integrated_gradients": Method(integrated_gradients, images_per_task=1),
    "guided_gradcam": Method(guided_gradcam, images_per_task=8),
}


def attribute(model: nn.Module, images: torch.Tensor, target: torch.Tensor, method: str,
              **options) -> torch.Tensor:
    """Saliency maps (B,H,W) of `method` for images (B,3,H,W) and class ids target (B,)."""
    if method not in METHODS:
        raise FeatscopeError(f"unknown saliency method '{method}': use one of {', '.join(METHODS)}")
    if images.dim() != 4 or target.shape != images.shape[:1]:
        raise FeatscopeError(f"images must be (B,3,H,W) with one target each; got {tuple(images.shape)} "
                             f"and {tuple(target.shape)} targets")
    return METHODS[method].function(model, images, target, **options)
