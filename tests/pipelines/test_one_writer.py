"""Two jobs rewriting one set of pictures and the table that vouches for them take turns
(`atomic.one_writer`): else the table of the one that finished last vouched for the other's
pictures wherever they differed (other options, another top-k), a toolbox picture's record
gave another job's numbers, and an output's record (`derived`) named the sources of another
job's output. Table-driven: each stage, started while another job holds its folder's lock,
says so and waits, its folder untouched, then finishes."""

import shutil
import threading
import time

import pytest
from helpers import write_dataset

from featscope.pipelines.app import report
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import holding
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.trust import read_evaluation
from featscope.pipelines.stages import atlas, embed, explain, extract, mosaic, saliency, style, topk, units, viz
from featscope.pipelines.stages import index as neighbours
from featscope.pipelines.stages import neighbours as sheets
from featscope.pipelines.stages import saliency_trust as trust


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits):
    """Nine digits and two photos: layer3 top-k, a pool index and map, Grad-CAM maps."""
    root = tmp_path_factory.mktemp("turns")
    write_dataset(root / "images", digits, n_photos=2, labels=(0, 1, 7), digits_per_label=3)
    rd = RunDir(root / "run")
    manifest.run(rd, root / "images", model="resnet18", weights="random")
    extract.extract(rd, ["pool", "layer3"], workers=0, topk=3, progress=False)
    neighbours.build(rd, "pool", progress=False)
    topk.merge(rd, "layer3")
    embed.embed(rd, "pool", perplexity=3)
    saliency.run(rd, saliency.SaliencyOptions(method="gradcam", select="label=photo"), progress=False)
    return rd


def photo(rd) -> int:
    return next(r["image_id"] for r in manifest.read(rd).to_pylist() if r["label"] == "photo")


def photos(rd) -> list[str]:
    return [r["path"] for r in manifest.read(rd).to_pylist() if r["label"] == "photo"]


STAGES = {  # name -> (the folder whose lock it takes, the job)
    "topk render": (lambda rd: rd.patches_dir("layer3"),
                    lambda rd: topk.render(rd, "layer3", units=[0, 1], progress=False)),
    "units render": (lambda rd: rd.units_dir("layer3"),
                     lambda rd: units.render(rd, units.RenderOptions(layer="layer3", units="0", size=32, steps=2),
                                             progress=False)),
    "units atlas": (lambda rd: rd.atlas_dir("layer3"),
                    lambda rd: atlas.atlas(rd, atlas.AtlasOptions(layer="layer3", grid=3, images=11, per_image=1,
                                                                  min_count=2, size=24, steps=2, perplexity=3),
                                           progress=False)),
    "explain queries": (lambda rd: rd.explain_dir("pool"),
                        lambda rd: explain.run(rd, explain.ExplainOptions(layer="pool", queries=[photo(rd)], k=2))),
    "explain pair": (lambda rd: rd.explain_dir("pool"),
                     lambda rd: explain.run(rd, explain.ExplainOptions(layer="pool", pair=f"{photo(rd)},0",
                                                                       similarity="dot"))),
    "saliency": (lambda rd: rd.saliency_dir("gradcam"),
                 lambda rd: saliency.run(rd, saliency.SaliencyOptions(method="gradcam", select="label=photo"),
                                         progress=False)),
    "saliency sanity": (lambda rd: rd.sanity_table.parent,
                        lambda rd: trust.sanity(rd, trust.SanityOptions(sample=2), progress=False)),
    "report": (lambda rd: rd.report_dir, lambda rd: report.build(rd, k=2, progress=False)),
    "embed": (lambda rd: rd.embedding("pool").parent, lambda rd: embed.embed(rd, "pool", perplexity=3)),
    "mosaic grid": (lambda rd: rd.root / "mosaic", lambda rd: mosaic.grid(rd, "pool", side=2, tile=8, progress=False)),
    "mosaic scatter": (lambda rd: rd.root / "mosaic",
                       lambda rd: mosaic.scatter(rd, "pool", size=64, tile=8, progress=False)),
    "mosaic plot": (lambda rd: rd.root / "mosaic", lambda rd: mosaic.plot(rd, "pool")),
    "topk merge": (lambda rd: rd.topk("layer3").parent, lambda rd: topk.merge(rd, "layer3")),
    "index build": (lambda rd: rd.index_root, lambda rd: neighbours.build(rd, "pool", progress=False)),
    "index evaluate": (lambda rd: rd.index_evaluation.parent, lambda rd: neighbours.evaluate(rd, ["pool"], k=2)),
    "neighbours sheet": (lambda rd: rd.neighbour_sheet("pool").parent,
                         lambda rd: sheets.render(rd, "pool", [photo(rd)], k=2, tile=16)),
    "viz adversarial": (lambda rd: rd.viz_dir / "adversarial",
                        lambda rd: viz.adversarial(rd, [photo(rd)], method="fgsm")),
    "viz inversion": (lambda rd: rd.viz_dir / "inversion",
                      lambda rd: viz.inversion(rd, [photo(rd)], ["layer1"], steps=2, progress=False)),
    "style train": (lambda rd: rd.root / "style-net",
                    lambda rd: style.train(rd.root / "style-net", photos(rd), rd.root.parent / "images",
                                           style.TrainOptions(steps=2, size=32, batch=1, width=8, blocks=1,
                                                              model="resnet18", weights="random",
                                                              content_layer="layer1", style_layers=["layer1"]),
                                           progress=False)),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_waits_while_another_job_writes_its_set(run, stage, capfd):
    folder, job = STAGES[stage]
    failed = []

    def work():
        try:
            job(run)
        except BaseException as e:  # noqa: BLE001 (shown by the assertion below)
            failed.append(e)

    def files():
        return {p: p.stat().st_mtime_ns for p in folder(run).rglob("*") if p.is_file() and p.suffix != ".lock"}

    worker = threading.Thread(target=work)
    with holding(folder(run) / ".writer.lock"):  # another job is writing
        before = files()
        worker.start()
        said, deadline = "", time.monotonic() + 300
        while "another job is writing" not in said and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
            said += capfd.readouterr().err
        assert "another job is writing" in said and str(folder(run)) in said, (said, failed)
        assert worker.is_alive() and files() == before  # waiting, its set untouched
    worker.join(300)
    assert not worker.is_alive() and failed == []


def test_an_evaluation_finished_while_another_ran_keeps_its_rows(run, monkeypatch):
    """`saliency evaluate` reads the stored rows again when it writes: a job that evaluated other
    images meanwhile (here, between this job's start and its write) keeps its rows."""
    photos = [r["image_id"] for r in manifest.read(run).to_pylist() if r["label"] == "photo"]
    options = {"steps": 4, "precision": "fp32", "images_per_task": 100, "methods": ["gradcam"]}
    for path in run.faithfulness_dir.glob("*.parquet"):
        path.unlink()
    batch = trust.evaluate_batch

    def with_another_job(*args):
        monkeypatch.setattr(trust, "evaluate_batch", batch)
        trust.evaluate(run, trust.EvaluateOptions(select=f"ids={photos[1]}", **options), progress=False)
        return batch(*args)

    monkeypatch.setattr(trust, "evaluate_batch", with_another_job)
    trust.evaluate(run, trust.EvaluateOptions(select=f"ids={photos[0]}", **options), progress=False)
    assert sorted(read_evaluation(run, "gradcam")) == sorted(photos)


def test_status_tells_a_set_being_written_now_from_one_a_stopped_job_left(run):
    """Pictures without their table are unfinished work: being written now where a job holds
    the folder's lock (who, since when), else left by a stopped job. Likewise the report."""
    from featscope.pipelines.app.status import status

    folder = run.root / "units" / "layerX"  # pictures of a render whose table is not written yet
    folder.mkdir(parents=True)
    (folder / "unit-0000.png").write_bytes(b"")
    if not (run.report_dir / "data" / "run.js").exists():
        report.build(run, k=2, progress=False)
    summary = run.report_dir / "data" / "run.js"
    summary.rename(summary.with_name("run.js.aside"))  # as a build does before it writes its data
    try:
        with holding(folder / ".writer.lock"), holding(run.report_dir / ".writer.lock"), \
                holding(run.saliency_dir("gradcam") / ".writer.lock"):
            said = status(run)
            lines = said.line().splitlines()
            assert next(x for x in lines if x.startswith("units layerX visualisations: being written now (pid "))
            assert next(x for x in lines if x.startswith("report: being built now (pid "))
            assert "saliency/gradcam: being written now (pid " in said.line()
            assert "units layerX visualisations" in said.stale and "report" in said.stale
        lines = status(run).line().splitlines()
        assert "units layerX visualisations: unfinished (pictures without their table: a job was stopped while it " \
               "wrote them)" in lines
        assert next(x for x in lines if x.startswith("report: unfinished: a build was stopped"))
        assert "being written now" not in "\n".join(lines)
    finally:
        summary.with_name("run.js.aside").rename(summary)
        shutil.rmtree(folder)


def test_status_names_sanity_plots_left_without_their_verdicts(run):
    from featscope.pipelines.app.status import status

    if not run.sanity_verdicts.exists():
        trust.sanity(run, trust.SanityOptions(sample=2), progress=False)
    aside = run.sanity_verdicts.with_name("sanity.json.aside")
    run.sanity_verdicts.rename(aside)  # as a sanity job does before it draws its plots again
    try:
        with holding(run.sanity_table.parent / ".writer.lock"):
            assert next(x for x in status(run).line().splitlines() if x.startswith("sanity: being written now (pid "))
        assert "sanity: unfinished (pictures without their table: a job was stopped while it wrote them)" in \
            status(run).line().splitlines()
    finally:
        aside.rename(run.sanity_verdicts)
