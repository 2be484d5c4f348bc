"""Images made by gradient ascent: class models, feature amplification, feature inversion and
feature visualisations of units.

All three optimise a batch of images in pixel space [0,1] through a `PixelModel`, so that
several targets (classes, layers, images) are rendered together in one batch, and each
returns the images with the trajectory of its objective, (steps, B).

- class models (Simonyan et al., 2014): ascend score_c(I) - l2 * ||I||^2, with I the
  image minus the mean colour, from zero or seeded noise; regularisers of Yosinski et al.
  (2015): jitter, periodic Gaussian blur, clipping pixels of small norm, and octaves
  (optimising at a few growing scales).
- feature amplification, DeepDream (Mordvintsev et al., 2015): ascend the mean squared
  activation of a layer, whose gradient is the activation itself; octaves carry the detail
  added at one scale up to the next; jitter.
- feature inversion (Mahendran & Vedaldi, 2015): minimise ||Phi(x) - Phi0||^2 / ||Phi0||^2
  + tv * R_V^beta(x) / (H*W) with Adam, from seeded noise.
- feature visualisation (Olah et al., 2017): maximise a unit objective over a Fourier,
  colour-decorrelated parameterisation with transformation robustness; one unit per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from featscope.kernels.image_param import FourierImage
from featscope.kernels.objectives import layer_energy, layer_outputs, relative_error, total_variation
from featscope.kernels.scoring import class_score
from featscope.kernels.transforms import PixelModel, blur, jitter, octave_sizes, resize, robustness, stretch
from featscope.kernels.unit_objectives import Objective


def _normalised_step(grad: torch.Tensor) -> torch.Tensor:
    """Each image's gradient divided by its mean absolute value: steps of a fixed size."""
    return grad / grad.abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, 1, 1, 1)


def class_models(model: PixelModel, classes: torch.Tensor, *, size: int = 224, steps: int = 150, lr: float = 0.02,
                 l2: float = 3e-3, jitter_pixels: int = 16, blur_every: int = 4, blur_sigma: float = 0.7,
                 clip_percentile: float = 20.0, octaves: int = 3, octave_scale: float = 1.4, noise: float = 0.0,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """classes (B,) -> images (B,3,size,size) in [0,1] and scores (steps, B).

    The image starts at the mean colour (the zero of the model's input), plus Gaussian
    noise of sd `noise` from `seed`; clip_percentile: each step, pixels whose norm (over
    colour) is below that percentile of the image are reset to the mean colour.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = model.mean.to(classes.device)
    sizes = octave_sizes(size, size, octaves, octave_scale)
    first = sizes[0]
    delta = torch.randn((len(classes), 3, *first), generator=generator).to(mean.device) * noise
    scores = []
    per_octave = [steps // octaves + (1 if k < steps % octaves else 0) for k in range(octaves)]
    for octave, (shape, count) in enumerate(zip(sizes, per_octave)):
        if octave:
            delta = resize(delta, shape)
        for step in range(count):
            shifted, (dy, dx) = jitter(delta, jitter_pixels, generator)
            shifted = shifted.detach().requires_grad_(True)
            with torch.enable_grad():
                score = class_score(model((mean + shifted).clamp(0, 1)), classes)
                objective = score - l2 * shifted.pow(2).flatten(1).sum(1)
                (grad,) = torch.autograd.grad(objective.sum(), shifted)
            scores.append(score.detach())
            grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))
            delta = delta + lr * _normalised_step(grad)
            if blur_every and (step + 1) % blur_every == 0:
                delta = blur(delta, blur_sigma)
            if clip_percentile > 0:
                norms = delta.norm(dim=1, keepdim=True)
                cut = torch.quantile(norms.flatten(1), clip_percentile / 100, dim=1).view(-1, 1, 1, 1)
                delta = delta * (norms >= cut)
            delta = (mean + delta).clamp(0, 1) - mean
    return (mean + delta).clamp(0, 1).detach(), torch.stack(scores)


def deepdream(model: PixelModel, images: torch.Tensor, layers: Sequence[nn.Module], *, octaves: int = 3,
              octave_scale: float = 1.4, steps: int = 10, lr: float = 0.01, jitter_pixels: int = 16,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B,3,H,W) in [0,1], one layer module per image -> dreamed images and the
    layer energies (octaves*steps, B)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = images.shape[2:]
    detail = None
    energies = []
    for shape in octave_sizes(height, width, octaves, octave_scale):
        base = resize(images, shape)
        x = base if detail is None else (base + resize(detail, shape)).clamp(0, 1)
        for _ in range(steps):
            shifted, (dy, dx) = jitter(x, jitter_pixels, generator)
            shifted = shifted.detach().requires_grad_(True)
            with torch.enable_grad():
                energy = _per_image(layer_outputs(model, shifted, list(layers)), layer_energy)
                (grad,) = torch.autograd.grad(energy.sum(), shifted)
            energies.append(energy.detach())
            grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))
            x = (x + lr * _normalised_step(grad)).clamp(0, 1)
        detail = x - base
    return x.detach(), torch.stack(energies)


def _per_image(outputs: list[torch.Tensor], measure) -> torch.Tensor:
    """Image i's value of `measure` on the output of its own layer (outputs[i] is the whole
    batch's output of image i's layer)."""
    return torch.stack([measure(out[i:i + 1])[0] for i, out in enumerate(outputs)])


def layer_features(model: PixelModel, images: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Phi0: image i's output at layers[i], detached, each (1, ...)."""
    with torch.no_grad():
        outputs = layer_outputs(model, images, list(layers))
    return [out[i:i + 1].detach().clone() for i, out in enumerate(outputs)]


def invert(model: PixelModel, reference: Sequence[torch.Tensor], layers: Sequence[nn.Module],
           size: tuple[int, int], *, steps: int = 200, lr: float = 0.05, tv: float = 0.5, beta: float = 2.0,
           jitter_pixels: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose features at layers[i] match reference[i] (Phi0, from `layer_features`)
    -> images (B,3,H,W) in [0,1] and the relative feature errors (steps, B)."""
    generator = torch.Generator().manual_seed(seed)
    device = reference[0].device
    x = (0.5 + 0.1 * torch.randn((len(layers), 3, *size), generator=generator)).clamp(0, 1).to(device)
    x.requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=lr / 20)
    errors = []
    pixels = size[0] * size[1]
    for _ in range(steps):
        shifted, _offset = jitter(x, jitter_pixels, generator)
        with torch.enable_grad():
            outputs = layer_outputs(model, shifted, list(layers))
            error = torch.stack([relative_error(out[i:i + 1], reference[i])[0] for i, out in enumerate(outputs)])
            loss = error + tv * total_variation(x, beta) / pixels
            optimiser.zero_grad()
            loss.sum().backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        errors.append(error.detach())
    return x.detach(), torch.stack(errors)


def feature_visualisations(model: PixelModel, objective: Objective, seeds: Sequence[int], *, size: int = 128,
                           steps: int = 256, lr: float = 0.05, seed: int = 0, robust: bool = True,
                           model_size: int = 224, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B,3,size,size) in [0,1] that maximise `objective`, one per seed (its start),
    and its trajectory (steps, B). Lucid's recipe: a Fourier-parameterised image in a
    decorrelated colour space (`FourierImage`), Adam at `lr`, Lucid's standard
    transformation robustness each step (drawn from `seed`, one draw for the batch), images
    smaller than `model_size` upsampled to it; the model runs only as far as the deepest layer
    the objective reads. An image comes out the same whatever else is in its batch."""
    generator = torch.Generator().manual_seed(seed)
    device = model.mean.device
    image = FourierImage(len(seeds), size, seeds=list(seeds)).to(device)
    optimiser = torch.optim.Adam(image.parameters(), lr=lr)
    layers = list(objective.layers)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    trajectory = []
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            x = image()
            if robust:
                x = robustness(x, generator)
            if x.shape[2] < model_size:
                x = stretch(x, (model_size, model_size))
            with autocast:
                outputs = dict(zip(layers, layer_outputs(model, x, layers)))
            value = objective(outputs)
            (-value.sum()).backward()
        optimiser.step()
        trajectory.append(value.detach().float().cpu())
    with torch.no_grad():
        return image().detach(), torch.stack(trajectory)
