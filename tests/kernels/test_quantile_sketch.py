"""The activation sketch against exact quantiles: within one bin, mergeable exactly."""

import numpy as np
import pytest
import torch

from featscope.kernels.quantile_sketch import ActivationSketch


def _batches(seed: int = 0):
    """Conv-like maps whose range grows batch by batch (so the sketch must widen), one unit
    all zeros, one negative-heavy, one ReLU-like."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(6):
        x = torch.randn(8, 4, 5, 5, generator=g) * (1.5 ** b)
        x[:, 0] = 0
        x[:, 1] = -x[:, 1].abs() * 3
        x[:, 3] = x[:, 3].clamp_min(0)
        out.append(x)
    return out


def _exact(batches, unit: int, q: float) -> float:
    values = torch.cat([b[:, unit].flatten() for b in batches]).numpy()
    return float(np.quantile(values, q, method="inverted_cdf"))


@pytest.mark.parametrize("q", [0.01, 0.5, 0.9, 0.995])
def test_quantiles_are_within_one_bin_of_the_exact_ones(q):
    batches = _batches()
    sketch = ActivationSketch(4, bins=256)
    for b in batches:
        sketch.update(b)
    got = sketch.quantile(q)
    for unit in range(4):
        assert abs(float(got[unit]) - _exact(batches, unit, q)) <= float(sketch.width[unit]) * 1.0001 + 1e-12
    assert int(sketch.counts.sum()) == sum(b.numel() for b in batches)


def test_sketches_merge_exactly_in_any_order():
    batches = _batches(1)
    whole = ActivationSketch(4, bins=64)
    for b in batches:
        whole.update(b)
    first, second = ActivationSketch(4, bins=64), ActivationSketch(4, bins=64)
    for b in batches[:2]:
        first.update(b)  # small range
    for b in batches[2:]:
        second.update(b)  # a range several doublings wider
    for merged in (first.merge(second), second.merge(first)):
        assert torch.equal(merged.scale, whole.scale)
        assert torch.equal(merged.counts, whole.counts)


def test_counts_are_a_histogram_of_the_values():
    batches = _batches(2)
    sketch = ActivationSketch(4, bins=32)
    for b in batches:
        sketch.update(b)
    for unit in (1, 2, 3):
        values = torch.cat([b[:, unit].flatten() for b in batches]).double().numpy()
        expected, _ = np.histogram(values, bins=sketch.edges()[unit].numpy())
        assert np.abs(sketch.counts[unit].numpy() - expected).sum() <= 2  # a value on an edge may land either side


def test_bracket_holds_the_quantile_of_what_is_left_after_removals():
    batches = _batches(3)
    sketch = ActivationSketch(4, bins=512)
    for b in batches:
        sketch.update(b)
    unit, q = 2, 0.95
    values = torch.cat([b[:, unit].flatten() for b in batches]).numpy()
    order = np.sort(values)
    removed = 30
    for kept in (order[:-removed], order[removed:], np.random.default_rng(0).permutation(values)[removed:]):
        exact = float(np.quantile(kept, q, method="inverted_cdf"))
        low, high = sketch.bracket(q, removed)
        width = float(sketch.width[unit])
        assert float(low[unit]) - width <= exact <= float(high[unit]) + width
