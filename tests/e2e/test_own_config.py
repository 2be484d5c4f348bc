"""A user's config is the whole config: the workflow plans exactly the stages it configures,
nothing of the demo's, and every optional section can be left out or switched off."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_dataset

REPO = Path(__file__).resolve().parents[2]
ALWAYS = {"manifest", "index", "evaluate", "topk_merge", "topk_render", "embed", "mosaic", "report", "all"}


def planned_jobs(workdir: Path, cfg: dict) -> set[str]:
    configfile = workdir / "my.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(configfile), "--cores", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    table = (done.stdout + done.stderr).split("Job stats:")[1].split("total")[0]
    return set(re.findall(r"^([a-z_]+)\s+\d+\s*$", table, re.M))


@pytest.mark.parametrize("arch, layers", [("resnet18", ["layer4", "pool"]), ("mobilenet_v2", ["block13", "pool"])])
def test_a_minimal_config_plans_only_the_default_stages(tmp_path, digits, arch, layers):
    write_dataset(tmp_path / "images", digits, n_photos=2, labels=(0, 1))
    cfg = {"images": str(tmp_path / "images"), "run": "mine", "model": {"arch": arch, "weights": "random"},
           "layers": layers}
    assert planned_jobs(tmp_path, cfg) == ALWAYS


def test_optional_sections_can_be_switched_off_and_on(tmp_path, digits):
    write_dataset(tmp_path / "images", digits, n_photos=2, labels=(0, 1))
    base = {"images": str(tmp_path / "images"), "run": "mine", "model": {"arch": "resnet18", "weights": "random"},
            "layers": ["pool"]}
    off = base | {"viz": {}, "style_net": None, "saliency": {"methods": []}, "topk": {"k": 0},
                  "index": {"pixels": False}}
    assert planned_jobs(tmp_path, off) == ALWAYS - {"topk_merge", "topk_render"}
    on = base | {"saliency": {"methods": ["gradcam", "integrated_gradients"]}, "index": {"queries": [0]},
                 "viz": {"class_models": {"classes": [1]}}}
    assert planned_jobs(tmp_path, on) == ALWAYS | {"saliency", "neighbours", "viz_class_models"}


def test_without_a_config_the_workflow_says_how_to_give_one(tmp_path):
    done = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(tmp_path), "--cores", "1"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "featscope: error: no config: pass --configfile" in done.stdout + done.stderr
