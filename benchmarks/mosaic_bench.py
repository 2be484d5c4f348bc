"""Grid assignment and t-SNE timings, printed as a table.

Assignment: t-SNE-like points (Gaussian blobs) on 32x32, 64x64 and 128x128 grids; exact
`linear_sum_assignment` vs featscope's blockwise solve (with its cost relative to the exact
optimum), and lapjv on the same cost matrix where it is installed (`pip install lapjv`).
t-SNE: openTSNE with featscope's settings on 10k and 100k synthetic 50-d points.

    python benchmarks/mosaic_bench.py [--sides 32,64,128] [--tsne 10000,100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from featscope.pipelines.render.grid_layout import assign, cell_centres, normalise, total_cost
from featscope.pipelines.stages.embed import tsne

EXACT_MAX_SIDE = 64  # a 128x128 exact solve needs a 2 GB cost matrix and hours


def blobs(n: int, dims: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dims)) * 6
    return (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, dims))).astype(np.float32)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="32,64,128")
    parser.add_argument("--tsne", default="10000,100000")
    args = parser.parse_args()
    try:
        import lapjv
    except ImportError:
        lapjv = None
    print(f"{'grid':>9} {'exact s':>8} {'blockwise s':>11} {'blockwise/exact cost':>21} {'lapjv s':>8} "
          f"{'blockwise vs lapjv':>19}")
    for side in map(int, args.sides.split(",")):
        n = side * side
        points = normalise(blobs(n, 2, seed=side))
        blocked, t_block = timed(lambda: assign(points, side, side, exact_max=0))
        cost_block = total_cost(points, blocked, side, side)
        t_exact = t_lapjv = float("nan")
        ratio = "n/a"
        if side <= EXACT_MAX_SIDE:
            cost = ((points[:, None, :] - cell_centres(side, side)[None]) ** 2).sum(-1)
            (rows, cols), t_exact = timed(lambda: linear_sum_assignment(cost))
            ratio = f"{cost_block / cost[rows, cols].sum():.3f}"
            if lapjv is not None:
                _, t_lapjv = timed(lambda: lapjv.lapjv(cost))
        vs = f"{t_lapjv / t_block:.2f}x" if t_lapjv == t_lapjv else "n/a"
        print(f"{side:>4}x{side:<4} {t_exact:>8.2f} {t_block:>11.2f} {ratio:>21} {t_lapjv:>8.2f} {vs:>19}")
    print(f"\n{'t-SNE points':>12} {'seconds':>8}")
    for n in map(int, args.tsne.split(",")):
        x = blobs(n, 50, seed=n)
        _, seconds = timed(lambda: tsne(x, perplexity=30, seed=0, max_exact=max(n, 100_000)))
        print(f"{n:>12} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
