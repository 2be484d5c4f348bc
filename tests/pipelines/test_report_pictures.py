"""The report keeps the run's pictures it shows (report/pictures/): a picture a stage draws
again after the report was built does not appear beside the old lists and numbers."""

import errno
import os
import threading
import time

import pytest
from helpers import six_digit_reported_run, write_dataset
from PIL import Image

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.app import report, report_pictures
from featscope.pipelines.app.report_pictures import KeptPictures
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, reading, writer
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract, saliency, topk


def draw(path, colour):
    """A picture written as the stages write theirs: a new file renamed over the old one."""
    with atomic_path(path) as tmp:
        Image.new("RGB", (8, 8), colour).save(tmp, format="PNG")


def strips_run(tmp_path, digits) -> RunDir:
    """Two photos and six digits extracted at layer3, its top-k merged and units 0 and 1 drawn."""
    write_dataset(tmp_path / "images", digits, n_photos=2, labels=(0, 1), digits_per_label=3)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random")
    extract.extract(rd, ["layer3"], workers=0, topk=3, progress=False)
    topk.merge(rd, "layer3")
    topk.render(rd, "layer3", units=[0, 1], show="field", progress=False)
    return rd


def test_a_strip_drawn_again_after_the_report_leaves_the_reports_own_until_it_is_built_again(tmp_path, digits):
    rd = strips_run(tmp_path, digits)
    photos = saliency.select(rd, "label=photo")
    saliency.explain_batch(str(rd.root), saliency.SaliencyOptions(method="gradcam"),
                           saliency.ModelRef("resnet18", "random", 0, None), photos)
    report.build(rd, k=2, progress=False)
    strip = rd.unit_patches("layer3", 0)
    kept = rd.report_dir / "pictures" / "patches" / "layer3" / "unit-0000.png"
    overlay = rd.report_dir / "pictures" / "saliency" / "gradcam" / f"{photos[0]['image_id']}.png"
    assert kept.read_bytes() == strip.read_bytes() and overlay.exists()
    shown = strip.read_bytes()

    topk.render(rd, "layer3", units=[0, 1], show="mask", progress=False)  # drawn again, other crops
    assert strip.read_bytes() != shown
    assert kept.read_bytes() == shown  # the report's page shows the strip its list was built with

    for method in rd.saliency_methods():  # maps withdrawn: the next report no longer shows them
        for path in rd.saliency_dir(method).iterdir():
            path.unlink()
    report.build(rd, k=2, progress=False)
    assert kept.read_bytes() == strip.read_bytes() and os.path.samefile(kept, strip)
    assert not overlay.exists() and not overlay.parent.exists()


def test_kept_pictures_are_put_in_place_again_only_when_the_runs_picture_changed(tmp_path):
    rd = RunDir(tmp_path / "run")
    picture = rd.root / "units" / "layer3" / "unit-0000.png"
    draw(picture, "red")
    pictures = KeptPictures(rd)
    assert pictures.keep(picture) == "pictures/units/layer3/unit-0000.png"
    assert pictures.write() == 1
    kept = rd.report_dir / pictures.keep(picture)
    assert os.path.samefile(kept, picture)  # a hard link: no space
    assert pictures.write() == 0
    draw(picture, "blue")
    assert Image.open(kept).getpixel((0, 0)) == (255, 0, 0)  # the run's rename leaves the link as it was
    assert pictures.write() == 1 and Image.open(kept).getpixel((0, 0)) == (0, 0, 255)


def test_where_hard_links_fail_the_pictures_are_copied(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(report_pictures.os, "link", no_links)
    rd = RunDir(tmp_path / "run")
    picture = rd.root / "viz" / "dream" / "3.png"
    draw(picture, "red")
    pictures = KeptPictures(rd)
    kept = rd.report_dir / pictures.keep(picture)
    assert pictures.write() == 1
    assert not os.path.samefile(kept, picture) and kept.read_bytes() == picture.read_bytes()
    assert pictures.write() == 0  # the copy is the picture as it is: not copied again
    draw(picture, "blue")
    assert pictures.write() == 1 and kept.read_bytes() == picture.read_bytes()


def test_a_picture_deleted_while_the_report_is_built_is_refused_not_shown_as_a_hole(tmp_path):
    rd = RunDir(tmp_path / "run")
    picture = rd.root / "explain" / "pool" / "1-2.png"
    draw(picture, "red")
    pictures = KeptPictures(rd)
    pictures.keep(picture)
    picture.unlink()
    with pytest.raises(FeatscopeError, match="went away while the report was built"):
        pictures.write()


def test_two_builds_of_one_report_take_turns(tmp_path, digits, monkeypatch, capfd):
    """One build's pruning would remove the pictures another keeps (and each writes data files
    over the other's): a second build waits, saying so, until the first is done."""
    rd = six_digit_reported_run(tmp_path, digits)
    inside, release = threading.Event(), threading.Event()
    entered = []
    layers = report._layers

    def slow_layers(*args):
        entered.append(threading.current_thread().name)
        inside.set()
        assert release.wait(60)
        return layers(*args)

    monkeypatch.setattr(report, "_layers", slow_layers)
    first = threading.Thread(target=report.build, args=(rd,), kwargs={"k": 2, "progress": False}, name="first")
    first.start()
    assert inside.wait(60)
    second = threading.Thread(target=report.build, args=(rd,), kwargs={"k": 2, "progress": False}, name="second")
    second.start()
    second.join(2.0)
    assert entered == ["first"]  # the second has not begun while the first is under way
    assert "another job is writing" in capfd.readouterr().err
    release.set()
    first.join(60)
    second.join(60)
    assert entered == ["first", "second"] and not first.is_alive() and not second.is_alive()
    assert (rd.report_dir / "data" / "run.js").exists()


def test_strips_drawn_again_while_the_report_is_computed_are_refused_and_the_report_before_stays(
        tmp_path, digits, monkeypatch):
    """The report reads the strips' record (field or mask) and names the strips, then puts them
    in place: drawn again in between, it kept the new strips under the old record's caption.
    Now it refuses, and the report before is left as it was."""
    rd = strips_run(tmp_path, digits)
    report.build(rd, k=2, progress=False)
    run_js = (rd.report_dir / "data" / "run.js").read_bytes()
    kept = rd.report_dir / "pictures" / "patches" / "layer3" / "unit-0000.png"
    shown = kept.read_bytes()
    evaluation = report._evaluation

    def drawn_meanwhile(*args):  # the last of what the report reads
        topk.render(rd, "layer3", units=[0, 1], show="mask", progress=False)
        return evaluation(*args)

    monkeypatch.setattr(report, "_evaluation", drawn_meanwhile)
    with pytest.raises(FeatscopeError, match=r"patches/layer3/.drawn.json changed while the report was built"):
        report.build(rd, k=2, progress=False)
    assert (rd.report_dir / "data" / "run.js").read_bytes() == run_js
    assert kept.read_bytes() == shown != rd.unit_patches("layer3", 0).read_bytes()
    monkeypatch.setattr(report, "_evaluation", evaluation)
    report.build(rd, k=2, progress=False)
    assert kept.read_bytes() == rd.unit_patches("layer3", 0).read_bytes()


def test_the_report_waits_for_a_job_writing_a_set_it_keeps_pictures_of(tmp_path, digits, capfd):
    """While the report puts pictures in place it holds their folders' writer locks shared: it
    waits for a stage writing one, saying so, and a status check does not count it a writer."""
    rd = strips_run(tmp_path, digits)
    with one_writer(rd.patches_dir("layer3"), "topk render layer3"):
        build = threading.Thread(target=report.build, args=(rd,), kwargs={"k": 2, "progress": False})
        build.start()
        said, waited = "", time.monotonic() + 60
        while "another job is writing" not in said and time.monotonic() < waited:
            said += capfd.readouterr().err
            time.sleep(0.05)
        assert f"report: another job is writing {rd.patches_dir('layer3')}" in said
        assert build.is_alive() and not (rd.report_dir / "data" / "run.js").exists()
    build.join(60)
    assert not build.is_alive() and (rd.report_dir / "data" / "run.js").exists()
    with reading([rd.patches_dir("layer3")], "report"):
        assert writer(rd.patches_dir("layer3")) is None
