"""`pip install .` (not editable) gives a working featscope: schema and report assets ship as package data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_the_code_the_schema_and_the_report_assets_and_validates_configs(tmp_path):
    leftovers = [REPO / "build", REPO / "featscope.egg-info"]
    before = [p.exists() for p in leftovers]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    for path, existed in zip(leftovers, before):  # setuptools builds inside the checkout
        if path.exists() and not existed:
            shutil.rmtree(path)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("featscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("featscope/config/schema.yaml", "featscope/config/demo.yaml",
                     "featscope/pipelines/app/report_assets/report.js", "featscope/pipelines/app/cli.py",
                     "featscope/pipelines/stages/saliency.py", "featscope/kernels/architectures.py",
                     "featscope/index/search.py"):
        assert expected in names, expected
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # From the installed copy alone (not this checkout): the schema loads and checks a config.
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); "
            "import featscope.pipelines.app.config as c, featscope.config as pkg; "
            "assert pkg.__file__.startswith(%r), pkg.__file__; "
            "cfg = c.validate({'run': 'r', 'images': 'x', 'model': {'arch': 'resnet18'}, 'layers': ['pool']}); "
            "print(cfg['extract']['batch_size'], len(c.schema()['properties']))") % str(target)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "64"
