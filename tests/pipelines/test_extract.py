"""Extraction equals a plain torchvision forward pass with hooks; shards resume; datasets grow."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from helpers import write_dataset
from PIL import Image
from torchvision.transforms import v2 as T2

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines import load_features
from featscope.pipelines.core import device as device_mod
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import column_array, read_errors, read_predictions
from featscope.pipelines.stages import extract


def calibrated_checkpoint(arch: str, path) -> str:
    """Random weights whose BatchNorm statistics match their activations, as trained ones do.

    (Freshly initialised MobileNet-V2 in eval mode shrinks activations to ~1e-9, below
    float16's range, which would make the comparison meaningless.)
    """
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224))
    torch.save(model.state_dict(), path)
    return str(path)


def reference_outputs(arch: str, checkpoint: str, paths: list[str], module_paths: list[str]) -> dict:
    """torchvision's own recipe on tensor images (its v2 transforms), hooks, fp32; the
    model's output under the key "output"."""
    model = torchvision.models.get_model(arch, weights=None)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    tf = T2.Compose([T2.PILToTensor(), T2.Resize(256, antialias=True), T2.CenterCrop(224),
                     T2.ToDtype(torch.float32, scale=True), T2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    modules = dict(model.named_modules())
    seen = {}
    handles = [modules[m].register_forward_hook(lambda _m, _i, out, m=m: seen.setdefault(m, out.clone()))
               for m in module_paths]
    with torch.no_grad():
        seen["output"] = model(x)
    for h in handles:
        h.remove()
    return seen


def read_layer(rd: RunDir, layer: str):
    table = pq.read_table(rd.features_dir(layer))
    order = np.argsort(table["image_id"].to_numpy())
    cols = {name: column_array(table, name)[order] for name in table.column_names if name != "image_id"}
    return table["image_id"].to_numpy()[order], cols


def close_f16(ours: np.ndarray, ref: np.ndarray):
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * scale)


@pytest.mark.parametrize(
    "arch, vector_layer, vector_module, conv_layer, conv_module",
    [
        ("alexnet", "fc7", "classifier.5", "conv5", "features.11"),
        ("resnet18", "pool", "avgpool", "layer3", "layer3"),
        ("mobilenet_v2", "pool", "classifier.0", "block13", "features.13"),
    ],
)
def test_features_equal_a_direct_torchvision_forward(tmp_path, small_dataset, arch, vector_layer, vector_module,
                                                     conv_layer, conv_module):
    rd = RunDir(tmp_path / "run")
    checkpoint = calibrated_checkpoint(arch, tmp_path / f"{arch}.pth")
    manifest.run(rd, small_dataset, shard_size=4)
    pooled_layer = f"{conv_layer}@2x3"
    summary = extract.extract(rd, [vector_layer, conv_layer, pooled_layer], model=arch, weights=checkpoint,
                          device="cpu", precision="fp32", batch_size=3, workers=0, progress=False)
    assert summary.done == [0, 1, 2] and summary.images == 9 and summary.bad == 0

    rows = manifest.read(rd).sort_by("image_id")
    ref = reference_outputs(arch, checkpoint, rows["path"].to_pylist(), [vector_module, conv_module])
    ids, vec = read_layer(rd, vector_layer)
    assert ids.tolist() == rows["image_id"].to_pylist()
    ref_vec = ref[vector_module].flatten(1).numpy()
    assert ref_vec.std() > 0  # the comparison means something
    close_f16(vec["feature"], ref_vec)

    _, conv = read_layer(rd, conv_layer)
    maps = ref[conv_module].numpy()  # (N, C, H, W)
    close_f16(conv["feature"], maps.mean(axis=(2, 3)))
    close_f16(conv["max"], maps.max(axis=(2, 3)))
    n, c = conv["argmax_y"].shape
    at_cell = maps[np.arange(n)[:, None], np.arange(c)[None, :], conv["argmax_y"], conv["argmax_x"]]
    np.testing.assert_allclose(at_cell, maps.max(axis=(2, 3)), rtol=1e-5, atol=1e-6)  # the cell holds the max
    h, w = maps.shape[2:]
    assert conv["argmax_y"].max() < h and conv["argmax_x"].max() < w

    _, pooled = read_layer(rd, pooled_layer)
    close_f16(pooled["feature"], grid_means(maps, 2, 3).reshape(n, -1))
    assert set(pooled) == {"feature"}  # a pooled grid is stored as a vector

    # the model's top-5 classes come free with the taps, and match its own softmax
    predictions = read_predictions(rd)
    assert sorted(predictions) == rows["image_id"].to_pylist()
    probabilities, classes = ref["output"].softmax(1).topk(5, dim=1)
    for row, image_id in enumerate(rows["image_id"].to_pylist()):
        ours = np.array(predictions[image_id])
        assert ours[0, 0] == classes[row, 0]
        np.testing.assert_allclose(ours[:, 1], probabilities[row].numpy(), atol=2e-4)


def grid_means(maps: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(N,C,H,W) -> (N,C,rows,cols): the mean of each cell of a rows x cols grid whose cell
    i spans [floor(i*H/rows), ceil((i+1)*H/rows)), the bins of adaptive average pooling."""
    h, w = maps.shape[2:]
    out = np.empty(maps.shape[:2] + (rows, cols), dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            y0, y1 = (i * h) // rows, -((-(i + 1) * h) // rows)
            x0, x1 = (j * w) // cols, -((-(j + 1) * w) // cols)
            out[:, :, i, j] = maps[:, :, y0:y1, x0:x1].mean(axis=(2, 3))
    return out


def test_bf16_features_stay_close_to_fp32(tmp_path, small_dataset):
    runs = {}
    for precision in ("fp32", "bf16"):
        rd = RunDir(tmp_path / precision)
        manifest.run(rd, small_dataset)
        extract.extract(rd, ["pool"], model="resnet18", weights="random", device="cpu", precision=precision,
                     workers=0, progress=False)
        runs[precision] = read_layer(rd, "pool")[1]["feature"].astype(np.float32)
    a, b = runs["fp32"], runs["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_auto_precision_picks_bf16_only_where_the_cpu_has_it():
    expected = "bf16" if device_mod.cpu_has_fast_bf16() else "fp32"
    assert device_mod.resolve_precision("auto", torch.device("cpu")) == expected
    assert device_mod.resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_keeps_its_first_precision_and_new_images_are_embedded_in_it(tmp_path, digits, precision):
    """Whatever this CPU's `auto` is, the run's later shards and a new image embedded by
    `query --image` or the service are made as its first shard was."""
    from featscope.pipelines.core.features import ImageEmbedder
    from featscope.pipelines.core.store import file_metadata

    write_dataset(tmp_path / "images", digits, n_photos=2, labels=(0,), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    kwargs = dict(device="cpu", workers=0, progress=False)
    extract.extract(rd, ["pool"], model="resnet18", weights="random", precision=precision, shard=0, **kwargs)
    assert rd.read_config()["precision"] == precision
    other = "bf16" if precision == "fp32" else "fp32"
    with pytest.raises(FeatscopeError, match=f"precision {other}: run .* holds {precision} features, and {other} ones would differ"):
        extract.extract(rd, ["pool"], precision=other, **kwargs)
    extract.extract(rd, ["pool"], **kwargs)  # auto: the run's
    assert {file_metadata(p)["precision"] for p in rd.feature_parts("pool")} == {precision}

    stored = load_features(rd, "pool")
    vectors = dict(zip(stored.image_ids.tolist(), stored.vectors.astype(np.float32)))
    embedder = ImageEmbedder(rd.read_config(), ["pool"], device="cpu")
    for row in manifest.read(rd).to_pylist():
        again, kept = embedder.embed(row["path"], "pool"), vectors[row["image_id"]]
        assert np.linalg.norm(again - kept) <= 2e-3 * np.linalg.norm(kept)  # float16 storage apart, the same


def test_jobs_side_by_side_on_a_fresh_run_extract_in_one_precision(tmp_path, digits, monkeypatch):
    """Two extract jobs of a fresh run, on two kinds of node, that both look for the run's
    precision before either has recorded one: the second waits for the first's record and
    is refused, instead of recording its own over it and mixing precisions in the run."""
    import threading

    from featscope.pipelines.core.store import file_metadata

    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(0, 1), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    both_looked = threading.Barrier(2, timeout=3)
    resolve = extract.resolve_precision

    def looked_then_resolve(precision, device):
        try:
            both_looked.wait()  # under the run.json lock the other job never gets here meanwhile
        except threading.BrokenBarrierError:
            pass
        return resolve(precision, device)

    monkeypatch.setattr(extract, "resolve_precision", looked_then_resolve)
    one_at_a_time, load = threading.Lock(), extract.load_model

    def load_alone(*args, **kwargs):  # jobs are processes: here, seeded random weights must not interleave
        with one_at_a_time:
            return load(*args, **kwargs)

    monkeypatch.setattr(extract, "load_model", load_alone)
    refused = []

    def job(shard: int, precision: str) -> None:
        try:
            extract.extract(rd, ["pool"], model="resnet18", weights="random", device="cpu", workers=0,
                            progress=False, precision=precision, shard=shard)
        except FeatscopeError as e:
            refused.append(str(e))

    jobs = [threading.Thread(target=job, args=(0, "fp32")), threading.Thread(target=job, args=(1, "bf16"))]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join()
    recorded = rd.read_config()["precision"]
    assert len(refused) == 1 and f"holds {recorded} features" in refused[0], refused
    assert {file_metadata(p)["precision"] for p in rd.feature_parts("pool")} == {recorded}
    assert rd.read_config()["weights_sha256"]  # the model's record, written beside it, kept


def test_status_names_shards_of_another_precision(tmp_path, digits):
    """A run whose shards hold two precisions (extracted before run.json recorded one, under
    a lock, or with run.json edited by hand): status names the shards."""
    from featscope.pipelines.app.status import status

    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(0, 1), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    kwargs = dict(model="resnet18", weights="random", device="cpu", workers=0, progress=False)
    extract.extract(rd, ["pool"], precision="fp32", shard=0, **kwargs)
    rd.write_config({k: v for k, v in rd.read_config().items() if k != "precision"})  # edited by hand
    extract.extract(rd, ["pool"], precision="bf16", shard=1, **kwargs)
    found = status(rd)
    assert "features pool precision" in found.stale
    assert "  shards 0 hold features of another precision than the run's bf16" in found.line()


def vectors_by_id(rd: RunDir) -> dict[int, np.ndarray]:
    found = load_features(rd, "pool")
    return dict(zip(found.image_ids.tolist(), found.vectors))


def test_parts_made_for_other_images_are_refused_then_extracted_again(tmp_path, digits):
    """A manifest overwritten by an update from another listing hands ids out anew: a part
    extracted before holds other images under those ids."""
    from featscope.pipelines.core.store import write_table

    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(0, 1), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2)
    kwargs = dict(model="resnet18", weights="random", device="cpu", precision="fp32", workers=0, progress=False)
    extract.extract(rd, ["pool"], **kwargs)
    before = vectors_by_id(rd)
    table = pq.read_table(rd.manifest)
    swapped = [1, 0, *range(2, table.num_rows)]  # ids 0 and 1 now name each other's file
    table = table.set_column(1, "path", table["path"].take(swapped)).set_column(
        table.schema.get_field_index("sha256"), "sha256", table["sha256"].take(swapped))
    write_table(table, rd.manifest)
    with pytest.raises(FeatscopeError, match=r"features of 1 shard \(0\) were extracted for other images"):
        load_features(rd, "pool")
    summary = extract.extract(rd, ["pool"], **kwargs)
    assert summary.made_for_other_images == [0] and summary.done == [0] and summary.already_done == [1]
    after = vectors_by_id(rd)
    np.testing.assert_array_equal(after[0], before[1])
    np.testing.assert_array_equal(after[1], before[0])
    np.testing.assert_array_equal(after[2], before[2])


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_after_an_interrupted_run_redoes_only_missing_shards(tmp_path, small_dataset):
    kwargs = dict(model="resnet18", weights="random", device="cpu", precision="fp32", workers=0, progress=False)
    whole = RunDir(tmp_path / "whole")
    manifest.run(whole, small_dataset, shard_size=3)
    extract.extract(whole, ["pool", "layer2"], **kwargs)

    rd = RunDir(tmp_path / "interrupted")
    manifest.run(rd, small_dataset, shard_size=3)
    extract.extract(rd, ["pool", "layer2"], shard=0, **kwargs)
    # A job killed while writing shard 1 leaves only a .tmp file (named for its process) behind.
    half = rd.feature_part("pool", 1).with_name(".part-00001.parquet.99999.dead.tmp")
    half.write_bytes(b"PAR1 half a file")
    done_before = digest(rd.feature_part("pool", 0))

    summary = extract.extract(rd, ["pool", "layer2"], **kwargs)
    assert summary.already_done == [0] and summary.done == [1, 2]
    assert digest(rd.feature_part("pool", 0)) == done_before
    assert half not in rd.feature_parts("pool")  # never taken for a part
    for layer in ("pool", "layer2"):
        a, b = read_layer(whole, layer), read_layer(rd, layer)
        assert a[0].tolist() == b[0].tolist()
        for col in a[1]:
            np.testing.assert_array_equal(a[1][col], b[1][col])


def test_a_crash_inside_a_shard_leaves_no_finished_looking_file(tmp_path, small_dataset, monkeypatch):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=100)
    calls = {"n": 0}
    original = extract.FeatureExtractor.forward_with_predictions

    def flaky(self, pixels, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the probe, the first batch, then the crash
            raise KeyboardInterrupt
        return original(self, pixels, **kwargs)

    monkeypatch.setattr(extract.FeatureExtractor, "forward_with_predictions", flaky)
    with pytest.raises(KeyboardInterrupt):
        extract.extract(rd, ["pool"], model="resnet18", weights="random", batch_size=4, workers=0, progress=False)
    assert not list(rd.features_dir("pool").glob("*"))


@pytest.mark.parametrize("stop, code, said", [("SIGTERM", 143, "stopped by SIGTERM"),
                                               ("SIGINT", 130, "interrupted (Ctrl-C)")])
def test_a_stop_mid_shard_removes_the_temporary_files_and_says_so_in_one_line(tmp_path, digits, stop, code, said):
    """A cluster's scancel or requeue sends SIGTERM: the process used to vanish mid-write and
    leave its temporary feature parts behind (hundreds of MB each at scale, one more set each
    requeue); Ctrl-C printed a traceback. Now every temporary file goes, exit 128 + the
    signal, one line; the rerun finishes."""
    import signal
    import time

    write_dataset(tmp_path / "images", digits, n_photos=0, labels=tuple(range(10)), digits_per_label=40)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=1000, model="resnet18", weights="random")
    job = subprocess.Popen([sys.executable, "-m", "featscope.pipelines.app.cli", "extract", "--run", str(rd.root),
                            "--layers", "pool,layer3", "--workers", "0", "--batch-size", "8", "--quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           # a job started in the background inherits SIGINT ignored, as a shell leaves it
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(rd.root.rglob("*.tmp")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # until the shard's parts are being written (a window of a few seconds)
    assert list(rd.root.rglob("*.tmp")), f"no temporary part before the job ended ({job.poll()}): {job.communicate()}"
    time.sleep(0.5)
    job.send_signal(getattr(signal, stop))
    assert job.wait(timeout=120) == code
    err = job.stderr.read()
    assert err.count("\n") == 1 and err.startswith(f"featscope: extract {said}: "), err
    assert list(rd.root.rglob("*.tmp")) == [] and not rd.feature_part("pool", 0).exists()
    summary = extract.extract(rd, ["pool", "layer3"], workers=0, progress=False)
    assert summary.done == [0] and pq.read_table(rd.feature_part("pool", 0)).num_rows == 400


def test_growth_extracts_only_new_images_and_leaves_old_files_alone(tmp_path, digits):
    root = tmp_path / "images"
    write_dataset(root, digits, n_photos=3, labels=(0, 1))
    rd = RunDir(tmp_path / "run")
    kwargs = dict(model="resnet18", weights="random", device="cpu", workers=0, progress=False)
    manifest.run(rd, root, shard_size=2)
    extract.extract(rd, ["pool"], **kwargs)
    old = {p.name: (digest(p), p.stat().st_mtime_ns) for p in rd.feature_parts("pool")}
    old_ids = read_layer(rd, "pool")[0].tolist()

    write_dataset(root, digits, n_photos=0, labels=(4, 5), digits_per_label=2)
    grown = manifest.run(rd, root)
    summary = extract.extract(rd, ["pool"], **kwargs)
    assert summary.done == grown.new_shards == [3, 4] and summary.images == 4
    for p in rd.feature_parts("pool"):
        if p.name in old:
            assert (digest(p), p.stat().st_mtime_ns) == old[p.name]
    ids = read_layer(rd, "pool")[0].tolist()
    assert ids[: len(old_ids)] == old_ids and ids[len(old_ids):] == [5, 6, 7, 8]


def make_bad_inputs(root, digits):
    """One file per bad-input case of the issue, plus odd modes that must be converted."""
    write_dataset(root, digits, n_photos=2, labels=(3,))
    d = root / "odd"
    d.mkdir()
    rgb = Image.open(next((root / "photo").iterdir())).convert("RGB")
    buf = rgb.resize((300, 200))
    buf.save(d / "good.jpg")
    (d / "truncated.jpg").write_bytes((d / "good.jpg").read_bytes()[:700])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("hello, I am not a picture")
    rgb.convert("L").save(d / "gray.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)).save(d / "deep16.png")
    rgb.convert("RGBA").save(d / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    side = int(Image.MAX_IMAGE_PIXELS**0.5) + 100
    Image.new("1", (side, side)).save(d / "bomb.png")
    return {"truncated.jpg", "empty.jpg", "text.jpg", "bomb.png"}


@pytest.mark.slow
def test_bad_images_are_recorded_and_every_readable_image_is_extracted(tmp_path, digits):
    root = tmp_path / "images"
    bad = make_bad_inputs(root, digits)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, root, shard_size=5)
    summary = extract.extract(rd, ["pool"], model="resnet18", weights="random", workers=1, progress=False)
    errors = read_errors(rd.errors_dir).to_pylist()
    assert sorted(e["path"].rsplit("/", 1)[1] for e in errors) == sorted(bad)
    reasons = {e["path"].rsplit("/", 1)[1]: e["message"] for e in errors}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert "too large" in reasons["bomb.png"] and "decode" in reasons["truncated.jpg"]
    assert all(e["stage"] == "extract" for e in errors)
    rows = manifest.read(rd).to_pylist()
    good_ids = {r["image_id"] for r in rows if r["path"].rsplit("/", 1)[1] not in bad}
    assert set(read_layer(rd, "pool")[0].tolist()) == good_ids
    assert summary.bad == len(bad) and summary.images == len(good_ids)


def test_an_image_unreadable_at_extraction_is_extracted_by_the_next_update(tmp_path, digits):
    """A listed file that cannot be read while its shard is extracted (gone for a while, an
    I/O error) is recorded as unreadable, not as a bad image. It used to stay without
    features for good: the file came back with the same bytes and kept its id, its shard
    counted as done, and status asked for a rerun that changed nothing."""
    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(0, 1), digits_per_label=2)
    broken = tmp_path / "images" / "1" / "broken.png"
    broken.write_text("not a picture")
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=3)
    away = sorted((tmp_path / "images" / "0").iterdir())[0]
    kept = away.read_bytes()
    away.unlink()  # gone while its shard is extracted
    kwargs = dict(model="resnet18", weights="random", device="cpu", precision="fp32", workers=0, progress=False)
    first = extract.extract(rd, ["pool"], **kwargs)
    assert (first.bad, first.unreadable) == (2, 1)
    assert "2 images skipped (1 not decodable, 1 not readable now" in first.line(rd)
    kinds = {e["path"].rsplit("/", 1)[1]: e["error"] for e in read_errors(rd.errors_dir).to_pylist()}
    assert kinds == {away.name: "unreadable", "broken.png": "bad_image"}
    away.write_bytes(kept)  # back, the same bytes: the same image, the same id
    from featscope.pipelines.app.status import status

    said = status(rd)
    assert "features of unreadable images" in said.stale
    assert any("1 live image could not be read when extracted" in line for line in said.lines)
    summary = manifest.run(rd, tmp_path / "images")
    assert summary.invalidated_shards == [0] and summary.unreadable == 1 and summary.reread == 1
    assert "1 image unreadable when last extracted" in summary.line()
    assert extract.extract(rd, ["pool"], **kwargs).done == [0]
    live = {r["image_id"] for r in manifest.read(rd).to_pylist() if not r["path"].endswith("broken.png")}
    assert set(vectors_by_id(rd)) == live  # every readable image, the one that was away too
    assert [e["error"] for e in read_errors(rd.errors_dir).to_pylist()] == ["bad_image"]
    assert manifest.run(rd, tmp_path / "images").invalidated_shards == []  # a bad image is not retried
    assert "features of unreadable images" not in status(rd).stale


def _loud_run(tmp_path: Path, digits) -> tuple[RunDir, list[dict], set[int]]:
    """A run of 15 images and a ResNet-18 checkpoint whose logits are scaled so that those of
    some images (returned), and only theirs, pass 65,504 with a margin. The images are found
    independently: a fp32 forward pass of the unscaled checkpoint."""
    write_dataset(tmp_path / "images", digits, n_photos=6, labels=(0, 1, 7), digits_per_label=3)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=100)
    rows = manifest.read(rd).to_pylist()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    peak = np.abs(reference_outputs("resnet18", str(plain), [r["path"] for r in rows], [])["output"].numpy()).max(1)
    low, high = max(((a, b) for a, b in zip(np.sort(peak), np.sort(peak)[1:])), key=lambda ab: ab[1] / ab[0])
    assert high / low > 1.3  # a clear margin between the images that pass 65,504 and those that do not
    scale = 65504 / np.sqrt(low * high)
    state = model.state_dict()
    state["fc.weight"] *= scale
    state["fc.bias"] *= scale
    torch.save(state, tmp_path / "loud.pt")
    return rd, rows, {r["image_id"] for r, p in zip(rows, peak) if p >= high}


def _left_out_of_every_layer(rd: RunDir, good: set[int], expected: set[int]) -> None:
    """`_loud_run`'s images whose fc values cannot be stored (`expected`) are in no layer,
    not only in fc, and in no top-k; the others' values are stored as computed (below
    65,504). Each sketch counts what it could store: pool every image, fc the good ones."""
    from featscope.pipelines.core.store import read_sketch

    for layer in ("pool", "fc"):
        ids, cols = read_layer(rd, layer)
        assert set(ids.tolist()) == good and np.abs(cols["feature"].astype(np.float32)).max() < 65504
        assert not set(pq.read_table(rd.topk_candidates_part(layer, 0))["image_id"].to_pylist()) & expected
    counted = {layer: set(json.loads(read_sketch(rd.topk_sketch_part(layer, 0))[1]["image_ids"]))
               for layer in ("pool", "fc")}
    assert counted == {"pool": good | expected, "fc": good}


def test_images_whose_features_overflow_are_errors_in_no_layer_index_or_sketch(tmp_path, digits):
    """fp16 overflows past 65,504 (a GPU without bf16 picks it): the overflowing image's
    values are inf, or NaN after them. They used to be stored as if measured (an inf clamped
    to 65,504, a NaN as NaN), ranked by the index and counted by the unit's sketch."""
    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.neighbours import open_index
    from featscope.pipelines.core.store import read_sketch
    from featscope.pipelines.stages import index as index_stage

    rd, rows, expected = _loud_run(tmp_path, digits)
    summary = extract.extract(rd, ["pool", "fc"], model="resnet18", weights=str(tmp_path / "loud.pt"),
                              device="cpu", precision="fp16", topk=2, workers=0, progress=False)
    errors = read_errors(rd.errors_dir).to_pylist()
    assert {e["image_id"] for e in errors} == expected and 0 < len(expected) < len(rows)
    assert {e["error"] for e in errors} == {"non_finite"} and summary.non_finite == len(expected)
    assert all("NaN or inf in its fc features (fp16)" in e["message"] for e in errors)
    assert f"{len(expected)} with features that are not finite numbers (NaN or inf): fp16 overflows" in summary.line(rd)
    good = {r["image_id"] for r in rows} - expected
    _left_out_of_every_layer(rd, good, expected)
    assert set(read_predictions(rd)) == good
    assert np.isfinite(read_sketch(rd.topk_sketch_part("fc", 0))[0].scale.numpy()).all()
    index_stage.build(rd, "fc", progress=False)
    assert set(open_index(rd, "fc").ids.tolist()) == good
    line = next(x for x in status(rd).lines if "left out of every layer" in x)
    assert f"{len(expected)} live images left out of every layer: the model computed NaN or inf for them in fp16" in line
    # the output alone overflows when no tapped layer does: the features stand, the prediction goes
    other = RunDir(tmp_path / "pool-only")
    manifest.run(other, tmp_path / "images", shard_size=100)
    done = extract.extract(other, ["pool"], model="resnet18", weights=str(tmp_path / "loud.pt"), device="cpu",
                           precision="fp16", workers=0, progress=False)
    assert done.bad == 0 and set(read_layer(other, "pool")[0].tolist()) == good | expected
    assert set(read_predictions(other)) == good


def test_finite_features_past_float16s_range_are_errors_not_stored_clamped(tmp_path, digits):
    """The store keeps float16: a finite value past 65,504 (fp32 or bf16 computes them; a
    model of one's own with unnormalised activations) used to be stored as 65,504, a value
    the model never computed, ranked by the index and counted by the unit's sketch. Such an
    image is now an error row named with its largest value, in no layer, top-k or sketch."""
    from featscope.pipelines.app.status import status

    rd, rows, expected = _loud_run(tmp_path, digits)
    summary = extract.extract(rd, ["pool", "fc"], model="resnet18", weights=str(tmp_path / "loud.pt"),
                              device="cpu", precision="fp32", topk=2, workers=0, progress=False)
    errors = read_errors(rd.errors_dir).to_pylist()
    assert {e["image_id"] for e in errors} == expected and 0 < len(expected) < len(rows)
    assert {e["error"] for e in errors} == {"out_of_range"} and summary.out_of_range == len(expected)
    assert summary.non_finite == 0
    for e in errors:
        largest = float(re.search(r"its fc features reach ([\d,]+), past the 65,504", e["message"])[1].replace(",", ""))
        assert largest > 65504
    assert f"{len(expected)} with features past 65,504, which the store's float16 cannot hold" in summary.line(rd)
    _left_out_of_every_layer(rd, {r["image_id"] for r in rows} - expected, expected)
    line = next(x for x in status(rd).lines if "left out of every layer" in x)
    assert f"{len(expected)} live images left out of every layer: the model computed values past 65,504" in line


def test_features_with_nan_written_by_an_older_featscope_are_refused_and_named(tmp_path, small_dataset):
    """Parts written before extract checked its values may hold NaN rows: every reader (the
    index, maps, top-k) refuses them by name, and `verify` names the part and its fix."""
    from featscope.pipelines.app.verify import verify

    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=100, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    part = rd.feature_part("pool", 0)
    table = pq.read_table(part)
    values = column_array(table, "feature").copy()
    values[2, 5] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), values.shape[1])
    pq.write_table(table.set_column(1, "feature", column), part)  # its metadata kept: the run's own file
    victim = int(table["image_id"][2])
    with pytest.raises(FeatscopeError, match=rf"part-00000.parquet holds 1 image whose feature values are NaN or inf "
                                             rf"\(first: image {victim}\): delete it and run `featscope extract`"):
        load_features(rd, "pool")
    found = verify(rd)
    assert [(p.name, why) for p, why, _ in found.damaged] == [
        ("part-00000.parquet", f"the feature values of 1 image are NaN or inf (first: image {victim})")]
    assert "featscope extract --run" in found.damaged[0][2]
    # top-k candidates of such an image: merged first, as if they were the unit's strongest
    from featscope.pipelines.stages import topk

    extract.extract(rd, ["layer4"], topk=2, workers=0, progress=False)
    candidates = rd.topk_candidates_part("layer4", 0)
    table = pq.read_table(candidates)
    values = table["value"].to_numpy().copy()
    values[0] = np.nan
    pq.write_table(table.set_column(2, "value", pa.array(values, pa.float32())), candidates)
    with pytest.raises(FeatscopeError, match=r"part-00000.parquet holds top-k values that are NaN or inf: delete it"):
        topk.merge(rd, "layer4")
    assert ("part-00000.parquet", "NaN or inf in 1 top-k value") in [(p.name, why) for p, why, _ in verify(rd).damaged]


def test_a_run_refuses_other_weights_and_foreign_feature_files(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["pool"], model="resnet18", weights="random", workers=0, progress=False)
    with pytest.raises(FeatscopeError, match="uses model 'resnet18', not 'alexnet'"):
        extract.extract(rd, ["pool"], model="alexnet", workers=0, progress=False)
    with pytest.raises(FeatscopeError, match="weights 'random' changed"):
        extract.extract(rd, ["pool"], seed=1, workers=0, progress=False)
    other = RunDir(tmp_path / "other")
    manifest.run(other, small_dataset)
    extract.extract(other, ["pool"], model="resnet18", weights="random", seed=2, workers=0, progress=False)
    rd.feature_part("pool", 0).unlink()
    rd.feature_part("pool", 0).write_bytes(other.feature_part("pool", 0).read_bytes())
    with pytest.raises(FeatscopeError, match="written for weights_sha256="):
        extract.extract(rd, ["pool"], workers=0, progress=False)


def test_unknown_layer_and_shard_are_one_line_errors(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    with pytest.raises(FeatscopeError, match="unknown layer 'fc7' for resnet18"):
        extract.extract(rd, ["fc7"], model="resnet18", weights="random", progress=False)
    with pytest.raises(FeatscopeError, match="shard 7 is not in the manifest"):
        extract.extract(rd, ["pool"], model="resnet18", weights="random", shard=7, progress=False)


def test_adding_a_layer_later_extracts_only_that_layer(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=5)
    kwargs = dict(model="resnet18", weights="random", workers=0, progress=False)
    extract.extract(rd, ["pool"], **kwargs)
    before = {p.name: p.stat().st_mtime_ns for p in rd.feature_parts("pool")}
    summary = extract.extract(rd, ["pool", "layer2"], **kwargs)
    assert summary.done == [0, 1] and summary.already_done == []
    assert {p.name: p.stat().st_mtime_ns for p in rd.feature_parts("pool")} == before
    assert len(rd.feature_parts("layer2")) == 2
    assert extract.extract(rd, ["pool", "layer2"], **kwargs).already_done == [0, 1]


def test_two_processes_extracting_the_same_shard_leave_a_whole_part(tmp_path, small_dataset):
    """A requeued cluster job whose first copy still runs: both write their own temporary
    files, and the part that ends up in place reads back equal to a clean run's."""
    clean = RunDir(tmp_path / "clean")
    manifest.run(clean, small_dataset, shard_size=100, model="resnet18", weights="random")
    extract.extract(clean, ["pool", "pixels"], precision="fp32", workers=0, progress=False)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=100, model="resnet18", weights="random")
    command = [sys.executable, "-m", "featscope.pipelines.app.cli", "extract", "--run", str(rd.root), "--layers",
               "pool,pixels", "--shard", "0", "--precision", "fp32", "--workers", "0", "--batch-size", "2", "--quiet"]
    jobs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    for layer in ("pool", "pixels"):
        a, b = read_layer(clean, layer), read_layer(rd, layer)
        assert a[0].tolist() == b[0].tolist()
        for col in a[1]:
            np.testing.assert_array_equal(a[1][col], b[1][col])
    assert not list(rd.features_dir("pool").glob(".*.tmp"))  # each cleaned up its own


def test_damaged_and_truncated_parts_are_named_never_read_as_numbers(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=100, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    part = rd.feature_part("pool", 0)
    data = bytearray(part.read_bytes())
    data[200] ^= 0x01  # one flipped bit inside the first data page
    part.write_bytes(bytes(data))
    with pytest.raises(FeatscopeError, match=r"part-00000.parquet is damaged .*: delete it and run `featscope extract"):
        load_features(rd, "pool")
    part.write_bytes(bytes(data[: len(data) // 2]))  # a truncated copy
    with pytest.raises(FeatscopeError, match="part-00000.parquet is not a whole Parquet file"):
        load_features(rd, "pool")
    with pytest.raises(FeatscopeError, match="is not a whole Parquet file"):
        extract.extract(rd, ["pool"], workers=0, progress=False)  # its completeness check names it too
