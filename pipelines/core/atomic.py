"""Atomic file writes: write `.<name>.<pid>.<random>.tmp`, then rename.

A killed job leaves at most a `.tmp` file behind, never a half file under the final name,
so "the file exists" can be trusted to mean "the work is done". The temporary name is
unique to the process and the call: two jobs writing the same output at once (a requeued
cluster job whose first copy still runs) each write their own file, and the last rename
wins with a whole file, instead of both writing into one. The leading dot keeps it out of
what Parquet readers list in a folder (`pq.read_table("features/pool")`).

Every file put in place is registered with its size and sha256 in its folder's
`.checksums.jsonl` (one appended line per write; the last line of a name counts), so
`featscope verify` can tell any changed byte of any output, footers and pictures included.

A stage that writes many files and then the table or list that describes them (unit
pictures and their table, patch strips and their record, atlas cells, explained pairs,
sanity plots and their verdicts, the report's data files and its run.js) `withdraw`s that
table before it rewrites the first of them: each file is whole, but a job killed half way
must not leave the old table vouching for a mix of old and new files.

A file that jobs of one run read, change and write back (run.json, the manifest) is
changed only while `holding` its lock file: the second job then reads what the first wrote.
Two jobs rewriting one such set of files (the workflow's and one run by hand) take turns
likewise (`one_writer`): else the table of the one that finished last vouched for the other's
files wherever they differed. A job that takes files from other stages' sets (the report,
which keeps their pictures) holds their locks shared meanwhile (`reading`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import IO

REGISTRY = ".checksums.jsonl"


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def put_in_place(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file onto `path` and register what it holds."""
    digest, size = file_digest(tmp), tmp.stat().st_size
    os.replace(tmp, path)
    append_line(path.parent / REGISTRY, json.dumps({"name": path.name, "sha256": digest, "size": size}))


def append_line(path: Path, text: str) -> None:
    """Append one line with a single write: lines of concurrent writers never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def registered(folder: Path) -> dict[str, dict]:
    """name -> {"sha256", "size"} of the files last put in place in `folder` (torn lines skipped)."""
    return read_registry(folder)[0]


def read_registry(folder: Path) -> tuple[dict[str, dict], list[int]]:
    """`registered`, and the numbers (from 1) of the registry's lines that do not parse: the
    files they registered cannot be checked against their checksums (verify says so)."""
    out, bad = {}, []
    path = Path(folder) / REGISTRY
    if path.exists():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                entry = json.loads(line)
                out[entry["name"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                bad.append(number)
    return out, bad


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def meant(path: str | Path) -> Path:
    """The file a temporary name of `tmp_path_for` stands for, the folder a writer lock guards
    (any other path as it is): an error writing one names what the user knows."""
    path = Path(path)
    if path.name == WRITER_LOCK:
        return path.parent
    found = re.fullmatch(r"\.(.+)\.[0-9]+\.[0-9a-f]{8}\.tmp", path.name)
    return path.with_name(found.group(1)) if found else path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        put_in_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def withdraw(*paths: Path) -> None:
    """Delete the files that vouch for a set of outputs (the table a stage writes last) before
    the first of those outputs is rewritten, so that a job killed while rewriting them looks
    unfinished (to the report, `featscope status` and Snakemake) instead of finished with
    old numbers beside new pictures, until it runs again and writes the table last."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def rewrite_if_changed(path: Path, data: bytes) -> bool:
    """Write `data` to `path` only if it holds something else (True then): for files that
    are workflow inputs, whose time, not a job's running, decides what reruns."""
    if path.exists() and path.read_bytes() == data:
        return False
    write_bytes_atomic(path, data)
    return True


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextmanager
def holding(lock: Path, busy: str | None = None) -> Iterator[None]:
    """An exclusive flock on `lock` (created if missing) for the block: one process at a time.
    `busy`: a line printed (to stderr) where the lock is held by another, before waiting for it.
    The holder writes who it is into the file (`holder` reads it)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        _lock(f, fcntl.LOCK_EX, busy)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock(f: IO[str], mode: int, busy: str | None) -> None:
    """flock `f` in `mode`; where another holds it, print `busy` (and who) first, then wait."""
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if busy:
            f.seek(0)
            print(busy + (f" (held by {who})" if (who := f.read().strip()) else ""), file=sys.stderr, flush=True)
        fcntl.flock(f, mode)


def holder(lock: Path) -> str | None:
    """Who holds `lock` now ("pid 123 on node7 since ..."), or None where no one does. Reads
    only: `featscope status` tells a set being written now from one a stopped job left."""
    try:
        f = open(lock)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another job"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


WRITER_LOCK = ".writer.lock"


def one_writer(folder: Path, job: str) -> AbstractContextManager[None]:
    """Hold `folder`'s writer lock for the block: for a stage that rewrites a set of files in it
    and the table that vouches for them (see `withdraw`). A second job waits, saying so."""
    return holding(folder / WRITER_LOCK, busy=f"{job}: another job is writing {folder}: waiting for it to finish")


@contextmanager
def reading(folders: Iterable[Path], job: str) -> Iterator[None]:
    """Shared holds on the writer locks of `folders` (those that exist) for the block: a job
    that takes files from other stages' sets (the report, which keeps their pictures) waits
    for a job writing any of them to finish, and none starts until the block ends. Readers do
    not wait for each other, and `writer` does not count them."""
    with ExitStack() as held:
        for folder in sorted(set(folders)):
            if folder.is_dir():
                f = held.enter_context(open(folder / WRITER_LOCK, "a+"))
                _lock(f, fcntl.LOCK_SH, f"{job}: another job is writing {folder}: waiting for it to finish")
        yield


def writer(folder: Path) -> str | None:
    """Who is writing `folder`'s set now (`one_writer`), or None."""
    return holder(folder / WRITER_LOCK)
