"""Feature-space neighbour search with FAISS: choose, build, open, query, measure recall.

The public surface is `build_index` (streamed build with measured recall), `update_index`
(retired vectors out, new ones in, recall re-measured; `why_rebuild` says when not) and
`NeighbourIndex` (open a built index and ask it for neighbours of ids or vectors).
"""

from featscope.index.build import BuildResult, build_index, options_of
from featscope.index.factory import KINDS, METRICS, IndexPlan, choose_plan, parse_bytes
from featscope.index.recall import exact_knn, recall_at_k
from featscope.index.search import NeighbourIndex, Neighbours
from featscope.index.update import update_index, why_rebuild

__all__ = [
    "BuildResult", "IndexPlan", "KINDS", "METRICS", "NeighbourIndex", "Neighbours", "build_index", "choose_plan",
    "exact_knn", "options_of", "parse_bytes", "recall_at_k", "update_index", "why_rebuild",
]
