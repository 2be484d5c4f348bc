"""`featscope clean`: what killed jobs left is deleted, nothing else; a live job that loses its
temporary fails instead of putting a wrong file in place."""

import hashlib
import json
import os
import time

import numpy as np
import pytest
from helpers import write_dataset

from featscope.pipelines.app.cli import main as cli
from featscope.pipelines.app.status import status
from featscope.pipelines.app.verify import verify
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer
from featscope.pipelines.core.neighbours import open_index
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import FeaturePartWriter, RunIdentity
from featscope.pipelines.stages import extract
from featscope.pipelines.stages import index as neighbours


def _age(*paths, hours: float = 2) -> None:
    then = time.time() - hours * 3600
    for path in paths:
        os.utime(path, (then, then), follow_symlinks=False)


def _contents(rd: RunDir) -> dict[str, str]:
    """Every file and link of the run: its sha256, or where it points."""
    out = {}
    for folder, _, names in os.walk(rd.root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, rd.root)] = ("-> " + os.readlink(path) if os.path.islink(path) else
                                                   hashlib.sha256(open(path, "rb").read()).hexdigest())
    return out


@pytest.fixture
def run_with_leftovers(tmp_path, digits):
    """A run with an index, and what SIGKILLed jobs left two hours ago in it: a half feature
    part, an index version and its link that never became current, a report picture's
    temporary (where `featscope status` does not look); and a temporary written just now."""
    write_dataset(tmp_path / "images", digits, n_photos=0, labels=(0, 1), digits_per_label=2)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    before = _contents(rd)
    part = rd.feature_part("pool", 0).with_name(".part-00000.parquet.4242.0badc0de.tmp")
    part.write_bytes(b"PAR1" + bytes(300_000))
    version = rd.index_root / ".pool.4242.0badc0de"
    version.mkdir()
    (version / "index.faiss").write_bytes(bytes(200_000))
    link = rd.index_root / ".pool.link.4242.0badc0de"
    os.symlink(version.name, link)
    (rd.root / "report").mkdir()
    picture = rd.root / "report" / ".thumb-3.png.4242.0badc0de.tmp"
    picture.write_bytes(bytes(1000))
    _age(part, version / "index.faiss", version, link, picture)
    recent = rd.feature_part("pool", 0).with_name(".part-00001.parquet.4343.0badc0de.tmp")
    recent.write_bytes(b"PAR1")
    return rd, before, [part, version, link, picture], recent


def test_clean_deletes_what_killed_jobs_left_and_nothing_else(run_with_leftovers, capsys):
    rd, before, left, recent = run_with_leftovers
    assert cli(["clean", "--run", str(rd.root), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "clean: would delete 4 leftovers of stopped jobs, 0.5 MB\n" in said and "report/.thumb-3.png" in said
    assert "\n  features/pool/.part-00000.parquet.4242.0badc0de.tmp  0.3 MB, idle 2.0 h" in said  # each listed
    assert all(os.path.lexists(p) for p in left)

    assert cli(["clean", "--run", str(rd.root)]) == 0
    assert "clean: deleted 4 leftovers of stopped jobs, 0.5 MB" in capsys.readouterr().out
    assert not any(os.path.lexists(p) for p in left) and recent.exists()  # one written within the hour stays
    recent.unlink()
    assert _contents(rd) == before  # every output, checksum registry and record as it was
    assert not any(line.startswith("left by stopped jobs") for line in status(rd).lines)
    assert verify(rd).damaged == []
    assert open_index(rd, "pool").search_ids([0], 1).image_ids[0][0] == 0  # the current index still answers

    assert cli(["clean", "--run", str(rd.root)]) == 0
    assert "clean: deleted 0 leftovers of stopped jobs, 0.0 MB" in capsys.readouterr().out


def test_status_points_at_clean_and_a_shorter_idle_time_takes_recent_ones(run_with_leftovers, capsys):
    rd, _, left, recent = run_with_leftovers
    line = next(line for line in status(rd).lines if line.startswith("left by stopped jobs"))
    assert f"`featscope clean --run {rd.root}` deletes them" in line
    _age(recent, hours=0.5)
    assert cli(["clean", "--run", str(rd.root), "--idle-hours", "0.25"]) == 0
    assert "deleted 5 leftovers" in capsys.readouterr().out and not recent.exists()


def test_clean_keeps_leftovers_in_a_folder_another_job_is_writing(run_with_leftovers, capsys):
    rd, _, left, _ = run_with_leftovers
    picture = left[-1]
    with one_writer(picture.parent, "report"):
        assert cli(["clean", "--run", str(rd.root)]) == 0
    said = capsys.readouterr().out
    assert "deleted 3 leftovers" in said and "kept 1 leftover in folders another job is writing now" in said
    assert picture.exists()


def test_a_job_whose_temporary_is_deleted_fails_and_leaves_its_output_as_it_was(tmp_path):
    """What makes deleting a live job's temporary safe (a clock far off, a job idle for hours):
    its rename into place fails, and the file it was to replace stays whole."""
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"old": True}))
    with pytest.raises(FileNotFoundError):
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"new": True}))
            tmp.unlink()  # `featscope clean`, meanwhile
    assert json.loads(path.read_text()) == {"old": True}

    part = tmp_path / "part-00000.parquet"
    identity = RunIdentity(model="resnet18", weights_sha256="ab" * 32, preprocessing="{}")
    writer = FeaturePartWriter(part, identity, layer="pool", kind="vector", dims=2, row_group_rows=1)
    writer.write(np.array([0]), np.ones((1, 2), np.float32))
    next(tmp_path.glob(".part-00000.parquet.*.tmp")).unlink()
    writer.write(np.array([1]), np.ones((1, 2), np.float32))  # the stream goes on into the deleted file
    with pytest.raises(FileNotFoundError):
        writer.commit()
    assert not part.exists()


def test_clean_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli(["clean", "--run", str(tmp_path)]) == 2
    assert "is not a run: no run.json" in capsys.readouterr().err


def test_what_a_sigkilled_extract_leaves_is_cleaned_and_the_rerun_finishes(tmp_path, digits, capsys):
    """The real thing: an extract killed mid-shard (SIGKILL runs no clean-up) leaves its
    temporary parts; once they are an hour old, clean finds every one by its real name."""
    import signal
    import subprocess
    import sys

    write_dataset(tmp_path / "images", digits, n_photos=0, labels=tuple(range(10)), digits_per_label=30)
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=1000, model="resnet18", weights="random")
    job = subprocess.Popen([sys.executable, "-m", "featscope.pipelines.app.cli", "extract", "--run", str(rd.root),
                            "--layers", "pool,layer3", "--workers", "0", "--batch-size", "8", "--quiet"])
    deadline = time.monotonic() + 120
    while not list(rd.root.rglob("*.tmp")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the shard's parts are being written
    time.sleep(0.5)
    job.send_signal(signal.SIGKILL)
    assert job.wait(timeout=60) == -signal.SIGKILL
    left = list(rd.root.rglob("*.tmp"))
    assert left and not rd.feature_part("pool", 0).exists()
    assert cli(["clean", "--run", str(rd.root)]) == 0
    assert "deleted 0 leftovers" in capsys.readouterr().out  # not yet: a live job may write them
    _age(*left)
    assert cli(["clean", "--run", str(rd.root)]) == 0
    assert f"deleted {len(left)} leftover" in capsys.readouterr().out and list(rd.root.rglob("*.tmp")) == []
    assert extract.extract(rd, ["pool", "layer3"], workers=0, progress=False).done == [0]
    assert verify(rd).damaged == []
