"""A full disk, for real: a run on a tmpfs with no room left. Writing commands fail in one line
that names the place and says to free space (exit 2, no traceback); the outputs already
there stay whole, no temporary file stays behind, and once space is freed the rerun works."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from featscope.pipelines.core import manifest
from featscope.pipelines.core.neighbours import open_index
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract
from featscope.pipelines.stages import index as neighbours


def featscope(*args):
    return subprocess.run([sys.executable, "-m", "featscope.pipelines.app.cli", *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MB tmpfs (root only: skipped elsewhere, with the reason)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:100]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk):
    """Take every free byte of the disk; returns the filler to delete."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (65536, 512):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    return filler


def leftovers(root):
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp"))


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, small_dataset, full_disk):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=4)
    extract.extract(rd, ["pool"], model="resnet18", weights="random", workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    run = full_disk / "run"
    shutil.copytree(rd.root, run, symlinks=True)
    before = open_index(RunDir(run), "pool").ids.copy()
    filler = fill(full_disk)

    for args in (["index", "build", "--run", run, "--layer", "pool", "--rebuild", "--quiet"],
                 ["embed", "--run", run, "--layer", "pool", "--perplexity", "2", "--quiet"]):  # no bar on stderr
        done = featscope(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "No space left on device" in lines[0] and "free some space there" in lines[0], lines[0]
        assert str(run) in lines[0]
    np.testing.assert_array_equal(open_index(RunDir(run), "pool").ids, before)  # the old index, whole
    assert leftovers(run) == [] and [p.name for p in (run / "index").iterdir() if p.name.startswith(".pool.")] \
        == [open_index(RunDir(run), "pool").directory.resolve().name]
    assert featscope("verify", "--run", run).returncode == 0

    filler.unlink()
    assert featscope("index", "build", "--run", run, "--layer", "pool", "--rebuild").returncode == 0
    assert featscope("embed", "--run", run, "--layer", "pool", "--perplexity", "2").returncode == 0
