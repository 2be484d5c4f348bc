"""A built index on disk, opened for queries: `NeighbourIndex`.

    ix = NeighbourIndex.load("runs/demo/index/pool")
    ix.search_ids([12, 40], k=10)          # neighbours of images already in the run
    ix.search_vectors(array, k=10)         # neighbours of any vectors of the right dimension

Files of `<run>/index/<layer>/`: index.faiss, ids.parquet (row -> image_id), meta.json.
`<layer>` is a symbolic link to the current version folder (`.<layer>.<pid>.<random>`), which
a save replaces in one atomic rename.
Distances are cosine distances (1 - cosine similarity) for cosine indexes, Euclidean
distances for l2 ones; with PCA they are measured in the reduced space.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from featscope.index.build import BuildResult, prepare
from featscope.kernels.errors import FeatscopeError

INDEX_FILE, IDS_FILE, META_FILE = "index.faiss", "ids.parquet", "meta.json"
SCAN_MAX_QUERIES = 8  # see NeighbourIndex.scan_batches_at_once
_SCAN_FROM: dict[tuple[int, int], int] = {}  # (dimension, bit length of the size) -> where the scan pays


def scan_pays(one_query: float, scan: float, size: int) -> bool:
    """Whether scanning a batch of `size` queries at once (taking `scan` seconds) beats
    searching them one at a time (`one_query` seconds each)."""
    return scan < size * one_query


def _fastest(call, repeats: int) -> float:
    """The shortest of `repeats` timings of `call()` (after one untimed call), in seconds."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


class Neighbours(NamedTuple):
    image_ids: np.ndarray  # (queries, k) int64, -1 where fewer than k exist
    distances: np.ndarray  # (queries, k) float32


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


_STEP_HOOK = None  # tests: called with the step number between the file operations of `save`


def _step(number: int) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(number)


class NeighbourIndex:
    def __init__(self, index: faiss.Index, ids: np.ndarray, meta: dict, directory: Path | None = None):
        self.index, self.ids, self.meta, self.directory = index, ids, meta, directory
        self._order = np.argsort(ids, kind="stable")
        self._apply_search_params()
        self._scan_vectors = self._scan_norms = None  # see scan_batches_at_once
        self._scan_from = 2  # the smallest batch the scan takes; smaller ones go a query at a time

    @classmethod
    def from_build(cls, result: BuildResult) -> NeighbourIndex:
        return cls(result.index, result.ids, result.meta)

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> NeighbourIndex:
        """The index saved in `directory` (index.faiss, ids.parquet, meta.json), refused in one
        line if the three files do not belong together (see `save`). The directory is
        resolved once, so a save switching to a new version meanwhile is not mixed in."""
        directory = Path(directory)
        for attempt in range(3):
            real = directory.resolve()
            try:
                return cls._load(directory, real, mmap)
            except FileNotFoundError:  # the version just replaced, removed while being read
                if attempt == 2 or real == directory.resolve():
                    raise FeatscopeError(f"no index in {directory}: it has no {META_FILE}") from None
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, directory: Path, real: Path, mmap: bool) -> NeighbourIndex:
        if not (real / META_FILE).exists():
            raise FeatscopeError(f"no index in {directory}: it has no {META_FILE}")
        meta = json.loads((real / META_FILE).read_text())
        for name in (INDEX_FILE, IDS_FILE):
            want = (meta.get("files") or {}).get(name)
            if want and _file_digest(real / name) != want:
                raise FeatscopeError(f"{directory / name} is not the file its {META_FILE} describes (changed or "
                                     f"damaged since the build): rebuild the index with `featscope index build`")
        flags = 0
        if mmap:  # inverted lists map through the on-disk hook; flat codes through the mapped reader
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if meta.get("nlist") else faiss.IO_FLAG_MMAP_IFC
        index = faiss.read_index(str(real / INDEX_FILE), flags)
        ids = pq.read_table(real / IDS_FILE)["image_id"].to_numpy()
        counts = {"index.faiss": int(index.ntotal), "ids.parquet": len(ids), "meta.json": meta.get("vectors")}
        if len({v for v in counts.values() if v is not None}) > 1 or index.d != meta.get("dims", index.d):
            raise FeatscopeError(f"the files of {directory} do not belong together ("
                                 + ", ".join(f"{k} {v} vectors" for k, v in counts.items())
                                 + f"; dimension {index.d}, meta.json {meta.get('dims')}): rebuild the index")
        return cls(index, ids, meta, directory)

    def save(self, directory: str | Path, extra_meta: dict | None = None) -> None:
        """Write the three files into a fresh version folder beside `directory`, then make
        `directory` (a symbolic link) point to it with one atomic rename: a reader sees the
        old complete index or the new one, never a mix, whenever the writer stops. meta.json
        records the other two files' sha256, so a file changed later is refused too."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        version = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}")
        version.mkdir()
        try:
            _step(1)
            faiss.write_index(self.index, str(version / INDEX_FILE))
            _step(2)
            pq.write_table(pa.table({"image_id": pa.array(self.ids, pa.int64())}), version / IDS_FILE,
                           write_page_checksum=True)
            _step(3)
            files = {name: _file_digest(version / name) for name in (INDEX_FILE, IDS_FILE)}
            meta = self.meta | (extra_meta or {}) | {"files": files}
            (version / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            _step(4)
        except BaseException as e:  # a full disk, or a stop (SIGTERM, Ctrl-C): no half-written version left
            shutil.rmtree(version, ignore_errors=True)
            if isinstance(e, RuntimeError) and "write error" in str(e):  # how faiss reports a failed write
                full = "No space left on device" in str(e)
                raise OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC) if full else
                              "write error", str(directory.parent)) from None
            raise
        self.meta = meta
        previous = directory.resolve() if directory.is_symlink() else None
        if directory.exists() and not directory.is_symlink():  # an index saved before versions
            retired = directory.with_name(f".{directory.name}.old.{os.getpid()}.{secrets.token_hex(4)}")
            os.replace(directory, retired)
            previous = retired
        link = directory.with_name(f".{directory.name}.link.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            _step(5)
            os.symlink(version.name, link)
            _step(6)
            os.replace(link, directory)  # the switch
        except BaseException:  # stopped before it: the new version is no one's, and goes
            link.unlink(missing_ok=True)
            shutil.rmtree(version, ignore_errors=True)
            raise
        _step(7)
        if previous is not None and previous != version and previous.name.startswith("."):
            shutil.rmtree(previous, ignore_errors=True)
        self.directory = directory

    def _apply_search_params(self) -> None:
        params = faiss.ParameterSpace()
        for name, value in self.meta.get("search_params", {}).items():
            params.set_index_parameter(self.index, name, value)

    @property
    def dims(self) -> int:
        return int(self.meta["dims"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __contains__(self, image_id: object) -> bool:
        pos = int(np.searchsorted(self.ids, image_id, sorter=self._order))
        return pos < len(self.ids) and self.ids[self._order[pos]] == image_id

    def rows_of(self, image_ids) -> np.ndarray:
        """Index rows of image ids; an unknown id is a one-line error."""
        image_ids = np.atleast_1d(np.asarray(image_ids, dtype=np.int64))
        pos = np.searchsorted(self.ids, image_ids, sorter=self._order)
        pos = np.minimum(pos, len(self.ids) - 1)
        rows = self._order[pos]
        missing = image_ids[self.ids[rows] != image_ids]
        if len(missing):
            raise FeatscopeError(f"image_id {missing[0]} is not in this index ({len(self)} images)")
        return rows

    def vectors_of(self, image_ids) -> np.ndarray:
        """The stored (prepared) vectors of image ids, as the index holds them."""
        rows = self.rows_of(image_ids)
        try:
            return self.index.reconstruct_batch(rows)  # one call: the report asks for thousands at once
        except RuntimeError:  # an index kind without batch reconstruction
            return np.stack([self.index.reconstruct(int(r)) for r in rows])

    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> Neighbours:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.dims:
            raise FeatscopeError(f"query vectors have dimension {vectors.shape[1]}, the index expects {self.dims}")
        return self._search(prepare(vectors, self.meta["metric"]), k)

    def search_ids(self, image_ids, k: int = 10) -> Neighbours:
        """Neighbours of images in the index (each image is its own first neighbour)."""
        return self._search(self.vectors_of(image_ids), k)

    def scan_batches_at_once(self) -> bool:
        """Search later batches of 2 to SCAN_MAX_QUERIES queries on this exact (flat) index
        each in one pass over its vectors, through torch's matrix product, from the smallest
        batch for which that costs less here than a pass per query; return whether it will
        for any. FAISS's exact search of a few queries either reads the index once per query
        or, from `distance_compute_blas_threshold` on (2 queries of 1,280 dims on 2 cores:
        __init__), goes through BLAS at a fixed cost of about 3.6 single-query passes.
        For a process that has torch loaded and answers concurrent queries (the query
        service), on an index no one adds to afterwards (the scan reads the index's memory
        where it is); an index of another kind is left as it is. `benchmarks/index_bench.py
        --batched`, one thread of a Xeon: the demo's 5,012 x 1,280 `pool` 3.3x FAISS's speed a
        query in batches of 2, 1.8x in 4, 1.3-1.4x in 8; 200,000 x 1,280 2.9x, 1.5x, 1.0x; the
        same neighbours. Larger batches stay with FAISS: the scan still searches them faster
        alone, but its torch calls give up and take back the GIL, and in the service at 128
        GET clients (batches of about 20) that cost 15% of its throughput.
        Where the scan starts to pay is measured here (`_measure_scan_from`), not assumed: on
        a 2-core AMD EPYC torch's small matrix products cost far more (a batch of 2 took 4.9
        single-query passes of FAISS, against 1.1 on the Xeon), and scanning every batch cost
        the service 15-30% of its GETs at 8 clients there."""
        import torch

        flat = faiss.downcast_index(self.index)
        if not isinstance(flat, faiss.IndexFlat) or flat.metric_type != faiss.METRIC_L2 or len(self) == 0:
            return False
        vectors = faiss.rev_swig_ptr(flat.get_xb(), len(self) * flat.d).reshape(len(self), flat.d)
        self._scan_vectors = torch.from_numpy(vectors)  # the index's memory (mapped or not): never written
        self._scan_norms = torch.linalg.vector_norm(self._scan_vectors, dim=1).square_()  # a float per vector
        size = (flat.d, len(self).bit_length())  # measured once a process for indexes of a size (within 2x)
        if size not in _SCAN_FROM:
            _SCAN_FROM[size] = self._measure_scan_from()
        self._scan_from = _SCAN_FROM[size]
        return self._scan_from <= SCAN_MAX_QUERIES

    def _measure_scan_from(self) -> int:
        """The smallest batch (2 to SCAN_MAX_QUERIES) that the scan searches in less time than
        FAISS searches its queries one at a time, on this machine and index (the best of 3
        timings each; of one where a query takes over 5 ms, so opening a large index stays
        quick); SCAN_MAX_QUERIES + 1 where none. The scan's time grows much more slowly with
        the batch than a pass per query, so the first that pays ends the measuring (the demo's
        `pool`: under 0.1 s; 200,000 x 1,280: about 2 s, as the service opens the index).
        Near where the scan starts to pay the two cost about the same, so the noise of timing
        them matters little. Indexes of about the same size share the answer in a process (the
        service opens each index again after an update), so only the first pays for it."""
        rng = np.random.default_rng(0)
        queries = rng.standard_normal((SCAN_MAX_QUERIES, self.index.d)).astype(np.float32)
        k = min(10, len(self))
        one_query = _fastest(lambda: self.index.search(queries[:1], k), 3)
        repeats = 3 if one_query < 0.005 else 1
        return next((size for size in range(2, SCAN_MAX_QUERIES + 1)
                     if scan_pays(one_query, _fastest(lambda: self._scan(queries[:size], k), repeats), size)),
                    SCAN_MAX_QUERIES + 1)

    def _search(self, prepared: np.ndarray, k: int) -> Neighbours:
        if k < 1:
            raise FeatscopeError("k must be at least 1")
        if self._scan_from <= len(prepared) <= SCAN_MAX_QUERIES and self._scan_vectors is not None:
            dist, rows = self._scan(prepared, min(k, len(self)))
        elif 1 < len(prepared) < self._scan_from and self._scan_vectors is not None:  # a pass per query
            found = [self.index.search(np.ascontiguousarray(prepared[i:i + 1]), min(k, len(self)))
                     for i in range(len(prepared))]
            dist, rows = np.concatenate([d for d, _ in found]), np.concatenate([r for _, r in found])
        else:
            dist, rows = self.index.search(np.ascontiguousarray(prepared), min(k, len(self)))
        image_ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1)
        dist = np.maximum(dist, 0.0)
        dist = dist / 2.0 if self.meta["metric"] == "cosine" else np.sqrt(dist)
        return Neighbours(image_ids, dist.astype(np.float32))

    def _scan(self, prepared: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, rows) of the k nearest stored vectors of each query, as
        IndexFlatL2.search gives them: |x|^2 - 2 q.x in one matrix product, ranked, plus |q|^2
        (the same for a query's every row). Two torch calls: each gives up and takes back the
        GIL, which costs while the service's event loop holds it."""
        import torch

        queries = np.ascontiguousarray(prepared, dtype=np.float32)
        partial = torch.addmm(self._scan_norms, torch.from_numpy(queries), self._scan_vectors.T, alpha=-2)
        dist, rows = torch.topk(partial, k, dim=1, largest=False)  # sorted, nearest first
        return dist.numpy() + np.square(queries).sum(1, keepdims=True), rows.numpy()
