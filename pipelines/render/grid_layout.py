"""Placing a 2-D map's points on a regular grid, one image per cell, neighbours kept close.

`cover_sample` picks which points fill the grid when there are more points than cells (a
sample that covers the map evenly: round-robin over occupied bins, not the first N).
`assign` solves the linear assignment between normalised positions and cell centres
(squared distance) with scipy's `linear_sum_assignment`. Exact assignment grows about
cubically (64x64 cells took 34 s here), so above `exact_max` cells points and cells are
split into matching blocks (bands by y, then blocks by x, equal counts), each block is
solved exactly, and then blocks shifted by half a block are re-solved over the points they
hold (block coordinate descent: the cost can only fall), which removes most of the seams.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment


def normalise(points: np.ndarray) -> np.ndarray:
    """Scale each axis to [0, 1]."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - lo) / np.where(hi > lo, hi - lo, 1.0)


def cell_centres(rows: int, cols: int) -> np.ndarray:
    """(rows*cols, 2) centres (x, y) in [0,1], row-major."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([(c + 0.5) / cols, (r + 0.5) / rows], axis=1)


def cover_sample(points: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of n points spread evenly over the map: bin into about n cells, then take one
    point per occupied bin in turn (random within a bin) until n are chosen."""
    if n >= len(points):
        return np.arange(len(points))
    rng = np.random.default_rng(seed)
    side = max(1, int(math.sqrt(n)))
    p = normalise(points)
    bins = np.minimum((p * side).astype(int), side - 1)
    key = bins[:, 1] * side + bins[:, 0]
    order = rng.permutation(len(points))
    # rank of each point within its bin, in random order; taking ranks 0, 1, 2, ... in turn
    # is the round-robin over bins
    order = order[np.argsort(key[order], kind="stable")]
    sorted_keys = key[order]
    first = np.searchsorted(sorted_keys, sorted_keys)
    rank = np.arange(len(order)) - first
    chosen = order[np.lexsort((rng.random(len(order)), rank))[:n]]
    return np.sort(chosen)


def _cost(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    return ((points[:, None, :] - cells[None, :, :]) ** 2).sum(-1)


def assign_exact(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """cell index of each point (a bijection when counts match), minimum total squared distance."""
    rows, cols = linear_sum_assignment(_cost(points, cells))
    out = np.empty(len(points), dtype=np.int64)
    out[rows] = cols
    return out


def _refine(points: np.ndarray, out: np.ndarray, cells: np.ndarray, rows: int, cols: int, block: int,
            offset: tuple[int, int]) -> None:
    """Re-solve each block window (shifted by `offset`) over the points assigned inside it."""
    cell_of_point = out
    point_at = np.empty(rows * cols, dtype=np.int64)
    point_at[cell_of_point] = np.arange(len(points))
    for r0 in range(-offset[0], rows, block):
        for c0 in range(-offset[1], cols, block):
            rr = np.arange(max(r0, 0), min(r0 + block, rows))
            cc = np.arange(max(c0, 0), min(c0 + block, cols))
            if len(rr) * len(cc) < 2:
                continue
            window = (rr[:, None] * cols + cc[None, :]).ravel()
            members = point_at[window]
            out[members] = window[assign_exact(points[members], cells[window])]


def assign(points: np.ndarray, rows: int, cols: int, *, exact_max: int = 2048, block: int = 32,
           refine_passes: int = 2) -> np.ndarray:
    """Cell (row-major index) of each of rows*cols normalised points."""
    if len(points) != rows * cols:
        raise ValueError(f"{len(points)} points for {rows}x{cols} cells")
    cells = cell_centres(rows, cols)
    if rows * cols <= exact_max:
        return assign_exact(points, cells)
    out = np.empty(len(points), dtype=np.int64)
    by_y = np.argsort(points[:, 1], kind="stable")
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        band = by_y[r0 * cols:r1 * cols]  # as many points as the band has cells
        by_x = band[np.argsort(points[band, 0], kind="stable")]
        for c0 in range(0, cols, block):
            c1 = min(cols, c0 + block)
            members = by_x[(r1 - r0) * c0:(r1 - r0) * c1]
            block_cells = np.array([r * cols + c for r in range(r0, r1) for c in range(c0, c1)])
            out[members] = block_cells[assign_exact(points[members], cells[block_cells])]
    half = block // 2
    for _ in range(refine_passes):
        for offset in ((half, half), (0, half), (half, 0), (0, 0)):
            _refine(points, out, cells, rows, cols, block, offset)
    return out


def total_cost(points: np.ndarray, assignment: np.ndarray, rows: int, cols: int) -> float:
    return float(((points - cell_centres(rows, cols)[assignment]) ** 2).sum())
