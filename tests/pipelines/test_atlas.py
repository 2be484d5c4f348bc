"""`featscope units atlas` on a small run: vectors taken where it says, every sample in the cell
its layout bins it to, cell statistics recounted here, and renderings that point along their cell."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import read_predictions
from featscope.pipelines.core.workers import model_ref, worker_model
from featscope.pipelines.stages import atlas


@pytest.fixture(scope="module")
def run(reported_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("atlas") / "run"
    shutil.copytree(reported_run.root, copy)
    return RunDir(copy)


def _maps(run, layer, image_ids):
    loaded = worker_model(model_ref(run))[0]
    paths = {r["image_id"]: r["path"] for r in manifest.read(run).to_pylist()}
    prep = loaded.preprocessing
    from featscope.pipelines.core.images import read_pixels
    x = torch.stack([prep.to_uint8(read_pixels(paths[i], min_size=prep.resize)) for i in image_ids])
    seen = []
    module = loaded.module.get_submodule(loaded.layer(layer).module_path)
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().float()))
    with torch.no_grad():
        loaded.module(prep.normalize(x))
    handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def summary(run):
    options = atlas.AtlasOptions(layer="layer3", grid=4, images=12, per_image=2, min_count=2, size=32, steps=32,
                                 batch=8, perplexity=5)
    return atlas.atlas(run, options, progress=False)


def test_atlas_cells_hold_their_samples_and_say_what_landed_there(run, summary):
    samples = pq.read_table(run.atlas_samples("layer3")).to_pylist()
    cells = pq.read_table(run.atlas_table("layer3")).to_pylist()
    assert summary.vectors == len(samples) == 24 and summary.images == 12
    assert len({(s["image_id"], s["y"], s["x"]) for s in samples}) == 24  # distinct positions per image
    for s in samples:
        assert (s["gy"], s["gx"]) == (min(int(s["py"] * 4), 3), min(int(s["px"] * 4), 3))
    labels = {r["image_id"]: r["label"] for r in manifest.read(run).to_pylist()}
    predicted = read_predictions(run)
    names = worker_model(model_ref(run))[2]
    assert sum(c["count"] for c in cells) == len(samples)
    for c in cells:
        here = [s["image_id"] for s in samples if (s["gy"], s["gx"]) == (c["gy"], c["gx"])]
        assert c["count"] == len(here) and sorted(c["image_ids"]) == sorted(set(here))
        counts = {lab: sum(labels[i] == lab for i in here) for lab in set(labels[i] for i in here)}
        assert counts[c["label"]] == max(counts.values()) and c["label_share"] == pytest.approx(
            max(counts.values()) / len(here))
        top = [names[predicted[i][0][0]] if names else str(predicted[i][0][0]) for i in here]
        assert top.count(c["class"]) == max(top.count(t) for t in set(top))
        assert c["rendered"] == (len(here) >= 2) == run.atlas_cell("layer3", c["gy"], c["gx"]).exists()
    assert Image.open(run.atlas_image("layer3")).size == (4 * 32, 4 * 32)


def test_sampled_vectors_are_the_layers_activations_wherever_they_are_sampled(run):
    loaded, device, _ = worker_model(model_ref(run))
    module = loaded.module.get_submodule(loaded.layer("layer3").module_path)
    rows = manifest.read(run).select(["image_id", "path"]).to_pylist()
    vectors, where = atlas.sample_activations(loaded, module, device, rows[:5], 3, seed=1, progress=False)
    alone, where_alone = atlas.sample_activations(loaded, module, device, rows[3:4], 3, seed=1, progress=False)
    maps = _maps(run, "layer3", [r["image_id"] for r in rows[:5]])
    for v, (image_id, y, x) in zip(vectors, where):
        b = [r["image_id"] for r in rows[:5]].index(image_id)
        np.testing.assert_allclose(v, maps[b, :, y, x].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(where_alone, where[where[:, 0] == rows[3]["image_id"]])  # others do not matter
    np.testing.assert_allclose(alone, vectors[where[:, 0] == rows[3]["image_id"]], rtol=1e-4, atol=1e-4)


def test_a_cell_rendering_points_along_its_mean_direction(run, summary):
    """The direction objective's point: on a cell's rendering the layer's activation is closer
    in angle to the cell's mean vector than on the image it started from (one step in), for
    most cells and on average."""
    loaded, device, _ = worker_model(model_ref(run))
    module = loaded.module.get_submodule(loaded.layer("layer3").module_path)
    rows = {r["image_id"]: r for r in manifest.read(run).to_pylist()}
    samples = pq.read_table(run.atlas_samples("layer3")).to_pylist()
    vectors, where = atlas.sample_activations(loaded, module, device, [rows[i] for i in sorted(
        {s["image_id"] for s in samples})], 2, seed=0, progress=False)
    cell_of = {(s["image_id"], s["y"], s["x"]): (s["gy"], s["gx"]) for s in samples}
    cells = [c for c in pq.read_table(run.atlas_table("layer3")).to_pylist() if c["rendered"]]
    means = torch.stack([torch.from_numpy(vectors[[cell_of[tuple(w)] == (c["gy"], c["gx"]) for w in where]].mean(0))
                         for c in cells])
    start = atlas._render(loaded, loaded.layer("layer3"), device, means, cells, atlas.AtlasOptions(
        layer="layer3", grid=4, size=32, steps=1, batch=8), progress=False)

    def as_tensor(picture):
        return torch.from_numpy(np.array(picture)).permute(2, 0, 1).float()

    done = [as_tensor(Image.open(run.atlas_cell("layer3", c["gy"], c["gx"]))) for c in cells]
    x = F.interpolate(torch.stack(done + [as_tensor(p) for p in start]), size=(224, 224), mode="bilinear",
                      align_corners=True)
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().float()))
    with torch.no_grad():
        loaded.module(loaded.preprocessing.normalize(x))
    handle.remove()
    n = len(cells)
    target = torch.cat([means, means])[:, :, None, None]
    cosine = F.cosine_similarity(seen[0], target, dim=1).mean((-2, -1))
    gain = cosine[:n] - cosine[n:]  # an untrained network and 32 steps: most cells, not every one
    assert n >= 2 and float(gain.mean()) > 0.01 and float((gain > 0).float().mean()) >= 0.75, cosine


def test_bad_layers_are_one_line(run):
    with pytest.raises(FeatscopeError, match="no activation vectors"):
        atlas.atlas(run, atlas.AtlasOptions(layer="pixels"), progress=False)


def test_a_topk_merged_again_leaves_the_atlas_current(run, summary):
    """The atlas reads no top-k, but its stamp counted it: merging the top-k again (another k
    in the config) hid a current atlas from the report and called it stale for good, since
    the workflow does not make the atlas again for that."""
    import os

    from featscope.pipelines.core.trust import current_unit_table

    assert current_unit_table(run, run.atlas_table("layer3"), "layer3") is not None
    stat = run.topk("layer3").stat()
    os.utime(run.topk("layer3"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # merged again
    try:
        assert current_unit_table(run, run.atlas_table("layer3"), "layer3") is not None
        stat_ids = run.live_ids.stat()
        os.utime(run.live_ids, ns=(stat_ids.st_atime_ns, stat_ids.st_mtime_ns + 1))  # the dataset changed
        try:
            assert current_unit_table(run, run.atlas_table("layer3"), "layer3") is None
        finally:
            os.utime(run.live_ids, ns=(stat_ids.st_atime_ns, stat_ids.st_mtime_ns))
    finally:
        os.utime(run.topk("layer3"), ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_report_keeps_the_cell_pictures_its_atlas_table_describes(run, summary, tmp_path):
    """The report linked the run's cell pictures: an atlas made again after the report was
    built (another grid) put its cells' pictures over the old table's counts and images, so a
    cell showed one direction and listed the images of another."""
    from helpers import load_script

    from featscope.pipelines.app import report

    rd = RunDir(tmp_path / "run")
    shutil.copytree(run.root, rd.root)
    report.build(rd, k=2, progress=False)
    cells = pq.read_table(rd.atlas_table("layer3")).to_pylist()
    kept = rd.report_dir / "pictures" / "units" / "layer3" / "atlas"
    drawn = {p.name: p.read_bytes() for p in sorted(rd.atlas_dir("layer3").glob("cell-*.png"))}
    assert {p.name: p.read_bytes() for p in sorted(kept.glob("cell-*.png"))} == drawn
    assert len(drawn) == sum(c["rendered"] for c in cells) > 0
    atlas.atlas(rd, atlas.AtlasOptions(layer="layer3", grid=3, images=12, per_image=2, min_count=2, size=24, steps=2,
                                       batch=8, perplexity=5), progress=False)  # made again; the report not built
    assert {p.name: p.read_bytes() for p in rd.atlas_dir("layer3").glob("cell-*.png")} != drawn
    assert {p.name: p.read_bytes() for p in sorted(kept.glob("cell-*.png"))} == drawn  # still its table's
    assert load_script(rd.report_dir / "data" / "atlas-layer3.js")["grid"] == 4
    report.build(rd, k=2, progress=False)
    assert load_script(rd.report_dir / "data" / "atlas-layer3.js")["grid"] == 3
    assert {p.name: p.read_bytes() for p in sorted(kept.glob("cell-*.png"))} == {
        p.name: p.read_bytes() for p in sorted(rd.atlas_dir("layer3").glob("cell-*.png"))}
