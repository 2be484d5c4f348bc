"""A run's neighbour indexes, opened for queries: the one place query, sheets, report and
the query service get an index and its neighbours from.

`neighbours_of` follows one convention everywhere: the query image itself is left out
unless asked for, and each row has exactly k entries (padded with -1 where the index holds
fewer images).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from featscope.index import NeighbourIndex, Neighbours
from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import RunIdentity


def open_index(rd: RunDir, layer: str, *, mmap: bool = False) -> NeighbourIndex:
    """The layer's index, refused if it was built from another model, weights or
    preprocessing, or if it still holds images the manifest has retired since (its answers
    would name images that are gone)."""
    directory = rd.index_dir(layer)
    if not rd.index_meta(layer).exists():
        raise FeatscopeError(f"index for layer '{layer}' not found in {rd.root}: run "
                             f"`featscope index build --run {rd.root} --layer {layer}` first")
    index = NeighbourIndex.load(directory, mmap=mmap)
    identity = RunIdentity.of_run(rd.read_config())
    for key, want in asdict(identity).items():
        if index.meta.get(key) != want:
            raise FeatscopeError(f"the index of '{layer}' was built for another {key} than run {rd.root} has; "
                                 f"rebuild it with `featscope index build --run {rd.root} --layer {layer}`")
    live = manifest.read(rd).column("image_id").to_numpy()
    retired = int(np.isin(index.ids, live, invert=True).sum())
    if retired:
        raise FeatscopeError(f"the index of '{layer}' still holds {retired} images retired from run {rd.root} "
                             f"since it was built: update it with `featscope index build --run {rd.root} "
                             f"--layer {layer}`")
    return index


def neighbours_of(index: NeighbourIndex, image_ids, k: int, *, exclude_self: bool = True) -> Neighbours:
    """The k nearest images of each image id in `index`; without the image itself unless
    `exclude_self` is False."""
    image_ids = np.atleast_1d(np.asarray(image_ids, dtype=np.int64))
    found = index.search_ids(image_ids, k=k + 1 if exclude_self else k)
    if not exclude_self:
        return found
    ids = np.full((len(image_ids), k), -1, dtype=np.int64)
    dist = np.full((len(image_ids), k), np.inf, dtype=np.float32)
    for row, query in enumerate(image_ids):
        keep = (found.image_ids[row] >= 0) & (found.image_ids[row] != query)
        kept_ids, kept_d = found.image_ids[row][keep][:k], found.distances[row][keep][:k]
        ids[row, :len(kept_ids)], dist[row, :len(kept_d)] = kept_ids, kept_d
    return Neighbours(ids, dist)


def image_rows(rd: RunDir) -> dict[int, dict]:
    """image_id -> its manifest row (removed images too, so old ids still resolve)."""
    return {r["image_id"]: r for r in manifest.read(rd, include_removed=True).to_pylist()}
