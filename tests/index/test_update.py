"""Index updates: retired vectors out, new ones in, without retraining; exact indexes answer
as a fresh build does, approximate ones keep their recall target, and an update that would
leave the index outside its plan is refused with the reason."""

import numpy as np
import pytest
from helpers import as_chunks, clustered

from featscope.index import NeighbourIndex, build_index, options_of, recall_at_k, update_index, why_rebuild
from featscope.index.recall import exact_knn


def changed_collection(x, n_old, removed, rng):
    """ids 0..len(x)-1: the first n_old indexed before; `removed` of them retired; the rest new."""
    gone = np.sort(rng.choice(n_old, removed, replace=False))
    live = np.setdiff1d(np.arange(len(x)), gone)
    return gone, live


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_an_updated_exact_index_answers_as_a_fresh_build(metric):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1300, 24)).astype(np.float32)  # no near-ties: neighbour lists are unique
    old = build_index(as_chunks(x[:1000], np.arange(1000)), n=1000, dims=24, kind="flat", metric=metric)
    gone, live = changed_collection(x, 1000, 60, rng)
    new = np.arange(1000, 1300)
    updated = update_index(old.index, old.ids, old.meta, removed_ids=gone, added=as_chunks(x[new], new),
                           collection=as_chunks(x[live], live), n=len(live))
    fresh = build_index(as_chunks(x[live], live), n=len(live), dims=24, kind="flat", metric=metric)
    a, b = NeighbourIndex.from_build(updated), NeighbourIndex.from_build(fresh)
    assert sorted(a.ids) == sorted(live) and len(a) == len(live)
    got, want = a.search_ids(live, k=10), b.search_ids(live, k=10)
    np.testing.assert_array_equal(got.image_ids, want.image_ids)
    np.testing.assert_allclose(got.distances, want.distances, atol=1e-5)
    assert updated.meta["last_update"]["added"] == 300 and updated.meta["last_update"]["removed"] == 60
    assert updated.meta["trained_vectors"] == 1000 and updated.meta["recall_at_10"] == 1.0


def test_an_updated_inverted_file_keeps_its_training_and_its_recall_target():
    """(Every IVF codec, PQ included, removes and renumbers the same way; PQ training is slow.)"""
    x = clustered(9000, 16)
    old = build_index(as_chunks(x[:6000], np.arange(6000), size=1000), n=6000, dims=16, kind="ivf", metric="l2")
    centroids = old.index.quantizer.reconstruct_n(0, old.index.nlist).copy()
    gone, live = changed_collection(x, 6000, 600, np.random.default_rng(2))
    new = np.arange(6000, 9000)
    updated = update_index(old.index, old.ids, old.meta, removed_ids=gone, added=as_chunks(x[new], new),
                           collection=as_chunks(x[live], live, size=1000), n=len(live))
    assert updated is not None and "IVF" in updated.meta["factory"]
    np.testing.assert_array_equal(updated.index.quantizer.reconstruct_n(0, updated.index.nlist), centroids)
    assert updated.meta["recall_at_10"] >= 0.95
    ix = NeighbourIndex.from_build(updated)
    assert sorted(ix.ids) == sorted(live)
    # an independent check on held-out queries, against brute force over the live vectors
    queries = clustered(300, 16, seed=5)
    _, truth = exact_knn(x[live], queries, 10)
    found = ix.search_vectors(queries, k=10).image_ids
    rows = np.searchsorted(live, found)
    assert recall_at_k(rows, truth, 10) >= 0.9
    # every stored vector is still reachable by its id (the renumbered direct map)
    sample = live[::97]
    assert (ix.search_ids(sample, k=1).image_ids[:, 0] == sample).mean() >= 0.95


def test_updates_outside_the_plan_are_refused_with_the_reason():
    meta = {"options": options_of("auto", "cosine", 4 << 30, 0), "kind": "ivf", "factory": "IVF256,Flat",
            "dims": 64, "vectors": 300_000, "trained_vectors": 300_000}
    same = options_of("auto", "cosine", 4 << 30, 0)
    assert why_rebuild(meta, n=310_000, removed=10, options=same) is None
    assert "2x" in why_rebuild(meta, n=700_000, removed=0, options=same)
    assert "options" in why_rebuild(meta, n=300_000, removed=0, options=options_of("auto", "l2", 4 << 30, 0))
    assert "Flat" in why_rebuild(meta, n=1000, removed=0, options=same)  # back in the exact range
    graph = meta | {"kind": "hnsw", "factory": "HNSW32", "options": options_of("hnsw", "cosine", 4 << 30, 0)}
    assert "graph" in why_rebuild(graph, n=300_000, removed=5, options=options_of("hnsw", "cosine", 4 << 30, 0))
    assert why_rebuild({"kind": "flat", "factory": "Flat", "dims": 8, "vectors": 10}, n=10, removed=0,
                       options=same) == "the build options changed"  # an index from before updates
