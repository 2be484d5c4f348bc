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
    """An index plan for n vectors of `dims` dimensions within `max_memory` bytes."""
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
        raise FeatscopeError(f"IVF,Flat over {n} vectors needs {n * (reduced * 4 + 8) / 1e9:.1f} GB even after "
                             "PCA; raise <max_memory> or use <kind> ivfpq")
    m = min(PQ_BYTES, reduced)
    while reduced % m:
        m -= 1
    bytes_ = n * (m + 8)
    if bytes_ > max_memory:
        raise ParamError("max_memory", f"is too small: {n} vectors need at least {bytes_ / 1e9:.1f} GB even "
                         "compressed")
    return IndexPlan("ivfpq", f"{pca}IVF{nlist},PQ{m}x8", dims, reduced, nlist, bytes_)
