"""What jobs killed outright (SIGKILL, the OOM killer, a lost node) leave in a run: hidden
temporary files (`.<name>.<pid>.<random>.tmp`, see core.atomic) and index versions that
never became current (`.<layer>.<pid>.<random>`, see featscope.index.search). Nothing reads
them; they only take space, a half feature part or a whole index each.

One is called left once nothing in it was written for `LEFT_FOR` seconds: a job streams
its temporaries as it works, so one idle that long belongs to a stopped job. Deleting one
that a live job still holds never makes an output wrong: that job's rename into place
then fails, loudly, and the output it was writing stays as it was.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from featscope.pipelines.core.rundir import RunDir

LEFT_FOR = 3600  # seconds a temporary goes unwritten before it counts as left by a stopped job


@dataclass(frozen=True)
class Leftover:
    path: Path
    size: int  # bytes, all its files together
    idle_s: float  # seconds since anything in it was last written


def _index_versions(rd: RunDir) -> list[Path]:
    """Folders `.<layer>.*` beside the index links that no link points to, and links
    `.<layer>.link.*` that a save stopped before it renamed onto the layer's link."""
    if not rd.index_root.is_dir():
        return []
    current = {os.path.realpath(rd.index_dir(layer)) for layer in rd.index_layers()}
    return [p for p in rd.index_root.glob(".*.*")
            if p.is_symlink() or p.is_dir() and str(p.resolve()) not in current]


def _large_file_folders(rd: RunDir) -> list[Path]:
    """Where the large files go: what `featscope status` looks through (it must stay fast)."""
    return [rd.root, rd.index_root, rd.predictions_dir, rd.root / "embedding", rd.root / "topk",
            *rd.root.glob("features/*"), *rd.root.glob("topk/candidates/*")]


def _temporaries_everywhere(rd: RunDir, progress: bool) -> list[Path]:
    """Every hidden temporary in the run: a walk over all its folders (with a bar where it
    takes over a second: a run with a saliency map per image has millions of files)."""
    walk = tqdm(os.walk(rd.root), desc="looking through", unit=" folders", disable=not progress, delay=1.0)
    return [Path(folder) / name for folder, _, names in walk
            for name in names if name.startswith(".") and name.endswith(".tmp")]


def find(rd: RunDir, *, everywhere: bool = False, idle_for: float = LEFT_FOR, progress: bool = False) -> list[Leftover]:
    """The run's leftovers, sorted by path: temporaries and index versions none of whose files
    was written for `idle_for` seconds. `everywhere`: every folder of the run (a walk of all its
    files), else only where the large ones go."""
    now = time.time()
    if everywhere:
        found = _temporaries_everywhere(rd, progress)
    else:
        found = [p for folder in _large_file_folders(rd) if folder.is_dir() for p in folder.glob(".*.tmp")]
    out = []
    for path in sorted(set(found + _index_versions(rd))):
        try:
            folder = path.is_dir() and not path.is_symlink()
            files = [f for f in path.rglob("*") if f.is_file()] if folder else []
            stats = [f.stat() for f in files]
            idle = now - max(s.st_mtime for s in [*stats, path.lstat()])
        except OSError:  # removed meanwhile by the job that wrote it
            continue
        if idle > idle_for:
            size = sum(s.st_size for s in stats) if folder else path.lstat().st_size
            out.append(Leftover(path, size, idle))
    return out


def delete(leftover: Leftover) -> None:
    """Delete one leftover (one gone already counts as deleted)."""
    if leftover.path.is_dir() and not leftover.path.is_symlink():
        shutil.rmtree(leftover.path, ignore_errors=True)
    else:
        leftover.path.unlink(missing_ok=True)
