"""Occlusion sensitivity (Zeiler & Fergus, 2014): cover a window, see how far the score drops.

For each window position p the image is filled with a baseline inside the window and the
target's score s_p is compared with the clean score s; a pixel's map value is the mean drop
s - s_p over every window that covers it (Captum's `Occlusion` convention). Windows slide
by `stride`; a last row/column of windows is added at the far edge when the stride does not
land there, so every pixel is covered.

Speed: a window changes only the cells of an early layer whose receptive field touches it.
The model is cut into a prefix and a suffix at a block boundary; the clean image runs the
prefix once, and each occluded copy runs the prefix only on a crop around its window (the
crop holds the whole receptive field of every changed cell and starts on the layer's stride
grid, so those cells come out exactly as in the full image). The changed cells are pasted
into the clean activation, and the suffix runs on those in large batches. The places to cut
come from the architecture's profile (`kernels.architectures`), the cut itself is chosen by
a cost model (multiply-adds and activations of each block, crop area); architectures
without a profile run whole, still batched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from featscope.kernels import baselines
from featscope.kernels.architectures import profile_of_model
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import Param
from featscope.kernels.receptive_field import ReceptiveField, receptive_field
from featscope.kernels.scoring import class_score, like_model


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, ... and the far edge if not reached."""
    window = min(window, length)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


# ---- the model as prefix + suffix ---------------------------------------------------------

@dataclass
class _Trunk:
    """The model's blocks in forward order, each a place the model can be cut after."""

    model: nn.Module
    paths: list[str]  # module path of each block, for its receptive field
    blocks: list[nn.Module]

    def prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        for block in self.blocks[: cut + 1]:
            x = block(x)
        return x

    @contextmanager
    def suffix(self, cut: int) -> Iterator[nn.Module]:
        """Within the block, calling the yielded model on the activation after block `cut`
        runs the rest of the network: the blocks up to the cut are swapped for identities,
        and swapped back on exit, also on error."""
        saved = []
        try:
            for path, block in zip(self.paths[: cut + 1], self.blocks):
                parent, _, name = path.rpartition(".")
                owner = self.model.get_submodule(parent) if parent else self.model
                saved.append((owner, name, block))
                setattr(owner, name, nn.Identity())
            yield self.model
        finally:
            for owner, name, block in reversed(saved):
                setattr(owner, name, block)


def _trunk(model: nn.Module) -> _Trunk | None:
    """The blocks of a model whose family has a profile (see `kernels.architectures`), or
    None: such a model runs whole."""
    profile = profile_of_model(model)
    paths = profile.trunk(model) if profile is not None else None
    if not paths:
        return None
    return _Trunk(model, paths, [model.get_submodule(p) for p in paths])


# ---- windows, crops and changed cells --------------------------------------------------------

@dataclass(frozen=True)
class _Span:
    """Along one axis, for one window: the input crop [lo, hi) and the changed cells [c0, c1)
    of the cut layer; `first` is the crop's first cell in full-image cell coordinates."""

    lo: int
    hi: int
    c0: int
    c1: int
    first: int


def _span(start: int, window: int, length: int, cells: int, size: int, jump: int, offset: int) -> _Span:
    """Cell c of the cut layer sees input [offset + c*jump, offset + c*jump + size)."""
    end = start + window  # exclusive
    c0 = max(0, math.ceil((start - offset - size + 1) / jump))
    c1 = min(cells, (end - 1 - offset) // jump + 1)
    need_lo, need_hi = offset + c0 * jump, offset + (c1 - 1) * jump + size
    lo = 0 if need_lo <= 0 else (need_lo // jump) * jump  # on the stride grid
    hi = min(length, need_hi)
    return _Span(lo, hi, c0, c1, lo // jump)


def _crop_fraction(rf: ReceptiveField, starts: tuple[list[int], list[int]], window: tuple[int, int],
                   shape: tuple[int, int], cells: tuple[int, int]) -> float:
    """Mean crop area over all windows, as a fraction of the image."""
    fractions = []
    for axis in range(2):
        spans = [_span(s, window[axis], shape[axis], cells[axis], rf.size[axis], rf.jump[axis], rf.start[axis])
                 for s in starts[axis]]
        fractions.append(sum(sp.hi - sp.lo for sp in spans) / len(spans) / shape[axis])
    return fractions[0] * fractions[1]


# Weight of one activation element against one multiply-add: memory-bound layers (BN, ReLU,
# depthwise convs) cost far more per operation on a CPU. 16 picked the fastest measured cut
# for mobilenet_v2 and resnet18 at 224 px (benchmarks/saliency_bench.py).
ACTIVATION_COST = 16.0


def _block_costs(trunk: _Trunk, x: torch.Tensor) -> tuple[list[float], list[tuple[int, int]]]:
    """Per block: multiply-adds plus weighted activation elements for one image; and each
    block's output (H, W). One forward pass with hooks on the convolutions and linear layers."""
    macs = [0.0] * len(trunk.blocks)
    owner = {id(m): i for i, b in enumerate(trunk.blocks) for m in b.modules()}
    handles = []

    def count(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            per = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per = module.in_features
        macs[owner[id(module)]] += output[:1].numel() * per

    for block in trunk.blocks:
        for m in block.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                handles.append(m.register_forward_hook(count))
    sizes, costs = [], []
    try:
        a = x[:1]
        for i, block in enumerate(trunk.blocks):
            a = block(a)
            sizes.append(tuple(a.shape[2:]))
            costs.append(macs[i] + ACTIVATION_COST * a[:1].numel())
    finally:
        for h in handles:
            h.remove()
    return costs, sizes


def _choose_cut(trunk: _Trunk, x: torch.Tensor, window: int, stride: int) -> tuple[int, list[tuple[int, int]]]:
    """The block to cut after that minimises prefix cost x crop fraction + suffix cost
    (-1: do not cut), and every block's output size."""
    costs, sizes = _block_costs(trunk, x)
    h, w = x.shape[2:]
    starts = (window_starts(h, window, stride), window_starts(w, window, stride))
    win = (min(window, h), min(window, w))
    total = sum(costs)
    best, best_cost = -1, float(total)
    prefix = 0.0
    for cut, path in enumerate(trunk.paths):
        prefix += costs[cut]
        try:
            rf = receptive_field(trunk.model, path)
        except FeatscopeError:
            break
        if rf.is_global or len(sizes[cut]) != 2:
            break
        cost = prefix * _crop_fraction(rf, starts, win, (h, w), sizes[cut]) + (total - prefix)
        if cost < best_cost:
            best, best_cost = cut, cost
    return best, sizes


# ---- occlusion ------------------------------------------------------------------------------

def _cover(images: torch.Tensor, fill: torch.Tensor, ys: list[int], xs: list[int], window: int) -> torch.Tensor:
    """(1,3,H,W) image -> (len(ys)*len(xs),3,H,W) copies, window at (y, x) filled."""
    out = images.expand(len(ys) * len(xs), *images.shape[1:]).clone()
    for n, (y, x) in enumerate((y, x) for y in ys for x in xs):
        out[n, :, y:y + window, x:x + window] = fill[0, :, y:y + window, x:x + window]
    return out


def _chunks(n: int, batch: int) -> list[slice]:
    per = math.ceil(n / math.ceil(n / batch))
    return [slice(i, min(n, i + per)) for i in range(0, n, per)]


def _image_drops_whole(model, image, fill, target, clean, ys, xs, window, score, batch) -> torch.Tensor:
    """Drops of every window, running the whole model on each covered copy."""
    positions = [(y, x) for y in ys for x in xs]
    drops = []
    for part in _chunks(len(positions), batch):
        chunk = positions[part]
        covered = torch.cat([_cover(image, fill, [y], [x], window) for y, x in chunk])
        drops.append(clean - class_score(model(like_model(covered, model)), target.expand(len(chunk)), score))
    return torch.cat(drops)


def _image_drops_cut(trunk, cut, image, fill, target, ys, xs, window, score, batch, cells, rf) -> torch.Tensor:
    """Drops of every window: prefix on a crop per window, changed cells pasted into the
    clean activation, suffix on the pasted activations in batches."""
    h, w = image.shape[2:]
    model = trunk.model
    clean_act = trunk.prefix(like_model(image, model), cut)
    span_y = {y: _span(y, min(window, h), h, cells[0], rf.size[0], rf.jump[0], rf.start[0]) for y in ys}
    span_x = {x: _span(x, min(window, w), w, cells[1], rf.size[1], rf.jump[1], rf.start[1]) for x in xs}
    positions = [(y, x) for y in ys for x in xs]
    groups: dict[tuple, list[int]] = {}
    for n, (y, x) in enumerate(positions):
        sy, sx = span_y[y], span_x[x]
        groups.setdefault((sy.hi - sy.lo, sx.hi - sx.lo, sy.c1 - sy.c0, sx.c1 - sx.c0), []).append(n)
    pasted = clean_act.expand(len(positions), *clean_act.shape[1:]).clone()
    for members in groups.values():
        for part in _chunks(len(members), batch):
            crops = []
            for n in members[part]:
                (y, x), sy, sx = positions[n], span_y[positions[n][0]], span_x[positions[n][1]]
                crop = image[:, :, sy.lo:sy.hi, sx.lo:sx.hi].clone()
                crop[:, :, y - sy.lo:y - sy.lo + window, x - sx.lo:x - sx.lo + window] = \
                    fill[:, :, y:y + window, x:x + window]
                crops.append(crop)
            out = trunk.prefix(like_model(torch.cat(crops), model), cut)
            for k, n in enumerate(members[part]):
                sy, sx = span_y[positions[n][0]], span_x[positions[n][1]]
                pasted[n, :, sy.c0:sy.c1, sx.c0:sx.c1] = \
                    out[k, :, sy.c0 - sy.first:sy.c1 - sy.first, sx.c0 - sx.first:sx.c1 - sx.first]
    with trunk.suffix(cut) as rest:
        clean = class_score(rest(clean_act), target, score)
        drops = [clean - class_score(rest(pasted[part]), target.expand(part.stop - part.start), score)
                 for part in _chunks(len(positions), batch)]
    return torch.cat(drops)


def covered_per_pass(device: torch.device) -> int:
    """Covered images per forward pass when not given: 128 on a GPU; 8 on a CPU, where a
    larger batch's activations leave the cache. One thread (a saliency worker), a 224x298
    photo, default window and stride, 2-core AVX2 machine: MobileNet-V2 channels-last (as the
    stage runs it) 6.1-6.2 s at 8 against 8.6-9.5 at 128; as loaded 5.2-6.0 s at 4-16
    against 8.4-9.3 at 32 and 15-16 at 128; ResNet-18 17.6 s at 8 against 19.6 at 128. The
    whole stage, 16 photos: 0.23-0.24 images/s against 0.19-0.21 on one worker."""
    return 128 if device.type == "cuda" else 8


@torch.no_grad()
def occlusion(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
              window: Annotated[int, Param("occlusion window side in model pixels", min=1)] = 32,
              stride: Annotated[int, Param("occlusion stride in model pixels", min=1)] = 16,
              fill: Annotated[str, Param("occlusion fill: " + baselines.HELP, validate=baselines.check_kind)] = "zeros",
              baseline: torch.Tensor | float | None = None, score: str = "logit", batch: int | None = None,
              dtype: torch.dtype | None = None, cut: int | str | None = "auto") -> torch.Tensor:
    """Mean drop in class score when each window is covered.

    images (B,3,H,W) preprocessed; target (B,) class ids -> (B,H,W) float32 score drops.
    The window is covered with `fill` (see `kernels.baselines`; blur with sigma window/4),
    or with `baseline`, a scalar or a tensor that broadcasts to images, when given.
    dtype: autocast dtype (torch.bfloat16) for the forward passes, or None for float32.
    cut: "auto" (cost model), None (always run the whole model), or a block index.
    batch: covered images per forward pass (`covered_per_pass` when not given).
    """
    baselines.check_kind("fill", fill)
    if window < 1 or stride < 1:
        raise FeatscopeError(f"occlusion window and stride must be >= 1, got {window} and {stride}")
    b, _, h, w = images.shape
    device = images.device
    batch = batch or covered_per_pass(device)
    ys, xs = window_starts(h, window, stride), window_starts(w, window, stride)
    wy, wx = min(window, h), min(window, w)
    coverage = torch.zeros(h, w, device=device)
    for y in ys:
        for x in xs:
            coverage[y:y + wy, x:x + wx] += 1
    images = images.float()
    if baseline is None:
        fills = baselines.reference(images, fill, sigma=window / 4)
    else:
        fills = torch.as_tensor(baseline, dtype=torch.float32, device=device).expand_as(images)
    trunk = _trunk(model) if cut is not None else None
    maps = torch.zeros(b, h, w, device=device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        chosen, sizes, rf = -1, None, None
        if trunk is not None:
            if cut == "auto":
                chosen, sizes = _choose_cut(trunk, images, window, stride)
            else:
                chosen, sizes = int(cut), _block_costs(trunk, images)[1]
            if chosen >= 0:
                rf = receptive_field(model, trunk.paths[chosen])
        for i in range(b):
            image, fill, t = images[i:i + 1], fills[i:i + 1], target[i:i + 1]
            if chosen >= 0:
                drop = _image_drops_cut(trunk, chosen, image, fill, t, ys, xs, window, score, batch,
                                        sizes[chosen], rf)
            else:
                clean = class_score(model(like_model(image, model)), t, score)
                drop = _image_drops_whole(model, image, fill, t, clean, ys, xs, window, score, batch)
            drop = drop.float()
            for n, (y, x) in enumerate((y, x) for y in ys for x in xs):
                maps[i, y:y + wy, x:x + wx] += drop[n]
    return maps / coverage
