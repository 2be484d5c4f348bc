"""Exact k-NN over a stream of vector chunks, and recall@k against it."""

from __future__ import annotations

import faiss
import numpy as np


class StreamingExactKnn:
    """Exact k nearest neighbours of fixed queries over vectors that arrive in chunks.

    Memory is O(queries x k) plus one chunk; distances are squared L2, or inner products
    for `metric="ip"` (larger is nearer). Row numbers count across chunks.
    """

    def __init__(self, queries: np.ndarray, k: int, metric: str = "l2"):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k, self.metric = k, metric
        self.heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
        self.offset = 0

    def add(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        k = min(self.k, len(chunk))
        if k == 0:
            return
        flat = faiss.IndexFlatIP(chunk.shape[1]) if self.metric == "ip" else faiss.IndexFlatL2(chunk.shape[1])
        flat.add(chunk)
        dist, rows = flat.search(self.queries, k)
        if k < self.k:  # pad so the heap sees k columns
            pad = ((0, 0), (0, self.k - k))
            fill = -np.inf if self.metric == "ip" else np.inf
            dist = np.pad(dist, pad, constant_values=fill)
            rows = np.pad(rows, pad, constant_values=-1)
        self.heap.add_result(dist, np.where(rows >= 0, rows + self.offset, -1))
        self.offset += len(chunk)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self.heap.finalize()
        return self.heap.D, self.heap.I


def exact_knn(database: np.ndarray, queries: np.ndarray, k: int, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    knn = StreamingExactKnn(queries, k, metric)
    knn.add(database)
    return knn.result()


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's true k nearest rows that the index returned in its top k."""
    found, truth = np.asarray(found)[:, :k], np.asarray(truth)[:, :k]
    hits = [len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, int((t >= 0).sum())) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 1.0
