"""`featscope units render` on a small run: one PNG per unit, a sheet, and a table whose
activation, dataset top-1, ratio and rank are recomputed here from the images and top-k."""

import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featscope.pipelines.app.cli import main as cli
from featscope.pipelines.app.status import status
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import units


@pytest.fixture(scope="module")
def run(reported_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("units") / "run"
    shutil.copytree(reported_run.root, copy)
    return RunDir(copy)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_render_writes_images_and_checks_them_against_the_dataset(run, precision):
    """In bf16 too: the model optimises in bf16, and the table measures in float32."""
    from featscope.pipelines.core.workers import model_ref, worker_model

    shared = worker_model(model_ref(run))[0].module  # the process's cached model, which explain also uses
    asked = [p.requires_grad for p in shared.parameters()]
    summary = units.render(run, units.RenderOptions(layer="layer3", units="0-2,5", size=32, steps=4, batch=3,
                                                    precision=precision), progress=False)
    assert summary.units == 4
    assert [p.requires_grad for p in shared.parameters()] == asked  # left as it was found
    table = pq.read_table(run.units_table("layer3")).to_pylist()
    assert [r["unit"] for r in table] == [0, 1, 2, 5]
    assert pq.read_schema(run.units_table("layer3")).metadata[b"precision"] == precision.encode()
    said = f"units layer3 visualisations: 4 units, rendered in {precision}"
    assert said in status(run).lines
    maxima = units.dataset_maxima(run, "layer3")
    loaded = load_model("resnet18", "random")
    prep = loaded.preprocessing
    images = torch.stack([torch.from_numpy(np.array(Image.open(run.unit_visualisation("layer3", r["unit"]))))
                          .permute(2, 0, 1).float() / 255 for r in table])
    x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=True)
    captured = []
    handle = loaded.module.layer3.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        loaded.module(prep.normalize(x * 255))  # normalize takes 0-255
    handle.remove()
    peaks = captured[0].flatten(2).amax(2)  # (4, 256)
    for b, row in enumerate(table):
        # the PNG rounds pixels to 1/255: the activation agrees to that precision
        assert row["activation"] == pytest.approx(float(peaks[b, row["unit"]]), rel=0.05, abs=0.05)
        assert row["top1"] == pytest.approx(maxima[row["unit"]])
        assert row["ratio"] == pytest.approx(row["activation"] / row["top1"], rel=1e-5)
        relative = peaks[b] / torch.tensor([maxima[u] for u in range(peaks.shape[1])])
        assert row["rank"] == int((relative > relative[row["unit"]]).sum()) + 1 or abs(
            float(relative.sort(descending=True).values[row["rank"] - 1] - relative[row["unit"]])) < 0.05
    assert Image.open(run.units_sheet("layer3")).size == (4 * 34, 34)


def test_bad_layer_and_units_are_one_line(run, capsys):
    assert cli(["units", "render", "--run", str(run.root), "--layer", "pixels"]) == 2
    assert "no units" in capsys.readouterr().err
    assert cli(["units", "render", "--run", str(run.root), "--layer", "layer3", "--units", "300", "--steps", "1"]) == 2
    assert "256 units" in capsys.readouterr().err


def test_no_command_draws_an_empty_progress_bar(run, capsys):
    """A bar over nothing ('thumbnails: 0img [00:00, ?img/s]') said only that there was no
    work: units render without variants, a report or topk render with everything drawn."""
    args = ["units", "render", "--run", str(run.root), "--layer", "layer3", "--units", "1", "--size", "16",
            "--steps", "1"]
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "units render layer3" in err and "diverse variants" not in err
    assert cli([*args, "--diversity", "1"]) == 0
    assert "diverse variants" in capsys.readouterr().err
    for again in (["report"], ["topk", "render", "--layer", "layer3", "--units", "0-1"],
                  ["index", "build", "--layer", "layer3"]):  # (the second: an update adding nothing)
        assert cli([*again, "--run", str(run.root)]) == 0
        first = capsys.readouterr().err
        assert again[0] != "index" or "index layer3: " in first  # a build's bar, where there was work
        assert cli([*again, "--run", str(run.root)]) == 0  # nothing left to draw
        err = capsys.readouterr().err
        assert not re.search(r"\b0(it|img|unit) \[|\b0/\d+ \[", err), err


def test_bf16_on_a_cpu_whose_onednn_lacks_it_renders_and_says_it_is_slow(run, capsys, monkeypatch):
    from featscope.kernels import conv_fusion

    args = ["units", "render", "--run", str(run.root), "--layer", "layer3", "--units", "1", "--size", "16",
            "--steps", "1", "--precision", "bf16", "--quiet"]
    assert cli(args) == 0
    assert ("warning" in capsys.readouterr().err) == (not conv_fusion.onednn_runs(torch.bfloat16))
    monkeypatch.setitem(conv_fusion._ONEDNN_RUNS, torch.bfloat16, False)  # as on a CPU without AVX-512
    assert cli(args) == 0
    assert "warning: bf16 runs on PyTorch's slow reference kernels on this CPU" in capsys.readouterr().err
    assert pq.read_table(run.units_table("layer3"))["unit"].to_pylist() == [1]


@pytest.mark.parametrize("flags, onednn, made", [(True, True, "bf16"), (False, True, "fp32"), (True, False, "fp32")])
def test_auto_precision_is_bf16_only_where_it_runs_fast(run, monkeypatch, flags, onednn, made):
    """The default: bf16 on a CPU with AVX512-BF16 or AMX whose oneDNN runs it, else fp32;
    the table records what it ran in, never `auto`."""
    from featscope.kernels import conv_fusion
    from featscope.pipelines.core import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: flags)
    monkeypatch.setitem(conv_fusion._ONEDNN_RUNS, torch.bfloat16, onednn)
    assert cli(["units", "render", "--run", str(run.root), "--layer", "layer3", "--units", "2", "--size", "16",
                "--steps", "1", "--quiet"]) == 0
    assert pq.read_schema(run.units_table("layer3")).metadata[b"precision"] == made.encode()


@pytest.mark.parametrize("supported, made", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_gpu_is_bf16_or_fp32_never_fp16(monkeypatch, supported, made):
    """fp16, extraction's choice on a GPU without bf16, would need loss scaling to ascend."""
    from featscope.pipelines.core.device import render_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    assert render_precision("auto", torch.device("cuda")) == made
    assert render_precision("fp32", torch.device("cuda")) == "fp32"


def test_unit_labels_match_scikit_learn_and_the_classifier(run):
    from sklearn.metrics import roc_auc_score

    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.store import RunIdentity, iter_features

    summary = units.label(run, units.LabelOptions(layer="layer3", gradient_images=0))
    table = pq.read_table(run.units_labels("layer3")).to_pylist()
    assert summary.units == len(table) == 256
    label_of = {r["image_id"]: r["label"] for r in manifest.read(run).to_pylist()}
    parts = manifest.feature_parts(run, "layer3")
    ids, values = zip(*iter_features(parts, RunIdentity.of_run(run.read_config()), column="max"))
    ids, values = np.concatenate(ids), np.concatenate(values).astype(np.float32)
    labels = np.array([label_of[int(i)] for i in ids])
    top = pq.read_table(run.topk("layer3")).to_pylist()
    for row in table[:8]:
        unit = row["unit"]
        best = max(sorted(set(labels)), key=lambda name: roc_auc_score(labels == name, values[:, unit]))
        assert row["label"] == best
        assert row["auc"] == pytest.approx(roc_auc_score(labels == best, values[:, unit]), abs=1e-6)
        shown = [r["image_id"] for r in top if r["channel"] == unit]
        assert row["purity"] == pytest.approx(np.mean([label_of[i] == best for i in shown]))
    pool = units.label(run, units.LabelOptions(layer="pool", classes=2))
    assert pool.classes_from == "classifier weights"
    loaded = load_model("resnet18", "random")
    weight = loaded.module.fc.weight.detach()
    row = pq.read_table(run.units_labels("pool")).to_pylist()[7]
    expected = weight[:, 7].topk(2).indices.tolist()
    assert row["classes"] == [str(c) for c in expected]  # random weights: classes by number
    assert row["classes_from"] == "classifier weights"


def test_deeper_units_get_classes_from_the_mean_gradient_of_each_logit(run):
    """layer3 of ResNet-18 is read by layer4, not the classifier: its units' classes come from
    d logit / d unit averaged over a seeded sample, here checked by reverse-mode autograd."""
    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.images import read_pixels

    summary = units.label(run, units.LabelOptions(layer="layer3", classes=3, gradient_images=2, seed=4))
    assert summary.classes_from == "mean gradient over 2 images"
    rows = pq.read_table(run.units_labels("layer3")).to_pylist()
    live = manifest.read(run).to_pylist()
    chosen = sorted(np.random.default_rng(4).choice(len(live), size=2, replace=False).tolist())
    loaded = load_model("resnet18", "random")
    prep = loaded.preprocessing
    x = prep.normalize(torch.stack([prep.to_uint8(read_pixels(live[i]["path"], min_size=prep.resize))
                                    for i in chosen]))
    seen = {}

    def keep(_m, _i, out):
        seen["a"] = out.detach().requires_grad_()
        return seen["a"]

    handle = loaded.module.layer3.register_forward_hook(keep)
    logits = loaded.module.eval()(x)
    handle.remove()
    for unit in (0, 9):  # the listed classes' gradients (all 1,000 would take 1,000 backward passes)
        listed = [int(c) for c in rows[unit]["classes"]]
        gradient = [float(torch.autograd.grad(logits[:, c].sum(), seen["a"], retain_graph=True)[0][:, unit].sum()) / 2
                    for c in listed]
        np.testing.assert_allclose(rows[unit]["class_weights"], gradient, rtol=1e-3, atol=1e-4)
        assert gradient == sorted(gradient, reverse=True) and rows[unit]["classes_from"] == "mean gradient over 2 images"


def test_unit_tables_go_stale_when_the_dataset_changes(run):
    import os

    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.trust import current_unit_table

    units.label(run, units.LabelOptions(layer="layer3", classes=0))  # no classes: no model pass
    assert len(current_unit_table(run, run.units_labels("layer3"), "layer3")) == 256
    assert "units layer3 labels: 256 units" in status(run).lines
    stat = run.topk("layer3").stat()
    os.utime(run.topk("layer3"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a rerun's merge rewrote it
    try:
        assert current_unit_table(run, run.units_labels("layer3"), "layer3") is None
        found = status(run)
        assert "units layer3 labels: stale: made from the dataset as it was before" in found.lines
        assert "units layer3 labels" in found.stale
    finally:
        os.utime(run.topk("layer3"), ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_unit_labels_go_stale_when_the_source_relabels_an_image(run):
    import os

    from featscope.pipelines.app.status import status
    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.trust import current_unit_table

    units.label(run, units.LabelOptions(layer="layer3", classes=0))
    units.render(run, units.RenderOptions(layer="layer3", units="0", size=16, steps=1), progress=False)
    before, stat = run.live_labels.read_bytes(), run.live_labels.stat()
    rows = manifest.read(run).to_pylist()
    manifest.write_live_labels(run, [(r["image_id"], "photo" if n == 0 else r["label"]) for n, r in enumerate(rows)])
    try:
        assert current_unit_table(run, run.units_labels("layer3"), "layer3") is None
        assert current_unit_table(run, run.units_table("layer3"), "layer3") is not None  # names no label
        found = status(run)
        assert "units layer3 labels" in found.stale and "units layer3 visualisations" not in found.stale
        assert "report" in found.stale
    finally:
        run.live_labels.write_bytes(before)
        os.utime(run.live_labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(current_unit_table(run, run.units_labels("layer3"), "layer3")) == 256


def test_unit_labels_go_stale_when_a_feature_part_is_written_again(run):
    """units label reads the stored features: a shard extracted again (the same images, other
    values) left its AUCs as they were, and status and the report called them current."""
    import os

    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.trust import current_unit_table

    units.label(run, units.LabelOptions(layer="layer3", classes=0))
    units.render(run, units.RenderOptions(layer="layer3", units="0", size=16, steps=1), progress=False)
    part = run.feature_parts("layer3")[0]
    stat = part.stat()
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # written again
    try:
        assert current_unit_table(run, run.units_labels("layer3"), "layer3") is None
        assert current_unit_table(run, run.units_table("layer3"), "layer3") is not None  # reads no features
        assert "units layer3 labels" in status(run).stale
        units.label(run, units.LabelOptions(layer="layer3", classes=0))
        assert len(current_unit_table(run, run.units_labels("layer3"), "layer3")) == 256
    finally:
        os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_diverse_variants_differ_more_than_without_the_diversity_term(run):
    """Lucid's diversity objective pushes a unit's images apart: their Gram matrices at the
    layer are less alike than the same seeds optimised without it."""
    from featscope.pipelines.core.workers import model_ref, visualisation_model, worker_model

    summary = units.render(run, units.RenderOptions(layer="layer3", units="4", size=32, steps=12, diversity=3),
                           progress=False)
    assert summary.units == 1 and [p.name for p in run.unit_variants("layer3", 4)] == [
        "unit-0004-v1.png", "unit-0004-v2.png", "unit-0004-v3.png"]
    loaded = worker_model(model_ref(run))[0]
    model = visualisation_model(loaded, [loaded.layer("layer3")])
    module = model.model.layer3

    def gram_similarity(images):
        x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=True)
        with torch.no_grad():
            a = units.layer_outputs(model, x, [module])[0].flatten(2)
        gram = F.normalize((a @ a.transpose(1, 2)).flatten(1), dim=1)
        similarity = gram @ gram.T
        return float((similarity.sum() - similarity.diagonal().sum()) / (len(a) * (len(a) - 1)))

    options = units.RenderOptions(layer="layer3", units="4", size=32, steps=12, diversity=3)
    diverse = units.diverse_variants(model, module, 4, options, 224)
    plain = units.diverse_variants(model, module, 4, units.RenderOptions(
        layer="layer3", units="4", size=32, steps=12, diversity=3, diversity_weight=0), 224)
    assert gram_similarity(diverse) < gram_similarity(plain)
    units.render(run, units.RenderOptions(layer="layer3", units="4", size=32, steps=2, diversity=1), progress=False)
    assert len(run.unit_variants("layer3", 4)) == 1  # the render with fewer variants removed the others


_PAGE_FAULTS = """
import resource, torch
from featscope.kernels.layers import LayerSpec
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.workers import visualisation_model

def faults_of_a_fresh_block() -> int:
    torch.empty(16 << 20).fill_(1.0)  # 64 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults_of_a_fresh_block()
visualisation_model(load_model("resnet18", "random"), [LayerSpec("layer3", "layer3", "conv")])
print(plain, faults_of_a_fresh_block())
"""


def test_a_visualisation_model_makes_freed_activations_reusable_without_page_faults():
    """Every optimisation step allocates the same activations again; glibc used to unmap each
    large block when it was freed, so the next step faulted its pages in anew (a tenth of a
    bf16 MobileNet-V2 step). The benchmark's process, which makes its models alone, did."""
    import subprocess
    import sys

    pages = (64 << 20) // 4096
    out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS], check=True, capture_output=True, text=True).stdout
    plain, prepared = (int(v) for v in out.split())
    assert plain > pages // 2 and prepared < pages // 20, (plain, prepared)
