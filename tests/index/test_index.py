"""FAISS indexes: exact search equals brute force, recall is measured right, files round-trip."""

import json
import os
import time

import faiss
import numpy as np
import pytest
from helpers import as_chunks, clustered

from featscope.index import NeighbourIndex, build_index, choose_plan, parse_bytes, recall_at_k, search
from featscope.index.build import _without_polysemous_training
from featscope.index.recall import exact_knn
from featscope.index.search import SCAN_MAX_QUERIES, scan_pays
from featscope.kernels.errors import FeatscopeError


def brute_force(x, q, k, metric):
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        d = 1 - qn @ xn.T
    else:
        d = np.sqrt(((q[:, None, :] - x[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, 1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_search_equals_brute_force_numpy(metric):
    x = clustered(1000, 16)
    ids = np.arange(1000) * 3 + 7  # image ids are not row numbers
    ix = NeighbourIndex.from_build(build_index(as_chunks(x, ids), n=1000, dims=16, kind="flat", metric=metric))
    q = clustered(25, 16, seed=1)
    found = ix.search_vectors(q, k=5)
    rows, dist = brute_force(x, q, 5, metric)
    np.testing.assert_array_equal(found.image_ids, ids[rows])
    np.testing.assert_allclose(found.distances, dist, rtol=1e-4, atol=1e-4)


class _NoFaissSearch:
    """An index whose FAISS search fails: what answers must be the scan."""

    def __init__(self, index):
        self.index = index

    def search(self, *args):
        raise AssertionError("FAISS searched a batch the scan should have")

    def __getattr__(self, name):
        return getattr(self.index, name)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_batch_scanned_in_one_pass_equals_brute_force_and_other_batches_stay_with_faiss(tmp_path, metric):
    x = clustered(3000, 24)
    ids = np.arange(3000) * 5 + 2
    NeighbourIndex.from_build(build_index(as_chunks(x, ids), n=3000, dims=24, kind="flat", metric=metric)).save(
        tmp_path / "flat")
    ix = NeighbourIndex.load(tmp_path / "flat", mmap=True)  # as the query service opens it
    faiss_index = ix.index
    ix.scan_batches_at_once()
    ix._scan_from = 2  # every batch the scan may take (where it starts to pay is measured: below)
    q = clustered(SCAN_MAX_QUERIES + 1, 24, seed=3)
    ix.index = _NoFaissSearch(faiss_index)
    found = ix.search_vectors(q[:SCAN_MAX_QUERIES], k=7)
    rows, dist = brute_force(x.astype(np.float64), q[:SCAN_MAX_QUERIES].astype(np.float64), 7, metric)
    np.testing.assert_array_equal(found.image_ids, ids[rows])
    np.testing.assert_allclose(found.distances, dist, rtol=1e-4, atol=1e-4)
    # by id (each image its own first neighbour), and k past the index's size
    np.testing.assert_array_equal(ix.search_ids(ids[[10, 20]], k=4).image_ids[:, 0], ids[[10, 20]])
    assert ix.search_vectors(q[:2], k=5000).image_ids.shape == (2, 3000)
    # one query, and a batch past SCAN_MAX_QUERIES, go to FAISS as before, with the same answers
    ix.index = faiss_index
    everything = ix.search_vectors(q, k=7)
    np.testing.assert_array_equal(everything.image_ids[:SCAN_MAX_QUERIES], found.image_ids)
    np.testing.assert_array_equal(ix.search_vectors(q[:1], k=7).image_ids, found.image_ids[:1])


class _Counted:
    """A FAISS index that counts its searches by size, each taking `delay` seconds more."""

    def __init__(self, index, delay: float = 0.0):
        self.index, self.delay, self.sizes = index, delay, []

    def search(self, queries, k):
        self.sizes.append(len(queries))
        time.sleep(self.delay)
        return self.index.search(queries, k)

    def __getattr__(self, name):
        return getattr(self.index, name)


def test_batches_below_where_the_scan_pays_go_a_query_at_a_time_with_the_same_answers(tmp_path):
    """Where the scan does not pay for small batches (torch's small matrix products on an AMD
    EPYC cost 4.9 FAISS single-query passes for 2 queries), they go to FAISS one query at a
    time, not as one FAISS batch (which goes through BLAS at several passes' cost)."""
    x = clustered(3000, 24)
    ids = np.arange(3000) * 5 + 2
    ix = NeighbourIndex.from_build(build_index(as_chunks(x, ids), n=3000, dims=24, kind="flat", metric="cosine"))
    ix.scan_batches_at_once()
    q = clustered(SCAN_MAX_QUERIES + 2, 24, seed=3)
    rows, _ = brute_force(x, q, 6, "cosine")
    for scan_from in (2, 5, SCAN_MAX_QUERIES + 1):
        ix._scan_from, ix.index = scan_from, _Counted(ix.index)
        for size in range(1, SCAN_MAX_QUERIES + 3):
            np.testing.assert_array_equal(ix.search_vectors(q[:size], k=6).image_ids, ids[rows[:size]])
        ix.index, counted = ix.index.index, ix.index.sizes
        alone = [size for size in range(1, SCAN_MAX_QUERIES + 3) if size < scan_from]
        beyond = [SCAN_MAX_QUERIES + 1, SCAN_MAX_QUERIES + 2]  # past the scan's batches: FAISS's own
        assert counted == [1] + [1] * sum(alone[1:]) + beyond, scan_from


def test_where_the_scan_starts_to_pay_is_measured(monkeypatch):
    """A scan slower than a pass per query is never used; one faster is used from batches of 2."""
    x = clustered(3000, 24)
    ix = NeighbourIndex.from_build(build_index(as_chunks(x, np.arange(3000)), n=3000, dims=24, kind="flat"))
    scan = NeighbourIndex._scan

    def slow_scan(self, *args):
        time.sleep(0.02)
        return scan(self, *args)

    monkeypatch.setattr(search, "_SCAN_FROM", {})  # measured anew, not the answer for another index of this size
    with monkeypatch.context() as m:
        m.setattr(NeighbourIndex, "_scan", slow_scan)
        assert not ix.scan_batches_at_once() and ix._scan_from == SCAN_MAX_QUERIES + 1
    ix.index = _Counted(ix.index, delay=0.02)  # now each FAISS search is the slow one
    assert ix._measure_scan_from() == 2
    again = NeighbourIndex.from_build(build_index(as_chunks(x[:2500], np.arange(2500)), n=2500, dims=24, kind="flat"))
    assert not again.scan_batches_at_once()  # the same size within 2x: the answer measured above, not measured again
    assert scan_pays(one_query=1.0, scan=1.9, size=2) and not scan_pays(one_query=1.0, scan=2.1, size=2)


def test_an_approximate_index_is_not_scanned():
    x = clustered(3000, 16)
    ix = NeighbourIndex.from_build(build_index(as_chunks(x, np.arange(3000)), n=3000, dims=16, kind="hnsw"))
    assert not ix.scan_batches_at_once()
    assert ix._scan_vectors is None


def test_auto_on_a_small_collection_is_exact():
    x = clustered(500, 8)
    result = build_index(as_chunks(x, np.arange(500)), n=500, dims=8)
    assert result.meta["kind"] == "flat" and result.meta["recall_at_10"] == 1.0


def test_recall_at_k_on_known_answers():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(truth, truth, k=4) == 1.0
    assert recall_at_k(np.array([[4, 3, 9, 9], [5, 0, 0, 0]]), truth, k=4) == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert recall_at_k(np.array([[1, 9], [9, 9]]), truth[:, :2], k=2) == pytest.approx(0.25)


def test_streamed_exact_knn_equals_one_shot():
    x, q = clustered(900, 12), clustered(30, 12, seed=2)
    from featscope.index.recall import StreamingExactKnn

    knn = StreamingExactKnn(q, 7)
    for i in range(0, 900, 250):
        knn.add(x[i:i + 250])
    d_stream, i_stream = knn.result()
    d_once, i_once = exact_knn(x, q, 7)
    np.testing.assert_array_equal(i_stream, i_once)
    np.testing.assert_allclose(d_stream, d_once, rtol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq"])
def test_approximate_indexes_reach_their_measured_recall_on_held_out_queries(kind):
    x = clustered(8000, 32, clusters=40)
    result = build_index(as_chunks(x, np.arange(8000), size=1000), n=8000, dims=32, kind=kind, metric="l2")
    ix = NeighbourIndex.from_build(result)
    q = clustered(200, 32, clusters=40, seed=0)[:200] + np.random.default_rng(5).normal(size=(200, 32)) * 0.1
    truth, _ = brute_force(x, q.astype(np.float32), 10, "l2")
    measured = recall_at_k(ix.search_vectors(q, 10).image_ids, truth, 10)
    assert result.meta["recall_at_10"] >= 0.95 and measured >= 0.85
    assert result.meta["search_params"]  # nprobe / efSearch was tuned


def test_ivfpq_skips_faiss_centroid_reordering_which_changes_no_neighbour_or_distance():
    """faiss's default polysemous training reorders each sub-quantiser's centroids (seconds
    per sub-quantiser); featscope's build skips it and finds the same neighbours at the same
    distances."""
    x = clustered(2000, 4, clusters=10)
    q = x[:40] + np.random.default_rng(3).normal(size=(40, 4)).astype(np.float32) * 0.1
    found, centroids = [], []
    for index in (faiss.index_factory(4, "IVF8,PQ2x8"),
                  _without_polysemous_training(faiss.index_factory(4, "IVF8,PQ2x8"))):
        index.train(x)
        index.add(x)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.nprobe = 8
        found.append(index.search(q, 10))
        centroids.append(faiss.vector_to_array(ivf.pq.centroids).reshape(2, 256, 2))
    assert not np.array_equal(*centroids)  # faiss's default did reorder them
    assert all(np.array_equal(np.sort(a, axis=0), np.sort(b, axis=0)) for a, b in zip(*centroids))
    np.testing.assert_array_equal(found[0][0], found[1][0])
    np.testing.assert_array_equal(found[0][1], found[1][1])


@pytest.mark.parametrize("budget, codec", [(600_000, "SQfp16"), (330_000, "SQ8")])
def test_a_tight_budget_compresses_vectors_but_keeps_their_dimension_and_recall(tmp_path, budget, codec):
    # Isotropic clusters, the case where PCA would lose the ranking: scalar codes keep it.
    x = clustered(8000, 32, clusters=40)
    ids = np.arange(8000) + 7
    result = build_index(as_chunks(x, ids, size=1000), n=8000, dims=32, metric="cosine", max_memory=budget)
    assert result.meta["factory"] == f"IVF128,{codec}" and result.meta["pca_dims"] is None  # 128 <= 8000/39
    assert result.meta["estimated_bytes"] <= budget and result.index.ntotal == 8000
    q = x[:300] + np.random.default_rng(1).normal(size=(300, 32)).astype(np.float32) * 0.1
    truth, _ = brute_force(x, q, 10, "cosine")
    ix = NeighbourIndex.from_build(result)
    assert result.meta["recall_at_10"] >= 0.95 and recall_at_k(ix.search_vectors(q, 10).image_ids, ids[truth], 10) >= 0.9
    ix.save(tmp_path / "ix")
    again = NeighbourIndex.load(tmp_path / "ix", mmap=True)
    assert again.search_ids([7, 8006], k=1).image_ids[:, 0].tolist() == [7, 8006]


@pytest.mark.parametrize("dims, budget", [(300, 4000 * (300 * 4 + 8) - 1), (40, 4000 * (40 + 8))])
def test_inverted_files_filled_in_two_passes_equal_faiss_own_add(dims, budget):
    # PCA256,IVF,Flat (vectors over the budget at full dimension) and IVF,SQ8 (a tight budget).
    x = clustered(4000, dims, clusters=30)
    progress = []
    result = build_index(as_chunks(x, np.arange(4000) + 5, size=700), n=4000, dims=dims, metric="l2",
                         kind="ivf" if dims == 300 else "auto", max_memory=budget,
                         on_progress=lambda step, done, total: progress.append((step, done, total)))
    assert result.meta["factory"] in ("PCA256,IVF64,Flat", "IVF64,SQ8")
    # three passes, each counting the vectors from 0 to n
    assert [p[0] for p in progress if p[1] == 4000] == ["sample", "assign", "encode"]
    assert all(b[1] > a[1] for a, b in zip(progress, progress[1:]) if a[0] == b[0]) and {p[2] for p in progress} == {4000}
    reference = faiss.clone_index(result.index)  # the same training, filled by faiss's own add
    reference.reset()
    reference.add(x)
    q = x[::40] + 0.05
    ours, theirs = result.index.search(q, 10), reference.search(q, 10)
    np.testing.assert_array_equal(ours[1], theirs[1])
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
    ivf = faiss.extract_index_ivf(result.index)
    assert sum(ivf.invlists.list_size(i) for i in range(ivf.nlist)) == 4000 == result.index.ntotal


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_saved_index_round_trips_including_memory_mapped(tmp_path, kind):
    x = clustered(3000, 24)
    ids = np.arange(3000) + 1000
    ix = NeighbourIndex.from_build(build_index(as_chunks(x, ids), n=3000, dims=24, kind=kind, metric="cosine"))
    ix.save(tmp_path / "ix", extra_meta={"layer": "fc7"})
    q = clustered(10, 24, seed=3)
    before = ix.search_vectors(q, 6)
    for mmap in (False, True):
        again = NeighbourIndex.load(tmp_path / "ix", mmap=mmap)
        after = again.search_vectors(q, 6)
        np.testing.assert_array_equal(before.image_ids, after.image_ids)
        np.testing.assert_allclose(before.distances, after.distances, rtol=1e-5)
        assert again.meta["layer"] == "fc7"
    own = NeighbourIndex.load(tmp_path / "ix").search_ids([1000, 3999], k=1).image_ids[:, 0]
    assert own.tolist() == [1000, 3999]


def test_bad_queries_are_one_line_errors(tmp_path):
    x = clustered(100, 8)
    ix = NeighbourIndex.from_build(build_index(as_chunks(x, np.arange(100)), n=100, dims=8))
    with pytest.raises(FeatscopeError, match="dimension 5, the index expects 8"):
        ix.search_vectors(np.zeros((1, 5)), 3)
    with pytest.raises(FeatscopeError, match="image_id 4242 is not in this index"):
        ix.search_ids([4242])
    with pytest.raises(FeatscopeError, match="no index in .*: it has no meta.json"):
        NeighbourIndex.load(tmp_path / "index" / "fc7")


def test_an_index_whose_files_do_not_belong_together_is_refused(tmp_path):
    """A crash between two renames, a file of another layer copied in, or a damaged file:
    each is refused when loaded, never answered from."""
    small = NeighbourIndex.from_build(build_index(as_chunks(clustered(100, 8), np.arange(100)), n=100, dims=8))
    large = NeighbourIndex.from_build(build_index(as_chunks(clustered(300, 8, seed=1), np.arange(300)), n=300, dims=8))
    small.save(tmp_path / "a")
    large.save(tmp_path / "b")
    assert len(NeighbourIndex.load(tmp_path / "a")) == 100
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("ids.parquet", "meta.json"):
        (mixed / name).write_bytes((tmp_path / "a" / name).read_bytes())
    (mixed / "index.faiss").write_bytes((tmp_path / "b" / "index.faiss").read_bytes())  # another build's
    with pytest.raises(FeatscopeError, match="index.faiss is not the file its meta.json describes"):
        NeighbourIndex.load(mixed)
    data = bytearray((tmp_path / "a" / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the vectors
    (tmp_path / "a" / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(FeatscopeError, match="changed or damaged since the build"):
        NeighbourIndex.load(tmp_path / "a")
    # an index saved before checksums were recorded is still checked by its counts
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.faiss").write_bytes((tmp_path / "b" / "index.faiss").read_bytes())
    (old / "ids.parquet").write_bytes((tmp_path / "b" / "ids.parquet").read_bytes())
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    del meta["files"]
    (old / "meta.json").write_text(json.dumps(meta | {"vectors": 100}))
    with pytest.raises(FeatscopeError, match="do not belong together .index.faiss 300 vectors, ids.parquet 300"):
        NeighbourIndex.load(old)


def test_plans_follow_size_and_memory():
    assert choose_plan(150_000, 1280).factory == "Flat"
    assert choose_plan(300_000, 1280).factory == "IVF2048,Flat"  # 1.5 GB fits the default 4 GB
    # 1M x 1,280: float32 (4.9 GB) does not fit 4 GB, float16 (2.6 GB) does, at full dimension.
    assert choose_plan(1_000_000, 1280).factory == "IVF4096,SQfp16"
    assert choose_plan(1_000_000, 1280, max_memory=parse_bytes("2GB")).factory == "IVF4096,SQ8"
    assert choose_plan(10_000_000, 1280).factory == "PCA256,IVF16384,SQ8"
    assert choose_plan(1_000_000, 1280, kind="ivf").factory == "PCA256,IVF4096,Flat"
    tight = choose_plan(10_000_000, 1280, max_memory=parse_bytes("2GB"))
    assert tight.kind == "ivfpq" and tight.estimated_bytes <= parse_bytes("2GB")
    for n in (300_000, 10**6, 10**7):
        for budget in (1 << 30, 4 << 30):
            assert choose_plan(n, 1280, max_memory=budget).estimated_bytes <= budget
    assert parse_bytes("512MB") == 512 << 20 and parse_bytes("1.5GiB") == int(1.5 * (1 << 30))
    with pytest.raises(FeatscopeError):
        parse_bytes("lots")


@pytest.mark.parametrize("kind, n, dims, factory, need", [
    ("hnsw", 255, 512, "PCA256,HNSW32", 256),  # PCA to 256 dimensions: as many vectors
    ("ivfpq", 255, 512, "PCA256,IVF16,PQ64x8", 256),  # 256 centroids a sub-vector
    ("ivf", 15, 64, "IVF16,Flat", 16),  # a vector a list
])
def test_a_plan_too_few_vectors_train_is_refused_with_the_reason_and_one_more_builds(kind, n, dims, factory, need):
    """faiss stopped these builds with an assertion (a traceback to the user); the plan now
    says what needs more vectors, and one vector more is enough."""
    with pytest.raises(FeatscopeError, match=rf"\({factory}\) cannot be trained on {n} vectors: .* at least {need}"):
        choose_plan(n, dims, kind=kind)
    x = clustered(n + 1, dims, seed=3)
    result = build_index(as_chunks(x, np.arange(n + 1)), n=n + 1, dims=dims, kind=kind)
    assert result.meta["factory"] == factory and result.meta["vectors"] == n + 1
    assert choose_plan(n, 256, kind="hnsw").factory == "HNSW32"  # no PCA: any number of vectors


@pytest.mark.parametrize("stop_after", range(1, 8))
def test_a_save_stopped_at_any_step_leaves_the_old_index_or_the_new_one(tmp_path, monkeypatch, stop_after):
    """Fault injection: the writer stops after step i of `save` (not by timing: a hook), and a
    reader then opens a complete index, the old one or the new one, never a mix."""
    from featscope.index import search

    old = NeighbourIndex.from_build(build_index(as_chunks(clustered(100, 8), np.arange(100)), n=100, dims=8))
    new = NeighbourIndex.from_build(build_index(as_chunks(clustered(300, 8, seed=1), np.arange(300) + 1000),
                                                n=300, dims=8))
    old.save(tmp_path / "pool")

    def stop(step):
        if step == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(search, "_STEP_HOOK", stop)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "pool")
    monkeypatch.setattr(search, "_STEP_HOOK", None)
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    if stop_after < 7:  # stopped before the switch (Ctrl-C, SIGTERM): no version of its own left behind
        assert hidden == [os.readlink(tmp_path / "pool")], hidden
    seen = NeighbourIndex.load(tmp_path / "pool")
    assert seen.ids.tolist() in (old.ids.tolist(), new.ids.tolist())
    assert len(seen) == len(seen.ids) == seen.meta["vectors"]
    assert seen.search_ids([seen.ids[0]], k=1).image_ids[0, 0] == seen.ids[0]
    new.save(tmp_path / "pool")  # the rerun completes it
    assert NeighbourIndex.load(tmp_path / "pool").ids.tolist() == new.ids.tolist()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["pool"]


def test_an_index_saved_before_versions_is_replaced_in_place(tmp_path):
    ix = NeighbourIndex.from_build(build_index(as_chunks(clustered(100, 8), np.arange(100)), n=100, dims=8))
    legacy = tmp_path / "pool"
    legacy.mkdir()  # a plain folder, as featscope wrote indexes before
    import faiss as _faiss
    _faiss.write_index(ix.index, str(legacy / "index.faiss"))
    ix.save(tmp_path / "tmp-copy")
    for name in ("ids.parquet", "meta.json"):
        (legacy / name).write_bytes((tmp_path / "tmp-copy" / name).read_bytes())
    assert len(NeighbourIndex.load(legacy)) == 100
    ix.save(legacy)
    assert legacy.is_symlink() and len(NeighbourIndex.load(legacy)) == 100


def test_an_index_short_of_the_recall_aimed_for_says_so():
    """PQ over isotropic 300-d vectors (PCA to 256, 64 bytes each) stays far below 0.95 even
    when every list is searched; the build used to print the figure and nothing more."""
    from featscope.index import TARGET_RECALL
    from featscope.pipelines.stages.index import IndexSummary

    x = np.random.default_rng(0).normal(size=(4000, 300)).astype(np.float32)
    ids = np.arange(4000) + 5
    lossy = build_index(as_chunks(x, ids), n=4000, dims=300, metric="l2", kind="ivfpq", max_memory=4000 * 80)
    queries = x[::50]
    measured = recall_at_k(NeighbourIndex(lossy.index, lossy.ids, lossy.meta).search_vectors(queries, 10).image_ids,
                           ids[exact_knn(x, queries, 10, metric="l2")[1]], 10)
    assert measured < TARGET_RECALL and lossy.meta["recall_at_10"] < TARGET_RECALL  # an independent check agrees
    said = IndexSummary("pool", lossy.meta).warning()
    assert said.startswith(f"recall@10 {lossy.meta['recall_at_10']:.3f} is below the 0.95 aimed for")
    assert "PCA256,IVF64,PQ64x8 compresses the vectors" in said
    whole = build_index(as_chunks(x, ids), n=4000, dims=300, metric="l2")
    assert whole.meta["kind"] == "flat" and IndexSummary("pool", whole.meta).warning() == ""
