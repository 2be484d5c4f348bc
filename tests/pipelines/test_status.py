"""`featscope status`: pending changes of the image folder and stale outputs are named; the
history records each workflow run."""

import json
import time
from pathlib import Path

from helpers import write_dataset

from featscope.pipelines.app.status import status
from featscope.pipelines.core import manifest, timings
from featscope.pipelines.core.history import read_history, record_run
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import explain, extract
from featscope.pipelines.stages import index as neighbours


def test_status_names_pending_changes_and_stale_outputs_until_the_rerun(tmp_path, digits):
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=2, labels=(0, 1), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images, shard_size=3, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    explain.run(rd, explain.ExplainOptions(layer="pool", queries=[0], k=2))
    clean = status(rd)
    assert clean.stale == [] and clean.pending == {"new": 0, "edited": 0, "vanished": 0, "relabelled": 0}
    assert "index pool: 6 images (Flat), current" in clean.line() and "explain pool: 2 pairs, current" in clean.line()

    neighbour = explain.read_queries(rd, "pool")[0][0][0]  # an explained neighbour of image 0 leaves
    Path(next(r["path"] for r in manifest.read(rd).to_pylist() if r["image_id"] == neighbour)).unlink()
    write_dataset(images, digits, n_photos=0, labels=(7,), digits_per_label=1)
    pending = status(rd)
    assert pending.pending == {"new": 1, "edited": 0, "vanished": 1, "relabelled": 0} and "again" not in pending.line()

    manifest.run(rd, images)  # the manifest alone: the new shard is to be extracted, the index is stale
    after = status(rd)
    assert after.pending == {"new": 0, "edited": 0, "vanished": 0, "relabelled": 0}
    assert after.stale == ["features pool", "index pool", "explain pool"]
    assert "stale: 1 retired image in it, 1 live image missing" in after.line()
    assert "explain pool: 2 pairs, stale: 1 with an image that left the dataset" in after.line()
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    assert status(rd).stale == ["explain pool"]  # until explain runs on the new index
    explain.run(rd, explain.ExplainOptions(layer="pool", queries=[0], k=2))
    assert status(rd).stale == []


def test_status_check_fails_a_run_that_is_not_current_and_json_gives_the_facts(tmp_path, digits, capsys):
    """A scheduled job's last step: `status --check` exits 1 while a change of the image folder
    is pending or an output is stale, 0 once the run is current; `--json` says what."""
    import json

    from featscope.pipelines.app.cli import main as cli

    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=1, labels=(0, 1), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images, shard_size=3, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    check = ["status", "--run", str(rd.root), "--check"]
    assert cli(check) == 0 and "index pool: 5 images (Flat), current" in capsys.readouterr().out

    write_dataset(images, digits, n_photos=0, labels=(7,), digits_per_label=1)
    assert cli([*check, "--json"]) == 1
    facts = json.loads(capsys.readouterr().out)
    assert facts["current"] is False and facts["pending"]["new"] == 1 and facts["stale"] == []
    manifest.run(rd, images)
    assert cli([*check, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["stale"] == ["features pool", "index pool"]
    assert cli(["status", "--run", str(rd.root)]) == 0  # without --check: the lines, and success
    assert "not current: features pool, index pool" in capsys.readouterr().out
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    assert cli([*check, "--json"]) == 0 and json.loads(capsys.readouterr().out)["current"] is True


def test_images_without_features_leave_the_index_current_and_are_named_once(tmp_path, digits):
    """One image that does not decode made status call the index stale for good, and ask
    for a rerun of the workflow that could not change it."""
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=2, labels=(0,), digits_per_label=2)
    (images / "0" / "broken.png").write_text("not a picture")
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, images, shard_size=10, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    said = status(rd)
    broken = next(r["image_id"] for r in manifest.read(rd).to_pylist() if r["path"].endswith("broken.png"))
    assert said.stale == [] and "index pool: 4 images (Flat), current" in said.line()
    assert (f"  1 live image left out of every layer: not decodable (first id {broken}; see errors.parquet)"
            in said.lines)
    write_dataset(images, digits, n_photos=0, labels=(1,), digits_per_label=1)
    manifest.run(rd, images)
    away = next(images.glob("1/*.png"))
    away.unlink()  # away while its shard is extracted: its own line says a rerun tries it
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    assert status(rd).stale == ["features of unreadable images"]  # not the index as well


def test_history_records_what_each_run_changed_and_which_jobs_ran(tmp_path, digits):
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=1, labels=(0,), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    started = time.time() - 1
    manifest.run(rd, images)
    timings.record(rd, "manifest", 0.1)
    row = record_run(rd, started, "ok")
    assert (row["added"], row["retired"], row["images"], row["jobs"]) == (3, 0, 3, ["manifest"])
    later = time.time() + 1
    assert record_run(rd, later, "ok")["jobs"] == [] and len(read_history(rd)) == 2
    with open(rd.history, "a") as f:
        f.write('{"torn": ')  # a crash mid-line loses that line only
    assert len(read_history(rd)) == 2
    assert "history: 2 workflow runs" in status(rd).line()


def test_status_names_what_killed_jobs_left_once_nothing_writes_it_for_an_hour(tmp_path, digits):
    """SIGKILL (or a lost node) leaves hidden temporaries: a half feature part, a whole index
    version. Nothing reads them, nothing named them, and they took space for good."""
    import os

    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(0, 1), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    part = rd.feature_part("pool", 0).with_name(".part-00000.parquet.4242.0badc0de.tmp")
    part.write_bytes(b"PAR1" + bytes(300_000))
    version = rd.index_root / ".pool.4242.0badc0de"
    version.mkdir()
    (version / "index.faiss").write_bytes(bytes(200_000))
    assert not any(line.startswith("left by stopped jobs") for line in status(rd).lines)  # written just now
    hours_ago = time.time() - 7200
    for path in (part, version / "index.faiss", version):
        os.utime(path, (hours_ago, hours_ago))
    line = next(line for line in status(rd).lines if line.startswith("left by stopped jobs"))
    assert line.startswith("left by stopped jobs: 2 temporary files or index versions, 0.5 MB") and \
        "features/pool/.part-00000.parquet.4242.0badc0de.tmp, index/.pool.4242.0badc0de" in line
    assert status(rd).stale == []  # they make no output wrong
    facts = status(rd)
    facts.as_json = True  # `--json`, for an alert on the space they take
    assert json.loads(facts.line())["left_by_stopped_jobs"] == {"count": 2, "bytes": 300_004 + 200_000}
