"""A model of one's own: a fine-tuned checkpoint with its own classes and class names goes
through extract, saliency (explaining each image's own label) and the report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from helpers import write_dataset

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import manifest
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.rundir import RunDir


def featscope(*args):
    return subprocess.run([sys.executable, "-m", "featscope.pipelines.app.cli", *map(str, args)],
                          capture_output=True, text=True)


def fine_tuned(tmp_path, arch, classes):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=classes)
    path = tmp_path / f"{arch}-{classes}.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.slow
@pytest.mark.parametrize("arch, names", [("resnet18", ["0", "1", "7", "photo"]),
                                         ("mobilenet_v2", [str(d) for d in range(10)])])
def test_a_fine_tuned_model_with_its_own_classes_goes_through_extract_saliency_and_report(tmp_path, digits,
                                                                                           arch, names):
    model, checkpoint = fine_tuned(tmp_path, arch, len(names))
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    write_dataset(tmp_path / "images", digits, n_photos=2, labels=(0, 1, 7))
    run = tmp_path / "run"
    done = featscope("manifest", "--images", tmp_path / "images", "--run", run, "--model", arch,
                     "--weights", checkpoint, "--classes", tmp_path / "classes.txt")
    assert done.returncode == 0, done.stderr
    done = featscope("extract", "--run", run, "--layers", "pool", "--workers", 0, "--quiet")
    assert done.returncode == 0, done.stderr
    loaded = load_model(arch, str(checkpoint))
    assert loaded.module(torch.zeros(1, 3, 64, 64)).shape == (1, len(names))
    rows = manifest.read(RunDir(run)).to_pylist()
    digits_ids = [r["image_id"] for r in rows if r["label"] != "photo"]
    done = featscope("saliency", "--run", run, "--method", "gradcam", "--target", "label", "--workers", 1,
                     "--select", "ids=" + ",".join(map(str, digits_ids)), "--quiet")
    assert done.returncode == 0, done.stderr
    rd = RunDir(run)
    for row in rows:
        if row["label"] == "photo":
            continue
        with np.load(rd.saliency_map("gradcam", row["image_id"])) as stored:
            assert int(stored["target"]) == names.index(row["label"])  # the image's own label, by name
            assert str(stored["target_name"]) == row["label"]
    done = featscope("report", "--run", run, "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "run.json").read_text())["class_names"] == names


def test_checkpoint_mistakes_are_one_line(tmp_path, small_dataset):
    _, wrong = fine_tuned(tmp_path, "resnet18", 4)
    with pytest.raises(FeatscopeError, match=r"does not fit resnet50: .*(missing|unexpected|is \()"):
        load_model("resnet50", str(wrong))
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(weights=None), whole)
    with pytest.raises(FeatscopeError, match=r"holds a pickled model, not a state dict: save the weights with "
                                             r"torch.save\(model.state_dict\(\), path\)"):
        load_model("resnet18", str(whole))
    done = featscope("manifest", "--images", small_dataset, "--run", tmp_path / "r", "--model", "resnet18",
                     "--weights", tmp_path / "nonexistent.pth")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "--weights must be imagenet, random or a checkpoint file" in done.stderr
    assert not (tmp_path / "r").exists()
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    featscope("manifest", "--images", small_dataset, "--run", tmp_path / "r2", "--model", "resnet18",
              "--weights", wrong, "--classes", tmp_path / "three.txt")
    done = featscope("extract", "--run", tmp_path / "r2", "--layers", "pool", "--workers", 0, "--quiet")
    assert done.returncode == 2 and "--classes names 3 classes, but the model has 4 outputs" in done.stderr


def test_weights_holding_nan_or_inf_are_refused_before_any_feature_is_written(tmp_path, small_dataset):
    """A training run that diverged saves NaN weights; every feature, map and answer through
    them would be NaN (the index then answered no neighbours at all, with a recall of 0)."""
    model, _ = fine_tuned(tmp_path, "resnet18", 4)
    for key, value in (("layer4.1.conv2.weight", float("nan")), ("layer2.0.bn1.running_var", float("inf"))):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[key].view(-1)[3] = value
        torch.save(state, tmp_path / "diverged.pt")
        with pytest.raises(FeatscopeError, match=rf"the weights '.*diverged.pt' of resnet18 hold NaN or inf in "
                                                 rf"{key} \(1 of \d+ values\): a training run that diverged"):
            load_model("resnet18", str(tmp_path / "diverged.pt"))
    done = featscope("manifest", "--images", small_dataset, "--run", tmp_path / "r", "--model", "resnet18",
                     "--weights", tmp_path / "diverged.pt")  # refused when the run is made, not at extraction
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "hold NaN or inf" in done.stderr
    assert not (tmp_path / "r").exists()
