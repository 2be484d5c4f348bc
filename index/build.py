"""Build a FAISS index from vectors streamed in chunks, with recall measured, not assumed.

Passes over the chunks (e.g. Parquet shard by shard), never all vectors in memory at
once: the first picks a random training sample and 1,000 recall queries; the second adds
every vector to the index and, at the same time, finds the queries' exact neighbours (an
inverted file takes two passes for that, so that its lists are allocated exactly).
Then the search breadth (IVF nprobe, HNSW efSearch) is raised until recall@10 against
exact search reaches the target, and the recall reached is recorded.

Cosine similarity is L2 on unit vectors (the same ranking), so every index is built with
L2 internally: PCA, being a centred orthogonal projection, keeps L2 distances but not
inner products.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np

from featscope.index.factory import IndexPlan, choose_plan
from featscope.index.recall import StreamingExactKnn, recall_at_k
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError

Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
RECALL_K = 10
TARGET_RECALL = 0.95  # recall@10 the search breadth is raised to reach


def recall_shortfall(meta: dict) -> str:
    """What to tell whoever reads an approximate index's answers when its measured recall@10
    (`meta`: a built index's) is below TARGET_RECALL even at its widest search; "" if not."""
    recall = meta.get("recall_at_10")
    if meta.get("kind") == "flat" or recall is None or recall >= TARGET_RECALL:
        return ""
    return (f"recall@10 {recall:.3f} is below the {TARGET_RECALL} aimed for, even searching as widely as it can: "
            f"its answers miss about {1 - recall:.0%} of each image's 10 nearest neighbours; {meta['factory']} "
            "compresses the vectors to fit the memory budget, and a larger budget keeps more of them")


@dataclass
class BuildResult:
    index: faiss.Index
    ids: np.ndarray  # row -> image_id
    meta: dict


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, contiguous, and unit length for cosine."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        x = x.copy() if x is vectors else x
        faiss.normalize_L2(x)
    return x


def _train_size(plan: IndexPlan, n: int) -> int:
    if not plan.trained:
        return 0
    need = max(10_000, 2 * plan.dims)
    if plan.nlist:
        need = max(need, 39 * plan.nlist)  # faiss warns below 39 points per centroid
    return min(n, need, 250_000)


def _sample_rows(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=size, replace=False)) if size else np.empty(0, dtype=np.int64)


def _gather(chunks: Chunks, rows_wanted: list[np.ndarray], metric: str, advance: Callable[[int], None]) -> list[np.ndarray]:
    """First pass: the vectors at the given global row numbers, one array per request."""
    out = [[] for _ in rows_wanted]
    offset = 0
    for _, vectors in chunks():
        n = len(vectors)
        for i, rows in enumerate(rows_wanted):
            local = rows[(rows >= offset) & (rows < offset + n)] - offset
            if len(local):
                out[i].append(prepare(vectors[local], metric))
        offset += n
        advance(n)
    return [np.concatenate(parts) if parts else np.empty((0, 0), np.float32) for parts in out]


def _tune(index: faiss.Index, plan: IndexPlan, queries: np.ndarray, truth: np.ndarray, target: float,
          truth_row: np.ndarray | None = None) -> tuple[dict, float]:
    """Smallest search breadth whose recall@10 reaches `target` (or the widest tried).
    `truth_row` maps index rows to the rows `truth` counts in, where they differ (an update)."""
    k = min(RECALL_K, index.ntotal)

    def search() -> np.ndarray:
        _, found = index.search(queries, k)
        return found if truth_row is None else np.where(found >= 0, truth_row[np.maximum(found, 0)], -1)

    if plan.kind == "flat":
        return {}, recall_at_k(search(), truth, k)
    params = faiss.ParameterSpace()
    if plan.kind == "hnsw":
        name, values = "efSearch", [16, 32, 64, 128, 256, 512, 1024]
    else:
        name, values = "nprobe", [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if v < plan.nlist] + [plan.nlist]
    recall = 0.0
    for value in values:
        params.set_index_parameter(index, name, value)
        recall = recall_at_k(search(), truth, k)
        if recall >= target:
            break
    return {name: value}, recall


def options_of(kind: str, metric: str, max_memory: int, seed: int) -> dict:
    """The build options an index records, so an update can tell they are unchanged."""
    return {"kind": kind, "metric": metric, "max_memory": int(max_memory), "seed": int(seed)}


ADD_ROWS = 16_384  # vectors handled at once: bounds the temporaries next to the index


def _checked(chunks: Chunks, n: int, dims: int, metric: str) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(image_ids, prepared vectors) in pieces of at most ADD_ROWS, checking dimension and count."""
    seen = 0
    for image_ids, vectors in chunks():
        for start in range(0, len(vectors), ADD_ROWS):
            x = prepare(vectors[start:start + ADD_ROWS], metric)
            if x.shape[1] != dims:
                raise FeatscopeError(f"vectors of dimension {x.shape[1]} in a collection of dimension {dims}")
            seen += len(x)
            yield np.asarray(image_ids[start:start + ADD_ROWS], dtype=np.int64), x
    if seen != n:
        raise FeatscopeError(f"expected {n} vectors, the chunks held {seen}")


def _transformed(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """x through the index's pre-transforms (PCA), as the inverted file sees it."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    return x


def _add_to_ivf(index: faiss.Index, chunks: Chunks, n: int, dims: int, metric: str,
                exact: StreamingExactKnn, advance: Callable[[int, str], None]) -> tuple[np.ndarray, np.ndarray]:
    """Fill an inverted file in two passes, so its lists end exactly as large as their codes.

    Added chunk by chunk, each list is a vector that grows by doubling, which leaves up to
    twice the codes' bytes allocated (about 1.4x measured at 1M vectors). So the first pass
    assigns every vector to its list (and runs the exact search for the recall check); each
    list then gets its exact capacity; the second pass encodes the vectors into it, reusing
    the assignments. Returns (row -> image_id, exact neighbours of the recall queries).
    """
    ivf = faiss.extract_index_ivf(index)
    assigned, ids = [], []
    for image_ids, x in _checked(chunks, n, dims, metric):
        exact.add(x)
        assigned.append(ivf.quantizer.assign(_transformed(index, x), 1).ravel())
        ids.append(image_ids)
        advance(len(x), "assign")
    assigned, ids = np.concatenate(assigned).astype(np.int64), np.concatenate(ids)
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    for list_no, size in enumerate(np.bincount(assigned, minlength=ivf.nlist).tolist()):
        lists.resize(list_no, size)  # allocates the capacity ...
        lists.resize(list_no, 0)  # ... which a vector keeps when it shrinks
    offset = 0
    for _, x in _checked(chunks, n, dims, metric):
        xt = np.ascontiguousarray(_transformed(index, x))
        ivf.add_core(len(xt), faiss.swig_ptr(xt), None, faiss.swig_ptr(assigned[offset:offset + len(xt)]))
        offset += len(xt)
        advance(len(xt), "encode")
    index.ntotal = ivf.ntotal
    ivf.make_direct_map()  # lets NeighbourIndex.search_ids reconstruct stored vectors
    return ids, exact.result()[1]


def _without_polysemous_training(index: faiss.Index) -> faiss.Index:
    """faiss's factory makes IVF-PQ indexes that, after training the product quantiser,
    reorder its centroids for polysemous (Hamming-filtered) search, which featscope never
    runs: the order changes no distance, and the annealing took 29 of the 33 s of training
    an IVF128,PQ32x8 here."""
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an inverted file
        return index
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False
    return index


def build_index(chunks: Chunks, *, n: int, dims: int, kind: str = "auto", metric: str = "cosine",
                max_memory: int = 4 << 30, recall_queries: int = 1000, target_recall: float = TARGET_RECALL,
                seed: int = 0, on_progress: Callable[[str, int, int], None] | None = None) -> BuildResult:
    """Build an index over the `n` vectors that `chunks()` yields as (image_ids, vectors).

    `on_progress(step, vectors_read, n)` follows each pass over the chunks, by name: "sample"
    (training and recall-query vectors), then "add", or for an inverted file "assign" and
    "encode"; vectors_read starts again at 0 for each step."""
    if metric not in ("cosine", "l2"):
        raise ParamError("metric", f"must be cosine or l2, got '{metric}'")
    if n == 0:
        raise FeatscopeError("there are no vectors to index")
    start = time.perf_counter()
    plan = choose_plan(n, dims, kind=kind, max_memory=max_memory)
    rng = np.random.default_rng(seed)
    train_rows = _sample_rows(n, _train_size(plan, n), rng)
    query_rows = _sample_rows(n, min(n, recall_queries), rng)
    step, read = "", 0

    def advance(rows: int, name: str) -> None:
        nonlocal step, read
        step, read = name, (read if name == step else 0) + rows
        if on_progress:
            on_progress(step, read, n)

    train, queries = _gather(chunks, [train_rows, query_rows], metric, lambda rows: advance(rows, "sample"))

    index = _without_polysemous_training(faiss.index_factory(dims, plan.factory, faiss.METRIC_L2))
    if plan.trained:
        faiss.omp_set_num_threads(faiss.omp_get_max_threads())
        index.train(train)
    del train
    exact = StreamingExactKnn(queries, min(RECALL_K, n), "l2")
    if plan.nlist:
        ids, truth = _add_to_ivf(index, chunks, n, dims, metric, exact, advance)
    else:
        ids = []
        for image_ids, x in _checked(chunks, n, dims, metric):
            index.add(x)
            exact.add(x)
            ids.append(image_ids)
            advance(len(x), "add")
        ids, (_, truth) = np.concatenate(ids), exact.result()
    search_params, recall = _tune(index, plan, queries, truth, target_recall)
    meta = {
        "kind": plan.kind, "factory": plan.factory, "metric": metric, "dims": dims,
        "pca_dims": plan.reduced_dims if plan.reduced_dims < dims else None, "nlist": plan.nlist or None,
        "vectors": int(n), "search_params": search_params, "recall_at_10": round(recall, 4),
        "recall_queries": int(len(queries)), "build_seconds": round(time.perf_counter() - start, 2),
        "estimated_bytes": plan.estimated_bytes, "seed": seed,
        "options": options_of(kind, metric, max_memory, seed), "trained_vectors": int(n),
    }
    return BuildResult(index, ids, meta)
