"""The report's neighbour lists on a rerun: recomputed only where the change can reach, and
equal to a full recomputation."""

from pathlib import Path

from helpers import write_dataset

from featscope.pipelines.app import report
from featscope.pipelines.app.report_lists import read_script
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract
from featscope.pipelines.stages import index as neighbours


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
