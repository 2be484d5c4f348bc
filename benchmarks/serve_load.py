"""Load test of `featscope serve` against the standard-library server it replaced.

Each server runs in a process of its own on 127.0.0.1 over the same run (the demo run by
default); a bounded asyncio client (a fixed number of connections, each sending requests
one after another over keep-alive for a fixed time) measures throughput and p50/p99
latency, and counts errors (non-200 answers) and dropped connections:

- GET /api/neighbours (random ids, layer pool, k=10) at concurrency 1, 8, 32, 128;
- POST /api/neighbours (the demo photos, cycled) at concurrency 1, 4, 16;
- one upload client while 128 GET clients run (how long an upload waits in a GET storm).

Each line prints featscope's figures beside the baseline's (`benchmarks/stdlib_server.py`,
the server of before, unchanged), then `serve/<kind>_c<N>` ratios of throughput.

    python benchmarks/serve_load.py [--run runs/demo] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASELINE = """
import sys
sys.path.insert(0, {bench!r})
from stdlib_server import QueryService, _Handler, ThreadingHTTPServer
from featscope.pipelines.core.rundir import RunDir
handler = type("Handler", (_Handler,), {{"service": QueryService(RunDir({run!r}))}})
server = ThreadingHTTPServer(("127.0.0.1", {port}), handler)
server.daemon_threads = True
print("ready", flush=True)
server.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, run: Path, port: int) -> subprocess.Popen:
    if kind == "featscope":
        cmd = [str(Path(sys.executable).with_name("featscope")), "serve", "--run", str(run), "--port", str(port)]
    else:
        cmd = [sys.executable, "-c", BASELINE.format(bench=str(REPO / "benchmarks"), run=str(run), port=port)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{kind} server did not start")


async def request(reader, writer, method: str, path: str, body: bytes = b"") -> tuple[int, bool]:
    """(status, whether the server closes the connection after this answer: HTTP/1.0 does)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    length, closes = None, status_line.startswith(b"HTTP/1.0")
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "connection":
            closes = value.strip().lower() == "close"
    if length is None:
        await reader.read()  # the body runs to the close
    else:
        await reader.readexactly(length)
    return int(status_line.split()[1]), closes


async def client(port: int, until: float, make, latencies: list, counts: dict) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        counts["dropped"] += 1
        return
    while time.perf_counter() < until:
        method, path, body = make()
        start = time.perf_counter()
        try:
            status, closes = await asyncio.wait_for(request(reader, writer, method, path, body), 30)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            counts["dropped"] += 1  # no answer: a reset, a timeout or a close mid-request
            closes, status = True, None
        if status is not None:
            latencies.append(time.perf_counter() - start)
            counts["ok" if status == 200 else "errors"] += 1
        if closes:  # the server ends connections after each answer (HTTP/1.0): open the next one
            writer.close()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["dropped"] += 1
                return
    writer.close()


def measure(port: int, concurrency: int, seconds: float, make) -> dict:
    latencies, counts = [], {"ok": 0, "errors": 0, "dropped": 0}

    async def main():
        until = time.perf_counter() + seconds
        await asyncio.gather(*(client(port, until, make, latencies, counts) for _ in range(concurrency)))

    start = time.perf_counter()
    asyncio.run(main())
    return summary(latencies, counts, time.perf_counter() - start)


def summary(latencies: list, counts: dict, seconds: float) -> dict:
    """Throughput over `seconds`, p50 and p99 latency in ms, and the counts."""
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"rate": counts["ok"] / seconds, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            **counts}


def measure_mixed(port: int, seconds: float, upload, get) -> dict:
    """One upload client while 128 GET clients run (started first): the upload's figures."""
    latencies, counts = [], {"ok": 0, "errors": 0, "dropped": 0}
    ignored, ignored_counts = [], {"ok": 0, "errors": 0, "dropped": 0}

    async def main():
        until = time.perf_counter() + seconds + 1
        gets = [client(port, until, get, ignored, ignored_counts) for _ in range(128)]
        await asyncio.gather(*gets, uploads(until))

    async def uploads(until: float):
        await asyncio.sleep(1)  # the GET clients connected and busy
        await client(port, until, upload, latencies, counts)

    asyncio.run(main())
    return summary(latencies, counts, seconds)


def fmt(r: dict) -> str:
    return (f"{r['rate']:7.1f}/s p50 {r['p50']:7.1f} ms p99 {r['p99']:7.1f} ms "
            f"errors {r['errors']} dropped {r['dropped']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--photos", type=Path, default=REPO / "data" / "demo" / "photo")
    args = parser.parse_args()
    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.rundir import RunDir

    ids = manifest.read(RunDir(args.run))["image_id"].to_numpy()
    uploads = [p.read_bytes() for p in sorted(args.photos.iterdir()) if p.suffix.lower() in (".jpg", ".png")]
    rng = random.Random(0)

    def get():
        return "GET", f"/api/neighbours?id={int(rng.choice(ids))}&layer=pool&k=10", b""

    def post():
        return "POST", "/api/neighbours?layer=pool&k=10", rng.choice(uploads)

    plan = [("get", c, get) for c in (1, 8, 32, 128)] + [("upload", c, post) for c in (1, 4, 16)]
    results: dict[str, dict] = {}
    for kind in ("featscope", "stdlib"):
        port = free_port()
        server = start(kind, args.run, port)
        try:
            measure(port, 2, 2.0, post)  # warm-up: the model loads on the first upload
            measure(port, 2, 1.0, get)
            for name, concurrency, make in plan:
                results[f"{kind} {name} {concurrency}"] = measure(port, concurrency, args.seconds, make)
            results[f"{kind} mixed"] = measure_mixed(port, args.seconds, post, get)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"{len(ids)} images, {os.cpu_count()} cores, {args.seconds:g}s per level")
    for name, concurrency, _ in plan:
        ours, theirs = results[f"featscope {name} {concurrency}"], results[f"stdlib {name} {concurrency}"]
        print(f"{name:6s} c={concurrency:<3d} featscope {fmt(ours)} | stdlib {fmt(theirs)}")
    ours, theirs = results["featscope mixed"], results["stdlib mixed"]
    print(f"upload c=1 while 128 GET clients: featscope {fmt(ours)} | stdlib {fmt(theirs)}")
    for name, concurrency, _ in plan:
        ours, theirs = results[f"featscope {name} {concurrency}"], results[f"stdlib {name} {concurrency}"]
        print(f"serve/{name}_c{concurrency} featscope_vs_stdlib: {ours['rate'] / max(theirs['rate'], 1e-9):.2f}")
    scale = results["featscope upload 16"]["rate"] / max(results["featscope upload 1"]["rate"], 1e-9)
    print(f"serve/upload_c16_vs_c1: {scale:.2f} (target >= 3)")


if __name__ == "__main__":
    main()
