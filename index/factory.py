"""Which FAISS index to build, decided like a careful engineer (after autofaiss's rules).

- Exact (`Flat`) while the collection is small (under 200k vectors) and fits the memory
  budget: no training, no tuning, recall 1.
- Beyond that an inverted file with about 4*sqrt(N) lists, its vectors stored as compactly
  as the budget needs, losing as little as it can, in this order: float32 (`IVF,Flat`);
  float16 (`IVF,SQfp16`: lossless here, features are stored as float16); 8 bits a
  dimension (`IVF,SQ8`); PCA to 256 dimensions at 8 bits (`PCA256,IVF,SQ8`: CNN features
  are far from isotropic, so PCA loses little on them, but it scrambles the near-ties of
  isotropic data, which is why the full dimension is kept while it fits); last, product
  quantisation to 64 bytes a vector (`PCA256,IVF,PQ64`).
- `hnsw` on request: a graph index, fast to query, slow to build, memory-hungry (PCA to 256
  first for wider vectors, since its build cost grows with the dimension).
How many lists to visit (nprobe) or how wide to search (efSearch) is tuned at build time
against exact search; see `build.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError

KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
METRICS = ("cosine", "l2")
EXACT_MAX_VECTORS = 200_000
PCA_DIMS = 256
PQ_BYTES = 64


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # flat | hnsw | ivf | ivfpq
    factory: str  # faiss.index_factory string
    dims: int  # input dimension
    reduced_dims: int  # after PCA (== dims without PCA)
    nlist: int = 0
    estimated_bytes: int = 0

    @property
    def trained(self) -> bool:
        return self.kind != "flat"


def parse_bytes(text: str | int) -> int:
    """'4GB', '512MiB', '1e9' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise FeatscopeError(f"cannot read memory size '{text}': use e.g. 4GB or 512MB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _nlist(n: int) -> int:
    """About 4*sqrt(n) lists (a power of two), but no more than n/39: k-means wants at least
    39 training points per centroid."""
    return max(16, min(2 ** round(math.log2(4 * math.sqrt(n))), 2 ** int(math.log2(max(n // 39, 1)))))


def choose_plan(n: int, dims: int, *, kind: str = "auto", max_memory: int = 4 << 30) -> IndexPlan:
    """An index plan for n vectors of `dims` dimensions within `max_memory` bytes; a plan
    that cannot be trained on n vectors is refused with the reason (faiss would stop with
    an assertion of its own)."""
    plan = _plan(n, dims, kind=kind, max_memory=max_memory)
    need, why = training_minimum(plan)
    if n < need:
        raise ParamError("kind", f"{plan.kind} ({plan.factory}) cannot be trained on {n} vectors: {why} needs at "
                                 f"least {need}; an exact index (<kind> flat) is the right one at this size"
                                 + ("" if kind != "auto" else ", within a larger <max_memory>"))
    return plan


def training_minimum(plan: IndexPlan) -> tuple[int, str]:
    """(the fewest vectors that train `plan`, what needs them): PCA to r dimensions needs r,
    k-means of an inverted file one a list, and 8-bit product quantisation 256 a sub-vector."""
    needs = [(0, "")]
    if plan.reduced_dims < plan.dims:
        needs.append((plan.reduced_dims, f"PCA to {plan.reduced_dims} dimensions"))
    if plan.nlist:
        needs.append((plan.nlist, f"k-means into {plan.nlist} lists"))
    if ",PQ" in plan.factory:
        needs.append((256, "product quantisation (256 centroids a sub-vector)"))
    return max(needs)


def _plan(n: int, dims: int, *, kind: str, max_memory: int) -> IndexPlan:
    if kind not in KINDS:
        raise ParamError("kind", f"must be one of {', '.join(KINDS)}, got '{kind}'")
    flat_bytes = n * dims * 4
    if kind == "flat" or (kind == "auto" and n < EXACT_MAX_VECTORS and flat_bytes <= max_memory):
        return IndexPlan("flat", "Flat", dims, dims, estimated_bytes=flat_bytes)
    reduced = min(dims, PCA_DIMS)
    pca = f"PCA{reduced}," if reduced < dims else ""
    if kind == "hnsw":
        return IndexPlan("hnsw", f"{pca}HNSW32", dims, reduced, estimated_bytes=n * (reduced * 4 + 32 * 2 * 4))
    nlist = _nlist(n)
    # (width, prefix, codec, bytes a dimension); `ivf` forces uncompressed vectors.
    steps = [(dims, "", "Flat", 4), (dims, "", "SQfp16", 2), (dims, "", "SQ8", 1), (reduced, pca, "SQ8", 1)]
    if kind == "ivf":
        steps = [(dims, "", "Flat", 4), (reduced, pca, "Flat", 4)]
    for width, prefix, codec, per_dim in steps if kind in ("auto", "ivf") else []:
        ivf_bytes = n * (width * per_dim + 8)
        if ivf_bytes <= max_memory:
            return IndexPlan("ivf", f"{prefix}IVF{nlist},{codec}", dims, width, nlist, ivf_bytes)
    if kind == "ivf":
        raise FeatscopeError(f"IVF,Flat over {n} vectors needs {_size(n * (reduced * 4 + 8))} even after "
                             "PCA; raise <max_memory> or use <kind> ivfpq")
    m = min(PQ_BYTES, reduced)
    while reduced % m:
        m -= 1
    bytes_ = n * (m + 8)
    if bytes_ > max_memory:
        raise ParamError("max_memory", f"is too small: {n} vectors need at least {_size(bytes_)} even "
                         "compressed")
    return IndexPlan("ivfpq", f"{pca}IVF{nlist},PQ{m}x8", dims, reduced, nlist, bytes_)


def _size(n_bytes: int) -> str:
    """A byte count as a budget is given (4GB, 512MB): a small run's need is not "0.0 GB"."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale / 10:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 1e3:.1f} KB"
