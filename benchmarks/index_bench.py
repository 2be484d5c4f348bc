"""Neighbour index: featscope's `auto` choice vs exact search (and autofaiss if available).

Synthetic clustered vectors with a decaying spectrum, as CNN features have (default
200,000 x 1,280 and 1,000,000 x 256), 1,000 held-out queries searched in one batch.
Prints build time, queries/s, recall@10 against exact flat search and index bytes, and the
ratio `index/auto_vs_exact qps` (target >= 10 with recall@10 >= 0.95 for N >= 200k).

With `--batched`: an exact index searched as the query service searches it, on one thread,
in batches of 1-16 queries: FAISS's search (a pass over the index per query, or BLAS at the
cost of several) against `NeighbourIndex.scan_batches_at_once` (one pass per batch of 2-8 from the size
where it measured that this pays, a FAISS pass per query below it; FAISS's search for others), ms per
query and the ratio `index/batched_scan_vs_faiss`.

    python benchmarks/index_bench.py [--sets 200000x1280,1000000x256] [--autofaiss-python PATH] [--batched]

autofaiss pins numpy 1.x, so it cannot live in featscope's environment; give the python
of a separate venv with `pip install autofaiss` to compare, e.g. /tmp/afvenv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time

import faiss
import numpy as np

from featscope.index import NeighbourIndex, build_index, recall_at_k
from featscope.index.build import prepare

AUTOFAISS_SCRIPT = """
import json, sys, time, numpy as np
from autofaiss import build_index
x = np.load(sys.argv[1]); q = np.load(sys.argv[2])
t = time.perf_counter()
index, info = build_index(x, save_on_disk=False, max_index_memory_usage="4G", current_memory_available="16G",
                          metric_type="l2", min_nearest_neighbors_to_retrieve=10, verbose=40)
build = time.perf_counter() - t
index.search(q[:100], 10)
t = time.perf_counter(); _, rows = index.search(q, 10); search = time.perf_counter() - t
np.save(sys.argv[3], rows)
import faiss
print(json.dumps({"build": build, "qps": len(q) / search, "bytes": len(faiss.serialize_index(index)),
                  "factory": info.get("index_key")}))
"""


def synthetic(n: int, dims: int, seed: int, clusters: int = 256) -> np.ndarray:
    """Cluster centres plus within-cluster variation whose spectrum decays like a power law."""
    rng = np.random.default_rng(seed)
    scales = np.arange(1, dims + 1, dtype=np.float32) ** -0.8
    basis = np.linalg.qr(rng.normal(size=(dims, dims)))[0].astype(np.float32)
    centres = (rng.normal(size=(clusters, dims)).astype(np.float32) * scales * 3) @ basis
    out = np.empty((n, dims), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.normal(size=(m, dims)).astype(np.float32) * scales
        out[start:start + m] = centres[rng.integers(0, clusters, m)] + noise @ basis
    return out


def timed_search(index, queries, k=10):
    index.search(queries[:100], k)  # warm-up
    start = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, len(queries) / (time.perf_counter() - start)


def run_set(n: int, dims: int, autofaiss_python: str | None) -> None:
    data = synthetic(n + 1000, dims, seed=n)
    x, queries = data[:n], data[n:]
    xn, qn = prepare(x, "cosine"), prepare(queries, "cosine")

    exact = faiss.IndexFlatL2(dims)
    start = time.perf_counter()
    exact.add(xn)
    exact_build = time.perf_counter() - start
    truth, exact_qps = timed_search(exact, qn)

    chunk = 50_000
    start = time.perf_counter()
    result = build_index(lambda: ((np.arange(i, min(i + chunk, n)), x[i:i + chunk]) for i in range(0, n, chunk)),
                         n=n, dims=dims, kind="auto", metric="cosine", max_memory=4 << 30)
    build = time.perf_counter() - start
    ix = NeighbourIndex.from_build(result)
    rows, qps = timed_search(ix.index, qn)
    recall = recall_at_k(rows, truth, 10)
    size = len(faiss.serialize_index(ix.index))
    name = f"{n}x{dims}"
    print(f"index/auto_vs_exact qps {name}: {qps / exact_qps:.1f} (auto {result.meta['factory']} "
          f"{result.meta['search_params']}: {qps:,.0f} q/s, recall@10 {recall:.3f}, build {build:.1f}s, "
          f"{size / 1e6:.0f} MB; exact: {exact_qps:,.0f} q/s, build {exact_build:.1f}s, {n * dims * 4 / 1e6:.0f} MB)")

    if autofaiss_python:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(f"{tmp}/x.npy", xn)
            np.save(f"{tmp}/q.npy", qn)
            done = subprocess.run([autofaiss_python, "-c", AUTOFAISS_SCRIPT, f"{tmp}/x.npy", f"{tmp}/q.npy",
                                   f"{tmp}/rows.npy"], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"index/autofaiss {name}: failed: {done.stderr.strip().splitlines()[-1]}")
                return
            af = json.loads(done.stdout.strip().splitlines()[-1])
            af_recall = recall_at_k(np.load(f"{tmp}/rows.npy"), truth, 10)
        print(f"index/auto_vs_autofaiss qps {name}: {qps / af['qps']:.2f} (autofaiss {af['factory']}: "
              f"{af['qps']:,.0f} q/s, recall@10 {af_recall:.3f}, build {af['build']:.1f}s, {af['bytes'] / 1e6:.0f} MB)")


def run_batched(n: int, dims: int) -> None:
    """ms per query of an exact index on one thread, FAISS's search against one pass a batch."""
    import torch

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    data = prepare(synthetic(n + 64, dims, seed=n), "cosine")
    chunks = lambda: iter([(np.arange(n), data[:n])])  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:  # saved and memory-mapped, as the service opens it
        NeighbourIndex.from_build(build_index(chunks, n=n, dims=dims, kind="flat", metric="cosine")).save(
            f"{tmp}/flat")
        ix, scanned = (NeighbourIndex.load(f"{tmp}/flat", mmap=True) for _ in range(2))
        scanned.scan_batches_at_once()
        print(f"# {n}x{dims}: the scan pays here from batches of {scanned._scan_from}")
        _compare_batches(ix, scanned, data[n:], f"{n}x{dims}")


def _compare_batches(ix: NeighbourIndex, scanned: NeighbourIndex, data: np.ndarray, name: str) -> None:
    for batch in (1, 2, 4, 8, 16):
        queries = data[:batch]
        times, found = {}, {}
        for how, index in (("faiss", ix), ("scan", scanned)):
            found[how] = index.search_vectors(queries, 10)
            start, rounds = time.perf_counter(), max(3, 64 // batch)
            for _ in range(rounds):
                index.search_vectors(queries, 10)
            times[how] = (time.perf_counter() - start) / rounds / batch * 1000
        same = np.mean(found["faiss"].image_ids == found["scan"].image_ids)
        print(f"index/batched_scan_vs_faiss {name} batch {batch:2d}: {times['faiss'] / times['scan']:.2f} "
              f"(faiss {times['faiss']:.2f} ms a query, with the scan {times['scan']:.2f}; "
              f"same neighbours {same:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="200000x1280,1000000x256")
    parser.add_argument("--autofaiss-python", help="python of a venv where autofaiss is installed")
    parser.add_argument("--batched", action="store_true", help="only exact searches of 1-16 queries (the service's)")
    args = parser.parse_args()
    if args.batched:
        for spec in args.sets.split(","):
            run_batched(*map(int, spec.split("x")))
        return
    print(f"# faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, 1000 batched queries, k=10")
    for spec in args.sets.split(","):
        n, dims = map(int, spec.split("x"))
        run_set(n, dims, args.autofaiss_python)


if __name__ == "__main__":
    main()
