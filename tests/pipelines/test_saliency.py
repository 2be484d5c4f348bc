"""The saliency stage: maps at original size that match a direct computation, resume,
bad input, a real Dask scheduler with worker processes, and a worker killed mid-run."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.kernels.saliency import attribute
from featscope.pipelines.app.cli import main as cli
from featscope.pipelines.core import manifest
from featscope.pipelines.core.images import read_pixels
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.rundir import UNREADABLE_AT, RunDir, read_record
from featscope.pipelines.core.store import read_errors
from featscope.pipelines.stages import saliency

ARCH = "resnet18"


@pytest.fixture
def run(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=100, model=ARCH, weights="random")
    return rd


def photo_rows(rd):
    return saliency.select(rd, "label=photo")


def direct_gradient_map(path):
    """|d logit / d pixel| (max over channels) of the predicted class, on the stage's view
    (shorter side 224), bilinearly resized to the original size: written out here. The model
    runs channels_last as in the stage: max-pool gradients are discontinuous, so a layout
    that rounds differently sends a few of them elsewhere (1% of the map's range)."""
    loaded = load_model(ARCH, "random")
    loaded.module.to(memory_format=torch.channels_last)
    pixels = read_pixels(path)
    view = TF.resize(pixels, [224], antialias=True, max_size=448)
    x = loaded.preprocessing.normalize(view[None]).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    logits = loaded.module(x)
    logits[0, logits.argmax()].backward()
    heat = x.grad.abs().amax(1, keepdim=True)
    return F.interpolate(heat, size=pixels.shape[1:], mode="bilinear", align_corners=False)[0, 0].numpy()


def test_worker_task_writes_maps_at_original_size_equal_to_a_direct_gradient(run):
    rows = photo_rows(run)[:2]
    options = saliency.SaliencyOptions(method="gradient", segment=True)
    ref = saliency.ModelRef(ARCH, "random", 0, None)
    result = saliency.explain_batch(str(run.root), options, ref, rows)
    assert [s["image_id"] for s in result["summaries"]] == [r["image_id"] for r in rows] and not result["errors"]
    for row, summary in zip(rows, result["summaries"]):
        with np.load(run.saliency_map("gradient", row["image_id"])) as data:
            stored = data["saliency"]
            assert stored.dtype == np.float16 and int(data["target"]) == summary["target"]
        width, height = Image.open(row["path"]).size
        assert stored.shape == (height, width)
        expected = direct_gradient_map(row["path"])
        np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-2, atol=2e-3 * expected.max())
        assert summary["target"] == summary["predicted"]
        mask = np.asarray(Image.open(run.saliency_mask("gradient", row["image_id"])))
        assert mask.shape == (height, width) and 0 < mask.mean() < 1
        overlay = Image.open(run.saliency_overlay("gradient", row["image_id"]))
        assert overlay.mode == "RGB" and overlay.height > overlay.width * height / width  # the scale bar below


def test_occlusion_maps_on_the_folded_model_equal_the_kernel_on_the_model_as_loaded(run):
    row = photo_rows(run)[0]
    options = saliency.SaliencyOptions(method="occlusion", window=56, stride=56, precision="fp32")
    result = saliency.explain_batch(str(run.root), options, saliency.ModelRef(ARCH, "random", 0, None), [row])
    assert not result["errors"]
    loaded = load_model(ARCH, "random")
    pixels = read_pixels(row["path"])
    view = TF.resize(pixels, [224], antialias=True, max_size=448)
    x = loaded.preprocessing.normalize(view[None])
    target = torch.tensor([result["summaries"][0]["target"]])
    heat = attribute(loaded.module, x, target, "occlusion", window=56, stride=56, baseline=0.0)
    expected = F.interpolate(heat[:, None].float(), size=pixels.shape[1:], mode="bilinear", align_corners=False)[0, 0]
    with np.load(run.saliency_map("occlusion", row["image_id"])) as data:
        stored = data["saliency"].astype(np.float32)
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-2, atol=1e-3 * float(expected.abs().max()))


def test_bad_images_and_missing_targets_become_error_rows_not_failures(run, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = photo_rows(run)[0]
    rows = [{"image_id": 999, "path": str(broken), "label": None}, good]
    ref = saliency.ModelRef(ARCH, "random", 0, None)
    result = saliency.explain_batch(str(run.root), saliency.SaliencyOptions(method="gradcam"), ref, rows)
    assert [e["image_id"] for e in result["errors"]] == [999] and result["errors"][0]["error"] == "bad_image"
    assert [s["image_id"] for s in result["summaries"]] == [good["image_id"]]
    labelled = saliency.explain_batch(str(run.root), saliency.SaliencyOptions(method="gradcam", target="label"), ref,
                                      [good])
    assert labelled["errors"][0]["error"] == "no_target" and "photo" in labelled["errors"][0]["message"]
    fixed = saliency.explain_batch(str(run.root), saliency.SaliencyOptions(method="gradcam", target="7"), ref, [good])
    assert fixed["summaries"][0]["target"] == 7


def test_scores_or_maps_that_are_not_numbers_become_error_rows_not_pictures(run, tmp_path, monkeypatch):
    """An overflow (fp16 on a GPU without bf16; a model of one's own) gave NaN maps that were
    drawn as flat pictures and evaluated as if they ranked pixels."""
    from featscope.pipelines.app.status import status

    good = photo_rows(run)[0]
    state = load_model(ARCH, "random").module.state_dict()
    state["fc.weight"][0] = 1e37  # finite weights whose class-0 score passes float32's range: inf
    state["fc.bias"][0] = 3e38
    torch.save(state, tmp_path / "loud.pt")
    loud = saliency.ModelRef(ARCH, str(tmp_path / "loud.pt"), 0, None)
    result = saliency.explain_batch(str(run.root), saliency.SaliencyOptions(method="gradcam"), loud, [good])
    assert result["summaries"] == [] and [(e["error"], e["message"]) for e in result["errors"]] == [
        ("non_finite", "the model's scores for this image are NaN or inf")]
    monkeypatch.setattr(saliency, "attribute", lambda model, x, *args, **kwargs: torch.full((1, *x.shape[2:]),
                                                                                          float("nan")))
    options = saliency.SaliencyOptions(method="gradcam", select=f"ids={good['image_id']}", workers=1)
    assert saliency.run(run, options, progress=False).computed == 0
    assert [(e["error"], e["message"]) for e in read_errors(run.errors_dir).to_pylist()] == [
        ("non_finite", "its gradcam map holds NaN or inf")]
    assert not run.saliency_map("gradcam", good["image_id"]).exists()
    assert not run.saliency_overlay("gradcam", good["image_id"]).exists()
    said = [line for line in status(run).lines if line.startswith("saliency gradcam")]
    assert said == ["saliency gradcam: 0 maps; 1 selected image without one: 1 got NaN or inf from the model "
                    "(errors.parquet; the workflow's next run or `featscope saliency compute` tries again)"]
    # a map whose values pass float16's range is kept as they are (float16 would make them inf)
    monkeypatch.setattr(saliency, "attribute", lambda model, x, *args, **kwargs: torch.linspace(
        0, 1e6, x.shape[2] * x.shape[3]).view(1, *x.shape[2:]))
    assert saliency.run(run, options, progress=False).computed == 1
    with np.load(run.saliency_map("gradcam", good["image_id"])) as stored:
        assert stored["saliency"].dtype == np.float32 and 0.9e6 < stored["saliency"].max() <= 1e6


def test_an_image_unreadable_for_a_while_is_named_by_status_and_mapped_by_the_next_run(run):
    from featscope.pipelines.app.status import status

    photo = photo_rows(run)[0]
    kept = Path(photo["path"]).read_bytes()
    Path(photo["path"]).unlink()  # away while its map is computed
    options = saliency.SaliencyOptions(method="gradcam", select=f"ids={photo['image_id']}", workers=1)
    assert saliency.run(run, options, progress=False).computed == 0
    said = [line for line in status(run).lines if line.startswith("saliency gradcam")]
    assert said == ["saliency gradcam: 0 maps; 1 selected image without one: 1 could not be read (errors.parquet; "
                    "the workflow's next run or `featscope saliency compute` tries again)"]
    assert read_errors(run.errors_dir)["error"].to_pylist() == ["unreadable"]  # not `bad_image`: worth a retry
    # what the workflow's saliency rule carries in its params: changed by a run that met an
    # unreadable image (so the next invocation reruns it), kept by one that met none (it rests)
    met = read_record(run.saliency_unreadable("gradcam")).get(UNREADABLE_AT)
    assert met is not None
    assert saliency.run(run, options, progress=False).computed == 0  # still away: met again
    assert read_record(run.saliency_unreadable("gradcam")).get(UNREADABLE_AT) not in (None, met)
    met = read_record(run.saliency_unreadable("gradcam")).get(UNREADABLE_AT)
    Path(photo["path"]).write_bytes(kept)
    assert saliency.run(run, options, progress=False).computed == 1
    assert [line for line in status(run).lines if line.startswith("saliency gradcam")] == ["saliency gradcam: 1 map"]
    assert read_record(run.saliency_unreadable("gradcam")).get(UNREADABLE_AT) == met


def test_images_the_selection_chooses_since_the_last_run_are_named_by_status_until_mapped(run, small_dataset):
    """A photo added after `--select label=photo` ran has no map: status said "6 maps" and
    nothing else, as if the selection were done."""
    from featscope.pipelines.app.status import status

    options = saliency.SaliencyOptions(method="gradcam", select="label=photo", workers=1, images_per_task=64)
    assert saliency.run(run, options, progress=False).computed == 6
    assert [line for line in status(run).lines if line.startswith("saliency gradcam")] == ["saliency gradcam: 6 maps"]
    photo = Path(photo_rows(run)[0]["path"])
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo.with_name("flipped.png"))
    manifest.run(run, small_dataset)
    said = status(run)
    assert "saliency gradcam" in said.stale
    assert ("saliency gradcam: 6 maps; 1 image that `--select label=photo` chooses now without one yet (added since "
            "it ran): the next workflow run or `featscope saliency compute --method gradcam --select label=photo` "
            "makes them") in said.lines
    assert saliency.run(run, options, progress=False).computed == 1
    assert [line for line in status(run).lines if line.startswith("saliency gradcam")] == ["saliency gradcam: 7 maps"]
    assert "saliency gradcam" not in status(run).stale


def test_selection_by_label_and_ids_and_clear_errors(run):
    assert {r["label"] for r in photo_rows(run)} == {"photo"}
    ids = [r["image_id"] for r in manifest.read(run).to_pylist()][:2]
    assert [r["image_id"] for r in saliency.select(run, f"ids={ids[1]},{ids[0]}")] == [ids[1], ids[0]]
    with pytest.raises(FeatscopeError, match="unknown image ids: 12345"):
        saliency.select(run, "ids=12345")
    with pytest.raises(FeatscopeError, match="no image has label 'cat'"):
        saliency.select(run, "label=cat")
    with pytest.raises(FeatscopeError, match="select must be"):
        saliency.select(run, "everything")


@pytest.mark.slow
def test_local_cluster_run_resumes_and_guards_its_options(run):
    summary = saliency.run(run, saliency.SaliencyOptions(method="gradcam", select="label=photo", workers=2,
                                                         images_per_task=1), progress=False)
    photos = photo_rows(run)
    assert summary.computed == len(photos) and summary.workers == 2
    table = pq.read_table(run.saliency_summary("gradcam"))
    assert sorted(table["image_id"].to_pylist()) == sorted(r["image_id"] for r in photos)
    assert saliency.read_summary(run).num_rows == len(photos)

    again = saliency.run(run, saliency.SaliencyOptions(method="gradcam", select="label=photo"), progress=False)
    assert again.computed == 0 and again.skipped == len(photos)

    lost = photos[1]["image_id"]
    first_map = np.load(run.saliency_map("gradcam", photos[0]["image_id"]))["saliency"]
    lost_map = np.load(run.saliency_map("gradcam", lost))["saliency"]
    run.saliency_map("gradcam", lost).unlink()
    redo = saliency.run(run, saliency.SaliencyOptions(method="gradcam", select="label=photo", workers=1),
                        progress=False)
    assert redo.computed == 1 and run.saliency_map("gradcam", lost).exists()
    # one task's worth of images is computed in this process, to the same map a worker made
    assert redo.workers == 0 and "in this process" in redo.line()
    np.testing.assert_array_equal(np.load(run.saliency_map("gradcam", lost))["saliency"], lost_map)
    np.testing.assert_array_equal(np.load(run.saliency_map("gradcam", photos[0]["image_id"]))["saliency"], first_map)
    assert pq.read_table(run.saliency_summary("gradcam")).num_rows == len(photos)

    with pytest.raises(FeatscopeError, match="other options.*score='logit'->'probability'"):
        saliency.run(run, saliency.SaliencyOptions(method="gradcam", score="probability", select="label=photo"))
    assert run.saliency_map("gradcam", lost).exists(), "a refused run must not lose maps"


def test_cli_rejects_bad_input_with_one_line(run, capsys):
    assert cli(["saliency", "--run", str(run.root), "--method", "occlusion", "--fill", "grey"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fill must be one of zeros, mean, blur or a number" in err


def test_a_class_id_past_the_models_classes_is_refused_before_any_work():
    """--target 99999 made an error row for every image (exit 1 after the whole pass); where
    the class names say how many classes the model has, it is one line before any work."""
    imagenet = saliency.ModelRef(ARCH, "imagenet", 0, None)
    with pytest.raises(ParamError, match=r"one of the model's classes, 0\.\.999; got 1000"):
        saliency._check_target(imagenet, "1000")
    saliency._check_target(imagenet, "999")
    own = saliency.ModelRef(ARCH, "/some/checkpoint.pt", 0, "0" * 64, class_names=("cat", "dog"))
    with pytest.raises(ParamError, match=r"0\.\.1; got 2"):
        saliency._check_target(own, "2")
    for fine in ("1", "predicted", "label"):
        saliency._check_target(own, fine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dask_cluster():
    """A real scheduler and two worker processes (each behind a nanny), on 127.0.0.1 only."""
    dask = str(Path(sys.executable).with_name("dask"))
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              **quiet)]
    procs += [subprocess.Popen([dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                "--no-dashboard", "--name", f"w{i}"], **quiet) for i in range(2)]
    from distributed import Client

    try:
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            yield address, client
            client.shutdown()  # scheduler and workers, faster than signalling each
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


@pytest.mark.slow
def test_stage_on_a_real_scheduler_survives_a_killed_worker(run, dask_cluster):
    address, client = dask_cluster
    photos = photo_rows(run)
    cmd = [sys.executable, "-m", "featscope.pipelines.app.cli", "saliency", "--run", str(run.root), "--method",
           "occlusion", "--select", "label=photo", "--scheduler", address, "--images-per-task", "1",
           "--quiet"]
    stage = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = [run.saliency_map("occlusion", r["image_id"]) for r in photos]
    deadline = time.monotonic() + 300
    while not any(m.exists() for m in maps) and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    done_at_kill = sum(m.exists() for m in maps)
    pids = client.run(os.getpid)
    victim = max(pids)  # any one of the two worker processes
    os.kill(pids[victim], signal.SIGKILL)
    out, err = stage.communicate(timeout=600)
    assert stage.returncode == 0, err
    assert 0 < done_at_kill < len(photos), "the worker was not killed mid-run"
    assert all(m.exists() for m in maps)
    assert f"saliency occlusion: {len(photos)} maps" in out
    assert pq.read_table(run.saliency_summary("occlusion")).num_rows == len(photos)
    assert read_errors(run.errors_dir).num_rows == 0


def test_slurm_workers_job_script_asks_for_what_was_given():
    """dask-jobqueue writes the sbatch script of one worker job; no SLURM is needed to read it."""
    workers = saliency.SlurmWorkers(jobs=3, cores=8, memory="32GB", walltime="01:30:00", gpus=1, queue="gpu",
                                    account="vision")
    with workers.cluster() as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH --cpus-per-task=8", "#SBATCH -t 01:30:00", "#SBATCH --gres=gpu:1", "#SBATCH -p gpu",
                 "#SBATCH -A vision", "#SBATCH --mem=30G"):
        assert line in script, script
    assert "distributed.cli.dask_worker tcp://" in script and "--nthreads 8 --memory-limit 29.80GiB" in script
    with saliency.SlurmWorkers(jobs=2, cores=4, memory="16GB").cluster() as cluster:  # no GPU: a process per core
        script = cluster.job_script()
    assert "#SBATCH --cpus-per-task=4" in script and "--nthreads 1 " in script and "--nworkers 4 " in script, script


@pytest.mark.slow
def test_overwrite_replaces_only_the_selected_maps_and_only_once_the_new_ones_exist(run):
    photos = [r["image_id"] for r in photo_rows(run)][:3]
    first = saliency.run(run, saliency.SaliencyOptions(method="gradient", select="ids=" + ",".join(map(str, photos)),
                                                       workers=1), progress=False)
    assert first.computed == 3
    before = {i: run.saliency_map("gradient", i).read_bytes() for i in photos}
    # New options for one image only: that image is redone, the other two are left as they were.
    redo = saliency.run(run, saliency.SaliencyOptions(method="gradient", select=f"ids={photos[0]}",
                                                      score="probability", overwrite=True, workers=1),
                        progress=False)
    assert redo.computed == 1
    assert run.saliency_map("gradient", photos[0]).read_bytes() != before[photos[0]]
    assert [run.saliency_map("gradient", i).read_bytes() for i in photos[1:]] == [before[i] for i in photos[1:]]
    # A run in which every selected image fails keeps the old maps and exits non-zero.
    kept = run.saliency_map("gradient", photos[1]).read_bytes()
    code = cli(["saliency", "--run", str(run.root), "--method", "gradient", "--select", f"ids={photos[1]}",
                "--target", "999999", "--overwrite", "--workers", "1", "--quiet"])
    assert code == 1 and run.saliency_map("gradient", photos[1]).read_bytes() == kept
    # The two maps made with the old options are not "done" for the new ones: asked for all
    # three, a rerun refuses without --overwrite, and with it redoes exactly those two.
    ids = "ids=" + ",".join(map(str, photos))
    with pytest.raises(FeatscopeError, match="holds 2 selected maps made with other options"):
        saliency.run(run, saliency.SaliencyOptions(method="gradient", select=ids, score="probability", workers=1))
    again = saliency.run(run, saliency.SaliencyOptions(method="gradient", select=ids, score="probability",
                                                       overwrite=True, workers=1), progress=False)
    assert again.computed == 2 and again.skipped == 1


def test_tasks_sharing_a_worker_process_take_turns_with_its_model(run, monkeypatch):
    """A Dask worker with several threads (a SLURM job's worker has one per core, so may an
    external cluster's) runs several tasks at once, and they share the process's cached model.
    A guided-backprop task hooks that model's rectifiers: a gradient task beside it came out
    guided, silently. Tasks take turns: the gradient task waits, and its map is the plain one."""
    import threading
    from contextlib import contextmanager

    from featscope.kernels import saliency as kernel

    rows = photo_rows(run)[:2]
    ref = saliency.ModelRef(ARCH, "random", 0, None)
    inside, release = threading.Event(), threading.Event()
    real = kernel.guided_relus

    @contextmanager
    def held(model):  # the guided task stops with its hooks in place
        with real(model) as n:
            inside.set()
            release.wait(30)
            yield n

    monkeypatch.setattr(kernel, "guided_relus", held)
    guided = threading.Thread(target=saliency.explain_batch,
                              args=(str(run.root), saliency.SaliencyOptions(method="guided"), ref, rows[:1]))
    gradient = threading.Thread(target=saliency.explain_batch,
                                args=(str(run.root), saliency.SaliencyOptions(method="gradient"), ref, rows[1:]))
    guided.start()
    try:
        assert inside.wait(60)
        gradient.start()
        gradient.join(3)
        assert gradient.is_alive()  # waits for the guided task to finish with the model
    finally:
        release.set()
        guided.join(60)
        gradient.join(60)
    with np.load(run.saliency_map("gradient", rows[1]["image_id"])) as data:
        stored = data["saliency"].astype(np.float32)
    expected = direct_gradient_map(rows[1]["path"])
    np.testing.assert_allclose(stored, expected, rtol=2e-2, atol=2e-3 * expected.max())
