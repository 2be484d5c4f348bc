"""Top-k per unit: equal to brute force over full activation maps; boxes land on the image."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import LayerTap
from featscope.pipelines.core import manifest
from featscope.pipelines.core.dataset import image_batches
from featscope.pipelines.core.images import read_pixels
from featscope.pipelines.core.models import Preprocessing, load_model
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract, topk


def brute_force_topk(rd, arch, layer, k):
    """Global top-k per channel by (value desc, image_id asc) over every cell's image maximum."""
    maps, ids = full_maps(rd, arch, layer)
    n, c, h, w = maps.shape
    flat = maps.reshape(n, c, h * w)
    cell = flat.argmax(dim=2)
    peak = flat.max(dim=2).values
    expected = {}
    for ch in range(c):
        order = sorted(range(n), key=lambda i: (-float(peak[i, ch]), ids[i]))[:k]
        expected[ch] = [(float(peak[i, ch]), ids[i], int(cell[i, ch]) // w, int(cell[i, ch]) % w) for i in order]
    return expected


def full_maps(rd, arch, layer):
    """Full activation maps (N, C, H, W) of every live image through the same model, layout
    and precision, and their image ids."""
    loaded = load_model(arch, "random")
    extractor = extract.FeatureExtractor(loaded, [layer], torch.device("cpu"), "fp32")
    rows = manifest.read(rd).to_pylist()
    maps, ids = [], []
    for batch in image_batches([r["image_id"] for r in rows], [r["path"] for r in rows], loaded.preprocessing,
                               batch_size=4, workers=0):
        seen = {}
        x = loaded.preprocessing.normalize(batch.pixels).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), LayerTap(extractor.model, extractor.specs, lambda s, o: seen.update(o=o.clone())):
            extractor.model(x)
        maps.append(seen["o"].float())
        ids += batch.image_ids.tolist()
    return torch.cat(maps), ids


def test_streamed_topk_equals_brute_force_over_full_maps(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=4)
    extract.extract(rd, ["layer2", "pool"], model="resnet18", weights="random", precision="fp32", batch_size=3,
                workers=0, topk=3, progress=False)
    topk.merge(rd, "layer2")
    table = pq.read_table(rd.topk("layer2")).to_pylist()
    got = {}
    for r in table:
        got.setdefault(r["channel"], []).append((r["value"], r["image_id"], r["fy"], r["fx"]))
    assert got == brute_force_topk(rd, "resnet18", "layer2", 3)
    assert [r["rank"] for r in table[:3]] == [0, 1, 2]


def test_vector_units_get_whole_image_boxes(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["pool"], model="resnet18", weights="random", workers=0, topk=2, progress=False)
    topk.merge(rd, "pool")
    rows = {r["image_id"]: r for r in manifest.read(rd).to_pylist()}
    for r in pq.read_table(rd.topk("pool")).slice(0, 20).to_pylist():
        w, h = Image.open(rows[r["image_id"]]["path"]).size
        assert (r["x0"], r["y0"], r["x1"], r["y1"]) == (0, 0, w - 1, h - 1)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (640, 427), (97, 413), (256, 256)])
def test_boxes_map_back_to_the_same_spot_of_non_square_originals(tmp_path, size):
    """A bright dot in the original must land inside the box mapped back from where the
    preprocessed model input shows it."""
    width, height = size
    prep = Preprocessing()
    rng = np.random.default_rng(width * height)
    for _ in range(5):
        img = np.zeros((height, width, 3), np.uint8)
        new_w, new_h = prep.resized_size(width, height)
        left, top = round((new_w - prep.crop) / 2), round((new_h - prep.crop) / 2)
        # a dot inside the centre-cropped region, 3% of the shorter side
        r = max(2, min(width, height) // 32)
        cx = int(rng.uniform((left + 10) * width / new_w, (left + prep.crop - 10) * width / new_w))
        cy = int(rng.uniform((top + 10) * height / new_h, (top + prep.crop - 10) * height / new_h))
        img[cy - r:cy + r + 1, cx - r:cx + r + 1] = 255
        path = tmp_path / "dot.png"
        Image.fromarray(img).save(path)
        seen = prep.to_uint8(read_pixels(path))[0].float()
        y, x = divmod(int(seen.argmax()), seen.shape[1])
        box = prep.to_original(torch.tensor([[x, y, x, y]]), width, height)[0].tolist()
        assert box[0] <= cx + r and cx - r <= box[2] and box[1] <= cy + r and cy - r <= box[3], (box, cx, cy)
        assert box[2] - box[0] <= width / new_w + 1 and box[3] - box[1] <= height / new_h + 1


def test_render_writes_one_png_per_unit_and_a_contact_sheet(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["layer3"], model="resnet18", weights="random", workers=0, topk=4, progress=False)
    topk.merge(rd, "layer3")
    summary = topk.render(rd, "layer3", units=topk.parse_units("0-2,10"), tile=32, progress=False)
    assert sorted(p.name for p in rd.patches_dir("layer3").glob("unit-*")) == [
        "unit-0000.png", "unit-0001.png", "unit-0002.png", "unit-0010.png"]
    strip = Image.open(rd.patches_dir("layer3") / "unit-0000.png")
    assert strip.size == (topk.LABEL_W + 4 * (32 + topk.GAP), 32 + topk.CAPTION_H)
    # four strips four times as wide as tall: one column, a square sheet, not one wide row
    sheet = Image.open(rd.patch_sheet("layer3"))
    assert summary.units == 4 and sheet.size == (strip.size[0] + 8, 4 * (strip.size[1] + 4))
    # a rerun draws only the strips whose top-k changed: none here, so the same pictures
    before = {p.name: p.read_bytes() for p in rd.patches_dir("layer3").glob("unit-*")}
    again = topk.render(rd, "layer3", units=topk.parse_units("0-2,10"), tile=32, progress=False)
    assert again.drawn == 0 and "0 drawn anew" in again.line()
    assert {p.name: p.read_bytes() for p in rd.patches_dir("layer3").glob("unit-*")} == before
    assert topk.render(rd, "layer3", units=[0, 1], tile=40, progress=False).drawn == 2  # another size: redrawn


def test_a_strip_drawn_while_an_image_could_not_be_read_is_drawn_again_once_it_can(tmp_path, small_dataset):
    """A grey patch stood in for an image that could not be read when its strip was drawn, and
    the strip then counted as current for good: a rerun kept it, grey, once the image was back."""
    from featscope.pipelines.app.status import status

    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["layer3"], model="resnet18", weights="random", workers=0, topk=2, progress=False)
    topk.merge(rd, "layer3")
    rows = pq.read_table(rd.topk("layer3")).to_pylist()
    first = next(r for r in rows if r["channel"] == 0 and r["rank"] == 0)
    path = Path(next(r["path"] for r in manifest.read(rd).to_pylist() if r["image_id"] == first["image_id"]))
    units = sorted({r["channel"] for r in rows if r["image_id"] == first["image_id"] and r["channel"] < 4})
    kept = path.read_bytes()
    path.unlink()  # away while the strips are drawn
    topk.render(rd, "layer3", units=[0, 1, 2, 3], tile=16, progress=False)
    assert rd.greyed_strips("layer3") == units
    patches = next(line for line in status(rd).lines if "patch strips" in line)
    assert f"{len(units)} with a grey patch" in patches and "`featscope topk render` draws them again" in patches
    assert "patches layer3" in status(rd).stale  # and the workflow's next run draws them again (see the Snakefile)
    path.write_bytes(kept)
    again = topk.render(rd, "layer3", units=[0, 1, 2, 3], tile=16, progress=False)
    assert again.drawn == len(units) and rd.greyed_strips("layer3") == []  # those, and only those, drawn again
    assert topk.render(rd, "layer3", units=[0, 1, 2, 3], tile=16, progress=False).drawn == 0


def test_the_report_shows_only_strips_drawn_from_the_current_topk(tmp_path, small_dataset):
    from featscope.pipelines.app import report
    from featscope.pipelines.app.report_pictures import KeptPictures
    from featscope.pipelines.app.status import status

    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=8)
    extract.extract(rd, ["layer2"], model="resnet18", weights="random", precision="fp32", batch_size=4,
                    workers=0, topk=2, progress=False)
    topk.merge(rd, "layer2")
    topk.render(rd, "layer2", units=[0, 1, 2, 3], tile=16, progress=False)
    assert report._layers(rd, KeptPictures(rd), {})[0]["rendered"] == [0, 1, 2, 3]

    def top(unit_rows):  # unit -> image ids by rank
        out = {}
        for r in sorted(unit_rows, key=lambda r: r["rank"]):
            out.setdefault(r["channel"], []).append(r["image_id"])
        return out
    before = top(pq.read_table(rd.topk("layer2")).to_pylist())
    # unit 0's top image leaves the dataset; the top-k is merged again, the strips not drawn again
    gone = before[0][0]
    Path(next(r["path"] for r in manifest.read(rd).to_pylist() if r["image_id"] == gone)).unlink()
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["layer2"], precision="fp32", batch_size=4, workers=0, topk=2, progress=False)
    topk.merge(rd, "layer2")
    after = top(pq.read_table(rd.topk("layer2")).to_pylist())
    still = [u for u in range(4) if after[u] == before[u]]
    assert 0 not in still
    # a strip of images the unit's page no longer lists is not shown
    assert report._layers(rd, KeptPictures(rd), {})[0]["rendered"] == still
    assert "patches layer2" in status(rd).stale  # and status says they are not current
    topk.render(rd, "layer2", units=[0, 1, 2, 3], tile=16, progress=False)
    assert report._layers(rd, KeptPictures(rd), {})[0]["rendered"] == [0, 1, 2, 3]
    assert "patches layer2" not in status(rd).stale


def test_contact_sheets_are_about_square_and_never_too_wide():
    assert topk.sheet_columns(4, 584, 80) == 1  # four long strips: one column
    assert topk.sheet_columns(64, 584, 80) == 3
    assert topk.sheet_columns(512, 300, 80) == topk.SHEET_MAX_WIDTH // 308
    for count in (1, 7, 64, 512):
        columns = topk.sheet_columns(count, 938, 110)
        assert 1 <= columns <= count and (columns == 1 or columns * 946 <= topk.SHEET_MAX_WIDTH)


def test_merge_without_candidates_says_how_to_get_them(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["pool"], model="resnet18", weights="random", workers=0, progress=False)
    with pytest.raises(FeatscopeError, match="--topk K"):
        topk.merge(rd, "pool")
    with pytest.raises(FeatscopeError, match="cannot read units"):
        topk.parse_units("a-b")
    # a range that runs backwards is refused, not read as no units, which means all of them
    with pytest.raises(FeatscopeError, match="runs backwards"):
        topk.parse_units("5-2")
    assert topk.parse_units("0-3,2,7") == [0, 1, 2, 3, 7]  # each unit once


def test_merge_after_removals_equals_brute_force_over_the_live_images(tmp_path, small_dataset, monkeypatch):
    """Shards keep 2k candidates a unit: a shard that lost one image keeps its files, one that
    lost more than a unit's spare candidates is extracted again, and the merge stays exact."""
    monkeypatch.setattr(manifest, "SKETCH_RETIRED_SHARE", 0.2)  # 1 of 8 retired: the sketch alone would redo it
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=8)
    extract.extract(rd, ["layer2"], model="resnet18", weights="random", precision="fp32", batch_size=4,
                    workers=0, topk=2, progress=False)
    rows = manifest.read(rd).to_pylist()
    for r in [r for r in rows if r["shard"] == 0][:1] + [r for r in rows if r["shard"] == 1][:4]:
        Path(r["path"]).unlink()
    summary = manifest.run(rd, small_dataset)
    assert 0 not in summary.invalidated_shards and rd.topk_candidates_part("layer2", 0).exists()
    extract.extract(rd, ["layer2"], precision="fp32", batch_size=4, workers=0, topk=2, progress=False)
    topk.merge(rd, "layer2")
    got = {}
    for r in pq.read_table(rd.topk("layer2")).to_pylist():
        got.setdefault(r["channel"], []).append((r["value"], r["image_id"], r["fy"], r["fx"]))
    assert got == brute_force_topk(rd, "resnet18", "layer2", 2)


def test_a_topk_merged_before_a_shards_candidates_were_written_again_is_stale(tmp_path, small_dataset):
    """A shard extracted again for the same images (after its parts of another precision were
    deleted, as status advises) rewrote its candidates; the merged top-k kept the old values
    and status called it current."""
    from helpers import load_script

    from featscope.pipelines.app import report
    from featscope.pipelines.app.status import status

    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=4)
    extract.extract(rd, ["layer2"], model="resnet18", weights="random", precision="fp32", batch_size=4,
                    workers=0, topk=2, progress=False)
    topk.merge(rd, "layer2")
    assert "top-k layer2: 8 distinct images, current" in status(rd).line() and "top-k layer2" not in status(rd).stale
    part = rd.topk_candidates_part("layer2", 0)
    table = pq.read_table(part)
    strongest = int(np.argmax(table["value"].to_numpy()))
    values = table["value"].to_numpy().copy()
    values[strongest] *= 2  # the values a new extraction of the shard gave
    pq.write_table(table.set_column(table.schema.get_field_index("value"), "value", pa.array(values)), part)
    now = status(rd)
    assert "top-k layer2" in now.stale
    assert "merged before the dataset or a shard's candidates last changed" in now.line()
    report.build(rd, k=2, progress=False)
    assert "merged before" in load_script(rd.report_dir / "data" / "run.js")["topk"][0]["stale"]  # unit pages say so
    topk.merge(rd, "layer2")
    assert "top-k layer2" not in status(rd).stale
    report.build(rd, k=2, progress=False)
    assert load_script(rd.report_dir / "data" / "run.js")["topk"][0]["stale"] is None
    merged = pq.read_table(rd.topk("layer2"))
    assert pc.max(merged["value"]).as_py() == pytest.approx(float(values[strongest]))


def test_merge_refuses_candidates_that_ran_short(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=8)
    extract.extract(rd, ["layer2"], model="resnet18", weights="random", precision="fp32", batch_size=4,
                    workers=0, topk=1, progress=False)
    table = pq.read_table(rd.topk_candidates_part("layer2", 0))
    best = table.filter(pc.equal(table["channel"], 0))["image_id"].to_pylist()
    rows = pq.read_table(rd.manifest)
    removed = pc.or_(rows["removed"], pc.is_in(rows["image_id"], pa.array(best)))  # behind the manifest's back
    pq.write_table(rows.set_column(rows.schema.get_field_index("removed"), "removed", removed), rd.manifest)
    with pytest.raises(FeatscopeError, match="ran short|lost too many"):
        topk.merge(rd, "layer2")


def _exact_quantiles(maps: torch.Tensor, q: float) -> np.ndarray:
    per_unit = maps.transpose(0, 1).reshape(maps.shape[1], -1).numpy()
    return np.quantile(per_unit, q, axis=1, method="inverted_cdf")


def test_mask_thresholds_equal_the_exact_dataset_quantile_within_a_bin(tmp_path, small_dataset):
    """The shards' streamed sketches, merged, against the quantile of every cell of every image."""
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=4)
    extract.extract(rd, ["layer2", "pool", "layer2@2x2"], model="resnet18", weights="random", precision="fp32",
                    batch_size=3, workers=0, topk=2, progress=False)
    grid = pq.read_table(rd.topk_sketch_part("layer2@2x2", 0))
    assert len(grid) == 4 * 128 and np.stack(grid["counts"].to_numpy(zero_copy_only=False)).sum(1).max() == 4
    for layer in ("layer2", "pool"):
        topk.merge(rd, layer, quantile=0.9)
        table = pq.read_table(rd.topk_sketch(layer))
        maps, _ = full_maps(rd, "resnet18", layer)
        maps = maps if maps.ndim == 4 else maps.flatten(1)[:, :, None, None]
        width = 2 * table["scale"].to_numpy() / len(table["counts"][0])
        got = table["threshold"].to_numpy()
        assert np.all(np.abs(got - _exact_quantiles(maps, 0.9)) <= width * 1.001 + 1e-6)
        assert np.array_equal(table["low"].to_numpy(), got) and np.array_equal(table["high"].to_numpy(), got)
        counts = np.stack(table["counts"].to_numpy(zero_copy_only=False))
        assert (counts.sum(1) == maps[:, 0].numel()).all()


def test_thresholds_of_a_shard_that_lost_an_image_are_bracketed(tmp_path, small_dataset):
    """An image retired behind a kept shard's back: its counts stay in the sketch, and the
    stored bounds hold the exact quantile over the live images."""
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=16)
    extract.extract(rd, ["layer2"], model="resnet18", weights="random", precision="fp32", batch_size=4,
                    workers=0, topk=1, progress=False)
    rows = pq.read_table(rd.manifest)
    removed = pc.or_(rows["removed"], pc.equal(rows["image_id"], 0))
    pq.write_table(rows.set_column(rows.schema.get_field_index("removed"), "removed", removed), rd.manifest)
    topk.merge(rd, "layer2", quantile=0.5)
    table = pq.read_table(rd.topk_sketch("layer2"))
    maps, ids = full_maps(rd, "resnet18", "layer2")
    assert 0 not in ids
    exact = _exact_quantiles(maps, 0.5)
    width = 2 * table["scale"].to_numpy() / len(table["counts"][0])
    low, high = table["low"].to_numpy(), table["high"].to_numpy()
    assert (low <= high).all() and (low < high).any()
    assert np.all((low - width * 1.001 - 1e-6 <= exact) & (exact <= high + width * 1.001 + 1e-6))


def test_the_manifest_re_extracts_a_shard_whose_sketch_counts_too_many_retired_images(tmp_path, small_dataset):
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=16)
    extract.extract(rd, ["layer2"], model="resnet18", weights="random", workers=0, topk=1, progress=False)
    Path(manifest.read(rd).to_pylist()[0]["path"]).unlink()  # 1 of 9 images: over the 5% a sketch may keep
    summary = manifest.run(rd, small_dataset)
    assert summary.invalidated_shards == [0] and not rd.topk_sketch_part("layer2", 0).exists()


def test_masks_cover_each_units_strongest_cell_and_auto_picks_them_for_deep_layers(tmp_path, small_dataset):
    """NetDissect's masks: the unit's upsampled map above its dataset threshold. On each top
    image the mask holds the strongest cell's centre (its value is above the threshold) and
    is drawn, outlined, in the strip; a shallow layer keeps the receptive field."""
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["layer1", "layer3", "pool"], model="resnet18", weights="random", workers=0, topk=3,
                    progress=False)
    for layer in ("layer1", "layer3", "pool"):
        topk.merge(rd, layer)
    assert topk.render(rd, "layer3", units=[0, 1, 2], tile=48, progress=False).show == "mask"
    assert topk.render(rd, "layer1", units=[0], tile=48, progress=False).show == "field"
    assert topk.render(rd, "pool", units=[0], tile=48, progress=False).show == "field"
    with pytest.raises(FeatscopeError, match="no spatial map to mask"):
        topk.render(rd, "pool", units=[0], show="mask", progress=False)
    masks = topk._UnitMasks(rd, "layer3")
    from featscope.pipelines.render.unit_masks import input_masks
    maps, ids = full_maps(rd, "resnet18", "layer3")
    crop = masks.loaded.preprocessing.crop
    cell = crop / maps.shape[-1]
    for r in pq.read_table(rd.topk("layer3")).filter(pc.less(pq.read_table(rd.topk("layer3"))["channel"], 3)).to_pylist():
        unit_map = maps[ids.index(r["image_id"]), r["channel"]]
        threshold = masks.thresholds[r["channel"]]
        mask = input_masks(unit_map[None], torch.tensor([threshold]), crop)[0]
        cy, cx = int((r["fy"] + 0.5) * cell), int((r["fx"] + 0.5) * cell)
        assert bool(mask[cy, cx]) == (r["value"] > threshold)
        assert mask.float().mean() < 0.9  # a mask, not the whole image
    strip = np.asarray(Image.open(rd.unit_patches("layer3", 0)))
    assert (np.abs(strip.astype(int) - (255, 214, 0)).sum(-1) == 0).any()  # the outline is drawn


def test_without_every_shards_sketch_there_are_no_thresholds_and_the_merge_says_so(tmp_path, small_dataset):
    """Shards extracted before sketches were kept: a quantile of the others would pass for the
    dataset's, so none is written, and render falls back to receptive fields."""
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset, shard_size=4)
    extract.extract(rd, ["layer3"], model="resnet18", weights="random", workers=0, topk=2, progress=False)
    topk.merge(rd, "layer3")
    assert rd.topk_sketch("layer3").exists()
    rd.topk_sketch_part("layer3", 1).unlink()
    summary = topk.merge(rd, "layer3")
    assert summary.unsketched == [1] and "extract them again for masks" in summary.line()
    assert not rd.topk_sketch("layer3").exists()
    assert topk.render(rd, "layer3", units=[0], progress=False).show == "field"
    with pytest.raises(FeatscopeError, match="no activation thresholds"):
        topk.render(rd, "layer3", units=[0], show="mask", progress=False)


def test_a_mask_strip_is_redrawn_when_its_threshold_moves(tmp_path, small_dataset):
    """Same top-k, another dataset-wide threshold (the dataset changed elsewhere): the strip
    drawn at the old threshold must not be kept."""
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, small_dataset)
    extract.extract(rd, ["layer3"], model="resnet18", weights="random", workers=0, topk=2, progress=False)
    topk.merge(rd, "layer3")
    assert topk.render(rd, "layer3", units=[0, 1], show="mask", progress=False).drawn == 2
    assert topk.render(rd, "layer3", units=[0, 1], show="mask", progress=False).drawn == 0
    topk.merge(rd, "layer3", quantile=0.9)
    assert topk.render(rd, "layer3", units=[0, 1], show="mask", progress=False).drawn == 2
