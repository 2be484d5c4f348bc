"""Index stages on a real run: queries by id, path and new image; errors; precision@k; sheets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import clustered, write_dataset
from PIL import Image

from featscope.index import NeighbourIndex, build_index
from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import manifest
from featscope.pipelines.core.neighbours import list_identity, neighbours_of, open_index
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract
from featscope.pipelines.stages import index as neighbours
from featscope.pipelines.stages import neighbours as sheets


@pytest.fixture
def indexed_run(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=4)
    extract.extract(rd, ["pool", "pixels"], model="resnet18", weights="random", workers=0, progress=False)
    for layer in ("pool", "pixels"):
        neighbours.build(rd, layer, progress=False)
    return rd


def featscope(*args):
    return subprocess.run([sys.executable, "-m", "featscope.pipelines.app.cli", *map(str, args)],
                          capture_output=True, text=True)


def test_a_new_image_that_is_already_in_the_run_finds_itself_first(indexed_run, tmp_path):
    rows = manifest.read(indexed_run).to_pylist()
    target = next(r for r in rows if r["label"] == "photo")
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(target["path"], "rb").read())
    answer = neighbours.query(indexed_run, "pool", image=copy, k=3).neighbours
    assert answer[0]["image_id"] == target["image_id"] and answer[0]["distance"] < 1e-2
    # An image of the run asked by id or path is not its own neighbour (the same convention
    # as sheets, report and service): the answer is its k nearest *other* images.
    by_path = neighbours.query(indexed_run, "pool", path=target["path"], k=3).neighbours
    assert len(by_path) == 3 and target["image_id"] not in [a["image_id"] for a in by_path]
    assert [a["image_id"] for a in by_path] == [a["image_id"] for a in answer[1:3]] + [by_path[2]["image_id"]]
    pixels = neighbours.query(indexed_run, "pixels", image=copy, k=1).neighbours
    assert pixels[0]["image_id"] == target["image_id"]


def test_cli_query_prints_json_and_bad_queries_exit_2(indexed_run):
    done = featscope("query", "--run", indexed_run.root, "--layer", "pool", "--id", 2, "-k", 4, "--json")
    answer = json.loads(done.stdout)
    assert done.returncode == 0 and [a["rank"] for a in answer] == [1, 2, 3, 4] and 2 not in [a["image_id"] for a in answer]
    assert {"image_id", "path", "label", "distance"} <= set(answer[0])
    for args, message in [
        (("--layer", "pool", "--id", 999), "image_id 999 is not in run"),
        (("--layer", "pool", "--path", "/nowhere.png"), "is not an image of run"),
        (("--layer", "layer4", "--id", 1), "index for layer 'layer4' not found"),
    ]:
        done = featscope("query", "--run", indexed_run.root, *args)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1


def test_query_names_the_live_images_its_index_lacks_and_why_an_id_has_no_answer(indexed_run, small_dataset):
    """An index older than the manifest answered as if complete: an exact copy of the query,
    added since, was silently missing from its neighbours."""
    target = next(r for r in manifest.read(indexed_run).to_pylist() if r["label"] == "photo")
    copy = small_dataset / "photo" / "zz-copy.png"
    copy.write_bytes(open(target["path"], "rb").read())
    (small_dataset / "photo" / "zz-broken.png").write_text("not a picture")
    manifest.run(indexed_run, small_dataset)
    extract.extract(indexed_run, ["pool", "pixels"], workers=0, progress=False)
    ids = {r["path"].rsplit("/", 1)[1]: r["image_id"] for r in manifest.read(indexed_run).to_pylist()}
    run = indexed_run.root
    done = featscope("query", "--run", run, "--layer", "pool", "--id", target["image_id"], "-k", 3, "--json")
    assert done.returncode == 0 and ids["zz-copy.png"] not in [a["image_id"] for a in json.loads(done.stdout)]
    assert done.stderr == (f"warning: 1 live image of the run not in the 'pool' index yet (added since it was last "
                           f"updated), which no answer names: update it with `featscope index build --run {run} "
                           "--layer pool`\n")  # the broken image is not counted: it has no features to add
    for image_id, message in [(ids["zz-copy.png"], "is not in the 'pool' index yet (added since it was last updated)"),
                              (ids["zz-broken.png"], "has no pool features: ")]:
        done = featscope("query", "--run", run, "--layer", "pool", "--id", image_id)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1
    indexed_run.error_part("extract", 99).write_bytes(b"damaged")  # another part: it hides no reason but its own
    done = featscope("query", "--run", run, "--layer", "pool", "--id", ids["zz-broken.png"])
    assert "has no pool features: not an image (unrecognised file format)" in done.stderr, done.stderr
    neighbours.build(indexed_run, "pool", progress=False)
    answer = neighbours.query(indexed_run, "pool", image_id=target["image_id"], k=3)
    assert answer.note == "" and answer.neighbours[0]["image_id"] == ids["zz-copy.png"]
    copy.unlink()
    manifest.run(indexed_run, small_dataset)
    neighbours.build(indexed_run, "pool", progress=False)
    with pytest.raises(FeatscopeError, match=rf"image {ids['zz-copy.png']} was retired from run .*: it has no "):
        neighbours.query(indexed_run, "pool", image_id=ids["zz-copy.png"])
    from PIL import Image

    Image.open(target["path"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target["path"])  # edited: a new id
    manifest.run(indexed_run, small_dataset)
    extract.extract(indexed_run, ["pool", "pixels"], workers=0, progress=False)
    neighbours.build(indexed_run, "pool", progress=False)
    edited = next(r["image_id"] for r in manifest.read(indexed_run).to_pylist() if r["path"] == target["path"])
    assert edited != target["image_id"]
    by_path = neighbours.query(indexed_run, "pool", path=target["path"], k=3)  # the path's live image, not the old one
    assert by_path.neighbours == neighbours.query(indexed_run, "pool", image_id=edited, k=3).neighbours


def test_an_index_of_other_weights_is_refused(indexed_run):
    meta_path = indexed_run.index_dir("pool") / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"weights_sha256": "0" * 64}))
    with pytest.raises(FeatscopeError, match="built for another weights_sha256"):
        neighbours.query(indexed_run, "pool", image_id=1)


def test_wrong_dimension_vectors_are_refused(indexed_run):
    with pytest.raises(FeatscopeError, match="dimension 3, the index expects 512"):
        neighbours.open_index(indexed_run, "pool").search_vectors(np.zeros((1, 3)))


def test_removed_images_leave_the_index(indexed_run, small_dataset):
    victim = next(small_dataset.glob("photo/*.png"))
    victim_id = next(r["image_id"] for r in manifest.read(indexed_run).to_pylist() if r["path"] == str(victim))
    victim.unlink()
    assert manifest.run(indexed_run, small_dataset).invalidated_shards == []  # no top-k: nothing to redo
    summary = neighbours.build(indexed_run, "pool", progress=False)
    assert summary.meta["vectors"] == 8
    assert victim_id not in neighbours.open_index(indexed_run, "pool").ids


def test_an_update_takes_the_vectors_of_a_part_written_again(indexed_run):
    """An update used to follow ids only: a shard extracted again (its part written anew,
    its values changed) kept its old vectors in the index, which still answered as current.
    Here a part is written again with two images' vectors swapped: the updated index holds
    the new ones, as a fresh build does."""
    import time
    import urllib.request

    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers import serving

    from featscope.pipelines.app import report
    from featscope.pipelines.app.serve import CHECK_EVERY
    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.atomic import atomic_path
    from featscope.pipelines.core.store import column_array

    rd = indexed_run
    part = rd.feature_part("pool", 0)
    table = pq.read_table(part)
    values = column_array(table, "feature").copy()
    values[[0, 1]] = values[[1, 0]]
    a = int(table["image_id"][0].as_py())
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), values.shape[1])
    report.build(rd, k=2, progress=False)
    with serving(rd) as base:  # started before: it notices the part written again
        url = f"{base}/api/neighbours?id={a}&layer=pool&k=2"
        ask = lambda: json.loads(urllib.request.urlopen(url).read())  # noqa: E731
        assert "warning" not in ask()
        with atomic_path(part) as tmp:  # renamed into place, as extract writes it
            pq.write_table(table.set_column(1, "feature", column), tmp)  # its metadata kept: the run's own file
        time.sleep(2 * CHECK_EVERY)  # the service looks at the run at most this often
        again = "the 'pool' index holds the vectors of 1 shard as they were before it was extracted again (0)"
        assert ask()["warning"].startswith(again)
    assert "index pool: 9 images (Flat), stale: 1 shard extracted again since it was built (0): the next " \
           "`featscope index build` takes their vectors" in status(rd).lines
    assert neighbours.query(rd, "pool", image_id=a, k=2).note.startswith(again)
    assert again in sheets.run(rd, sheets.NeighboursOptions(layer="pool", ids=[a], k=2, out=rd.root / "a.jpg"))
    before = list_identity(neighbours.open_index(rd, "pool"))
    summary = neighbours.build(rd, "pool", progress=False)
    assert neighbours.query(rd, "pool", image_id=a, k=2).note == ""
    assert summary.how == "updated" and summary.meta["last_update"]["added"] == 4  # the part's four images
    # lists the report and the evaluation kept name vectors that changed: they are not reused
    after = list_identity(neighbours.open_index(rd, "pool"))
    assert after != before
    assert neighbours.build(rd, "pool", progress=False).how == "updated"  # nothing changed since:
    assert list_identity(neighbours.open_index(rd, "pool")) == after  # the lists stay valid
    found = neighbours.open_index(rd, "pool").search_vectors(values[0].astype(np.float32), k=1)
    assert found.image_ids[0][0] == a and found.distances[0][0] < 1e-3
    assert "index pool: 9 images (Flat), current" in status(rd).lines
    index_dir = rd.index_dir("pool")
    meta = json.loads((index_dir / "meta.json").read_text())  # an index from before parts were recorded
    del meta["feature_parts"]
    (index_dir / "meta.json").write_text(json.dumps(meta))
    assert neighbours.build(rd, "pool", progress=False).how.startswith("built (it does not record which feature")


def test_precision_after_a_change_reuses_unreached_lists_and_equals_a_fresh_evaluation(monkeypatch):
    x = clustered(900, 16, clusters=12, seed=3)
    labels = {i: f"c{i % 5}" for i in range(900)}
    before = np.arange(0, 700)  # then 30 retired and 200 added (larger ids, as the manifest gives them)
    after = np.concatenate([np.setdiff1d(before, np.arange(5, 700, 23)), np.arange(700, 900)])
    index = lambda ids: NeighbourIndex.from_build(  # noqa: E731
        build_index(lambda: [(ids, x[ids])], n=len(ids), dims=16, kind="flat", metric="cosine"))
    first = neighbours.precision_at_k(index(before), labels, k=5, max_queries=300)
    searched = []
    real = neighbours.neighbours_of
    monkeypatch.setattr(neighbours, "neighbours_of", lambda ix, ids, k: searched.append(len(ids)) or real(ix, ids, k))
    updated = neighbours.precision_at_k(index(after), labels, k=5, max_queries=300, previous=first.lists,
                                        added=np.arange(700, 900))
    fresh = neighbours.precision_at_k(index(after), labels, k=5, max_queries=300)
    assert updated[:3] == fresh[:3] and updated.lists.keys() == fresh.lists.keys()
    for query, found in fresh.lists.items():  # (distances: BLAS or not, they differ in the last bits)
        assert [n for n, _ in updated.lists[query]] == [n for n, _ in found]
        np.testing.assert_allclose([d for _, d in updated.lists[query]], [d for _, d in found], atol=1e-5)
    assert sum(searched[:-1]) < 300 and searched[-1] == 300  # the update searched only the lists it must
    # the sample follows the change: most queries stay, retired ones leave, some new ones enter
    kept = set(first.lists) & set(fresh.lists)
    assert len(kept) > 200 and not set(fresh.lists) & set(np.arange(5, 700, 23).tolist())


def test_query_sample_is_stable_as_ids_come_and_go():
    ids = np.arange(10_000)
    sample = set(neighbours.query_sample(ids, 500).tolist())
    grown = set(neighbours.query_sample(np.arange(10_100), 500).tolist())
    assert len(sample) == 500 and len(sample - grown) <= 10  # ~1% more images: ~1% of the sample changes
    removed = set(range(0, 10_000, 7))  # removals only let other images in
    assert sample - removed <= set(neighbours.query_sample(np.array(sorted(set(range(10_000)) - removed)), 500).tolist())
    assert not set(neighbours.query_sample(ids, 500, seed=1).tolist()) == sample


def test_precision_at_k_counts_same_label_neighbours_leaving_the_query_out():
    # Four points on a line: a a b b. Nearest other of each: a->a, a->a, b->b, b->b; the
    # second nearest crosses the label boundary for the inner points only.
    x = np.array([[0.0], [1.0], [2.5], [3.5]], dtype=np.float32)
    ids = np.array([10, 11, 12, 13])
    ix = NeighbourIndex.from_build(build_index(lambda: [(ids, x)], n=4, dims=1, kind="flat", metric="l2"))
    labels = {10: "a", 11: "a", 12: "b", 13: "b"}
    assert neighbours.precision_at_k(ix, labels, k=1)[0] == 1.0
    # k=2: 10 -> {11, 12}: 1/2; 11 -> {10, 12}: 1/2; 12 -> {13, 11}: 1/2; 13 -> {12, 11}: 1/2
    assert neighbours.precision_at_k(ix, labels, k=2)[0] == pytest.approx(0.5)


def test_precision_per_label_shows_which_label_loses():
    # 0, 1 (a) and 1.5, 1.6 (b): nearest others 10->11 a, 11->12 b, 12->13 b, 13->12 b.
    x = np.array([[0.0], [1.0], [1.5], [1.6]], dtype=np.float32)
    ids = np.array([10, 11, 12, 13])
    ix = NeighbourIndex.from_build(build_index(lambda: [(ids, x)], n=4, dims=1, kind="flat", metric="l2"))
    p = neighbours.precision_at_k(ix, {10: "a", 11: "a", 12: "b", 13: "b"}, k=1)
    assert p.per_label == {"a": (0.5, 2), "b": (1.0, 2)} and p.overall == 0.75 and p.queries == 4


def test_evaluate_writes_both_spaces(indexed_run):
    result = neighbours.evaluate(indexed_run)
    assert set(result["layers"]) == {"pool", "pixels"}
    labels = {r["label"] for r in manifest.read(indexed_run).to_pylist()}
    assert all(set(v["per_label"]) == labels for v in result["layers"].values())
    assert json.loads(indexed_run.index_evaluation.read_text()) == result


def test_sheet_has_a_feature_and_a_pixel_row_per_query(indexed_run):
    path = sheets.render(indexed_run, "pool", [1, 5], k=3, tile=40)
    img = Image.open(path)
    margin, caption = sheets.MARGIN, sheets.CAPTION
    assert img.size == (sheets.LEGEND + 4 * (40 + margin) + margin, margin + 2 * (2 * (40 + caption + margin) + margin))
    with pytest.raises(FeatscopeError, match="image_id 77 is not in run"):
        sheets.render(indexed_run, "pool", [77])


def test_a_sheet_drawn_while_an_image_could_not_be_read_is_named_until_drawn_again(indexed_run):
    """A grey tile stood in for a neighbour that could not be read when the sheet was drawn,
    and stayed until the index next changed: nothing said so, and reruns kept it."""
    from featscope.pipelines.app.status import status

    rd = indexed_run
    found = neighbours_of(open_index(rd, "pool"), [1], 3).image_ids[0]
    path = Path(next(r["path"] for r in manifest.read(rd).to_pylist() if r["image_id"] == found[1]))
    kept = path.read_bytes()
    path.unlink()  # away while the sheet is drawn
    line = sheets.run(rd, sheets.NeighboursOptions(layer="pool", ids=[1], k=3))
    assert rd.greyed_neighbours("pool") == [int(found[1])]
    assert f"1 image could not be read now, grey (ids {found[1]}" in line
    tile = Image.open(rd.neighbour_sheet("pool")).convert("RGB").crop(
        (sheets.LEGEND + 2 * (112 + sheets.MARGIN) + 20, sheets.MARGIN + 20,
         sheets.LEGEND + 2 * (112 + sheets.MARGIN) + 90, sheets.MARGIN + 90))
    assert np.abs(np.asarray(tile, dtype=int) - sheets.GREY).max() <= 3  # the neighbour's tile is grey
    now = status(rd)
    assert "neighbours pool" in now.stale
    assert any(ln.startswith("neighbours pool: sheet with 1 grey tile") for ln in now.lines)
    path.write_bytes(kept)
    sheets.render(rd, "pool", [1], k=3, out=rd.root / "elsewhere.jpg")  # another file: the run's record stays
    assert rd.greyed_neighbours("pool") == [int(found[1])]
    sheets.render(rd, "pool", [1], k=3)
    assert rd.greyed_neighbours("pool") == [] and "neighbours pool" not in status(rd).stale


def test_the_evaluation_table_shows_every_label_by_its_full_name():
    """Labels are never cut (golden_retriever and golden_eagle stay apart) or dropped (20 labels)."""
    labels = ["golden_retriever", "golden_eagle", "scene/aerial"] + [f"class{i:02d}" for i in range(17)]
    per_label = {lab: {"precision_at_k": round(0.01 * n, 4), "queries": n + 1} for n, lab in enumerate(labels)}
    result = {"k": 10, "layers": {"pool": {"precision_at_k": 0.5, "queries": 210, "per_label": per_label},
                                  "pixels": {"precision_at_k": 0.25, "queries": 210, "per_label": per_label}}}
    table = neighbours.format_evaluation(result).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table[2:]}
    assert set(rows) == {"(all)", *labels}
    assert rows["golden_eagle"] == ["2", "0.010", "0.010"] and rows["(all)"] == ["210", "0.500", "0.250"]
    assert table[1].split() == ["label", "queries", "pool", "pixels"]


def test_two_index_builds_of_one_layer_at_once_leave_a_whole_index(indexed_run):
    before = neighbours.open_index(indexed_run, "pool")
    command = [sys.executable, "-m", "featscope.pipelines.app.cli", "index", "build", "--run", str(indexed_run.root),
               "--layer", "pool", "--quiet"]
    for _ in range(2):  # twice over, two builders each time
        jobs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for job in jobs:
            _, err = job.communicate(timeout=300)
            assert job.returncode == 0, err
        after = neighbours.open_index(indexed_run, "pool")
        assert sorted(after.ids.tolist()) == sorted(before.ids.tolist())
        assert after.search_ids(before.ids[:3], k=4).image_ids.tolist() == \
            before.search_ids(before.ids[:3], k=4).image_ids.tolist()


def test_a_rerun_updates_the_index_and_answers_as_a_fresh_build(indexed_run, small_dataset, digits):
    rows = manifest.read(indexed_run).to_pylist()
    for r in rows[1:3]:
        Path(r["path"]).unlink()
    write_dataset(small_dataset, digits, n_photos=0, labels=(3, 5), digits_per_label=2)
    manifest.run(indexed_run, small_dataset)
    extract.extract(indexed_run, ["pool"], workers=0, progress=False)
    summary = neighbours.build(indexed_run, "pool", progress=False)
    assert summary.how == "updated" and "updated (+4 -2 vectors" in summary.line()
    updated = NeighbourIndex.load(indexed_run.index_dir("pool"))
    live = manifest.read(indexed_run)["image_id"].to_numpy()
    assert sorted(updated.ids) == sorted(live)
    got = updated.search_ids(live, k=5)
    assert neighbours.build(indexed_run, "pool", rebuild=True, progress=False).how == "built"
    want = NeighbourIndex.load(indexed_run.index_dir("pool")).search_ids(live, k=5)
    np.testing.assert_array_equal(got.image_ids, want.image_ids)
    np.testing.assert_allclose(got.distances, want.distances, atol=1e-5)
    assert neighbours.build(indexed_run, "pool", metric="l2", progress=False).how == "built (the build options changed)"


def test_an_index_that_still_holds_retired_images_is_refused_until_updated(indexed_run, small_dataset):
    victim = next(small_dataset.glob("photo/*.png"))
    victim.unlink()
    manifest.run(indexed_run, small_dataset)
    with pytest.raises(FeatscopeError, match="still holds 1 image retired .* update it with `featscope index build"):
        neighbours.query(indexed_run, "pool", image_id=0, k=3)
    neighbours.build(indexed_run, "pool", progress=False)
    assert len(neighbours.query(indexed_run, "pool", image_id=0, k=3).neighbours) == 3


def test_a_sheet_drawn_from_an_earlier_index_is_stale_until_drawn_again(indexed_run, small_dataset):
    """A sheet drawn before the index changed shows the neighbours of then, retired images
    included; status called it current."""
    import os

    from featscope.pipelines.app.status import status
    from featscope.pipelines.core import derived

    rd = indexed_run
    sheets.render(rd, "pool", [1], k=3)
    assert "neighbours pool" not in status(rd).stale and "neighbours pool: sheet, current" in status(rd).lines
    next(small_dataset.glob("photo/*.png")).unlink()
    manifest.run(rd, small_dataset)
    neighbours.build(rd, "pool", progress=False)  # the pixel index is not updated yet
    now = status(rd)
    assert "neighbours pool" in now.stale
    assert any(ln.startswith("neighbours pool: sheet drawn from an earlier index") for ln in now.lines)
    neighbours.build(rd, "pixels", progress=False)
    sheets.render(rd, "pool", [1], k=3)
    assert "neighbours pool" not in status(rd).stale
    sheet = rd.neighbour_sheet("pool")
    derived.record(sheet).unlink()  # a sheet drawn before records were kept: judged by its age
    assert "neighbours pool" not in status(rd).stale
    later = sheet.stat().st_mtime_ns + 10**9
    os.utime(rd.index_meta("pixels"), ns=(later, later))
    assert "neighbours pool" in status(rd).stale


def test_precision_measured_on_an_earlier_index_is_stale_and_not_shown(indexed_run, small_dataset):
    """The report showed the precision@k of an index since rebuilt over other images, and
    status said nothing."""
    from helpers import load_script

    from featscope.pipelines.app import report
    from featscope.pipelines.app.status import status

    rd = indexed_run
    measured = neighbours.evaluate(rd)
    now = status(rd)
    assert "index evaluation" not in now.stale
    assert f"index evaluation: current (precision@10 pixels {measured['layers']['pixels']['precision_at_k']:.3f}, " \
           f"pool {measured['layers']['pool']['precision_at_k']:.3f})" in now.lines
    next(small_dataset.glob("photo/*.png")).unlink()
    manifest.run(rd, small_dataset)
    for layer in ("pool", "pixels"):
        neighbours.build(rd, layer, progress=False)
    now = status(rd)
    assert "index evaluation" in now.stale
    assert any(ln.startswith("index evaluation: stale: measured on an earlier index") for ln in now.lines)
    report.build(rd, k=2, progress=False)
    assert set(load_script(rd.report_dir / "data" / "run.js")["evaluation"]) == {"stale"}
    again = neighbours.evaluate(rd)
    assert "index evaluation" not in status(rd).stale
    report.build(rd, k=2, progress=False)
    assert load_script(rd.report_dir / "data" / "run.js")["evaluation"] == again


def test_a_sheet_from_an_index_that_lacks_new_images_says_so_and_refuses_them_as_queries(indexed_run, digits):
    """After images were added and extracted but the indexes not yet updated, a sheet's line
    said nothing (its neighbours may miss a nearer new image), and a new image as a query was
    'not in this index (N images)', without saying why or what updates it."""
    from featscope.pipelines.core import derived

    rd = indexed_run
    images = Path(manifest.read(rd)["path"][0].as_py()).parents[1]
    before = set(manifest.read(rd)["image_id"].to_pylist())
    write_dataset(images, digits, n_photos=0, labels=(3,), digits_per_label=2)
    manifest.run(rd, images)
    extract.extract(rd, ["pool", "pixels"], workers=0, progress=False)
    new = sorted(set(manifest.read(rd)["image_id"].to_pylist()) - before)
    assert len(new) == 2
    line = sheets.run(rd, sheets.NeighboursOptions(layer="pool", ids=[min(before)], k=3))
    for space in ("pool", "pixels"):
        assert (f"2 live images of the run not in the '{space}' index yet (added since it was last updated), which no "
                f"answer names: update it with `featscope index build --run {rd.root} --layer {space}`") in line
    record = derived.record(rd.neighbour_sheet("pool"))
    kept = record.read_bytes()
    with pytest.raises(FeatscopeError, match=f"image {new[0]} is not in the 'pool' index yet .* `featscope index"):
        sheets.run(rd, sheets.NeighboursOptions(layer="pool", ids=[new[0]], k=3))
    assert record.read_bytes() == kept  # refused before the sheet of before lost anything
    for space in ("pool", "pixels"):
        neighbours.build(rd, space, progress=False)
    line = sheets.run(rd, sheets.NeighboursOptions(layer="pool", ids=new, k=3))
    assert "index yet" not in line
