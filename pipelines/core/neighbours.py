"""A run's neighbour indexes, opened for queries: the one place query, sheets, report and
the query service get an index and its neighbours from.

`neighbours_of` follows one convention everywhere: the query image itself is left out
unless asked for, and each row has exactly k entries (padded with -1 where the index holds
fewer images).
"""

from __future__ import annotations

from dataclasses import asdict

import faiss
import numpy as np
import pyarrow.parquet as pq

from featscope.index import NeighbourIndex, Neighbours
from featscope.index.search import IDS_FILE
from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import RunIdentity, parts_written_again
from featscope.pipelines.core.text import plural


def open_index(rd: RunDir, layer: str, *, mmap: bool = False, live: np.ndarray | None = None,
               identity: RunIdentity | None = None) -> NeighbourIndex:
    """The layer's index, refused if it was built from another model, weights or
    preprocessing, or if it still holds images the manifest has retired since (its answers
    would name images that are gone). `live` and `identity`: the manifest's live image ids
    and run.json's identity, if already read."""
    if not rd.index_meta(layer).exists():
        raise FeatscopeError(f"index for layer '{layer}' not found in {rd.root}: run "
                             f"`featscope index build --run {rd.root} --layer {layer}` first")
    index = NeighbourIndex.load(rd.index_dir(layer), mmap=mmap)
    check_current(rd, layer, index, live, identity)
    return index


def check_current(rd: RunDir, layer: str, index: NeighbourIndex, live: np.ndarray | None = None,
                  identity: RunIdentity | None = None) -> None:
    """`open_index`'s refusals for an index already open: built for another model, weights or
    preprocessing than run.json records (`identity`), or holding images retired from the
    manifest (whose live image ids are `live`); each read here if not given."""
    identity = RunIdentity.of_run(rd.read_config()) if identity is None else identity
    for key, want in asdict(identity).items():
        if index.meta.get(key) != want:
            raise FeatscopeError(f"the index of '{layer}' was built for another {key} than run {rd.root} has; "
                                 f"rebuild it with `featscope index build --run {rd.root} --layer {layer}`")
    live = manifest.read(rd).column("image_id").to_numpy() if live is None else live
    retired = int(np.isin(index.ids, live, invert=True).sum())
    if retired:
        raise FeatscopeError(f"the index of '{layer}' still holds {plural(retired, 'image')} retired from run "
                             f"{rd.root} since it was built: update it with `featscope index build --run {rd.root} "
                             f"--layer {layer}`")


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


TIE = 1e-4  # stored distances may be rounded to 4 decimals: a new image this close to the k-th may enter


def list_identity(index: NeighbourIndex) -> dict:
    """What stored neighbour lists were computed with: the same kind, metric and vectors'
    model keep them valid (updates included), as long as no image's vector changed since
    (`vectors_version`: new with each build, and with an update that took a feature part
    written again)."""
    m = index.meta
    return {"kind": m.get("kind"), "metric": m.get("metric"), "dims": m.get("dims"),
            "weights_sha256": m.get("weights_sha256"), "preprocessing": m.get("preprocessing"),
            "vectors_version": m.get("vectors_version")}


def _distances(metric: str, squared_l2: np.ndarray) -> np.ndarray:
    """Squared L2 between prepared vectors -> the distances the index reports."""
    d = np.maximum(squared_l2, 0.0)
    return d / 2.0 if metric == "cosine" else np.sqrt(d)


def lists_to_redo(index: NeighbourIndex, old: dict[int, list], queries: np.ndarray, k: int,
                  added: np.ndarray) -> np.ndarray:
    """The queries whose k-nearest lists ([[id, distance], ...], `neighbours_of`'s) must be
    computed, when `old` lists were computed on this exact (flat) index before the images
    `added` entered it: a list can change only if one of its neighbours was retired, or an
    added image is at least as near as its k-th neighbour. Queries without an old list are
    computed too. Searching the old queries against the few added images is all it costs."""
    have = np.array(sorted(i for i in old if i in index), dtype=np.int64)
    have = have[np.isin(have, queries)]
    missing = queries[~np.isin(queries, have)]
    live = set(index.ids.tolist())
    want = min(k, len(index) - 1)
    stale = [i for i in have.tolist() if len(old[i]) != want or any(n not in live for n, _ in old[i])]
    affected = []
    added = np.asarray(added, dtype=np.int64)
    if len(added) and len(have):
        fresh = faiss.IndexFlatL2(index.dims)
        fresh.add(np.ascontiguousarray(index.vectors_of(added), dtype=np.float32))
        for start in range(0, len(have), 8192):
            chunk = have[start:start + 8192]
            squared, _ = fresh.search(np.ascontiguousarray(index.vectors_of(chunk), dtype=np.float32), 1)
            nearest_added = _distances(index.meta["metric"], squared[:, 0])
            kth = np.array([old[i][-1][1] if old[i] else np.inf for i in chunk.tolist()])
            affected.append(chunk[nearest_added <= kth + TIE])
    return np.unique(np.concatenate([missing, np.asarray(stale, dtype=np.int64), *affected]))


def image_rows(rd: RunDir) -> dict[int, dict]:
    """image_id -> its manifest row (removed images too, so old ids still resolve)."""
    return {r["image_id"]: r for r in manifest.read(rd, include_removed=True).to_pylist()}


def rewritten_note(rd: RunDir, layer: str, meta: dict) -> str:
    """What answers from an index lack while shards it holds were extracted again since it was
    built (their images' vectors may have changed; `featscope index build` takes the new
    ones), or ""."""
    again = parts_written_again(rd.features_dir(layer), meta.get("feature_parts"))
    if not again:
        return ""
    return (f"the '{layer}' index holds the vectors of {plural(len(again), 'shard')} as they were before "
            f"{'it was' if len(again) == 1 else 'they were'} extracted again ({', '.join(map(str, again[:5]))}"
            f"{', ...' if len(again) > 5 else ''}): update it with `featscope index build --run {rd.root} --layer "
            f"{layer}`")


def unindexed_note(rd: RunDir, layer: str, indexed: np.ndarray, live: np.ndarray | None = None) -> str:
    """What answers from an index holding `indexed` lack while live images added since it was
    built are not in it yet (`live`: the live ids with features, if read already), or ""."""
    if live is None:
        live = np.setdiff1d(manifest.read(rd).column("image_id").to_numpy(), manifest.featureless(rd))
    unindexed = int(np.isin(live, indexed, invert=True).sum())
    return (f"{plural(unindexed, 'live image')} of the run not in the '{layer}' index yet (added since it was last "
            f"updated), which no answer names: update it with `featscope index build --run {rd.root} --layer "
            f"{layer}`" if unindexed else "")


def indexed_ids(rd: RunDir, layer: str) -> np.ndarray:
    """The image ids the layer's index holds, from its id table alone (the index unopened)."""
    return pq.read_table(rd.index_dir(layer) / IDS_FILE, columns=["image_id"])["image_id"].to_numpy()


def not_in_index(rd: RunDir, layer: str, image_id: int) -> FeatscopeError:
    """The error for a live image that the layer's index does not hold yet."""
    return FeatscopeError(f"image {image_id} is not in the '{layer}' index yet (added since it was last updated): "
                          f"update it with `featscope index build --run {rd.root} --layer {layer}`")
