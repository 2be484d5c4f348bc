"""Atomic file writes: write `.<name>.<pid>.<random>.tmp`, then rename.

A killed job leaves at most a `.tmp` file behind, never a half file under the final name,
so "the file exists" can be trusted to mean "the work is done". The temporary name is
unique to the process and the call: two jobs writing the same output at once (a requeued
cluster job whose first copy still runs) each write their own file, and the last rename
wins with a whole file, instead of both writing into one. The leading dot keeps it out of
what Parquet readers list in a folder (`pq.read_table("features/pool")`).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
