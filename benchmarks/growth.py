"""Growth benchmark: what does a scheduled rerun cost after a small change of the dataset?

On 20,000 synthetic JPEGs in 10 label folders (plus a `probe` folder of 20 that gets
saliency maps), the whole workflow runs with `snakemake --cores 2`: extract (pool and
block13), an index per layer, top-k, embed, mosaic, neighbour sheets, evaluation, saliency
(gradient, on the probes) and the report. Then the dataset changes twice, each time followed
by a rerun: +1% images (one of them a probe), then 0.5% removed. Each rerun's wall time is
divided by the full run's and printed as `growth/rerun_vs_full` (target: at most 0.10), with
the jobs it ran, the old map points' displacement, and whether `snakemake -n` then says
"Nothing to be done". Last, a from-scratch run on the final files (a second run directory)
is compared with the updated one: features, exact-index neighbours, top-k tables,
embedding ids, and no retired id in the report's data.

    python benchmarks/growth.py [--images 20000] [--work /tmp/growth] [--skip-scratch]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from scale_rehearsal import make_images  # noqa: E402

from featscope.index import NeighbourIndex  # noqa: E402
from featscope.pipelines import load_features  # noqa: E402
from featscope.pipelines.core import manifest  # noqa: E402
from featscope.pipelines.core.rundir import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["pool", "block13"]


def config(work: Path, run: str, weights: str, n: int) -> Path:
    path = work / f"{run}.yaml"
    path.write_text(json.dumps({
        "run": run, "runs_dir": str(work / "runs"), "images": str(work / "images"), "shard_size": 1000,
        "model": {"arch": "mobilenet_v2", "weights": weights}, "layers": LAYERS,
        "extract": {"batch_size": 64, "threads": 2},
        "embed": {"layers": ["pool"]},
        "topk": {"k": 9, "layers": ["block13"], "units": "0-63"},
        "index": {"pixels": False, "queries": [0, n // 2], "k": 8},
        "saliency": {"methods": ["gradient"], "select": "label=probe", "workers": 1},
    }, indent=1))
    return path


def snakemake(work: Path, configfile: Path, *extra: str) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(configfile), "--cores", "2", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"snakemake failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout + done.stderr


def probes(images: Path, first: int, count: int) -> None:
    """`count` probe images, copies of synthetic ones under new names (content differs by name)."""
    (images / "probe").mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        source = next((images / f"class{i % 10}").glob("*.jpg"))
        shutil.copyfile(source, images / "probe" / f"probe{i:04d}.jpg")


def add_images(images: Path, n_before: int, count: int) -> None:
    """`count` new synthetic images (ids past the first n_before), in the label folders."""
    staging = images.parent / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    from scale_rehearsal import _make

    _make((staging, n_before, count))
    for path in staging.rglob("*.jpg"):
        target = images / path.parent.name / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.move(path, target)
    shutil.rmtree(staging)


def jobs_of_last_run(rd: RunDir) -> list[str]:
    lines = rd.history.read_text().splitlines()
    return json.loads(lines[-1])["jobs"] if lines else []


def map_update(rd: RunDir, since: float) -> str:
    """How embed made the map in the last run, and how far the old points moved."""
    path = rd.embedding("pool")
    if path.stat().st_mtime < since:
        return "map not remade"
    meta = pq.read_schema(path).metadata
    moved = meta.get(b"displacement", b"null").decode()
    return f"map {meta[b'how'].decode()}, old points moved " + ("-" if moved == "null" else f"{100 * float(moved):.2f}%")


def compare(updated: RunDir, scratch: RunDir) -> list[str]:
    """The updated run against a from-scratch run on the same files: what differs (empty: nothing)."""
    problems = []
    key = {}
    for rd in (updated, scratch):  # ids differ between the runs: match images by path
        rows = manifest.read(rd).to_pylist()
        key[rd.root] = {r["image_id"]: Path(r["path"]).relative_to(Path(rd.read_config()["images_root"])).as_posix()
                        if Path(r["path"]).is_absolute() else r["path"] for r in rows}
    for layer in LAYERS:
        a, b = load_features(updated, layer), load_features(scratch, layer)
        va = dict(zip((key[updated.root][int(i)] for i in a.image_ids), a.vectors))
        vb = dict(zip((key[scratch.root][int(i)] for i in b.image_ids), b.vectors))
        if va.keys() != vb.keys():
            problems.append(f"features {layer}: {len(va.keys() ^ vb.keys())} images in one run only")
            continue
        worst = max(float(np.abs(va[p] - vb[p]).max()) for p in va)
        if worst > 0.05:
            problems.append(f"features {layer}: differ by up to {worst:.3g}")
        ia = NeighbourIndex.load(updated.index_dir(layer))
        ib = NeighbourIndex.load(scratch.index_dir(layer))
        sample = np.random.default_rng(0).choice(ia.ids, 500, replace=False)
        path_to_b = {p: i for i, p in key[scratch.root].items()}
        na = ia.search_ids(sample, k=10).image_ids
        nb = ib.search_ids([path_to_b[key[updated.root][int(i)]] for i in sample], k=10).image_ids
        same = np.mean([len({key[updated.root][int(x)] for x in ra} & {key[scratch.root][int(x)] for x in rb}) / 10
                        for ra, rb in zip(na, nb)])
        if same < 0.99:
            problems.append(f"index {layer}: neighbour lists agree {same:.3f}")
        print(f"  {layer}: features agree within {worst:.2g}; 10-NN lists agree {same:.4f}")
    ta = pq.read_table(updated.topk("block13")).to_pylist()
    tb = pq.read_table(scratch.topk("block13")).to_pylist()
    sa = {(r["channel"], key[updated.root][r["image_id"]]) for r in ta}
    sb = {(r["channel"], key[scratch.root][r["image_id"]]) for r in tb}
    print(f"  top-k block13: {len(sa & sb)} of {len(sb)} (unit, image) pairs shared")
    if sa != sb:
        problems.append(f"top-k block13: {len(sa ^ sb)} (unit, image) pairs differ")
    ea = {key[updated.root][int(i)] for i in pq.read_table(updated.embedding("pool"))["image_id"].to_numpy()}
    eb = {key[scratch.root][int(i)] for i in pq.read_table(scratch.embedding("pool"))["image_id"].to_numpy()}
    if ea != eb:
        problems.append(f"embedding: {len(ea ^ eb)} images in one map only")
    live = set(key[updated.root])
    dead = set()
    for path in (updated.report_dir / "data").glob("images-*.js"):
        body = json.loads(path.read_text().split(", ", 1)[1].rsplit(");", 1)[0])
        dead |= {int(i) for i in body} - live
        for entry in body.values():
            for found in entry["neighbours"].values():
                dead |= {int(n[0]) for n in found} - live
    if dead:
        problems.append(f"report data: {len(dead)} retired ids")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/growth"))
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--skip-scratch", action="store_true", help="skip the from-scratch comparison")
    args = parser.parse_args()
    work, n = args.work, args.images
    images = work / "images"
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(images / "probe", ignore_errors=True)
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    for extra in sorted(images.glob("class*/img*.jpg")) if images.exists() else []:
        if int(extra.stem[3:]) >= n:  # images a previous benchmark added
            extra.unlink()
    print(f"making {n} images in {images} ...", flush=True)
    make_images(images, n)
    probes(images, 0, 20)
    cfg = config(work, "growth", args.weights, n)
    rd = RunDir(work / "runs" / "growth")

    full, _ = snakemake(work, cfg)
    print(f"full workflow: {full:.1f}s, {len(jobs_of_last_run(rd))} jobs", flush=True)

    steps = [("+1% images", lambda: (add_images(images, n, n // 100 - 1), probes(images, 20, 1))),
             ("-0.5% images", lambda: [p.unlink() for p in np.random.default_rng(1).choice(
                 sorted(images.glob("class*/img*.jpg")), n // 200, replace=False)])]  # spread over every shard
    for name, change in steps:
        change()
        started = time.time()
        seconds, log = snakemake(work, cfg)
        _, dry = snakemake(work, cfg, "-n")
        nothing = "Nothing to be done" in dry
        jobs = jobs_of_last_run(rd)
        print(f"{name}: rerun {seconds:.1f}s, {len(jobs)} jobs ({', '.join(jobs)}); {map_update(rd, started)}; "
              "then `snakemake -n`: "
              f"{'Nothing to be done' if nothing else 'WORK LEFT'}")
        print(f"growth/rerun_vs_full {name}: {seconds / full:.3f}", flush=True)

    if args.skip_scratch:
        return
    scratch_cfg = config(work, "scratch", args.weights, n)
    seconds, _ = snakemake(work, scratch_cfg)
    print(f"from scratch on the final files: {seconds:.1f}s; comparing ...")
    problems = compare(rd, RunDir(work / "runs" / "scratch"))
    print("growth/same_as_scratch:", "yes" if not problems else "NO: " + "; ".join(problems))


if __name__ == "__main__":
    main()
