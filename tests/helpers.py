"""Helpers for tests: tiny datasets built from images that ship in installed packages."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from featscope.pipelines.data.demo import PHOTOS, _package_file


def photo_paths() -> list[Path]:
    return [_package_file(pkg, rel) for pkg, rel in PHOTOS]


def write_dataset(root: Path, digits, *, n_photos: int = 6, digits_per_label: int = 1, labels=(0, 1, 7),
                  photo_side: int = 120) -> list[Path]:
    """Label folders: `photo/` with downscaled real photos (non-square, PNG so decoding is
    exact), and one folder per digit label with MNIST PNGs."""
    images, y = digits
    written = []
    for src in photo_paths()[:n_photos]:
        img = Image.open(src).convert("RGB")
        img.thumbnail((photo_side, photo_side))
        path = root / "photo" / (src.stem + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        written.append(path)
    for label in labels:
        for k, i in enumerate(np.flatnonzero(y == label)[:digits_per_label]):
            path = root / str(label) / f"digit-{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
            written.append(path)
    return written


REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """The object a report data file assigns (window.X = Object.assign(..., {...}))."""
    text = path.read_text()
    return json.loads(text[text.index("}, ") + 3: text.rindex(")")])


def six_digit_reported_run(tmp_path: Path, digits):
    """Six digits (labels 0 and 1) extracted at `pool` and reported: a run to serve."""
    from featscope.pipelines.app import report
    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.stages import extract

    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(0, 1), digits_per_label=3)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, topk=0, progress=False)
    report.build(rd, k=2, progress=False)
    return rd


@contextmanager
def serving(rd) -> Iterator[str]:
    """`featscope serve` of `rd` on a free port of 127.0.0.1 while the block runs: its base URL."""
    from featscope.pipelines.app.serve import make_server

    server = make_server(rd, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def lossy_pixel_run(tmp_path: Path):
    """A run of 300 noise images (seeded) whose `pixels` index is PQ-compressed: isotropic
    vectors do not compress, so its recall@10 stays near 0.5 at any search breadth. With
    its report, so that it can be served."""
    from featscope.pipelines.app import report
    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.stages import extract
    from featscope.pipelines.stages import index as neighbours

    rng = np.random.default_rng(0)
    (tmp_path / "images" / "noise").mkdir(parents=True)
    for i in range(300):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / "noise" / f"{i:03d}.png")
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random")
    extract.extract(rd, ["pixels"], workers=0, topk=0, progress=False)
    built = neighbours.build(rd, "pixels", kind="ivfpq", max_memory=300 * 72, progress=False)
    report.build(rd, k=2, progress=False)
    return rd, built


def snakemake(workdir: Path, configfile: Path, *extra: str) -> subprocess.CompletedProcess:
    """The workflow run by `snakemake` itself (2 cores), from `workdir`."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True)


# Runs Snakemake's own entry point, then names the model libraries its process imported.
_IMPORT_PROBE = """
import runpy, sys
sys.argv = ["snakemake", *sys.argv[1:]]
try:
    runpy.run_module("snakemake", run_name="__main__", alter_sys=True)
finally:
    heavy = sorted(m for m in ("torch", "torchvision", "openTSNE", "sklearn") if m in sys.modules)
    print("IMPORTED:" + ",".join(heavy), file=sys.stderr)
"""


def snakemake_imports(workdir: Path, configfile: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`snakemake(...)`, and which of torch, torchvision, openTSNE and scikit-learn the process
    running the workflow (not its jobs) imported."""
    cmd = [sys.executable, "-c", _IMPORT_PROBE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = next(x for x in done.stderr.splitlines() if x.startswith("IMPORTED:"))
    return done, [m for m in line.removeprefix("IMPORTED:").split(",") if m]


def clustered(n: int, dims: int, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Vectors around `clusters` random centres: neighbour structure like real features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dims)) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dims))).astype(np.float32)


def as_chunks(x: np.ndarray, ids: np.ndarray, size: int = 333):
    """The `chunks()` callable index builds take: (ids, vectors) pieces of `size` rows."""
    return lambda: ((ids[i:i + size], x[i:i + size]) for i in range(0, len(x), size))



def trained_like_batchnorms(model, seed: int = 0):
    """Give `model`'s batch norms statistics and affine parameters far from a fresh network's
    (mean 0, var 1, weight 1, bias 0), in place, so that folding them is a real test."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
            m.bias.data.uniform_(-0.2, 0.2, generator=generator)
    return model
