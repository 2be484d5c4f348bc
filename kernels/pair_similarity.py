"""Why two images are neighbours: a map on each of how much its regions add to their similarity.

For a layer whose vector is an average pool of a conv map A (global, f = mean_i A_i, or to a
grid of cells), the dot product of two images' vectors is linear in each map, so it splits
exactly over pairs of positions (Stylianou et al. 2019, "Visualizing Deep Similarity
Networks"): f_a . f_b = sum_i sum_j A_i . B_j w_ij. Summed over the other image's positions,
position i of image a contributes A_i . (P^T f_b)_i, where P^T spreads each cell's vector back
over the positions it averages (for global pooling: f_b / N_a). The two maps each sum to the
similarity; for cosine similarity everything is divided by |f_a| |f_b|.

For a vector that is not a pool of the conv map (a fully connected layer), no such split
exists; the maps are then gradient x activation of the similarity at the last conv block,
which only approximates it (first order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.scoring import like_model

SIMILARITIES = ("cosine", "dot")
EXACT = "decomposition"
APPROXIMATE = "gradient x activation"


@dataclass
class PairMaps:
    maps: torch.Tensor  # (2,h,w): each image's positions' contributions
    similarity: float  # of the two images' vectors at the layer
    method: str  # EXACT or APPROXIMATE
    grid: tuple[int, int]  # (h, w) of the conv map the maps live on


def _capture(model: nn.Module, images: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """The outputs of `modules` in one forward pass, still in the graph."""
    found: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, k=k: found.setdefault(k, out))
               for k, m in enumerate(modules)]
    try:
        model(like_model(images, model))
    finally:
        for handle in handles:
            handle.remove()
    if len(found) != len(modules):
        raise FeatscopeError("a layer to explain did not run in the model's forward pass")
    return [found[k] for k in range(len(modules))]


def _similarity(fa: torch.Tensor, fb: torch.Tensor, similarity: str) -> torch.Tensor:
    dot = (fa * fb).sum()
    return dot / (fa.norm() * fb.norm()).clamp_min(1e-12) if similarity == "cosine" else dot


def pooled_pair_maps(activations: torch.Tensor, grid: tuple[int, int] = (1, 1), *,
                     similarity: str = "cosine") -> PairMaps:
    """The exact split. activations (2,C,h,w): the conv map of each image; the layer's vector
    is its adaptive average pool to `grid`, flattened -> maps (2,h,w) summing to the similarity."""
    if similarity not in SIMILARITIES:
        raise FeatscopeError(f"similarity must be one of {', '.join(SIMILARITIES)}, not '{similarity}'")
    a = activations.detach().double().requires_grad_(True)
    with torch.enable_grad():
        pooled = F.adaptive_avg_pool2d(a, grid).flatten(1)  # (2, C*cells)
        fa, fb = pooled.detach()
        # P^T f_other by autograd: the gradient of <P(A_a), f_b> + <P(A_b), f_a> with respect to A
        (spread,) = torch.autograd.grad((pooled * torch.stack([fb, fa])).sum(), a)
    maps = (a.detach() * spread).sum(1)
    scale = 1.0 / (fa.norm() * fb.norm()).clamp_min(1e-12) if similarity == "cosine" else 1.0
    value = _similarity(fa, fb, similarity)
    return PairMaps((maps * scale).float(), float(value), EXACT, tuple(a.shape[2:]))


def pair_maps(model: nn.Module, images: torch.Tensor, spatial: nn.Module, *, feature: nn.Module | None = None,
              grid: tuple[int, int] = (1, 1), similarity: str = "cosine") -> PairMaps:
    """Maps of two preprocessed images (2,3,H,W) on the conv map output by `spatial`.

    `feature` None: the layer's vector is that map pooled to `grid` (exact split). Otherwise
    the vector is `feature`'s output: split exactly if it equals the map's global average
    (e.g. resnet's avgpool), else gradient x activation of the similarity at `spatial`."""
    if images.shape[0] != 2:
        raise FeatscopeError(f"explain a pair: images must be (2,3,H,W), got {tuple(images.shape)}")
    x = images.detach().float()
    if feature is None:
        with torch.no_grad():
            (activations,) = _capture(model, x, [spatial])
        return pooled_pair_maps(activations.float(), grid, similarity=similarity)
    with torch.enable_grad():
        # the input asks for gradients, so the graph exists whatever the parameters ask
        activations, vectors = _capture(model, x.requires_grad_(True), [spatial, feature])
        if activations.dim() != 4:
            raise FeatscopeError(f"the layer explained on must be a conv map (B,C,h,w), not {tuple(activations.shape)}")
        vectors = vectors.flatten(1).float()
        pooled = activations.detach().float().mean(dim=(2, 3))
        if pooled.shape == vectors.shape and torch.allclose(pooled, vectors.detach(), rtol=1e-4, atol=1e-5):
            return pooled_pair_maps(activations.detach().float(), (1, 1), similarity=similarity)
        value = _similarity(vectors[0], vectors[1], similarity)
        (grad,) = torch.autograd.grad(value, activations)
    maps = (grad.float() * activations.detach().float()).sum(1)
    return PairMaps(maps, float(value.detach()), APPROXIMATE, tuple(activations.shape[2:]))


def pairwise_contributions(activations: torch.Tensor, *, similarity: str = "cosine") -> torch.Tensor:
    """(2,C,h,w) -> (h*w, h*w) matrix of what each pair of positions (i in a, j in b) adds to
    the similarity of the globally pooled vectors: A_i . B_j / (N_a N_b) (Stylianou et al. eq. 3)."""
    a, b = activations.double().flatten(2)  # (C, N)
    matrix = a.T @ b / (a.shape[1] * b.shape[1])
    if similarity == "cosine":
        matrix = matrix / (a.mean(1).norm() * b.mean(1).norm()).clamp_min(1e-12)
    return matrix
