"""`featscope viz`: every method writes its pictures for a run, and the numbers it reports
hold when checked independently (the adversarial PNG re-read from disk, the inversion error)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from featscope.pipelines.app.cli import main as cli
from featscope.pipelines.core import manifest
from featscope.pipelines.core.images import read_pixels
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import viz


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    from helpers import write_dataset

    root = tmp_path_factory.mktemp("viz")
    images = root / "images"
    write_dataset(images, digits, n_photos=2)
    rd = RunDir(root / "run")
    manifest.run(rd, images, shard_size=100, model="resnet18", weights="random")
    return rd


def photo_ids(rd):
    return [r["image_id"] for r in manifest.read(rd).to_pylist() if r["label"] == "photo"]


def test_filters_and_activations_write_one_picture_per_layer_and_image(run):
    summary = viz.filters(run, ["stem", "layer1"])
    assert [p.name for p in summary.written] == ["stem.png", "layer1.png"]
    ctx = viz._context(run)
    assert viz._conv_weight(ctx, "stem")[0] == "conv1"  # the alias names the ReLU after conv1
    assert viz._conv_weight(ctx, "layer1")[0] == "layer1.0.conv1"
    ids = photo_ids(run)
    written = viz.activations(run, ["layer1", "layer3"], ids).written
    assert sorted(str(p.relative_to(run.root)) for p in written) == sorted(
        f"viz/activations/{layer}/{i}.png" for layer in ("layer1", "layer3") for i in ids)
    assert all(Image.open(p).size[0] > 224 for p in written)


def test_adversarial_image_reread_from_disk_is_the_target_within_budget(run):
    ids = photo_ids(run)
    viz.adversarial(run, ids, target=7, epsilon=16, steps=30, step=2)
    loaded = load_model("resnet18", "random")
    rows = {r["image_id"]: r for r in manifest.read(run).to_pylist()}
    for i in ids:
        record = json.loads(run.viz_adversarial(i, "7", "", ".json").read_text())
        adv = np.asarray(Image.open(run.viz_adversarial(i, "7", "-adv")).convert("RGB")).astype(np.int16)
        original = loaded.preprocessing.to_uint8(read_pixels(rows[i]["path"])).permute(1, 2, 0).numpy()
        assert np.abs(adv - original.astype(np.int16)).max() <= 16
        x = loaded.preprocessing.normalize(torch.from_numpy(adv.astype(np.uint8)).permute(2, 0, 1)[None])
        with torch.no_grad():
            predicted = int(loaded.module(x).argmax())
        assert predicted == 7 and record["fooled"] and record["adversarial_class"] == 7
        assert record["original_class"] != 7


def test_class_models_dream_and_inversion_move_their_objectives(run):
    # A random network has logits of ~0.01 and, at the exact mean colour, every ReLU at 0 (no
    # gradient): start from a little noise, without the priors, so that the score term leads.
    viz.class_model(run, [3, 500], steps=30, lr=0.05, octaves=2, l2=0.0, clip_percentile=0.0, jitter=0, noise=0.05,
                    progress=False)
    record = json.loads(run.viz_class_models.with_suffix(".json").read_text())
    assert [r["class"] for r in record] == [3, 500]
    assert all(r["final_score"] > r["scores"][0] + 0.1 for r in record), record
    assert run.viz_class_model(3).exists() and run.viz_class_models.exists()

    ids = photo_ids(run)[:1]
    viz.dream(run, ids, ["layer1", "layer2"], octaves=2, steps=4, progress=False)
    assert run.viz_dream(ids[0]).exists()

    viz.inversion(run, ids, ["layer1", "layer2"], steps=40, tv=0.05, progress=False)
    layers = json.loads(run.viz_inversion(ids[0]).with_suffix(".json").read_text())["layers"]
    for layer in layers:
        assert layer["feature_errors"][-1] < layer["feature_errors"][0] / 5
    assert run.viz_inversion(ids[0]).exists()


def test_viz_cli_names_bad_input_in_one_line(run, capsys):
    assert cli(["viz", "dream", "--run", str(run.root), "--ids", "123456", "--layers", "layer1"]) == 2
    assert capsys.readouterr().err.strip() == (f"featscope: error: --ids holds 123456, which is no image id of run "
                                               f"{run.root} (nor a file)")
    assert cli(["viz", "filters", "--run", str(run.root), "--layers", "layer9"]) == 2
    assert "unknown layer 'layer9' for resnet18" in capsys.readouterr().err
    assert cli(["viz", "class-model", "--run", str(run.root), "--classes", "1000"]) == 2
    assert "class ids must be in 0..999" in capsys.readouterr().err


def test_viz_takes_image_files_as_well_as_ids(run, tmp_path):
    """A new file is drawn exactly as the same picture given by its run id would be."""
    row = next(r for r in manifest.read(run).to_pylist() if r["label"] == "photo")
    copy = tmp_path / "new-photo.png"
    Image.open(row["path"]).save(copy)
    by_id = viz.activations(run, ["layer1"], [row["image_id"]]).written[0]
    by_file = viz.activations(run, ["layer1"], [str(copy)]).written[0]
    assert by_file.name == "new-photo.png"
    from featscope.pipelines.render.panels import LINE, MARGIN

    top = LINE + 6 + MARGIN  # below the title; the pictures are 224 (image) and 224 (its maps) high
    a, b = np.asarray(Image.open(by_file)), np.asarray(Image.open(by_id))
    np.testing.assert_array_equal(a[top:top + 224, :2 * 224 + 3 * MARGIN], b[top:top + 224, :2 * 224 + 3 * MARGIN])
    assert cli(["viz", "activations", "--run", str(run.root), "--layers", "layer1", "--ids", "nowhere.png"]) == 2


def test_images_are_optimised_through_a_folded_copy_that_is_the_same_function(run):
    """The optimising methods run a copy of the model with its batch norms folded (fewer
    passes over memory): at every layer they read it gives the model's own outputs, and the
    run's model is left as loaded for attacks, filters and activation maps."""
    from helpers import trained_like_batchnorms

    from featscope.kernels.objectives import layer_outputs

    ctx = viz._context(run, threads=1)
    trained_like_batchnorms(ctx.loaded.module)
    layers = ["stem", "layer1", "layer3", "pool"]
    model, modules = ctx.optimised_through(layers)
    images, _ = ctx.images(photo_ids(run)[:2])
    with torch.no_grad():
        folded = layer_outputs(model, images, modules)
        loaded = layer_outputs(ctx.pixel_model, images, [ctx.module(layer)[1] for layer in layers])
    for layer, a, b in zip(layers, folded, loaded):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), layer
    unfolded = sum(isinstance(m, torch.nn.BatchNorm2d) for m in ctx.loaded.module.modules())
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert unfolded == 20 and left < unfolded  # ResNet-18's 20 batch norms stay in the run's model
