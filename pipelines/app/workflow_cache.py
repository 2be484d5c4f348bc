"""What the Snakefile works out from a config and featscope's own code, kept between starts.

Validating the config and deriving each job's command line import every stage module (torch,
torchvision and openTSNE among them): 6-10 s at each `snakemake` start, paid again by every
scheduled rerun although neither the config nor the code changed, and paid before the first
job can start. The results are pure functions of the config, the arguments and the code, so
they are kept in one JSON file per config under `.snakemake/featscope/`, named by a
fingerprint of featscope's source files and the Snakefile (path, size, modification time),
the Python running the workflow and torchvision's version (its model list decides which
architectures exist): an edit, an upgrade or another interpreter starts a new file, and
older files are deleted.

This is an accelerator, never a source of truth: only JSON values that read back equal are
kept, errors are never cached, and an unreadable or unwritable cache means working things out
afresh. Snakemake's own metadata is not involved (deleting `.snakemake/` only costs the time).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from collections.abc import Callable
from importlib import metadata, util
from pathlib import Path
from typing import TypeVar

from featscope.pipelines.core.atomic import tmp_path_for

T = TypeVar("T")
PACKAGES = ("featscope.kernels", "featscope.index", "featscope.pipelines", "featscope.config")


def code_fingerprint(*files: Path) -> str:
    """A digest of every source and data file of featscope and of `files` (path, size, mtime),
    the running interpreter and torchvision's version: what a cached result was derived with."""
    digest = hashlib.sha256()
    digest.update(sys.executable.encode())
    for path in files:
        stat = Path(path).stat()
        digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    try:
        digest.update(metadata.version("torchvision").encode())
    except metadata.PackageNotFoundError:
        pass
    for package in PACKAGES:
        for root in util.find_spec(package).submodule_search_locations:
            for path in sorted(Path(root).rglob("*")):
                if path.suffix in (".py", ".yaml", ".json") and "__pycache__" not in path.parts:
                    stat = path.stat()
                    digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class WorkflowCache:
    """Results keyed by (kind, arguments) for one config; `get` computes what is missing.
    New entries are written once, when the process exits."""

    def __init__(self, directory: Path, config: dict, code: tuple[Path, ...] = ()) -> None:
        """`code`: files besides featscope's own that the results depend on (the Snakefile)."""
        self.directory = directory
        self.fingerprint = code_fingerprint(*code)
        config_key = hashlib.sha256(_canonical(config).encode()).hexdigest()[:16]
        self.path = directory / f"{self.fingerprint}-{config_key}.json"
        try:
            self.entries: dict[str, object] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        if not isinstance(self.entries, dict):
            self.entries = {}
        self._dirty = False
        atexit.register(self.save)

    def get(self, kind: str, arguments: object, compute: Callable[[], T]) -> T:
        """The cached result of `compute()` for (kind, arguments), computing it when missing."""
        key = f"{kind}:{_canonical(arguments)}"
        if key in self.entries:
            return self.entries[key]  # type: ignore[return-value]
        value = compute()
        try:
            kept = json.loads(json.dumps(value)) == value
        except (TypeError, ValueError):
            kept = False
        if kept:
            self.entries[key] = value
            self._dirty = True
        return value

    def save(self) -> None:
        """Write new entries (atomically: overlapping workflows may share the file) and delete
        the files of other code fingerprints. Failure to write is ignored: it only costs time."""
        if not self._dirty:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = tmp_path_for(self.path)
            try:
                tmp.write_text(json.dumps(self.entries))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            for old in self.directory.glob("*.json"):
                if not old.name.startswith(self.fingerprint):
                    old.unlink(missing_ok=True)
        except OSError:
            return
        self._dirty = False


def default_directory() -> Path:
    """`.snakemake/featscope` under the working directory, where Snakemake keeps its own state."""
    return Path(os.getcwd()) / ".snakemake" / "featscope"
