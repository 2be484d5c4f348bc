"""The Parquet store: schemas, metadata checks, streamed atomic writes, batched reads.

Every file carries key/value metadata naming the model, the weights fingerprint, the
layer, the preprocessing and the featscope version. A reader given the run's identity
refuses a file made by anything else, so features of two models are never mixed.
Stages ask for `(image_ids, array)` batches and never touch pyarrow themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.atomic import atomic_path, put_in_place, tmp_path_for
from featscope.pipelines.core.text import plural
from featscope.pipelines.core.version import FEATSCOPE_VERSION

if TYPE_CHECKING:
    from featscope.kernels.quantile_sketch import ActivationSketch
    from featscope.pipelines.core.rundir import RunDir

FLOAT16_MAX = float(np.finfo(np.float16).max)
NON_FINITE = "non_finite"  # an extract error: the model computed NaN or inf for the image
OUT_OF_RANGE = "out_of_range"  # an extract error: a value past FLOAT16_MAX, which the store cannot hold


def no_features(config: dict) -> FeatscopeError:
    """The error of a stage that needs features in a run without any: not extracted yet, or
    no image to extract (a run made empty with `allow_empty`, waiting for images)."""
    if config.get("next_id") == 0:
        return FeatscopeError("this run has no images yet: its image source listed none when the manifest was last "
                              "updated, so there is nothing to work on until images arrive")
    return FeatscopeError("this run has no features yet: run `featscope extract` first")


@dataclass(frozen=True)
class RunIdentity:
    """What makes two feature files comparable: same model, same weights, same pixels in."""

    model: str
    weights_sha256: str
    preprocessing: str  # JSON

    @classmethod
    def of_run(cls, config: dict) -> RunIdentity:
        """The identity run.json records once features were extracted."""
        if "weights_sha256" not in config:
            raise no_features(config)
        preprocessing = config["preprocessing"]
        if not isinstance(preprocessing, str):  # run.json holds an object; runs before 0.2 a JSON string
            preprocessing = json.dumps(preprocessing, sort_keys=True)
        return cls(config["model"], config["weights_sha256"], preprocessing)

    def metadata(self, **extra: object) -> dict[bytes, bytes]:
        fields = asdict(self) | {"featscope_version": FEATSCOPE_VERSION} | extra
        return {k.encode(): (v if isinstance(v, str) else json.dumps(v)).encode() for k, v in fields.items()}

    def check(self, path: Path, meta: dict[str, str]) -> None:
        for key, want in asdict(self).items():
            got = meta.get(key)
            if got != want:
                raise FeatscopeError(
                    f"{path} was written for {key}={_short(got)}, but this run has {key}={_short(want)}; "
                    "remove it or use a run directory of its own"
                )


def _short(value: str | None) -> str:
    return "(none)" if value is None else value if len(value) <= 24 else value[:16] + "…"


def file_metadata(path: Path) -> dict[str, str]:
    """A Parquet file's key/value metadata; a truncated or foreign file is a one-line error."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise FeatscopeError(f"{path} is not a whole Parquet file ({str(e).splitlines()[0][:100]}): delete it "
                             f"and rerun the stage that writes it") from None
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW")}


# ---- feature parts ---------------------------------------------------------------------

def feature_schema(kind: str, dims: int) -> pa.Schema:
    """Vector layers: image_id, feature[D] float16. Conv layers: feature = per-channel spatial
    mean, plus max and the (argmax_y, argmax_x) cell of the max, all of length C."""
    fields = [pa.field("image_id", pa.int64(), nullable=False), pa.field("feature", pa.list_(pa.float16(), dims))]
    if kind == "conv":
        fields += [
            pa.field("max", pa.list_(pa.float16(), dims)),
            pa.field("argmax_y", pa.list_(pa.int16(), dims)),
            pa.field("argmax_x", pa.list_(pa.int16(), dims)),
        ]
    return pa.schema(fields)


def _fixed_list(values: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    n, d = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=dtype), d)


def part_stamp(path: Path) -> str:
    """A file's size and modification time: a feature part is written anew (a new file renamed
    into place) whenever its shard is extracted again, so a changed stamp means the vectors
    may have changed while the ids did not (what an index records of the parts it holds)."""
    found = path.stat()
    return f"{found.st_size}:{found.st_mtime_ns}"


def parts_written_again(features_dir: Path, recorded: dict[str, str] | None) -> list[int]:
    """The shards whose feature part in `features_dir` (a layer's) was written since it was
    recorded as {part name: `part_stamp`} (an index's `feature_parts`): extracted again, so
    an index made from the record may hold other vectors for their images. A part gone is
    not counted: its images are retired."""
    again = []
    for name, stamp in (recorded or {}).items():
        try:
            if part_stamp(features_dir / name) != stamp:
                again.append(int(Path(name).stem.split("-")[1]))
        except FileNotFoundError:
            continue
    return sorted(again)


def to_float16(values: np.ndarray) -> np.ndarray:
    """Store as float16. Extract keeps images with values past its range out of every part
    (`features.storable_rows`); the clamp guards any other writer against storing an inf."""
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


class FeaturePartWriter:
    """Streams one layer's rows of one shard to `<part>.tmp`; `commit()` renames it into place.

    Rows are buffered into row groups of `row_group_rows`, so memory stays bounded however
    large the shard is. A writer that is never committed leaves no file under the final name.
    """

    def __init__(self, path: Path, identity: RunIdentity, *, layer: str, kind: str, dims: int,
                 extra: dict | None = None, row_group_rows: int = 2048):
        self.path = Path(path)
        self.schema = feature_schema(kind, dims).with_metadata(
            identity.metadata(layer=layer, kind=kind, dims=dims, **(extra or {}))
        )
        self.kind = kind
        self.row_group_rows = row_group_rows
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self.rows = 0
        self._tmp = tmp_path_for(self.path)
        self._tmp.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd", write_page_checksum=True)

    def write(self, image_ids: np.ndarray, feature: np.ndarray, conv: dict[str, np.ndarray] | None = None) -> None:
        columns = [pa.array(np.asarray(image_ids, dtype=np.int64)), _fixed_list(to_float16(feature), pa.float16())]
        if self.kind == "conv":
            columns += [
                _fixed_list(to_float16(conv["max"]), pa.float16()),
                _fixed_list(conv["argmax_y"].astype(np.int16), pa.int16()),
                _fixed_list(conv["argmax_x"].astype(np.int16), pa.int16()),
            ]
        self._buffer.append(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self._buffered += len(image_ids)
        self.rows += len(image_ids)
        if self._buffered >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_batches(self._buffer, schema=self.schema))
            self._buffer, self._buffered = [], 0

    def commit(self) -> None:
        self._flush()
        self._writer.close()
        put_in_place(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def read_feature_part(path: Path, identity: RunIdentity | None = None) -> pa.Table:
    """A whole part as a table, after checking its metadata against `identity`."""
    if identity is not None:
        identity.check(path, file_metadata(path))
    return pq.read_table(path)


def part_is_complete(path: Path, identity: RunIdentity) -> bool:
    """True if `path` exists and was written for this run (a foreign file is an error)."""
    if not path.exists():
        return False
    identity.check(path, file_metadata(path))
    return True


def column_array(table: pa.Table | pa.RecordBatch, name: str) -> np.ndarray:
    """A fixed-size-list column as an (N, D) numpy array (zero-copy where possible)."""
    column = table.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def iter_features(parts: list[Path], identity: RunIdentity, *, column: str = "feature",
                  batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (image_ids int64 (N,), values (N, D)) batches over parts, one part open at a time.

    Arrow's allocator keeps freed buffers for reuse; after each part they are handed back, so
    a pass over many large parts (an index build) does not hold a part's worth of dead pages
    next to what it builds."""
    for path in parts:
        identity.check(path, file_metadata(path))
        batches = pq.ParquetFile(path, page_checksum_verification=True).iter_batches(
            batch_size=batch_rows, columns=["image_id", column])
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as e:  # a damaged page: never read back as numbers
                raise FeatscopeError(f"{path} is damaged ({str(e).splitlines()[0][:120]}): delete it and run "
                                     f"`featscope extract` again for its shard") from None
            ids, values = batch.column(0).to_numpy(), column_array(batch, column)
            bad = non_finite_rows(values)
            if bad.any():  # written before extract checked: an index would rank them anywhere
                raise FeatscopeError(f"{path} holds {plural(int(bad.sum()), 'image')} whose {column} values are NaN or inf "
                                     f"(first: image {int(ids[bad][0])}): delete it and run `featscope extract` "
                                     "again for its shard, which records such images as errors")
            yield ids, values
        pa.default_memory_pool().release_unused()


def non_finite_rows(values: np.ndarray) -> np.ndarray:
    """(N, D) -> (N,) bool: rows holding a NaN or inf. For float16 (the store's), read from
    the bits (an all-ones exponent): 10x faster than np.isnan, which converts each value."""
    if values.dtype != np.float16:
        return ~np.isfinite(values).all(axis=1)
    magnitude = values.view(np.uint16) & 0x7FFF
    if magnitude.size == 0 or magnitude.max() < 0x7C00:
        return np.zeros(len(values), dtype=bool)
    return (magnitude >= 0x7C00).any(axis=1)


# ---- top-k tables ----------------------------------------------------------------------

TOPK_CANDIDATE_SCHEMA = pa.schema([
    pa.field("channel", pa.int32()), pa.field("rank", pa.int16()), pa.field("value", pa.float32()),
    pa.field("image_id", pa.int64()), pa.field("fy", pa.int16()), pa.field("fx", pa.int16()),
])
TOPK_SCHEMA = pa.schema(list(TOPK_CANDIDATE_SCHEMA) + [pa.field(n, pa.int32()) for n in ("x0", "y0", "x1", "y1")])


def write_topk(path: Path, columns: dict[str, np.ndarray], identity: RunIdentity, **meta: object) -> None:
    """A top-k table (shard candidates, or the merged result with boxes) with run metadata."""
    schema = TOPK_SCHEMA if "x0" in columns else TOPK_CANDIDATE_SCHEMA
    table = pa.table({f.name: pa.array(np.asarray(columns[f.name]), f.type) for f in schema}, schema=schema)
    table = table.replace_schema_metadata(identity.metadata(**meta))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


TOPK_MAX = 1000  # images a unit keeps at most: a patch sheet of more says nothing more
TOPK_DEPTH = 2  # shards keep 2k candidates a unit, so retiring images rarely forces a re-extraction


def topk_is_complete(path: Path, identity: RunIdentity, k: int) -> bool:
    """True if a shard's candidates exist for this run and the top-k asked (files written
    before TOPK_DEPTH kept exactly k: still right, only re-extracted sooner on removals)."""
    if not path.exists():
        return False
    meta = file_metadata(path)
    identity.check(path, meta)
    return int(meta.get("k", -1)) == k


def candidates_run_short(channel: np.ndarray, image_id: np.ndarray, retired: np.ndarray, k: int,
                         depth: int) -> np.ndarray:
    """Units of one shard whose kept candidates, without the `retired` images, may no longer
    hold the shard's top-k live images: the list was full (`depth` deep, so deeper images
    were dropped) and fewer than k live candidates are left. Empty: the merge stays exact."""
    channel = np.asarray(channel, dtype=np.int64)
    if len(channel) == 0:
        return channel
    live = ~np.isin(image_id, retired)
    kept = np.bincount(channel, minlength=channel.max() + 1)
    left = np.bincount(channel[live], minlength=len(kept))
    return np.flatnonzero((kept >= depth) & (left < k))


# ---- activation sketches ---------------------------------------------------------------

SKETCH_SCHEMA = pa.schema([
    pa.field("channel", pa.int32()),
    pa.field("scale", pa.float64()),  # the histogram spans [-scale, scale]
    pa.field("counts", pa.list_(pa.int64())),
])


def write_sketch(path: Path, sketch: ActivationSketch, identity: RunIdentity, *, image_ids: np.ndarray,
                 cells: int, **meta: object) -> None:
    """One shard's activation histograms of a layer, with the images they count (so a later
    merge knows which counts belong to images since retired) and the cells per image."""
    table = pa.table({"channel": pa.array(np.arange(len(sketch.scale)), pa.int32()),
                      "scale": pa.array(sketch.scale.cpu().numpy(), pa.float64()),
                      "counts": pa.array(list(sketch.counts.cpu().numpy()), pa.list_(pa.int64()))},
                     schema=SKETCH_SCHEMA)
    table = table.replace_schema_metadata(identity.metadata(
        image_ids=[int(i) for i in image_ids], cells=cells, bins=sketch.bins, **meta))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


def read_sketch(path: Path) -> tuple[ActivationSketch, dict[str, str]]:
    """A stored sketch and its metadata."""
    import torch

    from featscope.kernels.quantile_sketch import ActivationSketch

    meta = file_metadata(path)
    table = pq.read_table(path)
    counts = np.stack(table["counts"].to_numpy(zero_copy_only=False))
    sketch = ActivationSketch(len(counts), counts.shape[1])
    sketch.counts = torch.from_numpy(counts.astype(np.int64))
    sketch.scale = torch.from_numpy(table["scale"].to_numpy().astype(np.float64))
    return sketch, meta


PREDICTION_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64()),
    pa.field("classes", pa.list_(pa.int32())),  # the model's top classes, best first
    pa.field("probabilities", pa.list_(pa.float32())),  # their softmax probabilities
])


def write_predictions(path: Path, image_ids: np.ndarray, classes: np.ndarray, probabilities: np.ndarray,
                      identity: RunIdentity, **meta: object) -> None:
    """One shard's predictions (image_id, top classes, probabilities) with run metadata."""
    table = pa.table({"image_id": pa.array(image_ids, pa.int64()),
                      "classes": pa.array(classes.tolist(), pa.list_(pa.int32())),
                      "probabilities": pa.array(probabilities.tolist(), pa.list_(pa.float32()))},
                     schema=PREDICTION_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(identity.metadata(**meta)), tmp, compression="zstd",
                       write_page_checksum=True)


def read_predictions(rd: RunDir) -> dict[int, list[tuple[int, float]]]:
    """image_id -> [(class, probability), ...] best first, from the parts written for the run's
    current model (parts of another model are left out, not mixed in)."""
    parts = sorted(rd.predictions_dir.glob("part-*.parquet")) if rd.predictions_dir.is_dir() else []
    if not parts:
        return {}
    identity = RunIdentity.of_run(rd.read_config())
    out: dict[int, list[tuple[int, float]]] = {}
    for part in parts:
        try:
            identity.check(part, file_metadata(part))
        except FeatscopeError:
            continue
        table = pq.read_table(part, schema=PREDICTION_SCHEMA)
        for i, c, p in zip(table["image_id"].to_pylist(), table["classes"].to_pylist(),
                           table["probabilities"].to_pylist()):
            out[i] = list(zip(c, p))
    return out


# ---- small tables (manifest, errors) ---------------------------------------------------

def write_table(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a whole table atomically, with optional key/value metadata."""
    if metadata:
        merged = dict(table.schema.metadata or {}) | {k.encode(): v.encode() for k, v in metadata.items()}
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


ERROR_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64()),
    pa.field("path", pa.string()),
    pa.field("stage", pa.string()),
    pa.field("error", pa.string()),
    pa.field("message", pa.string()),
])


def write_errors(path: Path, rows: list[dict]) -> None:
    write_table(pa.Table.from_pylist(rows, schema=ERROR_SCHEMA), path)


def read_errors(errors_dir: Path) -> pa.Table:
    """All error rows of a run (every stage and shard), or an empty table."""
    parts = sorted(errors_dir.glob("*.parquet")) if errors_dir.is_dir() else []
    if not parts:
        return ERROR_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=ERROR_SCHEMA) for p in parts])


EMBEDDING_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64()), pa.field("tsne_x", pa.float32()), pa.field("tsne_y", pa.float32()),
    pa.field("pca_x", pa.float32()), pa.field("pca_y", pa.float32()),
])


def read_embedding(rd: RunDir, layer: str) -> pa.Table:
    """The 2-D map of a layer (image_id, tsne_x, tsne_y, pca_x, pca_y)."""
    if not rd.embedding(layer).exists():
        raise FeatscopeError(f"no embedding of layer '{layer}': run `featscope embed --run {rd.root} --layer {layer}`")
    return pq.read_table(rd.embedding(layer))
