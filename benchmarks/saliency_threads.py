"""Occlusion on a busy machine: featscope's default threads against the best explicit setting.

A competing job (two torch threads multiplying matrices, as another cluster job on the same
node would) runs for the whole benchmark. On the same photos, interleaved and repeated,
`featscope saliency --method occlusion` runs with its defaults and with `--workers 1
--threads 1`, `--workers 1 --threads 2` and `--workers 2 --threads 1`; each line gives the
wall time, and the last the ratio of the default's time to the best one (target <= 1.20).

    python benchmarks/saliency_threads.py [--images 4] [--repeats 2] [--model mobilenet_v2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from extract_throughput import make_photos  # noqa: E402

from featscope.pipelines.core import manifest  # noqa: E402
from featscope.pipelines.core.rundir import RunDir  # noqa: E402
from featscope.pipelines.stages import saliency  # noqa: E402

COMPETITOR = ("import torch; torch.set_num_threads(2); a = torch.randn(1500, 1500)\n"
              "while True: a = (a @ a).clamp(-1, 1)")
SETTINGS = {"defaults": {}, "1x1": {"workers": 1, "threads": 1}, "1x2": {"workers": 1, "threads": 2},
            "2x1": {"workers": 2, "threads": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="mobilenet_v2")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp) / "photos", args.images)
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
        try:
            time.sleep(2)  # the competitor is up and busy
            for repeat in range(args.repeats):
                for name, setting in SETTINGS.items():
                    rd = RunDir(Path(tmp) / f"run-{name}-{repeat}")
                    manifest.run(rd, Path(tmp) / "photos", num_shards=1, model=args.model, weights="random")
                    start = time.perf_counter()
                    saliency.run(rd, saliency.SaliencyOptions(method="occlusion", **setting), progress=False)
                    times[name].append(time.perf_counter() - start)
        finally:
            competitor.kill()
    medians = {name: statistics.median(t) for name, t in times.items()}
    workers, threads = saliency.split(None, None)  # as the default runs computed it
    for name, median in medians.items():
        shown = f"{workers}x{threads}" if name == "defaults" else name
        print(f"saliency_threads/{name} ({shown} workers x threads) occlusion busy: {median:.1f}s "
              f"({args.images / median:.2f} img/s)")
    best = min(v for k, v in medians.items() if k != "defaults")
    print(f"saliency_threads/defaults_vs_best busy: {medians['defaults'] / best:.2f}")


if __name__ == "__main__":
    main()
