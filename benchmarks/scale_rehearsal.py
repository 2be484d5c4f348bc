"""Scale rehearsal: does featscope's cost stay flat per image as the dataset grows?

Generates N synthetic JPEGs (random gradients, shapes and noise; sides 96-320 px) for each
N, then runs manifest, extract (a real model, MobileNet-V2), index build, top-k merge and
embed as separate `featscope` processes, recording per stage wall time, images/s and peak
resident memory (GNU time's %M). Then prints, per stage, the 50k/10k ratios of time per
image (bound: 1.2) and of peak RSS (bound: 1.25, except for the stages that must hold an
N-sized result: index build holds the vectors, embed the PCA'd matrix and t-SNE), and the
time of Snakemake's planning (`-n`) for a run of 2,000 shards.

    python benchmarks/scale_rehearsal.py [--sizes 10000,50000] [--out /tmp/rehearsal]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FEATSCOPE = str(Path(sys.executable).with_name("featscope"))
N_SIZED = {"index": "holds the N vectors it indexes", "embed": "holds the N x 50 PCA matrix and the t-SNE"}


def _make(args: tuple[Path, int, int]) -> None:
    out, start, count = args
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        w, h = (int(v) for v in rng.integers(96, 321, 2))
        base = np.linspace(rng.uniform(0, 255, 3), rng.uniform(0, 255, 3), w)[None].repeat(h, 0)
        img = Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 6))):
            box = sorted(rng.integers(0, w, 2).tolist()), sorted(rng.integers(0, h, 2).tolist())
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((box[0][0], box[1][0], box[0][1], box[1][1]), fill=fill)
        path = out / f"class{i % 10}" / f"img{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=85)


def make_images(out: Path, n: int, workers: int = 2) -> None:
    if out.is_dir() and sum(1 for _ in out.rglob("*.jpg")) == n:
        return
    chunk = 1000
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make, [(out, s, min(chunk, n - s)) for s in range(0, n, chunk)]))


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a command, by GNU time."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024


def rehearse(n: int, work: Path, model: str, weights: str) -> dict[str, tuple[float, float]]:
    images = work / f"images-{n}"
    make_images(images, n)
    run = work / f"run-{n}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    stages = {
        "manifest": [FEATSCOPE, "manifest", "--images", str(images), "--run", str(run), "--shard-size", "2500",
                     "--model", model, "--weights", weights],
        "extract": [FEATSCOPE, "extract", "--run", str(run), "--layers", "pool,block13", "--topk", "9", "--quiet"],
        "index": [FEATSCOPE, "index", "build", "--run", str(run), "--layer", "pool", "--quiet"],
        "topk_merge": [FEATSCOPE, "topk", "merge", "--run", str(run), "--layer", "block13"],
        "embed": [FEATSCOPE, "embed", "--run", str(run), "--layer", "pool"],
    }
    results = {}
    for stage, cmd in stages.items():
        results[stage] = timed(cmd)
        seconds, rss = results[stage]
        print(f"  N={n:>6} {stage:<11} {seconds:8.1f} s {n / seconds:9.0f} img/s  peak RSS {rss:7.0f} MB", flush=True)
    return results


def planning_time(work: Path, images: Path, shards: int) -> float:
    """Snakemake's dry run (`-n`) over a run whose manifest has `shards` shards."""
    n = sum(1 for _ in images.rglob("*.jpg"))
    config = {"run": "plan", "runs_dir": str(work / "runs"), "images": str(images), "shard_size": max(1, n // shards),
              "model": {"arch": "mobilenet_v2", "weights": "random"}, "layers": ["pool"]}
    configfile = work / "plan.yaml"
    configfile.write_text(json.dumps(config))
    subprocess.run([FEATSCOPE, "manifest", "--images", str(images), "--run", str(work / "runs" / "plan"),
                    "--shard-size", str(config["shard_size"]), "--model", "mobilenet_v2", "--weights", "random"],
                   check=True, capture_output=True)
    repo = Path(__file__).resolve().parents[1]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--snakefile", str(repo / "Snakefile"),
                    "--directory", str(work), "--configfile", str(configfile)], check=True, capture_output=True)
    return time.perf_counter() - start


def index_from_shards(work: Path, n: int, dims: int = 1280, shard: int = 50_000) -> tuple[float, float, dict]:
    """Write n synthetic `dims`-d vectors (1,000 Gaussian clusters, float16) as feature
    shards of a run, then time `featscope index build` over them (streamed: it never holds
    all vectors). Returns (seconds, peak RSS MB, the index's meta.json)."""
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.core.store import FeaturePartWriter, RunIdentity

    rd = RunDir(work / f"vectors-{n}")
    identity = RunIdentity(model="synthetic", weights_sha256="synthetic", preprocessing="{}")
    rd.write_config({"model": "synthetic", "weights": "synthetic", "weights_sha256": "synthetic",
                     "preprocessing": "{}"})
    if not rd.manifest.exists():  # the index keeps only images the manifest still lists
        import pyarrow as pa

        from featscope.pipelines.core.manifest import MANIFEST_SCHEMA
        from featscope.pipelines.core.store import write_table

        ids = np.arange(n, dtype=np.int64)
        write_table(pa.table({"image_id": ids, "path": pa.array([f"synthetic/{i}" for i in ids]),
                              "label": pa.nulls(n, pa.string()), "shard": (ids // shard).astype(np.int32),
                              "removed": np.zeros(n, dtype=bool), "size": pa.nulls(n, pa.int64()),
                              "mtime_ns": pa.nulls(n, pa.int64()), "sha256": pa.nulls(n, pa.string()),
                              "replaced_by": pa.nulls(n, pa.int64()), "ctime_ns": pa.nulls(n, pa.int64())},
                             schema=MANIFEST_SCHEMA), rd.manifest)
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 2, (1000, dims)).astype(np.float32)
    for part, start in enumerate(range(0, n, shard)):
        path = rd.feature_part("pool", part)
        if path.exists():
            continue
        count = min(shard, n - start)
        vectors = centres[rng.integers(0, 1000, count)] + rng.normal(0, 0.5, (count, dims)).astype(np.float32)
        writer = FeaturePartWriter(path, identity, layer="pool", kind="vector", dims=dims)
        writer.write(np.arange(start, start + count, dtype=np.int64), np.abs(vectors))
        writer.commit()
    seconds, rss = timed([FEATSCOPE, "index", "build", "--run", str(rd.root), "--layer", "pool", "--quiet"])
    return seconds, rss, json.loads((rd.index_dir("pool") / "meta.json").read_text())


def index_line(work: Path, n: int) -> str:
    """Build the index of n synthetic vectors from shards and say what it cost."""
    seconds, rss, meta = index_from_shards(work, n)
    return (f"scale/index {n} x 1280-d from shards: {seconds:.0f} s, peak RSS {rss:.0f} MB (the float32 vectors "
            f"alone: {n * 1280 * 4 / 2**20:.0f} MB); {meta['factory']}, recall@10 {meta['recall_at_10']}, "
            f"{meta['estimated_bytes'] / 2**20:.0f} MB index")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--out", type=Path, default=Path("/tmp/featscope-rehearsal"))
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--plan-shards", type=int, default=2000)
    parser.add_argument("--index-vectors", type=int, default=1_000_000,
                        help="also build an index from this many synthetic 1,280-d vectors in shards (0: skip)")
    parser.add_argument("--only-index", action="store_true", help="run the synthetic index build alone")
    args = parser.parse_args()
    if args.only_index:
        print(index_line(args.out, args.index_vectors))
        return
    sizes = [int(x) for x in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    table = {n: rehearse(n, args.out, args.model, args.weights) for n in sizes}
    small, large = sizes[0], sizes[-1]
    print(f"\nstage        s/img ratio {large // 1000}k/{small // 1000}k   RSS ratio   (bounds 1.2 and 1.25)")
    for stage in table[small]:
        (t0, m0), (t1, m1) = table[small][stage], table[large][stage]
        per_image = (t1 / large) / (t0 / small)
        note = f"  N-sized result: {N_SIZED[stage]}" if stage in N_SIZED else ""
        flat = "ok" if per_image <= 1.2 and (m1 / m0 <= 1.25 or stage in N_SIZED) else "NOT FLAT"
        print(f"scale/{stage:<11} {per_image:10.2f} {m1 / m0:12.2f}   {flat}{note}")
    plan = planning_time(args.out, args.out / f"images-{small}", args.plan_shards)
    print(f"scale/plan snakemake -n for {args.plan_shards} shards: {plan:.1f} s")
    if args.index_vectors:
        print(index_line(args.out, args.index_vectors))
    (args.out / "rehearsal.json").write_text(json.dumps({str(n): t for n, t in table.items()} | {"plan_s": plan}))


if __name__ == "__main__":
    main()
