"""A stage that rewrites many files and then the table that describes them, stopped half way
(a killed job, a requeued cluster job, Ctrl-C), must not leave the old table vouching for a
mix of old and new files: the report would show new pictures beside old numbers, and a later
run with the old options would keep the new pictures as if they were its own."""

import dataclasses
import json
import shutil

import pytest

from featscope.pipelines.app import report
from featscope.pipelines.app.report_pictures import KeptPictures
from featscope.pipelines.app.status import status
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.trust import read_sanity
from featscope.pipelines.stages import atlas, explain, saliency_trust, topk, units


class Stopped(Exception):
    """Stands for the job being killed where it was."""


def stop_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make module.name raise Stopped on its call number `calls` + 1."""
    real, seen = getattr(module, name), []

    def counted(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise Stopped
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)


@pytest.fixture(scope="module")
def run(reported_run, tmp_path_factory):
    copy = tmp_path_factory.mktemp("interrupted") / "run"
    shutil.copytree(reported_run.root, copy)
    return RunDir(copy)


def strips(run: RunDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.patches_dir("layer3").glob("unit-*.png")}


def test_a_stopped_patch_render_vouches_for_none_of_its_strips(run, monkeypatch):
    topk.render(run, "layer3", units=[0, 1, 2, 3], tile=32, progress=False)
    drawn_at_32 = strips(run)
    assert sorted(run.drawn_strips("layer3")) == [0, 1, 2, 3]

    with monkeypatch.context() as patched:
        stop_after(patched, topk, "_strip", 2)  # two strips at 40 px written, then killed
        with pytest.raises(Stopped):
            topk.render(run, "layer3", units=[0, 1, 2, 3], tile=40, progress=False)
    assert strips(run) != drawn_at_32  # the mix is on disk...
    assert sorted(run.drawn_strips("layer3")) == []  # ...but nothing vouches for it: the report shows no strip
    assert not run.patches_record("layer3").exists() and not run.patch_sheet("layer3").exists()
    assert report._patches_show(run, "layer3") is None
    assert "patches layer3" in status(run).stale  # and `featscope status` says so

    # the old options again: every strip is drawn again, not the 40 px ones kept as current
    again = topk.render(run, "layer3", units=[0, 1, 2, 3], tile=32, progress=False)
    assert again.drawn == 4 and strips(run) == drawn_at_32
    # a render of some units keeps the others listed while they are current
    assert topk.render(run, "layer3", units=[0, 1], tile=32, progress=False).drawn == 0
    assert sorted(run.drawn_strips("layer3")) == [0, 1, 2, 3]
    assert sorted(json.loads(run.patches_record("layer3").read_text())["units"]) == ["0", "1", "2", "3"]


def test_a_stopped_unit_render_leaves_no_table(run, monkeypatch):
    options = units.RenderOptions(layer="layer3", units="0-3", size=32, steps=2, batch=2)
    units.render(run, options, progress=False)
    assert run.units_table("layer3").exists() and run.units_sheet("layer3").exists()

    with monkeypatch.context() as patched:
        stop_after(patched, units, "to_image", 2)
        with pytest.raises(Stopped):
            units.render(run, units.RenderOptions(layer="layer3", units="0-3", size=48, steps=2, batch=2),
                         progress=False)
    assert run.unit_visualisation("layer3", 0).exists()  # a new picture, described by no table
    assert not run.units_table("layer3").exists() and not run.units_sheet("layer3").exists()
    assert any(line.startswith("units layer3 visualisations: unfinished") for line in status(run).lines)

    units.render(run, options, progress=False)
    assert run.units_table("layer3").exists() and run.units_sheet("layer3").exists()
    assert "units layer3 visualisations" not in status(run).stale


def test_a_stopped_atlas_leaves_no_tables_or_picture(run, monkeypatch):
    options = atlas.AtlasOptions(layer="layer3", grid=3, images=8, per_image=1, min_count=1, size=16, steps=2,
                                 batch=8, perplexity=3)
    atlas.atlas(run, options, progress=False)
    made = (run.atlas_table("layer3"), run.atlas_samples("layer3"), run.atlas_image("layer3"))
    assert all(p.exists() for p in made)

    with monkeypatch.context() as patched:
        stop_after(patched, atlas, "_mosaic", 0)  # the cells of another layout written, then killed
        with pytest.raises(Stopped):
            atlas.atlas(run, dataclasses.replace(options, seed=1), progress=False)
    assert list(run.atlas_dir("layer3").glob("cell-*.png"))
    assert not any(p.exists() for p in made)
    assert "units layer3 atlas" in status(run).stale


def test_a_stopped_query_batch_lists_no_pairs_and_a_pair_of_another_similarity_leaves_the_list(run, monkeypatch):
    photos = [r["image_id"] for r in manifest.read(run).to_pylist() if r["label"] == "photo"]
    explain.run(run, explain.ExplainOptions(layer="pool", queries=photos[:1], k=3))
    listed = explain.read_queries(run, "pool")
    assert len(listed[photos[0]]) == 3

    with monkeypatch.context() as patched:
        stop_after(patched, explain, "write", 1)
        with pytest.raises(Stopped):
            explain.run(run, explain.ExplainOptions(layer="pool", queries=photos[:1], k=3, similarity="dot"))
    assert explain.read_queries(run, "pool") == {}  # one pair's files hold dot maps: the cosine list is gone
    assert report._explained(run, set(manifest.read(run)["image_id"].to_pylist()), KeptPictures(run))[0] == {}

    explain.run(run, explain.ExplainOptions(layer="pool", queries=photos[:1], k=3))
    first, second = (n[0] for n in explain.read_queries(run, "pool")[photos[0]][:2])
    # one pair of the list explained alone with the list's similarity: it stays listed
    explain.run(run, explain.ExplainOptions(layer="pool", pair=f"{photos[0]},{first}"))
    assert [n[0] for n in explain.read_queries(run, "pool")[photos[0]]][:2] == [first, second]
    # with another similarity: its files no longer match the list's numbers, so it leaves the list
    explain.run(run, explain.ExplainOptions(layer="pool", pair=f"{photos[0]},{first}", similarity="dot"))
    assert first not in [n[0] for n in explain.read_queries(run, "pool")[photos[0]]]
    assert second in [n[0] for n in explain.read_queries(run, "pool")[photos[0]]]



def test_a_stopped_sanity_check_leaves_no_verdicts_beside_its_plots(run, monkeypatch):
    options = saliency_trust.SanityOptions(methods=["gradcam"], sample=2, steps=3)
    saliency_trust.sanity(run, options, progress=False)
    assert read_sanity(run) and run.sanity_table.exists()

    with monkeypatch.context() as patched:
        real_plot = saliency_trust._plot

        def plot_then_stop(*args):
            real_plot(*args)
            raise Stopped
        patched.setattr(saliency_trust, "_plot", plot_then_stop)
        with pytest.raises(Stopped):  # the plot of another seed written, then killed
            saliency_trust.sanity(run, dataclasses.replace(options, seed=1), progress=False)
    assert run.sanity_plot("gradcam").exists()
    assert read_sanity(run) == {} and not run.sanity_table.exists()


def test_a_stopped_report_build_says_so_instead_of_mixing_two_builds(run, monkeypatch):
    summary = run.report_dir / "data" / "run.js"
    report.build(run, k=4, progress=False)
    assert summary.exists()

    with monkeypatch.context() as patched:
        stop_after(patched, report, "_script", 1)  # one data file of the new build written, then killed
        with pytest.raises(Stopped):
            report.build(run, k=3, progress=False)
    assert not summary.exists()  # the pages start from it: without it they say the report is incomplete
    page = (run.report_dir / "index.html").read_text()
    assert "if (window.FS_RUN) FS.index(); else" in page and "build was stopped" in page

    report.build(run, k=4, progress=False)
    assert summary.exists()
