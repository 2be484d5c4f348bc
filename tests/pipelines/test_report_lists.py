"""The report's neighbour lists on a rerun: recomputed only where the change can reach, and
equal to a full recomputation."""

from pathlib import Path

from helpers import load_script, write_dataset

from featscope.pipelines.app import report
from featscope.pipelines.app.report_lists import read_script
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract
from featscope.pipelines.stages import index as neighbours
from featscope.pipelines.stages import neighbours as sheets


def lists(rd):
    out = {}
    for path in sorted((rd.report_dir / "data").glob("images-*.js")):
        for key, entry in read_script(path).items():
            out[int(key)] = entry["neighbours"]
    return out


def update(rd, images, **first):
    manifest.run(rd, images, **first)
    extract.extract(rd, ["pool", "pixels"], precision="fp32", workers=0, progress=False,
                    **({"model": "resnet18", "weights": "random"} if first else {}))
    for layer in ("pool", "pixels"):
        neighbours.build(rd, layer, progress=False)
    return report.build(rd, k=3, progress=False)


def test_a_rerun_recomputes_only_the_lists_a_change_reaches_and_equals_a_full_recompute(tmp_path, digits):
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=3, labels=(0, 1, 7), digits_per_label=4)
    rd = RunDir(tmp_path / "run")
    first = update(rd, images, shard_size=5)
    assert first.lists_recomputed == {"pixels": 15, "pool": 15}
    again = report.build(rd, k=3, progress=False)
    assert again.lists_recomputed == {"pixels": 0, "pool": 0} and again.chunks_written == 0

    for r in manifest.read(rd).to_pylist()[4:6]:
        Path(r["path"]).unlink()
    write_dataset(images, digits, n_photos=0, labels=(3,), digits_per_label=2)
    changed = update(rd, images)
    assert 2 <= changed.lists_recomputed["pool"] < 15  # the 2 new images and the lists they reach
    incremental = lists(rd)
    assert sorted(incremental) == sorted(manifest.read(rd)["image_id"].to_pylist())

    (rd.report_dir / "data" / "neighbours-state.json").unlink()  # forget: recompute every list
    full = report.build(rd, k=3, progress=False)
    assert full.lists_recomputed == {"pixels": 15, "pool": 15}
    assert lists(rd) == incremental


def test_lists_from_an_index_that_lacks_new_images_are_stale_and_say_so(tmp_path, digits):
    """After images were added and extracted but the indexes not yet updated, the report built
    then gave the new images no neighbours and every other list could miss a nearer new image,
    while `featscope report` named nothing and status called the report, and a neighbour sheet
    drawn then, current."""
    from featscope.pipelines.app.status import status

    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=2, labels=(0, 1), digits_per_label=4)
    rd = RunDir(tmp_path / "run")
    update(rd, images, shard_size=5)
    assert "report" not in status(rd).stale
    write_dataset(images, digits, n_photos=0, labels=(3,), digits_per_label=3)
    manifest.run(rd, images)
    extract.extract(rd, ["pool", "pixels"], precision="fp32", workers=0, progress=False)
    sheets.run(rd, sheets.NeighboursOptions(layer="pool", ids=[1], k=3))  # also before the indexes take them
    new = sorted(set(manifest.read(rd)["image_id"].to_pylist()) - set(lists(rd)))
    assert len(new) == 3
    built = report.build(rd, k=3, progress=False)
    assert "shown with a notice: neighbours pixels, neighbours pool" in built.line()
    run = load_script(rd.report_dir / "data" / "run.js")
    assert run["unindexed"] == {"pixels": 3, "pool": 3}
    entries = {int(key): entry for path in sorted((rd.report_dir / "data").glob("images-*.js"))
               for key, entry in read_script(path).items()}
    assert [entries[i].get("unindexed") for i in new] == [["pixels", "pool"]] * 3
    assert not any("unindexed" in entries[i] for i in entries if i not in new)
    now = status(rd)
    assert {"report", "neighbours pool"} <= set(now.stale)
    assert ("report: stale: its neighbour lists come from indexes that lack live images added since they were built "
            "(pixels: 3, pool: 3; its pages say so): the next workflow run, or `featscope index build` and then "
            "`featscope report`, builds it again") in now.lines
    assert any(line.startswith("neighbours pool: sheet drawn from an index that lacks live images added since it "
                               "was built (pool: 3, pixels: 3)") for line in now.lines)
    for layer in ("pool", "pixels"):
        neighbours.build(rd, layer, progress=False)
    report.build(rd, k=3, progress=False)
    assert "unindexed" not in load_script(rd.report_dir / "data" / "run.js") or \
        not load_script(rd.report_dir / "data" / "run.js")["unindexed"]
    assert {i for i, found in lists(rd).items() if "pool" in found} >= set(new)
    assert "report" not in status(rd).stale
