"""How many thumbnails a scatter mosaic skips, with chosen sizes against the old fixed ones.

For 150, 5,000 and 50,000 t-SNE-mapped points (Gaussian blobs in 50-d, a fifth of them
near-duplicates as augmented photos are), it lays out the mosaic with `scatter_layout.fit`
(sizes chosen from the positions) and with the old fixed 4,000 px canvas and 64 px
thumbnails at the exact positions (no nearby spots), and prints the skipped share of each.
No image is read: placement depends on positions only. The blobs are a hard case: t-SNE
makes them tight discs that cover about a quarter of the map. `--run` adds a real run's
map (all of it, and a 150-image sample).

    python benchmarks/scatter_fit.py [--sizes 150,5000,50000] [--run runs/demo --layer pool]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import read_embedding
from featscope.pipelines.render.grid_layout import normalise
from featscope.pipelines.render.scatter_layout import fit
from featscope.pipelines.stages.embed import tsne


def mapped_points(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 50)) * 1.5
    x = centres[rng.integers(0, 20, n)] + rng.normal(size=(n, 50)) * rng.uniform(0.5, 2, size=(n, 1))
    twins = rng.random(n) < 0.2
    x[twins] = x[rng.integers(0, n, twins.sum())] + rng.normal(size=(twins.sum(), 50)) * 0.01
    xy, _ = tsne(x.astype(np.float32), perplexity=30, seed=seed, max_exact=100_000)
    return normalise(xy)


def old_fixed(points: np.ndarray, size: int = 4000, tile: int = 64) -> int:
    """The old rule: exact spot at full then half size, else skipped."""
    covered = np.zeros((size, size), dtype=bool)
    skipped = 0
    for px, py in points * (size - tile):
        x, y = int(px), int(py)
        for side in (tile, tile // 2):
            cx, cy = x + (tile - side) // 2, y + (tile - side) // 2
            if covered[cy:cy + side, cx:cx + side].mean() <= 0.5:
                covered[cy:cy + side, cx:cx + side] = True
                break
        else:
            skipped += 1
    return skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="150,5000,50000")
    parser.add_argument("--run", help="also a real run's map")
    parser.add_argument("--layer", default="pool")
    args = parser.parse_args()
    maps = [(f"blobs {n}", mapped_points(n)) for n in map(int, args.sizes.split(",") if args.sizes else [])]
    if args.run:
        table = read_embedding(RunDir(args.run), args.layer)
        real = normalise(np.stack([table["tsne_x"].to_numpy(), -table["tsne_y"].to_numpy()], axis=1))
        maps += [(f"{args.layer} {len(real)}", real),
                 (f"{args.layer} 150", normalise(real[np.random.default_rng(0).choice(len(real), 150, replace=False)]))]
    print(f"{'map':>12} {'old skipped':>12} {'canvas':>7} {'tile':>5} {'skipped':>8} {'half-size':>9} {'fit s':>6}")
    for name, points in maps:
        n = len(points)
        points = points[np.random.default_rng(0).permutation(n)]  # the stage's drawing order
        old = old_fixed(points)
        start = time.perf_counter()
        size, tile, layout = fit(points)
        seconds = time.perf_counter() - start
        half = int((layout.side == tile // 2).sum())
        print(f"{name:>12} {old / n:>11.1%} {size:>7} {tile:>5} {layout.skipped / n:>8.1%} {half / n:>9.1%} "
              f"{seconds:>6.1f}")


if __name__ == "__main__":
    main()
