"""Stage `manifest`: list a dataset's images with stable ids, assigned to shards.

Sources: an image folder (one subfolder per label, or flat), a text file of paths, or a
Parquet/CSV table with a `path` (and optional `label`) column. Datasets grow between
scheduled runs: a path keeps its image_id forever, new paths get new ids in new shards
(old shards are never reshuffled, so their features stay valid), and paths that vanished
are marked `removed` rather than renumbered.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.core.images import is_image_name
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import write_table
from featscope.pipelines.core.text import plural
from featscope.pipelines.core.version import FEATSCOPE_VERSION

DEFAULT_SHARD_SIZE = 1000

MANIFEST_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("label", pa.string()),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("removed", pa.bool_(), nullable=False),
])


@dataclass
class ManifestSummary:
    total: int
    added: int
    removed: int
    shards: int
    new_shards: list[int]
    seconds: float

    def line(self) -> str:
        return (f"manifest: {plural(self.total, 'image')} in {plural(self.shards, 'shard')}; {self.added} new "
                f"(shards {_ranges(self.new_shards) or 'none'}), {self.removed} removed; {self.seconds:.1f}s")


def _ranges(shards: list[int]) -> str:
    return f"{shards[0]}-{shards[-1]}" if len(shards) > 1 else ",".join(map(str, shards))


def scan(source: str | Path) -> list[tuple[str, str | None]]:
    """(absolute path, label or None) of every image a source names, sorted by path."""
    source = Path(source)
    if source.is_dir():
        items = []
        for path in source.rglob("*"):
            if path.is_file() and is_image_name(path):
                parent = path.parent.relative_to(source).as_posix()
                items.append((str(path.resolve()), None if parent == "." else parent))
    elif source.is_file() and source.suffix.lower() in (".parquet", ".csv"):
        table = pq.read_table(source) if source.suffix.lower() == ".parquet" else pacsv.read_csv(source)
        if "path" not in table.column_names:
            raise FeatscopeError(f"{source} has no 'path' column (columns: {', '.join(table.column_names)})")
        paths = table.column("path").to_pylist()
        labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
        items = [(_resolve(p, source.parent), None if lab is None else str(lab)) for p, lab in zip(paths, labels)]
    elif source.is_file():
        lines = [ln.strip() for ln in source.read_text().splitlines()]
        items = [(_resolve(ln, source.parent), None) for ln in lines if ln and not ln.startswith("#")]
    else:
        raise FeatscopeError(f"image source {source} does not exist")
    unique = dict(items)
    return sorted(unique.items())


def listing_fingerprint(source: str | Path) -> str:
    """sha256 of the images a source names with their sizes and mtimes.

    It changes when images are added, removed or replaced, which is what tells a scheduler
    that the manifest must be brought up to date.
    """
    digest = hashlib.sha256()
    for path, label in scan(source):
        try:
            st = os.stat(path)
            digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0{label}\0missing\n".encode())
    return digest.hexdigest()


def _resolve(path: str, base: Path) -> str:
    p = Path(path)
    return str((p if p.is_absolute() else base / p).resolve())


def run(rd: RunDir, images: str | Path, *, num_shards: int | None = None, shard_size: int | None = None,
        model: str | None = None, weights: str | None = None) -> ManifestSummary:
    """Create or update `manifest.parquet` and `run.json` for the images in `images`."""
    start = time.perf_counter()
    if num_shards is not None and shard_size is not None:
        raise ParamError("num_shards", "cannot be given with <shard_size>")
    if (num_shards is not None and num_shards < 1) or (shard_size is not None and shard_size < 1):
        raise ParamError("num_shards", "and <shard_size> must be at least 1")
    found = scan(images)
    config = rd.read_config() if rd.run_json.exists() else {}
    old = pq.read_table(rd.manifest).to_pylist() if rd.manifest.exists() else []
    known = {row["path"]: row for row in old}
    present = {path for path, _ in found}
    rows = [row | {"removed": row["path"] not in present} for row in old]
    new = [(path, label) for path, label in found if path not in known]
    if shard_size is None:
        if num_shards is not None:
            shard_size = max(1, math.ceil(len(new) / num_shards))
        else:
            shard_size = config.get("shard_size", DEFAULT_SHARD_SIZE)
    next_id = max((r["image_id"] for r in old), default=-1) + 1
    next_shard = max((r["shard"] for r in old), default=-1) + 1
    for offset, (path, label) in enumerate(new):
        rows.append({"image_id": next_id + offset, "path": path, "label": label,
                     "shard": next_shard + offset // shard_size, "removed": False})
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    if rows != old or not rd.manifest.exists():  # unchanged datasets leave the file untouched
        write_table(table, rd.manifest, {"featscope_version": FEATSCOPE_VERSION})
    if model is not None:
        config["model"] = model
    if weights is not None:
        config["weights"] = weights
    config |= {"name": rd.name, "images": str(Path(images).resolve()), "shard_size": shard_size,
               "featscope_version": FEATSCOPE_VERSION}
    rd.write_config(config)
    new_shards = sorted({r["shard"] for r in rows[len(old):]})
    return ManifestSummary(
        total=sum(not r["removed"] for r in rows), added=len(new), removed=sum(r["removed"] for r in rows),
        shards=len({r["shard"] for r in rows}), new_shards=new_shards, seconds=time.perf_counter() - start,
    )


def read(rd: RunDir, shard: int | None = None, *, include_removed: bool = False) -> pa.Table:
    """The manifest (optionally one shard), without removed images unless asked."""
    if not rd.manifest.exists():
        raise FeatscopeError(f"no manifest in {rd.root}: run `featscope manifest --images DIR --run {rd.root}` first")
    table = pq.read_table(rd.manifest)
    mask = None
    if shard is not None:
        mask = pc.equal(table["shard"], shard)
    if not include_removed:
        keep = pc.invert(table["removed"])
        mask = keep if mask is None else pc.and_(mask, keep)
    return table if mask is None else table.filter(mask)


def shards(rd: RunDir) -> list[int]:
    """Every shard id that has at least one image still present."""
    return sorted(set(read(rd)["shard"].to_pylist()))
