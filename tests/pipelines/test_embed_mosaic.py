"""2-D maps and mosaics: seeded determinism, the large-data path, assignment optimality,
even coverage, and tiles from odd images."""

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import load_script, write_dataset
from PIL import Image

from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.render.grid_layout import (
    assign,
    assign_exact,
    cell_centres,
    cover_sample,
    normalise,
    total_cost,
)
from featscope.pipelines.render.scatter_layout import default_tile, fit, place
from featscope.pipelines.render.thumbnails import square_tiles
from featscope.pipelines.stages import embed, extract, mosaic


@pytest.fixture
def mapped_run(tmp_path, digits):
    root = tmp_path / "images"
    write_dataset(root, digits, n_photos=4, labels=(0, 1, 2, 3, 7), digits_per_label=8)
    odd = root / "odd"
    odd.mkdir()
    Image.new("RGBA", (5, 3), (255, 0, 0, 255)).save(odd / "tiny-red.png")
    Image.fromarray(np.full((40, 90), 40000, np.uint16)).save(odd / "deep16.png")
    Image.new("L", (300, 20), 200).save(odd / "strip-gray.png")
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, root, shard_size=20)
    extract.extract(rd, ["pool"], model="resnet18", weights="random", workers=0, progress=False)
    return rd


def coords(rd):
    t = pq.read_table(rd.embedding("pool"))
    return t["image_id"].to_numpy(), np.stack([t["tsne_x"].to_numpy(), t["tsne_y"].to_numpy()], 1)


def test_same_seed_same_map_and_quality_is_recorded(mapped_run):
    first = embed.embed(mapped_run, "pool", perplexity=10, seed=3)
    ids_a, a = coords(mapped_run)
    again = embed.embed(mapped_run, "pool", perplexity=10, seed=3, refit=True)  # fitted anew, then aligned
    ids_b, b = coords(mapped_run)
    assert again.how == "refitted" and again.displacement < 1e-5
    assert np.array_equal(ids_a, ids_b) and np.allclose(a, b, atol=1e-3)
    meta = pq.read_schema(mapped_run.embedding("pool")).metadata
    assert float(meta[b"trustworthiness"]) == pytest.approx(first.trustworthiness, abs=1e-4)
    assert 0 < first.trustworthiness <= 1 and first.knn_accuracy is not None and len(ids_a) == 47


def test_large_runs_embed_a_sample_and_place_the_rest(mapped_run):
    summary = embed.embed(mapped_run, "pool", perplexity=5, max_exact=25)
    ids, xy = coords(mapped_run)
    assert summary.sampled and len(ids) == 47 and np.isfinite(xy).all()
    assert len(np.unique(xy, axis=0)) == 47


def test_a_rerun_places_new_images_into_the_map_and_old_points_stay_put(mapped_run, digits):
    embed.embed(mapped_run, "pool", perplexity=10)
    ids_a, a = coords(mapped_run)
    images = mapped_run.root.parent / "images"
    write_dataset(images, digits, n_photos=0, labels=(0, 1, 2, 3, 7), digits_per_label=10)  # 2 new per label
    next(images.glob("odd/*.png")).unlink()
    manifest.run(mapped_run, images)
    extract.extract(mapped_run, ["pool"], workers=0, progress=False)
    summary = embed.embed(mapped_run, "pool", perplexity=10)
    assert summary.how == "placed" and summary.placed == 10 and summary.displacement == 0
    assert "10 new placed into the previous map, old points fixed" in summary.line()
    ids_b, b = coords(mapped_run)
    live = manifest.read(mapped_run)["image_id"].to_numpy()
    assert sorted(ids_b) == sorted(live) and len(ids_b) == 47 - 1 + 10
    old = np.isin(ids_b, ids_a)
    np.testing.assert_array_equal(b[old], a[np.searchsorted(ids_a, ids_b[old])])  # not moved at all
    # each new point lands nearer the map positions of its nearest old images in feature space
    # than the old points lie from each other on average
    x = {int(i): v for i, v in zip(*embed.read_layer(mapped_run, "pool"))}
    new_ids, old_ids = ids_b[~old], ids_b[old]
    feats_old = np.stack([x[int(i)] for i in old_ids])
    spread = np.mean(np.linalg.norm(b[old][:, None] - b[old][None], axis=2))
    for i, p in zip(new_ids, b[~old]):
        nearest = np.argsort(np.linalg.norm(feats_old - x[int(i)], axis=1))[:3]
        assert np.linalg.norm(b[old][nearest] - p, axis=1).mean() < 0.5 * spread


def test_a_refit_past_the_growth_factor_is_aligned_to_the_previous_map(mapped_run):
    embed.embed(mapped_run, "pool", perplexity=10)
    with np.load(mapped_run.embedding_pca("pool")) as saved:  # the map state a rerun starts from, mirrored
        state = dict(saved)
    state["coords"] = state["coords"] * [-1, 1]
    np.savez(mapped_run.embedding_pca("pool"), **state)
    summary = embed.embed(mapped_run, "pool", perplexity=10, refit_growth=0.5)  # "grown" past 0.5x: refit
    assert summary.how == "refitted" and summary.displacement < 1e-5
    ids, xy = coords(mapped_run)
    np.testing.assert_array_equal(ids, state["ids"])
    np.testing.assert_allclose(xy, state["coords"], atol=1e-3)  # the mirror was followed


def test_a_dataset_mostly_replaced_is_refitted_not_placed_around_the_few_images_left(mapped_run, digits):
    """Scheduled runs over a rolling dataset: most images retire and as many new ones come,
    so the count never grows. The map used to place every new image around the few left
    (a picture of the old data, printed as an ordinary placement); it is now fitted anew,
    as a map made from scratch on the same features would be."""
    embed.embed(mapped_run, "pool", perplexity=10)
    images = mapped_run.root.parent / "images"
    for path in sorted(images.rglob("*.png"))[6:]:  # 41 of 47 retire
        path.unlink()
    write_dataset(images, digits, n_photos=0, labels=(4, 5, 6, 8, 9), digits_per_label=8)
    manifest.run(mapped_run, images, allow_empty=True)
    extract.extract(mapped_run, ["pool"], workers=0, progress=False)
    state = mapped_run.embedding_pca("pool").read_bytes()
    placed = embed.embed(mapped_run, "pool", perplexity=10, refit_growth=100)  # what it did before
    assert placed.how == "placed" and placed.placed == 40
    mapped_run.embedding_pca("pool").write_bytes(state)
    summary = embed.embed(mapped_run, "pool", perplexity=10)
    assert summary.how == "refitted" and summary.points == 46
    assert "refitted: 6 images of its last fit left among 46, fewer than 1 in 2 (--refit-growth)" in summary.line()
    mapped_run.embedding_pca("pool").unlink()
    fresh = embed.embed(mapped_run, "pool", perplexity=10)  # from scratch: the map aligned is this one turned
    assert fresh.how == "fitted" and summary.trustworthiness == pytest.approx(fresh.trustworthiness, abs=1e-3)
    assert placed.trustworthiness < summary.trustworthiness - 0.02
    # the next rerun with nothing new keeps the refitted map: its images are all of its fit
    assert embed.embed(mapped_run, "pool", perplexity=10).how == "placed"


def test_a_placement_that_measures_worse_than_its_fit_says_so(mapped_run, digits):
    """Images of kinds the map was not fitted on, placed into it, can land among others
    (label accuracy in 2-D here falls by more than 0.05, and a refit does better): the line
    used to print the new figures alone. It now gives them beside those of the fit and
    says that a refit fits anew."""
    first = embed.embed(mapped_run, "pool", perplexity=10)
    images = mapped_run.root.parent / "images"
    write_dataset(images, digits, n_photos=0, labels=(4, 5, 6, 8), digits_per_label=10)  # 47 -> 87: placed
    manifest.run(mapped_run, images)
    extract.extract(mapped_run, ["pool"], workers=0, progress=False)
    placed = embed.embed(mapped_run, "pool", perplexity=10)
    assert placed.how == "placed" and placed.at_fit == {"trustworthiness": first.trustworthiness,
                                                        "knn_accuracy": first.knn_accuracy}
    line = placed.line()
    assert f"trustworthiness {placed.trustworthiness:.3f} ({first.trustworthiness:.3f} at its fit)" in line
    assert f"accuracy in 2-D {placed.knn_accuracy:.3f} ({first.knn_accuracy:.3f} at its fit)" in line
    assert placed.knn_accuracy < first.knn_accuracy - embed.QUALITY_DROP
    assert "it measures worse than when it was fitted" in line and "`--refit` fits it anew" in line
    refitted = embed.embed(mapped_run, "pool", perplexity=10, refit=True)
    assert refitted.knn_accuracy > placed.knn_accuracy and "at its fit" not in refitted.line()


def test_images_of_a_part_written_again_are_placed_anew_not_kept_where_they_were(mapped_run):
    """A shard extracted again may hold other values for the same ids: a placement used to
    keep their old places. Here a part is written again with two images' vectors swapped:
    the part's images are placed anew (the rest stay put), so the two trade places."""
    import pyarrow as pa

    from featscope.pipelines.core.store import column_array

    embed.embed(mapped_run, "pool", perplexity=10)
    ids_a, a = coords(mapped_run)
    part = mapped_run.feature_part("pool", 0)
    table = pq.read_table(part)
    values = column_array(table, "feature").copy()
    values[[0, 1]] = values[[1, 0]]
    column = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float16()), values.shape[1])
    pq.write_table(table.set_column(1, "feature", column), part)  # its metadata kept: the run's own file
    summary = embed.embed(mapped_run, "pool", perplexity=10)
    in_part = table["image_id"].to_numpy()
    assert summary.how == "placed" and summary.placed == summary.again == len(in_part) == 20
    assert f"{len(in_part)} new placed into the previous map, {len(in_part)} of them extracted again since" \
        in summary.line()
    ids_b, b = coords(mapped_run)
    others = ~np.isin(ids_b, in_part)
    np.testing.assert_array_equal(b[others], a[others])  # the others stay put
    first, second = (np.flatnonzero(ids_b == i)[0] for i in in_part[:2])
    spread = np.linalg.norm(a[others] - a[others].mean(0), axis=1).mean()
    assert np.linalg.norm(b[first] - a[second]) < 0.5 * spread  # image 0 lands where image 1 was


def test_a_map_state_from_before_fitted_ids_were_kept_is_refitted_only_if_placed_into(mapped_run):
    embed.embed(mapped_run, "pool", perplexity=10)
    with np.load(mapped_run.embedding_pca("pool")) as saved:
        state = {k: v for k, v in saved.items() if k != "fitted_ids"}
    np.savez(mapped_run.embedding_pca("pool"), **state)  # as written before: a fit's own images known
    assert embed.embed(mapped_run, "pool", perplexity=10).how == "placed"
    state["fitted_points"] = np.asarray(40)  # a fit of 40, 7 placed since: which 40 is not known
    np.savez(mapped_run.embedding_pca("pool"), **state)
    summary = embed.embed(mapped_run, "pool", perplexity=10)
    assert summary.how == "refitted" and "does not say which images it was fitted on" in summary.line()


def test_align_recovers_a_rotation_mirror_and_shift():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(50, 2))
    angle = 1.1
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1, -1])
    new = old @ turn + [5, -3]
    np.testing.assert_allclose(embed.align(new, new, old), old, atol=1e-9)
    assert embed.displacement(old, old + [0.0, 0.0]) == 0


def test_pca_signs_do_not_depend_on_row_order():
    x = np.random.default_rng(1).normal(size=(200, 6)) * [5, 4, 3, 2, 1, 0.5]
    _, a = embed.fit_pca(x, 3)
    _, b = embed.fit_pca(x[::-1].copy(), 3)
    np.testing.assert_allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_trustworthiness_equals_scikit_learn_s(seed):
    from sklearn.manifold import trustworthiness

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, 20)).astype(np.float32)
    y = x[:, :2] + rng.normal(scale=0.5 + seed, size=(400, 2)).astype(np.float32)  # more noise, less trust
    for k in (1, 5, 10):
        assert embed.trustworthiness(x, y, k) == pytest.approx(trustworthiness(x, y, n_neighbors=k), abs=1e-9)


def test_a_tied_label_vote_goes_to_the_nearest_neighbours_label():
    assert embed.majority(["b", "a", "a", "b"]) == "b" and embed.majority(["a", "b", "b", "a"]) == "a"
    assert embed.majority(["a", "b", "b"]) == "b"


def test_grid_is_a_bijection_onto_cells_and_odd_images_become_tiles(mapped_run):
    embed.embed(mapped_run, "pool", perplexity=10)
    summary = mosaic.grid(mapped_run, "pool", side=6, tile=20, progress=False)
    cells = pq.read_table(mapped_run.mosaic("pool", "grid", "parquet")).to_pylist()
    assert len(cells) == 36 and len({(c["cell_row"], c["cell_col"]) for c in cells}) == 36
    assert len({c["image_id"] for c in cells}) == 36 and "exact optimum" in summary.detail
    assert Image.open(mapped_run.mosaic("pool", "grid")).size == (120, 120)
    # every image, odd ones included, would be a well-formed tile, drawn from its shared thumbnail
    rows = manifest.read(mapped_run).to_pylist()
    tiles = square_tiles(mapped_run, [(r["image_id"], r["path"], 20) for r in rows])
    assert all(t.size == (20, 20) and t.mode == "RGB" for t in tiles)
    assert all(mapped_run.thumbnail(r["image_id"]).exists() for r in rows)
    red = tiles[next(n for n, r in enumerate(rows) if r["path"].endswith("tiny-red.png"))]
    assert np.abs(np.asarray(red)[10, 10].astype(int) - [255, 0, 0]).max() <= 3  # a JPEG thumbnail


def test_a_grid_canvas_past_the_limit_is_refused_before_drawing(mapped_run, monkeypatch):
    """A large --side x --tile used to run the machine out of memory (one RGB canvas)."""
    from featscope.kernels.params import ParamError

    embed.embed(mapped_run, "pool", perplexity=10)
    before = mapped_run.mosaic("pool", "grid").read_bytes() if mapped_run.mosaic("pool", "grid").exists() else None
    monkeypatch.setattr(mosaic, "MAX_CANVAS", 100)  # 6 x 20 = 120 px: past it
    with pytest.raises(ParamError, match="side 6 x tile 20 px is a 120 px canvas; at most 100"):
        mosaic.grid(mapped_run, "pool", side=6, tile=20, progress=False)
    after = mapped_run.mosaic("pool", "grid").read_bytes() if mapped_run.mosaic("pool", "grid").exists() else None
    assert after == before


def test_scatter_and_plot_are_written(mapped_run):
    embed.embed(mapped_run, "pool", perplexity=10)
    s = mosaic.scatter(mapped_run, "pool", size=400, tile=40, progress=False)
    assert Image.open(s.path).size == (400, 400) and 0 < s.images <= 47
    assert "skipped as hidden" in s.line() and "400 px canvas, 40 px thumbnails" in s.line()
    chosen = mosaic.scatter(mapped_run, "pool", progress=False)  # sizes chosen: nearly all drawn
    assert chosen.images >= 46 and Image.open(chosen.path).size[0] >= 4 * default_tile(47)
    assert Image.open(mosaic.plot(mapped_run, "pool").path).format == "PNG"


def test_mosaics_drawn_while_an_image_could_not_be_read_are_named_until_drawn_again(mapped_run):
    """A mosaic leaves out an image it cannot read, and kept it out until the map changed:
    nothing said so, and the workflow never drew it again."""
    from pathlib import Path

    from featscope.pipelines.app.status import status
    from featscope.pipelines.core.rundir import UNREADABLE_AT, read_record

    rd = mapped_run
    embed.embed(rd, "pool", perplexity=10)
    mosaic.grid(rd, "pool", side=6, tile=16, progress=False)
    image_id = pq.read_table(rd.mosaic("pool", "grid", "parquet"))["image_id"][0].as_py()  # one the grid shows
    path = Path(next(r["path"] for r in manifest.read(rd).to_pylist() if r["image_id"] == image_id))
    kept = path.read_bytes()
    path.unlink()  # away while the mosaics are drawn again, its thumbnail not made yet
    rd.thumbnail(image_id).unlink()
    mosaic.grid(rd, "pool", side=6, tile=16, progress=False)
    assert "1 unreadable" in mosaic.scatter(rd, "pool", progress=False).line()
    for kind in ("grid", "scatter"):
        record = read_record(rd.mosaic_unreadable("pool", kind))
        assert record["ids"] == [image_id] and record[UNREADABLE_AT]
    now = status(rd)
    assert {"mosaic pool grid", "mosaic pool scatter"} <= set(now.stale)
    assert any(line.startswith("mosaic pool grid: 1 image left out, unreadable") for line in now.lines)
    path.write_bytes(kept)
    mosaic.grid(rd, "pool", side=6, tile=16, progress=False)
    mosaic.scatter(rd, "pool", progress=False)
    assert all(read_record(rd.mosaic_unreadable("pool", kind))["ids"] == [] for kind in ("grid", "scatter"))
    assert not {"mosaic pool grid", "mosaic pool scatter"} & set(status(rd).stale)


def draw_then_change_the_dataset(rd, digits) -> np.ndarray:
    """Embed pool and draw its three mosaics (all current), then retire the eight 7s and add
    eight 4s (manifest and extract; the map not made again): the grid's image ids as drawn."""
    import shutil

    from featscope.pipelines.app.status import status

    embed.embed(rd, "pool", perplexity=10)
    mosaic._all(rd, mosaic.AllOptions(layer="pool", side=6, tile=16), progress=False)
    assert not {s for s in status(rd).stale if s.startswith("mosaic")}
    assert "mosaic pool: grid, plot, scatter, current" in status(rd).lines
    shown = pq.read_table(rd.mosaic("pool", "grid", "parquet"))["image_id"].to_numpy()
    images = rd.root.parent / "images"
    shutil.rmtree(images / "7")
    write_dataset(images, digits, n_photos=0, labels=(4,), digits_per_label=8)
    manifest.run(rd, images, shard_size=20)
    extract.extract(rd, ["pool"], workers=0, progress=False)
    return shown


def test_mosaics_drawn_from_an_earlier_map_are_stale_and_left_out_of_the_report(mapped_run, digits):
    """After images retired and others were placed into the map, the mosaics drawn before
    still showed the retired ones (and not the new), and status and the report called them
    current."""
    from featscope.pipelines.app import report
    from featscope.pipelines.app.status import status
    from featscope.pipelines.core import derived

    rd = mapped_run
    shown = draw_then_change_the_dataset(rd, digits)
    assert embed.embed(rd, "pool", perplexity=10).how == "placed"
    live = manifest.read(rd)["image_id"].to_numpy()
    gone = int(np.isin(shown, live, invert=True).sum())  # tiles of the 8 sevens retired
    assert gone > 0
    now = status(rd)
    assert {"mosaic pool grid", "mosaic pool scatter", "mosaic pool plot"} <= set(now.stale)
    assert f"mosaic pool grid: stale: drawn from an earlier map of pool ({gone} of its 36 tiles show images retired " \
           "since)" in now.line()
    built = report.build(rd, k=2, progress=False)
    assert "made from earlier outputs, so shown with a notice: mosaic pool (`featscope status`" in built.line()
    run = load_script(rd.report_dir / "data" / "run.js")
    assert [set(m) for m in run["mosaics"]] == [{"layer", "stale"}]  # a notice, no picture to show
    mosaic.grid(rd, "pool", side=6, tile=16, progress=False)
    mosaic.scatter(rd, "pool", progress=False)
    assert {s for s in status(rd).stale if s.startswith("mosaic")} == {"mosaic pool plot"}
    mosaic.plot(rd, "pool")
    assert not {s for s in status(rd).stale if s.startswith("mosaic")}
    report.build(rd, k=2, progress=False)
    run = load_script(rd.report_dir / "data" / "run.js")
    assert set(run["mosaics"][0]) == {"layer", "side", "grid", "scatter", "plot"}
    # a mosaic that a job stopped before it recorded its map counts as current only if newer than the map
    derived.record(rd.mosaic("pool", "grid")).unlink()
    assert "mosaic pool grid" not in status(rd).stale
    embed.embed(rd, "pool", perplexity=10, refit=True)
    assert "mosaic pool grid" in status(rd).stale


def test_mosaics_of_a_map_made_before_the_dataset_changed_are_stale_and_left_out_of_the_report(mapped_run, digits):
    """Mosaics drawn from the map as it is were called current while that map itself was
    behind the dataset (the manifest retired images and added others, and embed had not run
    since): status said "grid, plot, scatter, current" and the report showed the grid, whose
    tiles of retired images opened pages that no longer exist."""
    from featscope.pipelines.app import report
    from featscope.pipelines.app.status import status

    rd = mapped_run
    shown = draw_then_change_the_dataset(rd, digits)
    live = manifest.read(rd)["image_id"].to_numpy()
    gone = int(np.isin(shown, live, invert=True).sum())
    assert gone > 0
    now = status(rd)
    assert {"mosaic pool grid", "mosaic pool scatter", "mosaic pool plot"} <= set(now.stale)
    assert ("mosaic pool grid: stale: drawn from a map of pool made before the dataset last changed (8 retired "
            f"images in it, 8 live images missing; {gone} of its 36 tiles show images retired since): the next "
            "workflow run, or `featscope embed` and then `featscope mosaic grid`, draws it again") in now.lines
    built = report.build(rd, k=2, progress=False)
    assert "mosaic pool" in built.line()
    run = load_script(rd.report_dir / "data" / "run.js")
    assert [set(m) for m in run["mosaics"]] == [{"layer", "stale"}]
    assert "made before the dataset last changed (8 retired images in it" in run["mosaics"][0]["stale"]
    embed.embed(rd, "pool", perplexity=10)
    mosaic._all(rd, mosaic.AllOptions(layer="pool", side=6, tile=16), progress=False)
    assert "mosaic pool: grid, plot, scatter, current" in status(rd).lines
    report.build(rd, k=2, progress=False)
    assert set(load_script(rd.report_dir / "data" / "run.js")["mosaics"][0]) == {"layer", "side", "grid", "scatter",
                                                                                   "plot"}


def test_the_report_keeps_the_grid_its_cell_table_describes(mapped_run):
    """The report linked the grid picture in the run: drawn again after the report was built
    (another side), its page showed the new tiles over the old table, so a click opened
    another image than the tile showed."""
    from featscope.pipelines.app import report
    from featscope.pipelines.core.atomic import file_digest

    rd = mapped_run
    embed.embed(rd, "pool", perplexity=10)
    mosaic.grid(rd, "pool", side=6, tile=16, progress=False)
    drawn = file_digest(rd.mosaic("pool", "grid"))
    report.build(rd, k=2, progress=False)
    entry = load_script(rd.report_dir / "data" / "run.js")["mosaics"][0]
    assert entry["grid"] == "pictures/mosaic/pool-grid.jpg" and entry["side"] == 6
    mosaic.grid(rd, "pool", side=4, tile=16, progress=False)  # drawn again; the report not built since
    assert file_digest(rd.mosaic("pool", "grid")) != drawn
    assert file_digest(rd.report_dir / entry["grid"]) == drawn  # the picture its 6x6 table describes
    assert len(load_script(rd.report_dir / "data" / "mosaic-pool.js")["pool"]) == 6
    report.build(rd, k=2, progress=False)
    assert load_script(rd.report_dir / "data" / "run.js")["mosaics"][0]["side"] == 4
    assert file_digest(rd.report_dir / entry["grid"]) == file_digest(rd.mosaic("pool", "grid"))


def test_kept_tiles_equal_fresh_ones_and_follow_the_images_asked_for(mapped_run):
    rows = manifest.read(mapped_run).to_pylist()
    items = [(r["image_id"], r["path"], 24 if r["image_id"] % 3 else 12) for r in rows]
    fresh = square_tiles(mapped_run, items)
    first = square_tiles(mapped_run, items, keep_as="t")
    store = mapped_run.thumbnail_tiles("t")
    for thumb in mapped_run.report_dir.glob("thumbs/*/*.jpg"):
        thumb.unlink()  # kept tiles need no thumbnail: a call that decoded one would fail here
    for r in rows:
        r["path"] = "/nonexistent"
    kept = square_tiles(mapped_run, [(i, "/nonexistent", side) for i, _, side in items], keep_as="t")
    assert [np.asarray(t).tolist() for t in kept] == [np.asarray(t).tolist() for t in fresh]
    assert [np.asarray(t).tolist() for t in first] == [np.asarray(t).tolist() for t in fresh]
    fewer = items[: len(items) // 2]  # retired images leave the kept file
    square_tiles(mapped_run, fewer, keep_as="t")
    with np.load(store) as stored:
        assert sorted(int(i) for key in stored.files if key.startswith("ids_") for i in stored[key]) == \
            sorted(i for i, _, _ in fewer)
    store.write_bytes(b"damaged")  # a damaged file is made again
    again = square_tiles(mapped_run, [(i, p, s) for i, p, s in fewer], keep_as="t")
    assert [np.asarray(t).tolist() for t in again] == [np.asarray(t).tolist() for t in fresh[: len(fewer)]]


def _coverage(layout, size):
    counts = np.zeros((size, size), dtype=np.int32)
    for x, y, side in zip(layout.x, layout.y, layout.side):
        counts[y:y + side, x:x + side] += 1
    return counts


def test_scatter_layout_keeps_every_thumbnail_mostly_visible_and_near_its_spot():
    rng = np.random.default_rng(3)
    points = normalise(rng.normal(size=(400, 2)))
    size, tile = 900, 40
    layout = place(points, size, tile)
    drawn = layout.side > 0
    assert set(layout.side[drawn].tolist()) <= {tile, tile // 2}
    # drawn in order, each one at most half covered by those before it when it was placed
    covered = np.zeros((size, size), dtype=bool)
    for i in np.flatnonzero(drawn):
        x, y, side = layout.x[i], layout.y[i], layout.side[i]
        assert covered[y:y + side, x:x + side].mean() <= 0.5
        covered[y:y + side, x:x + side] = True
    # never further than two thumbnails (plus rounding) from its own spot
    spot = points * (size - tile)
    centre = np.stack([layout.x + layout.side / 2 - tile / 2, layout.y + layout.side / 2 - tile / 2], 1)
    assert np.abs(centre[drawn] - spot[drawn]).max() <= 2 * tile + 1


def test_near_duplicates_are_placed_beside_each_other_not_skipped():
    points = np.repeat(np.random.default_rng(4).random((30, 2)), 5, axis=0)  # five copies of each
    layout = place(points, 2000, 48)
    assert layout.skipped == 0


def test_fit_chooses_sizes_that_skip_at_most_the_allowed_share():
    rng = np.random.default_rng(5)
    for n in (150, 3000):
        centres = rng.normal(size=(8, 2)) * 5
        points = normalise(centres[rng.integers(0, 8, n)] + rng.normal(size=(n, 2)))
        size, tile, layout = fit(points, max_skipped=0.02)
        assert tile == default_tile(n) and layout.skipped <= 0.02 * n
        given = fit(points, size=600)  # a given canvas: thumbnails shrink instead
        assert given[0] == 600 and (given[2].skipped <= 0.02 * n or given[1] == 16)
    assert default_tile(150) == 96 and default_tile(50_000) == 22


def test_exact_assignment_is_the_optimum_of_all_permutations():
    rng = np.random.default_rng(0)
    points = rng.random((6, 2))
    cells = cell_centres(2, 3)
    best = min(sum(((points[i] - cells[p[i]]) ** 2).sum() for i in range(6)) for p in itertools.permutations(range(6)))
    assert total_cost(points, assign_exact(points, cells), 2, 3) == pytest.approx(best)


def test_blockwise_assignment_stays_within_a_few_percent_of_exact():
    rng = np.random.default_rng(1)
    side = 32
    points = normalise(np.concatenate([rng.normal(size=(side * side // 2, 2)),
                                       rng.normal(size=(side * side // 2, 2)) + 3]))
    exact = assign(points, side, side, exact_max=10**9)
    blocks = assign(points, side, side, exact_max=0, block=16)
    assert sorted(blocks.tolist()) == list(range(side * side))
    assert total_cost(points, blocks, side, side) <= 1.05 * total_cost(points, exact, side, side)


def test_cover_sample_leaves_no_quadrant_empty():
    rng = np.random.default_rng(2)
    dense = rng.random((5000, 2)) * 0.5  # everything in the lower-left quadrant ...
    sparse = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.8], [0.95, 0.95]])  # ... but four points
    points = np.concatenate([dense, sparse])
    chosen = cover_sample(points, 100)
    p = points[chosen]
    assert len(set(chosen.tolist())) == 100
    quadrants = {(x > 0.5, y > 0.5) for x, y in p}
    assert quadrants == {(False, False), (True, False), (False, True), (True, True)}
    assert not np.array_equal(chosen, np.arange(100))  # not simply the first N


def test_a_grid_picture_that_is_not_the_one_its_table_describes_is_refused(mapped_run):
    from featscope.kernels.errors import FeatscopeError
    from featscope.pipelines.app import report

    embed.embed(mapped_run, "pool", perplexity=10)
    mosaic.grid(mapped_run, "pool", side=4, tile=16, progress=False)
    picture = mapped_run.mosaic("pool", "grid")
    Image.new("RGB", (64, 64)).save(picture, format="JPEG")  # as if a later run stopped after the picture
    with pytest.raises(FeatscopeError, match="is not the picture pool-grid.parquet describes"):
        report.build(mapped_run, progress=False)


def test_reference_neighbours_give_opentsne_s_affinities_for_new_points():
    from openTSNE.affinity import PerplexityBasedNN

    rng = np.random.default_rng(0)
    reference, new = rng.normal(size=(600, 12)), rng.normal(size=(20, 12))
    want, want_n, _ = PerplexityBasedNN(reference, perplexity=10, method="exact", random_state=0).to_new(
        new, return_distances=True)
    got, got_n, _ = embed.ReferenceNeighbours(reference, 10).to_new(new, return_distances=True)
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_allclose(got.toarray(), want.toarray(), atol=1e-6)


@pytest.mark.parametrize("max_exact", [1000, 40])  # one fit; a sample's fit with the rest placed into it
def test_tsne_progress_bar_counts_every_iteration_and_leaves_the_map_unchanged(capsys, max_exact):
    x = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    quiet, _ = embed.tsne(x, perplexity=5, seed=1, max_exact=max_exact)
    shown, sampled = embed.tsne(x, perplexity=5, seed=1, max_exact=max_exact, progress=True)
    np.testing.assert_array_equal(quiet, shown)  # a callback returning True would have cut t-SNE short
    total = 750 + (embed.PLACE_ITERATIONS if sampled else 0)
    assert sampled == (max_exact < 60) and f"{total}/{total}" in capsys.readouterr().err


def test_a_grid_picture_replaced_while_its_table_is_written_is_refused(mapped_run, monkeypatch):
    """The table records the digest of the picture its own job drew, not of the file in place
    when it looks: a job drawing the same mosaic at once may have put its own there in between,
    whose tiles the table's cells would otherwise open as if they were these."""
    from featscope.kernels.errors import FeatscopeError
    from featscope.pipelines.app import report

    embed.embed(mapped_run, "pool", perplexity=10)
    picture = mapped_run.mosaic("pool", "grid")
    record = mosaic.record_unreadable

    def another_job_draws_its_own(*args):  # between this job's picture and its table
        Image.new("RGB", (64, 64), (0, 90, 0)).save(picture, format="JPEG")
        return record(*args)

    monkeypatch.setattr(mosaic, "record_unreadable", another_job_draws_its_own)
    mosaic.grid(mapped_run, "pool", side=4, tile=16, progress=False)
    with pytest.raises(FeatscopeError, match="is not the picture pool-grid.parquet describes"):
        report.build(mapped_run, progress=False)
