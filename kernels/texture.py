"""Gram-matrix textures and neural style transfer (Gatys et al., 2015, 2016).

A layer's texture is the Gram matrix of its output, G = F F^T / (H W) with F the (C, HW)
feature map: the channel co-activations, with where they happen averaged away. Texture
synthesis matches the Gram matrices of an example at several layers, starting from noise;
style transfer matches one image's features at a content layer and another's Gram matrices
at style layers, with a total-variation prior. Images are optimised in pixel space [0,1]
through a `PixelModel`, several targets per batch: each image has its own set of
(layer, weight) terms, so a texture and its single-layer reconstructions run together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from featscope.kernels.objectives import layer_outputs, relative_error, total_variation
from featscope.kernels.transforms import PixelModel


def gram(features: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> (B,C,C) = F F^T / (H W)."""
    b, c, h, w = features.shape
    flat = features.float().reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (h * w)


@dataclass(frozen=True)
class Term:
    """One loss term of one image: match `target` (a Gram matrix, or features for content)
    at `layer` (index into the layer list) with `weight`. Both kinds are relative squared
    errors, ||x - target||^2 / ||target||^2."""

    layer: int
    target: torch.Tensor
    weight: float
    kind: str = "gram"  # "gram" | "content"


def targets_at(model: PixelModel, image: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The features of one image (1,3,H,W) at each layer, detached."""
    with torch.no_grad():
        return [o.detach() for o in layer_outputs(model, image, list(layers))]


def match(model: PixelModel, layers: Sequence[nn.Module], terms: Sequence[Sequence[Term]], init: torch.Tensor, *,
          steps: int = 300, lr: float = 0.02, tv: float = 0.0, beta: float = 2.0,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise images (init, (B,3,H,W) in [0,1]) so that image i meets its `terms[i]`, with
    Adam, plus tv * R_TV^beta / (H W). Returns images and the loss of each image per step."""
    x = init.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps, eta_min=lr / 10)
    pixels = init.shape[2] * init.shape[3]
    history = []
    for _ in range(steps):
        with torch.enable_grad():
            outputs = layer_outputs(model, x, list(layers))
            grams: dict[int, torch.Tensor] = {}
            losses = []
            for i, image_terms in enumerate(terms):
                loss = tv * total_variation(x[i:i + 1], beta)[0] / pixels
                for term in image_terms:
                    feature = outputs[term.layer][i:i + 1]
                    if term.kind == "content":
                        value = relative_error(feature, term.target)[0]
                    else:
                        if term.layer not in grams:
                            grams[term.layer] = gram(outputs[term.layer])
                        value = relative_error(grams[term.layer][i:i + 1], term.target)[0]
                    loss = loss + term.weight * value
                losses.append(loss)
            total = torch.stack(losses)
            optimiser.zero_grad()
            total.sum().backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        history.append(total.detach())
    return x.detach(), torch.stack(history)


def noise_like(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded uniform noise in [0.4, 0.6]: a flat, unbiased start."""
    return 0.4 + 0.2 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))
