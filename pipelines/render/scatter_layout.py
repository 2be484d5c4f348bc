"""Where each thumbnail of a scatter mosaic goes, and how large canvas and thumbnails must be.

A thumbnail is drawn at its map position unless that spot is already more than `max_cover`
covered; then it tries the same spot at half size, then nearby spots (up to one thumbnail
away, nearest first), and is skipped only if all of those are covered. Near-duplicate
images share a map position, so without the nearby spots a small dataset of augmented
photos loses a fifth of its images however large the canvas.

`fit` chooses the sizes from the positions alone (no image is read): thumbnails shrink
slowly with the number of images (96 px at 150 images, 40 px at 5,000, 22 px at 50,000) and
the canvas grows until at most `max_skipped` of the images are skipped; at its largest
(MAX_SIDE) the thumbnails shrink instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_SIDE = 8192  # largest canvas fit() chooses: 64 M pixels, about 200 MB while drawing
MIN_TILE = 16


@dataclass(frozen=True)
class Placement:
    """Thumbnail i of the input is drawn at (x[i], y[i]) with side side[i]; side 0 means skipped."""

    x: np.ndarray
    y: np.ndarray
    side: np.ndarray

    @property
    def skipped(self) -> int:
        return int((self.side == 0).sum())


def _offsets(tile: int) -> list[tuple[int, int]]:
    """The spot itself, then rings from half a thumbnail to two thumbnails away, nearest first."""
    rings = []
    for radius, count in ((tile / 2, 8), (tile, 16), (1.5 * tile, 24), (2 * tile, 32)):
        for k in range(count):
            angle = 2 * math.pi * k / count
            rings.append((round(radius * math.cos(angle)), round(radius * math.sin(angle))))
    return [(0, 0)] + rings


def place(points: np.ndarray, size: int, tile: int, *, max_cover: float = 0.5) -> Placement:
    """Lay out thumbnails for normalised points (in [0, 1]^2, drawn in the given order)."""
    covered = np.zeros((size, size), dtype=bool)
    span = size - tile
    n = len(points)
    xs, ys, sides = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    offsets = _offsets(tile)
    for i, (px, py) in enumerate(points * span):
        x, y = int(px), int(py)
        for dx, dy in offsets:
            for side in (tile, tile // 2):
                cx = min(max(x + dx + (tile - side) // 2, 0), size - side)
                cy = min(max(y + dy + (tile - side) // 2, 0), size - side)
                if np.count_nonzero(covered[cy:cy + side, cx:cx + side]) / (side * side) <= max_cover:
                    covered[cy:cy + side, cx:cx + side] = True
                    xs[i], ys[i], sides[i] = cx, cy, side
                    break
            if sides[i]:
                break
    return Placement(xs, ys, sides)


def default_tile(images: int) -> int:
    """Thumbnail side for a map of this many images: 96 px at 150, shrinking as n^-1/4."""
    return int(np.clip(96 * (150 / max(images, 1)) ** 0.25, 20, 96))


def fit(points: np.ndarray, *, size: int | None = None, tile: int | None = None, max_skipped: float = 0.02,
        max_cover: float = 0.5) -> tuple[int, int, Placement]:
    """(size, tile, placement): what is not given is chosen so that at most `max_skipped` of
    the points are skipped (or the limits MAX_SIDE and MIN_TILE are reached)."""
    n = len(points)
    allowed = int(max_skipped * n)
    if size is not None and tile is not None:
        return size, tile, place(points, size, min(tile, size), max_cover=max_cover)
    if size is None:
        tile = tile or default_tile(n)
        size = min(MAX_SIDE, max(4 * tile, int(math.sqrt(n * tile * tile * 2))))
        while True:
            layout = place(points, size, tile, max_cover=max_cover)
            if layout.skipped <= allowed or size >= MAX_SIDE:
                break
            size = min(MAX_SIDE, int(size * 1.2))
        if layout.skipped <= allowed:
            return size, tile, layout
    else:
        tile = min(tile or default_tile(n), size // 4)
    while True:  # the canvas is given or at its largest: thumbnails shrink
        layout = place(points, size, tile, max_cover=max_cover)
        if layout.skipped <= allowed or tile <= MIN_TILE:
            return size, tile, layout
        tile = max(MIN_TILE, int(tile * 0.85))
