"""Per-unit activation histograms kept while streaming a dataset: quantiles at O(units) memory.

NetDissect (Bau et al. 2017, "Network Dissection") thresholds each unit's upsampled
activation map at a dataset-wide quantile of that unit's activations (the top 0.5%). The
exact quantile needs every activation of every image; this sketch keeps, per unit, a
histogram of `bins` equal bins over [-scale, scale], where scale is a power of two that
doubles (bins merged in pairs) whenever a larger value arrives. So:

- memory is (units, bins), whatever the dataset size;
- any quantile is read off to within one bin (2 * scale / bins), and the test holds it to that;
- two sketches merge exactly (bring both to the larger scale, add the counts), so shards
  are sketched independently and summed, in any order, with the same result.

The histogram itself is what a unit's page plots as its activation distribution.
"""

from __future__ import annotations

import torch

DEFAULT_BINS = 1024
_SMALLEST = 2.0 ** -24  # scale of a unit that has only seen zeros


def _power_of_two_above(values: torch.Tensor) -> torch.Tensor:
    """Smallest 2**e >= |value| (and >= _SMALLEST), elementwise, float64."""
    v = values.double().abs().clamp_min(_SMALLEST)
    return torch.exp2(torch.ceil(torch.log2(v)))


def _double(counts: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Rows of `counts` as histograms over a range 2**times[row] wider: the old range falls in
    the middle of the new one and each step merges neighbouring bins in pairs."""
    bins = counts.shape[1]
    out = counts.clone()
    for step in range(int(times.max().item()) if len(times) else 0):
        rows = times > step
        old = out[rows]
        merged = old.view(len(old), bins // 2, 2).sum(2)
        grown = torch.zeros_like(old)
        grown[:, bins // 4: bins // 4 + bins // 2] = merged
        out[rows] = grown
    return out


class ActivationSketch:
    """Histogram of every value each unit took, over a symmetric power-of-two range."""

    def __init__(self, units: int, bins: int = DEFAULT_BINS, device: torch.device | str = "cpu"):
        if bins < 4 or bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.counts = torch.zeros((units, bins), dtype=torch.int64, device=device)
        self.scale = torch.zeros(units, dtype=torch.float64, device=device)  # 0: nothing seen yet

    @property
    def bins(self) -> int:
        return self.counts.shape[1]

    def _grow(self, scale: torch.Tensor) -> None:
        """Widen each unit's range to at least `scale` (powers of two)."""
        fresh = self.scale == 0
        self.scale = torch.where(fresh, scale, self.scale)
        times = torch.log2(torch.maximum(scale, self.scale) / self.scale).round().long()
        if bool((times > 0).any()):
            self.counts = _double(self.counts, times)
            self.scale = self.scale * torch.exp2(times.double())

    def update(self, activation: torch.Tensor) -> None:
        """Count a batch: (B, C, H, W) maps or (B, C) vectors."""
        c, bins = activation.shape[1], self.bins
        # one unit's values together (contiguous), so the counting below fills one unit's
        # bins at a time: 2-3x faster than interleaved units on a channels-last map
        values = activation.detach().transpose(0, 1).reshape(c, -1).float().contiguous()
        self._grow(_power_of_two_above(values.abs().amax(1)).to(self.scale.device))
        # bin = floor((value + scale) / width) with width = 2 * scale / bins, a power of two:
        # as value * (1 / width) + bins / 2, the same rounding in one fused pass
        per_value = (bins / (2 * self.scale)).float().view(c, 1)
        index = torch.addcmul(torch.tensor(bins / 2, device=values.device), values, per_value)
        index = index.floor_().clamp_(0, bins - 1).to(torch.int32)
        index += (torch.arange(c, device=index.device, dtype=torch.int32) * bins).view(c, 1)
        self.counts += torch.bincount(index.view(-1), minlength=c * bins).view(c, bins)

    def merge(self, other: ActivationSketch) -> ActivationSketch:
        """A new sketch counting both; exact, whichever is larger."""
        scale = torch.maximum(self.scale, other.scale)
        out = ActivationSketch(len(scale), self.bins, self.counts.device)
        for part in (self, other):
            seen = part.scale > 0
            times = torch.where(seen, torch.log2(scale / part.scale.clamp_min(_SMALLEST)).round(),
                                torch.zeros_like(scale)).long()
            out.counts += _double(part.counts, times)
        out.scale = scale
        return out

    def edges(self) -> torch.Tensor:
        """(C, bins + 1) bin edges."""
        steps = torch.linspace(-1, 1, self.bins + 1, dtype=torch.float64, device=self.scale.device)
        return self.scale.view(-1, 1) * steps.view(1, -1)

    def quantile(self, q: float) -> torch.Tensor:
        """(C,) each unit's q-quantile: the value at rank q * count (the smallest value with
        at least that share of values at or below it), to within one bin."""
        return self.at_rank(q * self.counts.sum(1).double())

    def bracket(self, q: float, removed: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds on the q-quantile of the values left after `removed` counted values (per
        unit, which ones unknown) are taken out: whichever they were, the answer lies between
        these, each to within a bin."""
        removed = torch.as_tensor(removed, dtype=torch.float64, device=self.scale.device)
        kept = self.counts.sum(1).double() - removed
        # if the removed values were all the largest, the kept quantile is the whole's at rank
        # q * kept; if they were all the smallest, at rank q * kept + removed
        return self.at_rank(q * kept), self.at_rank(q * kept + removed)

    def at_rank(self, rank: torch.Tensor) -> torch.Tensor:
        """(C,) the value at each unit's `rank` (a count from the bottom), linear inside its bin."""
        total = self.counts.sum(1).double()
        cdf = self.counts.cumsum(1).double()
        target = torch.minimum(torch.as_tensor(rank, dtype=torch.float64).expand_as(total), total).clamp_min(0)
        where = torch.searchsorted(cdf, target.view(-1, 1)).clamp_max(self.bins - 1).squeeze(1)
        before = torch.where(where > 0, cdf.gather(1, (where - 1).clamp_min(0).view(-1, 1)).squeeze(1),
                             torch.zeros_like(total))
        inside = self.counts.gather(1, where.view(-1, 1)).squeeze(1).double().clamp_min(1)
        fraction = ((target - before) / inside).clamp(0, 1)
        low_edge = self.edges().gather(1, where.view(-1, 1)).squeeze(1)
        return torch.where(total > 0, low_edge + fraction * self.width, torch.full_like(low_edge, float("nan")))

    @property
    def width(self) -> torch.Tensor:
        """(C,) bin width: the precision of every quantile read off."""
        return 2 * self.scale / self.bins
