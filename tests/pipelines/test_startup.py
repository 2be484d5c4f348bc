"""Start-up cost: the stages that run no model import no torch (3-4 s of a scheduled rerun's
every job), and `featscope --help` imports no stage at all."""

import shutil
import subprocess
import sys

import pytest

NO_MODEL = ["manifest", "index", "topk", "mosaic", "neighbours", "embed"]


def imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(','.join(m for m in ('torch', 'torchvision', 'openTSNE') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(filter(None, out.strip().split(",")))


@pytest.mark.parametrize("stage", NO_MODEL)
def test_stages_without_a_model_import_no_torch(stage):
    assert imported_after(f"import featscope.pipelines.stages.{stage}") == set()


def test_apps_and_help_import_no_model_library():
    assert imported_after("import featscope.pipelines.app.report, featscope.pipelines.app.status, "
                          "featscope.pipelines.app.verify") == set()
    assert imported_after("import contextlib, io\nfrom featscope.pipelines.app.cli import main\n"
                          "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main(['--help'])\n"
                          "    except SystemExit:\n        pass") == set()


def test_rebuilding_a_report_imports_no_model_library(reported_run, tmp_path):
    """The report job of every scheduled rerun: a run with random weights has no class names to
    look up, and its thumbnails are made, so nothing asks for torch (5 s of the job's 7)."""
    run = tmp_path / "run"
    shutil.copytree(reported_run.root, run)
    assert imported_after("from featscope.pipelines.app import report\n"
                          "from featscope.pipelines.core.rundir import RunDir\n"
                          f"report.build(RunDir({str(run)!r}), k=4, progress=False)") == set()
