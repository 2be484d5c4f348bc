"""`saliency evaluate` and `saliency sanity` on a small run: AUCs equal a direct computation
on the stored maps, finished maps are skipped and recomputed ones measured again, retired
maps lose their rows, Dask workers give what the process gives, and the randomisation test's
numbers equal an independent re-initialisation."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from torchvision.transforms import functional as TF

from featscope.kernels.faithfulness import area_under_curve, centre_map, perturbation_curves, random_map
from featscope.kernels.saliency import attribute
from featscope.pipelines.app.cli import main as cli
from featscope.pipelines.core import manifest
from featscope.pipelines.core.images import read_pixels
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.trust import current_evaluation
from featscope.pipelines.stages import saliency
from featscope.pipelines.stages import saliency_trust as trust

ARCH = "resnet18"
METHODS = ("gradient", "gradcam")


@pytest.fixture
def run(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=100, model=ARCH, weights="random")
    photos = saliency.select(rd, "label=photo")[:3]
    for method in METHODS:
        saliency.explain_batch(str(rd.root), saliency.SaliencyOptions(method=method),
                               saliency.ModelRef(ARCH, "random", 0, None), photos)
    return rd, photos


def options(**given):
    return trust.EvaluateOptions(**({"steps": 5, "precision": "fp32", "images_per_task": 100} | given))


def direct_aucs(rd, row, method):
    """The deletion and insertion AUCs of a stored map, computed here from the kernels."""
    loaded = load_model(ARCH, "random")
    model = loaded.module.to(memory_format=torch.channels_last)
    view = TF.resize(read_pixels(row["path"]), [224], antialias=True, max_size=448)
    x = loaded.preprocessing.normalize(view[None])
    with np.load(rd.saliency_map(method, row["image_id"])) as stored:
        heat = torch.from_numpy(stored["saliency"].astype(np.float32))[None, None]
        target = torch.tensor([int(stored["target"])])
    heat = F.interpolate(heat, size=view.shape[1:], mode="bilinear", align_corners=False)[0]
    return [area_under_curve(perturbation_curves(model, x, heat, target, mode=mode, steps=5, replacement="blur",
                                                 score="probability")).item() for mode in ("deletion", "insertion")]


def test_evaluate_writes_aucs_equal_to_a_direct_computation_and_skips_what_is_done(run):
    rd, photos = run
    done = trust.evaluate(rd, options(), progress=False)
    assert (done.pairs, done.skipped) == (6, 0)
    for method in METHODS:
        table = pq.read_table(rd.faithfulness(method)).to_pylist()
        assert sorted(r["image_id"] for r in table) == sorted(p["image_id"] for p in photos)
        row = table[0]
        photo = next(p for p in photos if p["image_id"] == row["image_id"])
        assert [row["deletion_auc"], row["insertion_auc"]] == pytest.approx(direct_aucs(rd, photo, method), abs=1e-5)
        with np.load(rd.saliency_curves(method, row["image_id"])) as curves:
            assert curves["fractions"].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
            assert np.trapezoid(curves["deletion"], dx=0.2) == pytest.approx(row["deletion_auc"], rel=1e-5)
            assert np.trapezoid(curves["random_insertion"], dx=0.2) == pytest.approx(row["random_insertion_auc"],
                                                                                     rel=1e-5)
            # the two methods share the image's baselines
            other = np.load(rd.saliency_curves("gradcam" if method == "gradient" else "gradient", row["image_id"]))
            np.testing.assert_array_equal(curves["centre_deletion"], other["centre_deletion"])
    again = trust.evaluate(rd, options(), progress=False)
    assert (again.pairs, again.skipped) == (0, 6)

    # a recomputed map is stale until it is measured again; a retired one loses its row and curves
    first, second = photos[0]["image_id"], photos[1]["image_id"]
    saliency.explain_batch(str(rd.root), saliency.SaliencyOptions(method="gradient"),
                           saliency.ModelRef(ARCH, "random", 0, None), [photos[0]])
    os.utime(rd.saliency_map("gradient", first), ns=(1, 1))  # a different file whatever the clock's resolution
    assert first not in current_evaluation(rd, "gradient")
    rd.saliency_map("gradcam", second).unlink()
    third = trust.evaluate(rd, options(), progress=False)
    assert (third.pairs, third.skipped) == (1, 4)
    assert first in current_evaluation(rd, "gradient")
    assert second not in {r["image_id"] for r in pq.read_table(rd.faithfulness("gradcam")).to_pylist()}
    assert not rd.saliency_curves("gradcam", second).exists()


def test_changed_options_are_measured_again_and_baselines_are_what_they_say(run):
    rd, photos = run
    trust.evaluate(rd, options(methods=["gradcam"]), progress=False)
    redo = trust.evaluate(rd, options(methods=["gradcam"], replacement="zeros"), progress=False)
    assert redo.pairs == 3
    loaded = load_model(ARCH, "random")
    model = loaded.module.to(memory_format=torch.channels_last)
    row = pq.read_table(rd.faithfulness("gradcam")).to_pylist()[0]
    photo = next(p for p in photos if p["image_id"] == row["image_id"])
    view = TF.resize(read_pixels(photo["path"]), [224], antialias=True, max_size=448)
    x = loaded.preprocessing.normalize(view[None])
    target = torch.tensor([row["target"]])
    chance = random_map(tuple(view.shape[1:]), trust.baseline_seed(0, row["image_id"]))[None]
    centre = centre_map(tuple(view.shape[1:]))[None]
    for name, heat in (("random", chance), ("centre", centre)):
        curve = perturbation_curves(model, x, heat, target, mode="deletion", steps=5, replacement="zeros")
        assert row[f"{name}_deletion_auc"] == pytest.approx(area_under_curve(curve).item(), abs=1e-5)


@pytest.mark.slow
def test_dask_workers_give_what_the_process_gives(run, tmp_path):
    rd, _ = run
    trust.evaluate(rd, options(), progress=False)
    alone = {m: pq.read_table(rd.faithfulness(m)).to_pylist() for m in METHODS}
    for method in METHODS:
        rd.faithfulness(method).unlink()
    done = trust.evaluate(rd, options(workers=2, images_per_task=1), progress=False)
    assert done.workers == 2 and done.pairs == 6
    for method in METHODS:
        assert pq.read_table(rd.faithfulness(method)).to_pylist() == alone[method]


def test_sanity_numbers_equal_an_independent_randomisation(run):
    rd, photos = run
    done = trust.sanity(rd, trust.SanityOptions(methods=["gradient"], sample=2, granularity="block"), progress=False)
    table = pq.read_table(rd.sanity_table).to_pylist()
    steps = done.steps
    assert steps == 11  # resnet18: fc, layer4.1, layer4.0, ..., layer1.0, bn1, conv1
    assert len(table) == 2 * steps and {r["layer"] for r in table if r["step"] == 1} == {"fc"}
    # the last step: every weight re-initialised, here by hand from seed 43 per module
    loaded = load_model(ARCH, "random")
    model = loaded.module.to(memory_format=torch.channels_last)
    image_id = table[-1]["image_id"]
    photo = next(p for p in photos if p["image_id"] == image_id)
    square = TF.center_crop(TF.resize(read_pixels(photo["path"]), [224], antialias=True, max_size=448), [224, 224])
    x = loaded.preprocessing.normalize(square[None])
    target = model(x).argmax(1)
    original = attribute(model, x, target, "gradient")[0]
    import copy

    random_model = copy.deepcopy(model)
    for module in random_model.modules():
        if hasattr(module, "reset_parameters") and module is not random_model:
            torch.manual_seed(43)
            module.reset_parameters()
    randomised = attribute(random_model, x, target, "gradient")[0]
    expected = spearmanr(original.abs().flatten().detach(), randomised.abs().flatten().detach())[0]
    last = next(r for r in table if r["image_id"] == image_id and r["step"] == steps)
    assert last["spearman"] == pytest.approx(expected, abs=1e-6)
    verdicts = json.loads(rd.sanity_verdicts.read_text())
    assert verdicts["gradient"]["verdict"] == trust.verdict(verdicts["gradient"]["score"], 0.5)
    assert Image.open(rd.sanity_plot("gradient")).size[0] > 300


def test_cli_names_bad_input_in_one_line(run, capsys):
    rd, _ = run
    assert cli(["saliency", "evaluate", "--run", str(rd.root), "--methods", "occlusion"]) == 2
    assert "no occlusion maps" in capsys.readouterr().err
    assert cli(["saliency", "evaluate", "--run", str(rd.root), "--replacement", "grey"]) == 2
    assert "--replacement" in capsys.readouterr().err
    # the old spelling of `saliency compute` still works
    assert cli(["saliency", "--run", str(rd.root), "--method", "gradient", "--select", "label=photo", "--quiet"]) == 0


def test_curves_that_are_not_numbers_are_error_rows_not_areas(run, monkeypatch):
    """An overflow along a curve (fp16 autocast on a GPU without bf16) gave a NaN area that
    the trust page's means then left out without a word."""
    from featscope.pipelines.core.store import read_errors

    rd, photos = run
    real = trust.perturbation_curves

    def overflowing(*args, **kwargs):
        curves = real(*args, **kwargs).clone()
        curves[0, -1] = float("inf")  # the first map of each image
        return curves

    monkeypatch.setattr(trust, "perturbation_curves", overflowing)
    trust.evaluate(rd, options(), progress=False)
    errors = [e for e in read_errors(rd.errors_dir).to_pylist() if e["stage"] == "saliency-evaluate"]
    assert {e["image_id"] for e in errors} == {p["image_id"] for p in photos} and {e["error"] for e in errors} == {
        "non_finite"}
    hit = {e["message"].split(" along its ")[1].split(" ")[0] for e in errors}
    assert len(hit) == 1 and hit < set(METHODS)
    (other,) = set(METHODS) - hit
    assert not rd.faithfulness(*hit).exists() or pq.read_table(rd.faithfulness(*hit)).num_rows == 0
    assert sorted(pq.read_table(rd.faithfulness(other))["image_id"].to_pylist()) == sorted(
        p["image_id"] for p in photos)
    assert all(np.isfinite(v) for row in pq.read_table(rd.faithfulness(other)).to_pylist()
               for k, v in row.items() if k.endswith("_auc"))


def test_verdicts_reached_before_the_maps_were_made_again_are_stale(run):
    """A method's maps made again (other options, other images) left its sanity verdict as it
    was; status and the trust page showed it as current."""
    from featscope.pipelines.app import report
    from featscope.pipelines.app.report_pictures import KeptPictures
    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.atomic import write_bytes_atomic
    from featscope.pipelines.core.trust import read_sanity

    rd, photos = run
    trust.sanity(rd, trust.SanityOptions(methods=["gradient"], sample=1, steps=2), progress=False)
    assert "sanity" not in status(rd).stale
    summary = rd.saliency_summary("gradient")
    summary.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(summary, b"the maps' summary, written again by `saliency compute`")
    now = status(rd)
    assert "sanity" in now.stale and any(line.startswith("sanity gradient:") and "stale: its maps were made again"
                                         in line for line in now.lines)
    assert report._sanity(rd, read_sanity(rd), KeptPictures(rd))
    assert "sanity verdicts" in report.build(rd, k=2, progress=False).line()
    trust.sanity(rd, trust.SanityOptions(methods=["gradient"], sample=1, steps=2), progress=False)
    assert "sanity" not in status(rd).stale
