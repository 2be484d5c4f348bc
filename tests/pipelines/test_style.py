"""`featscope style`: training at a small size lowers the losses, resumes from its checkpoint,
adds a style without touching the others, and exports to ONNX; `viz texture` and `viz style`."""

import csv
import json
import os
import random

import pytest
import torch

from featscope.kernels.params import ParamError
from featscope.kernels.style_net import one_hot
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.data import demo as demo_data
from featscope.pipelines.stages import style, viz

# A random-weights ResNet-18 as loss network: no download, and its losses still fall.
OPTIONS = dict(size=48, batch=2, width=8, blocks=1, model="resnet18", weights="random", content_layer="layer1",
               style_layers=["stem", "layer1", "layer2"], lr=5e-3, checkpoint_every=10)


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return {p.stem: p for p in demo_data.textures(tmp_path_factory.mktemp("textures"))}


@pytest.fixture(scope="module")
def content(tmp_path_factory, digits):
    from helpers import write_dataset

    root = tmp_path_factory.mktemp("content")
    write_dataset(root, digits, n_photos=4, labels=())
    return root


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_training_lowers_the_loss_resumes_and_adds_a_style(tmp_path, textures, content):
    out = tmp_path / "net"
    styles = [textures["brick"], textures["ihc"]]
    first = style.train(out, styles, content, style.TrainOptions(steps=20, **OPTIONS), progress=False)
    assert first.steps_done == 20 and (out / "net.pt").exists()
    with open(out / "losses.csv", "a") as f:  # rows of steps a killed run did past its last checkpoint
        f.write("21,9.9,1,1,1\n22,9.9,1,1,1\n")
    resumed = style.train(out, styles, content, style.TrainOptions(steps=60, **OPTIONS), progress=False)
    assert resumed.new_steps == 40 and resumed.steps_done == 60
    log = rows(out / "losses.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 61))
    losses = [float(r["loss"]) for r in log]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses

    image = textures["grass"]
    net_before = style.network(style.load_checkpoint(out / "net.pt"))
    index, added = style.add_style(out / "net.pt", textures["gravel"], content, steps=10, progress=False)
    assert index == 2 and added.steps_done == 70 and added.new_steps == 10
    net_after = style.network(style.load_checkpoint(out / "net.pt"))
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        for s in range(2):
            torch.testing.assert_close(net_after(x, one_hot(s, 3)), net_before(x, one_hot(s, 2)), rtol=0, atol=0)
    twice = [style.stylise(out / "net.pt", [image], style=2, size=40) for _ in range(2)]
    torch.testing.assert_close(twice[0], twice[1], rtol=0, atol=0)

    ort = pytest.importorskip("onnxruntime")
    onnx_path = style.export_onnx(out / "net.pt", tmp_path / "net.onnx", size=40)
    w = torch.tensor([[0.2, 0.3, 0.5]])
    got = ort.InferenceSession(str(onnx_path)).run(None, {"image": x.numpy(), "style": w.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), net_after(x, w), rtol=1e-4, atol=1e-5)
    strip = style.strip(out / "net.pt", image, tmp_path / "strip.png", size=40)
    assert strip.exists()


def test_the_loss_network_is_a_folded_copy_with_the_losses_of_the_model_as_loaded(tmp_path, textures, content,
                                                                                    monkeypatch):
    """Training runs the loss network with its batch norms folded: the same content, style and
    TV losses as the model as loaded (batch norms with statistics far from a fresh network's)."""
    from helpers import trained_like_batchnorms

    from featscope.kernels.transforms import PixelModel
    from featscope.pipelines.core.models import load_model

    net = trained_like_batchnorms(load_model("resnet18", "random").module)
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")
    options = style.TrainOptions(**OPTIONS | {"weights": str(tmp_path / "resnet18.pt")})
    styles = [textures["brick"], textures["ihc"]]
    crops = style._crops(style._image_files(content), 48, 2, random.Random(0))
    stylised = torch.rand(crops.shape, generator=torch.Generator().manual_seed(0))
    folded = style._LossNetwork(options, styles)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    with torch.no_grad():
        ours = folded.losses(stylised, crops, [0, 1])
    monkeypatch.setattr(style, "visualisation_model",
                        lambda loaded, specs: PixelModel(loaded.module, loaded.preprocessing.mean,
                                                         loaded.preprocessing.std))
    with torch.no_grad():
        theirs = style._LossNetwork(options, styles).losses(stylised, crops, [0, 1])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_texture_and_style_transfer_write_their_panels_and_losses_fall(tmp_path, textures, content):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, content, shard_size=100, model="resnet18", weights="random")
    viz.texture(rd, textures["brick"], ["layer1", "layer2"], size=48, steps=40, lr=0.05, progress=False)
    record = json.loads(rd.viz_texture("brick").with_suffix(".json").read_text())
    assert record["loss_all_layers"][-1] < record["loss_all_layers"][0] / 5
    assert set(record["loss_single_layer"]) == {"layer1", "layer2"}
    image_id = manifest.read(rd)["image_id"][0].as_py()
    viz.style_transfer(rd, image_id, textures["ihc"], content_layer="layer2", style_layers=["layer1", "layer2"],
                       steps=20, progress=False)
    losses = json.loads(rd.viz_style(image_id, "ihc").with_suffix(".json").read_text())["losses"]
    assert losses[-1] < losses[0] / 2 and rd.viz_style(image_id, "ihc").exists()


def test_style_cli_errors_are_one_line(tmp_path, capsys):
    from featscope.pipelines.app.cli import main as cli

    assert cli(["style", "apply", "--checkpoint", str(tmp_path / "none.pt"), "--style", "0", "--images", "x.png",
                "--out", str(tmp_path)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)  # a torch file, but no style network
    for path, phrase in ((other, "is not a style network"), (tmp_path, "no checkpoint at")):
        out = str(tmp_path / "s.png")
        assert cli(["style", "strip", "--checkpoint", str(path), "--image", "x.png", "--out", out]) == 2
        assert phrase in capsys.readouterr().err


def test_a_resumed_training_is_refused_other_settings_or_a_changed_style_and_the_network_stays(tmp_path, textures,
                                                                                              content, capsys):
    """Resuming with another setting used to train on silently with the checkpoint's settings
    (the asked ones dropped, the summary none the wiser); a style image changed since was
    trained on as it is now under the old record. Both are refused, naming what differs,
    before a step; steps and checkpoint spacing may change."""
    from featscope.pipelines.app.cli import main as cli

    out = tmp_path / "net"
    brick = tmp_path / "brick.png"
    brick.write_bytes(textures["brick"].read_bytes())
    styles = [brick, textures["ihc"]]
    options = OPTIONS | {"checkpoint_every": 2}
    style.train(out, styles, content, style.TrainOptions(steps=2, **options), progress=False)
    saved = (out / "net.pt").read_bytes()

    with pytest.raises(ParamError, match=r"out holds a network trained with style_weight 4.0 \(asked: 8.0\)"):
        style.train(out, styles, content, style.TrainOptions(steps=4, **options | {"style_weight": 8.0}),
                    progress=False)
    command = ["style", "train", "--out", str(out), "--content", str(content), "--styles", *map(str, styles),
               "--steps", "4", *(f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}"
                                 for k, v in options.items())]
    assert cli([*command, "--size", "40"]) == 2
    assert "--out holds a network trained with --size 48 (asked: 40)" in capsys.readouterr().err
    assert (out / "net.pt").read_bytes() == saved

    brick.write_bytes(textures["gravel"].read_bytes())
    with pytest.raises(ParamError, match="brick.png changed since the network in out was trained on it"):
        style.train(out, styles, content, style.TrainOptions(steps=4, **options), progress=False)
    assert (out / "net.pt").read_bytes() == saved

    brick.write_bytes(textures["brick"].read_bytes())
    assert cli([*command, "--checkpoint-every", "1"]) == 0  # the same training, saved more often: resumed
    assert style.load_checkpoint(out / "net.pt")["step"] == 4


def test_a_strip_and_export_of_an_earlier_network_are_called_stale_until_made_again(tmp_path, textures, content):
    """A switch strip or ONNX file made from the run's network, which is then trained on (or
    given a style), showed the earlier network as if current: status said nothing and the
    report's caption neither. Each records the checkpoint it came from."""
    from featscope.pipelines.app import report
    from featscope.pipelines.app.status import status

    rd = RunDir(tmp_path / "run")
    manifest.run(rd, content, shard_size=100, model="resnet18", weights="random")
    checkpoint = rd.style_net_dir / "net.pt"
    options = OPTIONS | {"checkpoint_every": 2}
    styles = [textures["brick"], textures["ihc"]]
    style.train(rd.style_net_dir, styles, content, style.TrainOptions(steps=2, **options), progress=False)
    strip = style.strip(checkpoint, textures["grass"], rd.viz_style_switch("grass"), size=32)
    made = [strip, style.export_onnx(checkpoint, rd.style_net_dir / "net.onnx", size=32)]

    def style_line():
        return next(line for line in status(rd).lines if line.startswith("style network:"))

    assert style_line() == f"style network: {len(made)} outputs of it current (its ONNX export, switch strips)"
    report.build(rd, progress=False)
    assert "earlier training" not in (rd.report_dir / "data" / "run.js").read_text()

    style.train(rd.style_net_dir, styles, content, style.TrainOptions(steps=4, **options), progress=False)
    line = style_line()
    assert line.startswith("style network: 0 outputs of it current") and "stale: " in line
    assert all(p.relative_to(rd.root).as_posix() in line for p in made)
    assert "style network outputs" in status(rd).stale
    report.build(rd, progress=False)
    assert "drawn from an earlier training of the network" in (rd.report_dir / "data" / "run.js").read_text()

    style.strip(checkpoint, textures["grass"], strip, size=32)
    assert "viz/style/switch-grass.png" not in style_line()


def test_a_style_add_that_fails_or_stops_leaves_the_network_as_it_was(tmp_path, textures, content, monkeypatch):
    """`style add` saved the network with the new style before training it: an image that did
    not decode, or a job stopped in its first steps, left net.pt with a style that `style apply`
    drew as a copy of style 0. Now net.pt changes once, when the new style is trained."""
    from featscope.pipelines.app.cli import main as cli

    out = tmp_path / "net"
    style.train(out, [textures["brick"], textures["ihc"]], content, style.TrainOptions(steps=2, **OPTIONS),
                progress=False)
    saved = (out / "net.pt").read_bytes()
    junk = tmp_path / "junk.png"
    junk.write_bytes(bytes(range(256)) * 4)
    assert cli(["style", "add", "--checkpoint", str(out / "net.pt"), "--style", str(junk), "--content", str(content),
                "--steps", "3", "--quiet"]) == 2
    assert (out / "net.pt").read_bytes() == saved

    calls = []

    def stop_at_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return crops(*args, **kwargs)

    crops = style._crops
    monkeypatch.setattr(style, "_crops", stop_at_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        style.add_style(out / "net.pt", textures["gravel"], content, steps=3 * OPTIONS["checkpoint_every"],
                        progress=False)
    assert (out / "net.pt").read_bytes() == saved
    monkeypatch.setattr(style, "_crops", crops)

    # the styles are recorded whole: another working directory resumes and adds as well
    monkeypatch.chdir(tmp_path)
    index, summary = style.add_style(out / "net.pt", textures["gravel"], content, steps=2, progress=False)
    state = style.load_checkpoint(out / "net.pt")
    assert index == 2 and summary.steps_done == 4 and len(state["styles"]) == 3
    assert all(os.path.isabs(s["path"]) for s in state["styles"])


def test_a_training_begun_with_relative_style_paths_resumes_from_another_directory(tmp_path, textures, content,
                                                                                   monkeypatch):
    """The checkpoint recorded the style paths as typed; the same images named from another
    directory (or absolutely) were refused as other styles, and `style add` there failed to
    read the recorded ones."""
    (tmp_path / "styles").mkdir()
    for name in ("brick", "ihc"):
        (tmp_path / "styles" / f"{name}.png").write_bytes(textures[name].read_bytes())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "net"
    style.train(out, ["styles/brick.png", "styles/ihc.png"], content, style.TrainOptions(steps=2, **OPTIONS),
                progress=False)
    monkeypatch.chdir(tmp_path / "styles")
    resumed = style.train(out, ["brick.png", str(tmp_path / "styles" / "ihc.png")], content,
                          style.TrainOptions(steps=4, **OPTIONS), progress=False)
    assert resumed.steps_done == 4 and resumed.new_steps == 2
