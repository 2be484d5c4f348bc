"""Thumbnails: an image that cannot be read gets a grey square, marked as one, and is read
again next time instead of showing grey for good."""

import numpy as np
from PIL import Image

from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.render.thumbnails import PLACEHOLDER, ensure_thumbnail, make_thumbnail, stored_thumbnails


def test_an_image_away_for_a_while_gets_its_thumbnail_when_it_is_back(tmp_path):
    rd = RunDir(tmp_path / "run")
    picture = tmp_path / "images" / "red.png"
    picture.parent.mkdir(parents=True)
    Image.new("RGB", (300, 200), (220, 20, 20)).save(picture)
    kept = picture.read_bytes()
    picture.unlink()  # away while the report is built (a file system not mounted, an I/O error)
    assert ensure_thumbnail(rd, 7, str(picture))
    grey = np.asarray(Image.open(rd.thumbnail(7)).convert("RGB")).reshape(-1, 3)
    assert np.abs(grey.astype(int) - PLACEHOLDER).max() <= 2  # the page shows a grey square...
    assert stored_thumbnails(rd) == ({7}, {7})  # ...known as one
    assert make_thumbnail(rd, 7, str(picture)) is None  # never drawn in a mosaic as the image
    assert not ensure_thumbnail(rd, 7, str(picture))  # still away: nothing made, the grey stays

    picture.write_bytes(kept)  # back
    assert ensure_thumbnail(rd, 7, str(picture))
    red = np.asarray(Image.open(rd.thumbnail(7)).convert("RGB")).reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and Image.open(rd.thumbnail(7)).size == (128, 85)
    assert stored_thumbnails(rd) == ({7}, set())
    assert not ensure_thumbnail(rd, 7, str(picture))  # made once


def test_a_grey_square_of_an_image_that_came_back_is_replaced_in_mosaics_too(tmp_path):
    rd = RunDir(tmp_path / "run")
    picture = tmp_path / "blue.png"
    ensure_thumbnail(rd, 3, str(picture))  # not there yet: grey
    Image.new("RGB", (64, 64), (10, 10, 230)).save(picture)
    made = make_thumbnail(rd, 3, str(picture))  # a mosaic's tile reads the image, not the grey
    assert made is not None and np.asarray(made).reshape(-1, 3).mean(0)[2] > 200
    assert stored_thumbnails(rd) == ({3}, set())


def test_bytes_that_do_not_decode_get_a_grey_square_for_good_and_no_rerun(tmp_path, digits):
    """An undecodable file was taken for one away for a while: its square was marked, the
    report recorded meeting it on every build, and the workflow rebuilt the report on every
    invocation to try again, for bytes that never change under their id."""
    from helpers import write_dataset

    from featscope.pipelines.app import report
    from featscope.pipelines.app.status import status
    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.rundir import read_record
    from featscope.pipelines.stages import extract

    write_dataset(tmp_path / "images", digits, n_photos=1, labels=(0,), digits_per_label=2)
    (tmp_path / "images" / "0" / "broken.png").write_text("not a picture")
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    broken = next(r["image_id"] for r in manifest.read(rd).to_pylist() if r["path"].endswith("broken.png"))
    report.build(rd, k=2, progress=False)
    grey = np.asarray(Image.open(rd.thumbnail(broken)).convert("RGB")).reshape(-1, 3)
    assert np.abs(grey.astype(int) - PLACEHOLDER).max() <= 2  # shown as a grey square...
    assert broken not in stored_thumbnails(rd)[1]  # ...not marked as one to read again
    assert read_record(rd.report_unreadable) == {}  # nothing for the workflow's report rule to rerun for
    assert report.build(rd, k=2, progress=False).thumbnails_made == 0
    assert read_record(rd.report_unreadable) == {} and "report" not in status(rd).stale
