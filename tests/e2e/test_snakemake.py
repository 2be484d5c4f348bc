"""The workflow through `snakemake` itself: a run of every stage, a no-op rerun, a config error."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import snakemake, write_dataset

from featscope.pipelines.app.status import status
from featscope.pipelines.core.rundir import RunDir


@pytest.mark.slow
def test_workflow_runs_every_stage_and_reruns_nothing(tmp_path, digits):
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=4, labels=(0, 1, 2, 3))
    # bytes that do not decode: an error row for good, and no rule reruns for them (the report
    # used to take its grey square for an image away for a while and rebuild on every run)
    (images / "0" / "zz-broken.png").write_text("not a picture")
    cfg = {
        "run": "e2e", "runs_dir": str(tmp_path / "runs"), "images": str(images), "shard_size": 3,
        "model": {"arch": "resnet18", "weights": "random"}, "layers": ["pool", "layer3"],
        "extract": {"batch_size": 4, "workers": 0, "threads": 1},
        "index": {"queries": [0, 5], "k": 3},
        "topk": {"k": 3, "units": "0-3"},
        "embed": {"layers": ["pool"], "perplexity": 2, "grid_side": 2, "tile": 16},
        "saliency": {"methods": ["gradcam"], "select": "label=photo", "workers": 1, "segment": True,
                     "evaluate": {"steps": 4}, "sanity": {"sample": 2, "steps": 3}},
        "explain": {"k": 2},
        "clean": {},  # on from the first run, whose run directory does not exist yet as it starts
        "units": {"render": {"layers": ["layer3"], "units": "0-1", "size": 24, "steps": 2},
                  "label": {"gradient_images": 1},
                  "atlas": {"layers": ["layer3"], "grid": 2, "images": 8, "per_image": 1, "min_count": 1, "size": 16,
                            "steps": 1, "perplexity": 2, "precision": "bf16"}},
        "viz": {"filters": ["stem"], "activations": {"layers": ["layer1"], "ids": [0]},
                "class_models": {"classes": [1, 2], "steps": 3, "octaves": 1},
                "adversarial": {"ids": [0], "steps": 2}, "dream": {"layers": ["layer1"], "ids": [0],
                                                                     "octaves": 1, "steps": 2},
                "inversion": {"layers": ["layer1", "layer2"], "ids": [0], "steps": 3}},
    }
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "e2e"

    first = snakemake(tmp_path, configfile)
    assert first.returncode == 0, first.stderr[-3000:]
    listed = lambda folder: sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # noqa: E731
    parts = listed(run / "features" / "pool")
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert pq.read_table(run / "features" / "layer3").num_rows == 8
    for layer in ("pool", "layer3", "pixels"):
        assert json.loads((run / "index" / layer / "meta.json").read_text())["vectors"] == 8
    assert set(json.loads((run / "index" / "evaluation.json").read_text())["layers"]) == {"pool", "layer3", "pixels"}
    assert (run / "neighbours" / "pool.jpg").exists() and (run / "neighbours" / "layer3.jpg").exists()
    assert pq.read_table(run / "topk" / "layer3.parquet").num_rows == 256 * 3
    assert listed(run / "patches" / "layer3") == [f"unit-000{i}.png" for i in range(4)]
    assert pq.read_table(run / "embedding" / "pool.parquet").num_rows == 8
    assert listed(run / "mosaic") == [
        "pool-grid.jpg", "pool-grid.parquet", "pool-plot.png", "pool-scatter.jpg"]
    photo_ids = [r["image_id"] for r in pq.read_table(run / "manifest.parquet").to_pylist() if r["label"] == "photo"]
    assert sorted(pq.read_table(run / "saliency" / "summary.parquet")["image_id"].to_pylist()) == sorted(photo_ids)
    for i in photo_ids:
        for name in (f"{i}.npz", f"{i}.png", f"{i}-mask.png"):
            assert (run / "saliency" / "gradcam" / name).exists()

    evaluated = pq.read_table(run / "saliency" / "faithfulness.parquet" / "gradcam.parquet").to_pylist()
    assert sorted(r["image_id"] for r in evaluated) == sorted(photo_ids)
    assert all((run / "saliency" / "gradcam" / f"{i}.curves.npz").exists() for i in photo_ids)
    sanity = json.loads((run / "saliency" / "sanity.json").read_text())
    assert sanity["gradcam"]["steps"] == 3 and (run / "saliency" / "sanity-gradcam.png").exists()
    for layer in ("pool", "layer3"):
        explained = json.loads((run / "explain" / layer / "queries.json").read_text())["pairs"]
        assert sorted(explained) == ["0", "5"] and all(len(pairs) == 2 for pairs in explained.values())

    assert pq.read_table(run / "units" / "layer3" / "visualisations.parquet")["unit"].to_pylist() == [0, 1]
    assert listed(run / "units" / "layer3")[:2] == ["atlas", "labels.parquet"]
    assert pq.read_table(run / "units" / "layer3" / "labels.parquet").num_rows == 256
    assert pq.read_table(run / "units" / "pool" / "labels.parquet").num_rows == 512
    cells = pq.read_table(run / "units" / "layer3" / "atlas" / "cells.parquet").to_pylist()
    assert sum(c["count"] for c in cells) == 8 and (run / "units" / "layer3" / "atlas" / "atlas.png").exists()
    assert pq.read_schema(run / "units" / "layer3" / "atlas" / "cells.parquet").metadata[b"precision"] == b"bf16"
    assert (run / "topk" / "sketches" / "layer3.parquet").exists()

    viz = run / "viz"
    assert sorted(str(p.relative_to(viz)) for p in viz.rglob("*.png")) == [
        "activations/layer1/0.png", "adversarial/0-untargeted-adv.png", "adversarial/0-untargeted.png",
        "class-models.png", "class-models/1.png", "class-models/2.png", "dream/0.png", "filters/stem.png",
        "inversion/0.png"]

    assert (run / "report" / "index.html").exists() and (run / "report" / "data" / "run.js").exists()
    # every output that records what it was made from (top-k, sheets, mosaics, evaluation,
    # report) was made from what the run holds now: no record says stale after a full run
    assert status(RunDir(run)).stale == []

    again = snakemake(tmp_path, configfile)
    assert again.returncode == 0 and "Nothing to be done" in again.stderr

    # Images that cannot be read while a neighbour sheet, patch strips or a saliency map are
    # made (a share away for a minute) are grey stand-ins or no map: the next run makes those
    # again, and then rests.
    (run / "saliency" / "gradcam" / f"{photo_ids[0]}.npz").unlink()
    images.rename(tmp_path / "away")
    for args in (["neighbours", "--layer", "pool", "--ids", "0,5", "--k", "3"],
                 ["topk", "render", "--layer", "layer3", "--units", "0-3", "--tile", "40"],  # (drawn anew)
                 ["saliency", "compute", "--method", "gradcam", "--select", "label=photo", "--workers", "1",
                  "--segment"]):
        drawn = subprocess.run([str(Path(sys.executable).with_name("featscope")), *args, "--run", str(run)],
                               capture_output=True, text=True)
        assert drawn.returncode == (1 if args[0] == "saliency" else 0), drawn.stderr[-2000:]  # 1: every map failed
    (tmp_path / "away").rename(images)
    grey = RunDir(run)
    assert grey.greyed_neighbours("pool") and grey.greyed_strips("layer3") == [0, 1, 2, 3]
    redrawn = snakemake(tmp_path, configfile)
    assert redrawn.returncode == 0, redrawn.stderr[-3000:]
    assert all(f"rule {rule}:" in redrawn.stderr for rule in ("neighbours", "topk_render", "saliency"))
    assert grey.greyed_neighbours("pool") == [] and grey.greyed_strips("layer3") == []
    assert (run / "saliency" / "gradcam" / f"{photo_ids[0]}.npz").exists()
    rested = snakemake(tmp_path, configfile, "-n")
    assert "Nothing to be done" in rested.stdout + rested.stderr
    assert status(grey).stale == []

    # growth, removals and edits: tests/e2e/test_changing_dataset.py


def test_a_config_error_stops_the_workflow_before_any_job(tmp_path):
    cfg = {"run": "bad", "images": str(tmp_path), "model": {"arch": "resnet18"}, "layers": ["pool"],
           "extract": {"precision": "fp8"}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    done = snakemake(tmp_path, configfile)
    assert done.returncode != 0
    assert "config error at extract.precision: 'fp8' is not one of" in done.stderr + done.stdout
    assert not (tmp_path / "runs").exists()
    # a key given twice: Snakemake reads YAML keeping the last, so the first section went unseen
    configfile.write_text(yaml.safe_dump(cfg | {"extract": {"threads": 1}}) + "extract: {threads: 2}\n")
    done = snakemake(tmp_path, configfile)
    assert done.returncode != 0 and "'extract' is given twice in one mapping (first at line" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_config_change_reruns_what_it_decides_and_a_missing_output_is_made_again(tmp_path, digits):
    """Snakemake records no params for a rule whose command takes the job's threads: a change
    of `topk.k` or of a saliency option in the config used to rerun nothing, and the run kept
    top-k and maps made with the old settings as if current. And a stage's output deleted (or
    removed by Snakemake when a rerun of its job failed) stayed missing: every later run said
    "Nothing to be done" while the report was there."""
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=2, labels=(0, 1, 2, 3))
    cfg = {"run": "changed", "runs_dir": str(tmp_path / "runs"), "images": str(images),
           "model": {"arch": "resnet18", "weights": "random"}, "layers": ["pool"],
           "extract": {"workers": 0, "threads": 1}, "topk": {"k": 2, "units": "0-1"},
           "embed": {"perplexity": 1, "grid_side": 2, "tile": 16},
           "saliency": {"methods": ["gradient"], "select": "label=photo", "workers": 1}}
    configfile = tmp_path / "config.yaml"
    write = lambda: configfile.write_text(yaml.safe_dump(cfg))  # noqa: E731
    write()
    assert (first := snakemake(tmp_path, configfile)).returncode == 0, first.stderr[-3000:]
    rd = RunDir(tmp_path / "runs" / "changed")
    assert pq.read_table(rd.topk("pool")).num_rows == 512 * 2

    cfg["extract"] |= {"batch_size": 2, "threads": 2}  # how it runs, not what it makes: nothing to redo
    write()
    assert "Nothing to be done" in snakemake(tmp_path, configfile, "-n").stdout

    # what the run pins is refused before any job: an extract job refused it only after
    # Snakemake had deleted the feature part it was to make again
    parts = sorted(p.read_bytes() for p in (rd.root / "features" / "pool").glob("part-*.parquet"))
    for key, section, value in (("extract.precision", "extract", {"precision": "fp32"}),
                                ("model.seed", "model", {"seed": 1})):
        cfg[section] |= value
        write()
        refused = snakemake(tmp_path, configfile)
        assert refused.returncode != 0 and f"config error at {key}" in refused.stderr, refused.stderr[-2000:]
        assert sorted(p.read_bytes() for p in (rd.root / "features" / "pool").glob("part-*.parquet")) == parts
        for name in value:
            del cfg[section][name]

    cfg["topk"]["k"], cfg["saliency"]["score"] = 3, "probability"
    write()
    assert (changed := snakemake(tmp_path, configfile)).returncode == 0, changed.stderr[-3000:]
    assert pq.read_table(rd.topk("pool")).num_rows == 512 * 3
    made_with = {json.loads(o)["score"] for o in pq.read_table(rd.saliency_summary("gradient"))["options"].to_pylist()}
    assert made_with == {"probability"}
    assert "Nothing to be done" in snakemake(tmp_path, configfile, "-n").stdout

    rd.embedding("pool").unlink()
    # with `clean` on, a run that has work first deletes what killed jobs left an hour ago or
    # more (and only then: a dry run deletes nothing)
    cfg["clean"] = {}
    write()
    left, recent = (rd.feature_part("pool", 0).with_name(f".part-0000{n}.parquet.4242.0badc0de.tmp") for n in (7, 8))
    for path in (left, recent):
        path.write_bytes(b"PAR1")
    os.utime(left, (time.time() - 7200,) * 2)
    assert "rule embed:" in snakemake(tmp_path, configfile, "-n").stdout and left.exists()
    assert (again := snakemake(tmp_path, configfile)).returncode == 0, again.stderr[-3000:]
    assert "rule embed:" in again.stderr and rd.embedding("pool").exists()
    assert "featscope clean: deleted 1 leftover of stopped jobs" in again.stderr
    assert not left.exists() and recent.exists()
    recent.unlink()
    assert status(rd).stale == []
