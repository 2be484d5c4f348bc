"""Feature-space neighbour search with FAISS: choose, build, open, query, measure recall.

The public surface is `build_index` (streamed build with measured recall), `update_index`
(retired vectors out, new ones in, recall re-measured; `why_rebuild` says when not) and
`NeighbourIndex` (open a built index and ask it for neighbours of ids or vectors).
"""

import faiss

from featscope.index.build import TARGET_RECALL, BuildResult, build_index, options_of, recall_shortfall
from featscope.index.factory import KINDS, METRICS, IndexPlan, choose_plan, parse_bytes
from featscope.index.recall import exact_knn, recall_at_k
from featscope.index.search import NeighbourIndex, Neighbours
from featscope.index.update import update_index, why_rebuild

# faiss 1.15 computes exact distances with BLAS only from nq x d >= 128,000 (a crossover
# measured at 20+ threads); at this project's 1-2 threads BLAS wins from about 800 per
# thread (faiss PR #5109): here a batch of 32 queries against 5,000 x 1280-d vectors
# takes 8.5 ms instead of 27, and 2,000 evaluation queries take a fraction of the time.
faiss.cvar.distance_compute_blas_threshold = 800 * faiss.omp_get_max_threads()

__all__ = [
    "BuildResult", "IndexPlan", "KINDS", "METRICS", "TARGET_RECALL", "NeighbourIndex", "Neighbours", "build_index", "choose_plan",
    "exact_knn", "options_of", "parse_bytes", "recall_at_k", "recall_shortfall", "update_index", "why_rebuild",
]
