"""`featscope verify`: read every file of a run back and name each damaged one with the
command that rebuilds it.

Parquet files are read whole with page-checksum verification (they are written with
checksums) and their columns compared with their kind's, feature parts are checked against
the run's model, each index set against the sha256 its meta.json records, saliency maps are
opened; and every file featscope put in place (see core.atomic) is compared with the size
and sha256 registered when it was written: footers, metadata and pictures included. Nothing
is written, so it runs on a read-only copy; it exits 1 when anything is damaged.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.atomic import REGISTRY, file_digest, read_registry
from featscope.pipelines.core.manifest import MANIFEST_SCHEMA, MANIFEST_SCHEMA_BEFORE_CTIME
from featscope.pipelines.core.options import Command, Options
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import (
    EMBEDDING_SCHEMA,
    PREDICTION_SCHEMA,
    TOPK_CANDIDATE_SCHEMA,
    TOPK_SCHEMA,
    RunIdentity,
    column_array,
    feature_schema,
    file_metadata,
    non_finite_rows,
)
from featscope.pipelines.core.text import plural


@dataclass
class Verification:
    checked: int = 0
    damaged: list[tuple[Path, str, str]] = field(default_factory=list)  # (file, what is wrong, the fix)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.damaged)

    def line(self) -> str:
        lines = [f"verify: {plural(self.checked, 'file')} checked in {self.seconds:.1f}s, "
                 f"{plural(len(self.damaged), 'damaged file')}"]
        lines += [f"  {path}: {problem}; fix: {fix}" for path, problem, fix in self.damaged]
        return "\n".join(lines)


def _read_parquet(path: Path, schema: pa.Schema | None = None, *older: pa.Schema) -> pa.Table:
    """Every page read with its checksum verified; the columns, if given, as written (by this
    version, or by an `older` one whose files are still read as they are)."""
    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            raise ValueError("not a Parquet file: its first bytes are not PAR1")
    table = pq.ParquetFile(path, page_checksum_verification=True).read()
    if schema is not None:
        got = [(f.name, f.type) for f in table.schema]
        want = [(f.name, f.type) for f in schema]
        if got != want and all(got != [(f.name, f.type) for f in old] for old in older):
            wrong = next((g for g, w in zip(got, want) if g != w), None)
            raise ValueError(f"its columns are not those of its kind (first differing: {wrong})")
    return table


def _as(schema: pa.Schema, *older: pa.Schema) -> Callable[[Path], None]:
    return lambda path: _read_parquet(path, schema, *older)


def _files(rd: RunDir) -> Iterator[tuple[Path, Callable[[Path], None], str]]:
    """(file, how to check it, the command that rebuilds it) for every file verify knows."""
    run = f"--run {rd.root}"
    yield (rd.manifest, _as(MANIFEST_SCHEMA, MANIFEST_SCHEMA_BEFORE_CTIME),
           f"featscope manifest --images DIR {run} (ids are kept)")
    config = rd.read_config()
    identity = RunIdentity.of_run(config) if "weights_sha256" in config else None

    def feature_part(path: Path) -> None:
        meta = file_metadata(path)
        if identity is not None:
            identity.check(path, meta)
        table = _read_parquet(path, feature_schema(meta.get("kind", ""), int(meta.get("dims", 0))))
        for column in ("feature", "max"):
            if column in table.column_names:
                bad = non_finite_rows(column_array(table, column))
                if bad.any():
                    raise ValueError(f"the {column} values of {plural(int(bad.sum()), 'image')} are NaN or inf (first: image "
                                     f"{table['image_id'].to_numpy()[bad][0]})")

    def candidates(path: Path) -> None:
        if identity is not None:
            identity.check(path, file_metadata(path))
        values = _read_parquet(path, TOPK_CANDIDATE_SCHEMA)["value"].to_numpy()
        if not np.isfinite(values).all():
            raise ValueError(f"NaN or inf in {plural(int((~np.isfinite(values)).sum()), 'top-k value')}")

    for layer_dir in sorted(p for p in (rd.root / "features").glob("*") if p.is_dir()):
        for part in sorted(layer_dir.glob("part-*.parquet")):
            yield part, feature_part, (f"delete it, then featscope extract {run} --layers {layer_dir.name} "
                                       f"--shard {int(part.stem.split('-')[1])}")
    for part in sorted((rd.root / "topk" / "candidates").glob("*/part-*.parquet")):
        yield part, candidates, f"delete it, then featscope extract {run} --topk K --shard {int(part.stem[5:])}"
    for layer in rd.topk_layers():
        yield rd.topk(layer), _as(TOPK_SCHEMA), f"featscope topk merge {run} --layer {layer}"
    for part in sorted(rd.predictions_dir.glob("part-*.parquet")) if rd.predictions_dir.is_dir() else []:
        yield part, _as(PREDICTION_SCHEMA), f"delete it, then featscope extract {run} --shard {int(part.stem[5:])}"
    for path in sorted((rd.root / "embedding").glob("*.parquet")):
        yield path, _as(EMBEDDING_SCHEMA), f"featscope embed {run} --layer {path.stem}"
    for layer in rd.index_layers():
        def index_set(path: Path) -> None:
            from featscope.index import NeighbourIndex

            NeighbourIndex.load(path.parent)

        yield rd.index_meta(layer), index_set, f"featscope index build {run} --layer {layer}"
    for method in rd.saliency_methods():
        for npz in sorted(rd.saliency_dir(method).glob("*.npz")):
            image_id = npz.name.split(".")[0]
            if npz.name.endswith(".curves.npz"):
                yield npz, _read_npz, f"featscope saliency evaluate {run} --methods {method} --select ids={image_id}"
            else:
                yield npz, _read_npz, (f"featscope saliency compute {run} --method {method} --select ids={image_id} "
                                       "--overwrite")
    for part in sorted(rd.saliency_summary_dir.glob("*.parquet")) if rd.saliency_summary_dir.is_dir() else []:
        yield part, _read_parquet, f"featscope saliency compute {run} --method {part.stem}"
    for part in sorted(rd.faithfulness_dir.glob("*.parquet")) if rd.faithfulness_dir.is_dir() else []:
        yield part, _read_parquet, f"featscope saliency evaluate {run} --methods {part.stem}"
    if rd.sanity_table.exists():
        yield rd.sanity_table, _read_parquet, f"featscope saliency sanity {run}"


def _read_npz(path: Path) -> None:
    with np.load(path) as data:
        for name in data.files:
            data[name]


def _generic_fix(rd: RunDir, path: Path) -> str:
    if path == rd.run_json:
        return "restore it from a backup, or rerun `featscope manifest` and `featscope extract` (ids are kept)"
    top = path.relative_to(rd.root).parts[0]
    if top == "report":  # a build rewrites what is missing; a thumbnail or kept picture in place stays
        return f"delete it, then featscope report --run {rd.root}"
    return f"delete it and rerun the workflow (or the stage that writes {top}/)"


def _registry_fix(rd: RunDir, registry: Path) -> str:
    folder = registry.parent.relative_to(rd.root)
    return (f"delete the lines that do not parse (the files they named are then checked by their kind only), or "
            f"rerun the stage that writes {folder}/ to register its files again")


def verify(rd: RunDir, *, progress: bool = False) -> Verification:
    """Check each known file by its kind (readable, checksummed pages, the columns of its
    kind, the run's model), and every file featscope registered (see core.atomic) against
    its recorded size and sha256. `progress`: a bar over both (a run of millions of images
    has millions of files to read back)."""
    start = time.perf_counter()
    if not rd.run_json.exists():
        raise FeatscopeError(f"{rd.root} is not a run: no run.json")
    try:
        json.loads(rd.run_json.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FeatscopeError(f"{rd.run_json} is damaged ({e}): restore it from a backup, or start the run "
                             f"again") from None
    out = Verification()
    damaged: dict[Path, tuple[str, str]] = {}
    fixes: dict[Path, str] = {}
    files = list(_files(rd))
    entries = []
    for registry in sorted(rd.root.rglob(REGISTRY)):
        found, bad = read_registry(registry.parent)
        entries += [(registry.parent / name, entry) for name, entry in found.items()]
        if bad:  # a damaged line hides the checksum of the file it registered
            which = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            damaged[registry] = (f"{plural(len(bad), 'line')} that {'does' if len(bad) == 1 else 'do'} not parse "
                                 f"(line {which}): the files they registered cannot be checked against their "
                                 "checksums", _registry_fix(rd, registry))
    with tqdm(total=len(files) + len(entries), desc="verify", unit="file", disable=not progress,
              mininterval=1.0) as bar:
        for path, check, fix in files:
            bar.update(1)
            out.checked += 1
            fixes[path] = fix
            if not path.exists():
                damaged[path] = ("missing", fix)
                continue
            try:
                check(path)
            except (OSError, pa.ArrowException, FeatscopeError, ValueError, zipfile.BadZipFile, EOFError) as e:
                damaged[path] = (str(e).splitlines()[0][:160] or type(e).__name__, fix)
        for path, entry in entries:
            bar.update(1)
            if not path.exists() or path in damaged:
                continue  # deleted on purpose (a retired image's map), or already named
            out.checked += path not in fixes
            if path.stat().st_size != entry.get("size") or file_digest(path) != entry.get("sha256"):
                fix = fixes.get(path) or _generic_fix(rd, path)
                damaged[path] = ("changed or damaged since it was written (sha256 differs)", fix)
    out.damaged = [(path, problem, fix) for path, (problem, fix) in sorted(damaged.items())]
    out.seconds = time.perf_counter() - start
    return out


@dataclass(frozen=True)
class VerifyOptions(Options):
    pass


def run(rd: RunDir, options: VerifyOptions, progress: bool = True) -> Verification:
    return verify(rd, progress=progress)


COMMANDS = [
    Command("verify", VerifyOptions, run, records_timing=False,
            help="read every file of a run back; name each damaged one and the command that rebuilds it",
            description=__doc__.split("\n\n")[1].replace("\n", " ")),
]
