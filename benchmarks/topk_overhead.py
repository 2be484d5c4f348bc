"""Top-k collection during extraction: cost of `--topk 9` against the same extraction without.

Same photos, model, layers and settings, one process, runs alternated (off, on, off, on,
...) and the best of each kept, since this machine is noisy. Prints `topk/overhead`, the
time ratio on/off (target <= 1.05).

    python benchmarks/topk_overhead.py [--images 1000] [--model mobilenet_v2] [--layers pool,block13]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from extract_throughput import make_photos

from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract


def timed(images: Path, work: Path, model: str, layers: list[str], k: int) -> float:
    rd = RunDir(work / f"run-{time.monotonic_ns()}")
    manifest.run(rd, images, num_shards=1, model=model, weights="random")
    start = time.perf_counter()
    extract.extract(rd, layers, topk=k, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--layers", default="pool,block13")
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layers = args.layers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "photos"
        make_photos(images, args.images)
        timed(images, Path(tmp), args.model, layers, args.k)  # warm-up
        off, on = [], []
        for _ in range(args.repeats):
            off.append(timed(images, Path(tmp), args.model, layers, 0))
            on.append(timed(images, Path(tmp), args.model, layers, args.k))
    print(f"topk/overhead {args.model} {','.join(layers)} k={args.k}: {min(on) / min(off):.3f} "
          f"(with top-k {args.images / min(on):.0f} img/s, without {args.images / min(off):.0f} img/s)")


if __name__ == "__main__":
    main()
