"""Update a built index in place of rebuilding it: retired vectors out, new vectors in.

A scheduled rerun over a dataset that changed by 1% should not retrain and re-encode the
other 99%. The trained parts (PCA, IVF centroids, quantiser codebooks) stay; retired
vectors are removed (`remove_ids`), the survivors renumbered so rows stay 0..n-1 in the
order of `ids`, and the new vectors added. An update is refused, and the caller rebuilds,
when it would leave the index outside what it was built for:

- the build options or the plan changed (another kind, metric, budget or seed; or the
  collection left the exact range or its memory budget);
- the collection grew past `GROWTH_LIMIT` times the vectors the index was trained on;
- a graph index (HNSW) lost vectors: FAISS cannot remove from it;
- after the update, recall@10 re-measured against exact search on a fresh sample of the
  collection stays below the target even at the widest search.

Exact (flat) indexes stay exact: an update answers every query as a fresh build does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import faiss
import numpy as np

from featscope.index.build import RECALL_K, TARGET_RECALL, BuildResult, Chunks, _sample_rows, _tune, prepare
from featscope.index.factory import IndexPlan, choose_plan
from featscope.index.recall import StreamingExactKnn

GROWTH_LIMIT = 2.0  # retrain once the collection is this many times the vectors trained on


def why_rebuild(meta: dict, *, n: int, removed: int, options: dict) -> str | None:
    """Why the index described by `meta` cannot be updated to hold `n` vectors after `removed`
    removals under `options` (None: it can)."""
    if meta.get("options") != options:
        return "the build options changed"
    plan = choose_plan(n, int(meta["dims"]), kind=options["kind"], max_memory=options["max_memory"])
    if plan.kind != meta["kind"] or _codec(plan.factory) != _codec(meta["factory"]):
        return f"{n} vectors call for {plan.factory} instead of {meta['factory']}"
    trained = meta.get("trained_vectors") or meta["vectors"]
    if plan.trained and n > GROWTH_LIMIT * trained:
        return f"{n} vectors are more than {GROWTH_LIMIT:g}x the {trained} it was trained on"
    if removed and meta["kind"] == "hnsw":
        return "a graph index cannot remove vectors"
    return None


def _codec(factory: str) -> str:
    """The factory string without the list count, which follows the size (IVF1024 vs IVF2048)."""
    return "".join(c for c in factory if not c.isdigit()) if "IVF" in factory else factory


def _renumber_inverted_lists(ivf: faiss.IndexIVF, new_row: np.ndarray) -> None:
    """Rewrite the ids stored in every inverted list through `new_row` (old row -> new row)."""
    lists = ivf.invlists
    for list_no in range(ivf.nlist):
        size = lists.list_size(list_no)
        if size:
            stored = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
            stored[:] = new_row[stored]


def remove_rows(index: faiss.Index, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Remove index rows `rows`; the others keep their order and are renumbered 0..n-1.
    Returns the new row -> image_id array."""
    keep = np.ones(len(ids), dtype=bool)
    keep[rows] = False
    if not len(rows):
        return ids
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # the array map cannot remove
        removed = index.remove_ids(selector)
        _renumber_inverted_lists(ivf, np.cumsum(keep) - 1)
    else:
        removed = index.remove_ids(selector)  # a flat index compacts its rows itself
    if removed != len(rows):
        raise RuntimeError(f"faiss removed {removed} of {len(rows)} vectors")
    return ids[keep]


def update_index(index: faiss.Index, ids: np.ndarray, meta: dict, *, removed_ids: np.ndarray, added: Chunks,
                 collection: Chunks, n: int, target_recall: float = TARGET_RECALL, recall_queries: int = 1000,
                 on_progress: Callable[[str, int, int], None] | None = None) -> BuildResult | None:
    """The index with `removed_ids` taken out and the vectors `added()` yields put in.

    `collection()` yields the whole updated collection (`n` vectors), read only to re-measure
    recall for approximate indexes. Returns None if recall then stays below `target_recall`
    (the caller rebuilds)."""
    start = time.perf_counter()
    metric = meta["metric"]
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, removed_ids, sorter=order)
    rows = order[np.minimum(pos, len(ids) - 1)] if len(ids) else np.empty(0, np.int64)
    rows = rows[ids[rows] == removed_ids] if len(rows) else rows
    ids = remove_rows(index, ids, np.sort(rows))
    new_ids, read, to_add = [ids], 0, n - len(ids)
    for image_ids, vectors in added():
        if not len(image_ids):
            continue
        x = prepare(vectors, metric)
        if x.shape[1] != index.d:
            raise ValueError(f"vectors of dimension {x.shape[1]} for an index of dimension {index.d}")
        index.add(x)
        new_ids.append(np.asarray(image_ids, dtype=np.int64))
        read += len(x)
        if on_progress:
            on_progress("add", read, to_add)
    ids = np.concatenate(new_ids)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    if len(ids) != index.ntotal or len(ids) != n:
        raise RuntimeError(f"the update left {index.ntotal} vectors and {len(ids)} ids for {n} images")
    search_params, recall, queries = meta.get("search_params", {}), 1.0, 0
    if meta["kind"] != "flat":
        plan = IndexPlan(meta["kind"], meta["factory"], int(meta["dims"]), int(meta.get("pca_dims") or meta["dims"]),
                         int(meta.get("nlist") or 0))
        search_params, recall, queries = _remeasure(index, ids, plan, collection, n, metric, recall_queries,
                                                    target_recall, seed=int(meta.get("seed", 0)) + len(ids),
                                                    on_progress=on_progress)
        if recall < target_recall:
            return None
    updated = meta | {
        "vectors": int(n), "search_params": search_params, "recall_at_10": round(recall, 4),
        "recall_queries": int(queries or meta.get("recall_queries", 0)),
        "last_update": {"added": int(read), "removed": int(len(rows)),
                        "seconds": round(time.perf_counter() - start, 2)},
        "updates": int(meta.get("updates", 0)) + 1,
    }
    return BuildResult(index, ids, updated)


def _remeasure(index: faiss.Index, ids: np.ndarray, plan: IndexPlan, collection: Chunks, n: int, metric: str,
               recall_queries: int, target: float, *, seed: int,
               on_progress: Callable[[str, int, int], None] | None) -> tuple[dict, float, int]:
    """Retune the search breadth against exact search for a fresh sample of queries."""
    query_rows = _sample_rows(n, min(n, recall_queries), np.random.default_rng(seed))
    queries, order, offset = [], [], 0
    for image_ids, vectors in collection():
        local = query_rows[(query_rows >= offset) & (query_rows < offset + len(vectors))] - offset
        if len(local):
            queries.append(prepare(vectors[local], metric))
        order.append(np.asarray(image_ids, dtype=np.int64))
        offset += len(vectors)
        if on_progress:
            on_progress("sample", offset, n)
    queries, collection_ids = np.concatenate(queries), np.concatenate(order)
    exact, read = StreamingExactKnn(queries, min(RECALL_K, n), "l2"), 0
    for _, vectors in collection():
        exact.add(prepare(vectors, metric))
        read += len(vectors)
        if on_progress:
            on_progress("recall", read, n)
    _, truth = exact.result()
    by_id = np.argsort(collection_ids, kind="stable")  # index row -> collection row, through image ids
    truth_row = by_id[np.searchsorted(collection_ids, ids, sorter=by_id)]
    params, recall = _tune(index, plan, queries, truth, target, truth_row)
    return params, recall, len(queries)
