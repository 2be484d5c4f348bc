"""The workflow on a real (one-node) SLURM cluster through profiles/slurm: every job goes
through sbatch. `.ci/run` installs slurm-wlm and munge; this test starts the daemons itself.
In CI a missing SLURM fails the test instead of skipping it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import write_dataset

REPO = Path(__file__).resolve().parents[2]
CLUSTER = Path(__file__).with_name("slurm_cluster.sh")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        message = (f"a test SLURM cluster needs root and slurm-wlm + munge (missing: {', '.join(missing) or 'root'}); "
                   "`apt-get install slurm-wlm munge` (.ci/run does)")
        if os.environ.get("CI") or os.environ.get("FEATSCOPE_REQUIRE_SLURM"):
            pytest.fail(message)
        pytest.skip(message)
    state = tmp_path_factory.mktemp("slurm")
    subprocess.run([str(CLUSTER), "start", str(state)], check=True, timeout=120)
    yield state
    subprocess.run([str(CLUSTER), "stop", str(state)], check=False, timeout=60)


@pytest.mark.slow
def test_workflow_runs_on_slurm_through_the_profile(tmp_path, digits, slurm):
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=3, labels=(0, 1, 2))
    no_gpu = {"gpu": 0}
    cfg = {
        "run": "cluster", "runs_dir": str(tmp_path / "runs"), "images": str(images), "shard_size": 3,
        "model": {"arch": "resnet18", "weights": "random"}, "layers": ["pool"],
        "extract": {"batch_size": 4, "workers": 0, "threads": 1},
        "index": {"pixels": False},
        "topk": {"k": 2, "units": "0-1"},
        "embed": {"layers": ["pool"], "perplexity": 1, "grid_side": 2, "tile": 16},
        "saliency": {"methods": ["gradient"], "select": "label=photo", "workers": 1},
        # the test node has no GPU, and 80% of this machine's memory
        "resources": {"extract": no_gpu, "saliency": no_gpu, "embed": {"mem_mb": 4000}, "index": {"mem_mb": 4000}},
    }
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(configfile), "--profile", str(REPO / "profiles" / "slurm"), "--jobs", "4",
           "--slurm-no-account", "--slurm-keep-successful-logs", "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "10", "--max-threads", str(os.cpu_count())]  # jobs must fit the one node
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "runs" / "cluster"
    assert pq.read_table(run / "features" / "pool").num_rows == 6
    assert (run / "report" / "index.html").exists() and (run / "mosaic" / "pool-grid.jpg").exists()
    assert pq.read_table(run / "saliency" / "summary.parquet").num_rows == 3
    logs = tmp_path / ".snakemake" / "slurm_logs"
    rules = {p.name for p in logs.iterdir()}
    assert {"rule_extract", "rule_index", "rule_embed", "rule_saliency", "rule_report"} <= rules
    jobs = subprocess.run(["scontrol", "-o", "show", "jobs"], capture_output=True, text=True, check=True).stdout
    submitted = [line for line in jobs.splitlines() if f"WorkDir={tmp_path}" in line]
    assert len(submitted) >= 10 and all("JobState=COMPLETED" in line for line in submitted)
    extract_jobs = [line for line in submitted if "rule_extract" in line or "extract" in line.split("Comment=")[-1]]
    assert extract_jobs and all("MinMemoryNode=4000M" in line for line in extract_jobs), extract_jobs[:1]
