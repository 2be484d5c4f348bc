"""Resident memory of `featscope serve` at 5k and at 1M images.

The 5k figure is the demo run itself. The 1M run is synthetic: a manifest of 1,000,000
images (10 labels, paths like those of a real folder), the demo run's identity, and an
exact index of 1,000,000 random 128-d vectors for layer `pool` (built with featscope's own
builder and saved as a run's index is). Each server is started as `featscope serve`, asked
500 neighbour queries by id, and its VmRSS read from /proc; the model is not loaded (it
loads on the first upload, the same at any dataset size).

    python benchmarks/serve_memory.py [--images 1000000] [--work /tmp/serve-memory]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from featscope.index import NeighbourIndex, build_index
from featscope.pipelines.core.manifest import MANIFEST_SCHEMA
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import RunIdentity, write_table

REPO = Path(__file__).resolve().parents[1]


def synthetic_run(demo: RunDir, work: Path, n: int, dims: int = 128) -> RunDir:
    rd = RunDir(work / f"run-{n}")
    if rd.index_meta("pool").exists():
        return rd
    shutil.rmtree(rd.root, ignore_errors=True)
    rd.root.mkdir(parents=True)
    config = demo.read_config() | {"name": rd.name, "images": str(work / "images"), "images_root": str(work / "images")}
    rd.write_config(config)
    ids = np.arange(n, dtype=np.int64)
    table = pa.table({"image_id": ids, "path": [f"class{i % 10}/img{i:07d}.jpg" for i in range(n)],
                      "label": [f"class{i % 10}" for i in range(n)], "shard": (ids // 1000).astype(np.int32),
                      "removed": np.zeros(n, bool), "size": np.full(n, 20_000), "mtime_ns": np.zeros(n, np.int64),
                      "sha256": [None] * n, "replaced_by": pa.nulls(n, pa.int64()), "ctime_ns": np.zeros(n, np.int64)},
                     schema=MANIFEST_SCHEMA)
    write_table(table, rd.manifest, {})
    rng = np.random.default_rng(0)

    def chunks():
        for start in range(0, n, 100_000):
            yield ids[start:start + 100_000], rng.normal(size=(min(100_000, n - start), dims)).astype(np.float32)

    result = build_index(chunks, n=n, dims=dims, kind="flat", metric="cosine", recall_queries=100)
    identity = RunIdentity.of_run(config)
    NeighbourIndex.from_build(result).save(rd.index_dir("pool"), extra_meta=asdict(identity) | {"layer": "pool"})
    rd.report_dir.mkdir(parents=True)
    (rd.report_dir / "index.html").write_text("<!doctype html><title>synthetic</title>")
    return rd


def rss_of_server(rd: RunDir, queries: int = 500) -> tuple[float, float, float]:
    """MB resident in a `featscope serve` of the run after `queries` neighbour queries: in
    all, anonymous (the process's own), and file-backed (mapped index pages, shared with the
    page cache)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("featscope")), "serve", "--run", str(rd.root),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        ids = _ids(rd)
        for i in np.random.default_rng(1).choice(ids, queries):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/neighbours?id={int(i)}&layer=pool&k=10",
                                        timeout=30) as r:
                r.read()
        status = Path(f"/proc/{server.pid}/status").read_text()
        mb = {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status.splitlines()
              if line.startswith(("VmRSS", "RssAnon", "RssFile"))}
        return mb["VmRSS"], mb["RssAnon"], mb["RssFile"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)


def _ids(rd: RunDir) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(rd.manifest, columns=["image_id"])["image_id"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/serve-memory"))
    args = parser.parse_args()
    demo = RunDir(args.demo)
    line = "serve/rss_mb {}: {:.0f} (own {:.0f}, mapped files {:.0f})"
    print(line.format(f"demo, {len(_ids(demo))} images, {len(demo.index_layers())} indexes", *rss_of_server(demo)),
          flush=True)
    big = synthetic_run(demo, args.work, args.images)
    print(line.format(f"synthetic, {args.images} images, one exact 128-d index", *rss_of_server(big)))


if __name__ == "__main__":
    main()
