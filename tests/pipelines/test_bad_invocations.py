"""Every bad invocation is one line on stderr and exit 2, before any work: a table of cases
(ranges, paths, ports, hosts, names, files that are not what they should be), run against a
small indexed run with a report."""

import re
import socket

import pytest
from helpers import write_dataset

from featscope.pipelines.app import cli, report
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract
from featscope.pipelines.stages import index as neighbours


@pytest.fixture(scope="module")
def small_dataset_module(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("bad-images") / "images"
    write_dataset(root, digits)
    return root


@pytest.fixture(scope="module")
def made(tmp_path_factory, small_dataset_module):
    root = tmp_path_factory.mktemp("bad")
    rd = RunDir(root / "run")
    manifest.run(rd, small_dataset_module, shard_size=4, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    neighbours.build(rd, "pool", progress=False)
    report.build(rd, progress=False)
    (root / "afile").write_text("x")
    (root / "empty").mkdir()  # an image folder whose file system is not mounted
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield root, rd, busy.getsockname()[1]
    busy.close()


R = "{run}"
CASES = [
    # (arguments, a phrase the one-line error must contain)
    (("manifest", "--images", "{images}", "--run", "{root}/afile/run"), "run"),
    (("manifest", "--images", "{images}", "--run", "{root}/afile"), "run"),
    (("manifest", "--images", "{root}/missing", "--run", "{root}/r1"), "does not exist"),
    (("manifest", "--images", "{root}/binary.bin", "--run", "{root}/r2"), "binary.bin"),
    (("manifest", "--images", "{images}", "--run", "{root}/r3", "--shard-size", "0"), "--shard-size"),
    (("manifest", "--images", "{images}", "--run", "{root}/r4", "--model", "nope"), "nope"),
    (("manifest", "--images", "{images}", "--run", "{root}/r5", "--weights", "banana"), "banana"),
    (("manifest", "--images", "{images}", "--run", "{root}/r6", "--model", "resnet18", "--weights",
      "{root}/binary.bin"), "cannot load checkpoint"),  # said when the run is made, not at its extraction
    (("manifest", "--images", "{root}/empty", "--run", R, "--quiet"), "--allow-empty"),  # (its bar: 0 files)
    (("manifest", "--images", "{images}", "--run", R, "--model", "mobilenet_v2"), "a run directory of its own"),
    (("extract", "--run", R, "--layers", "pool", "--threads", "-1"), "--threads"),
    (("extract", "--run", R, "--layers", "pool", "--workers", "-1"), "--workers"),
    (("extract", "--run", R, "--layers", "pool", "--batch-size", "0"), "--batch-size"),
    (("extract", "--run", R, "--layers", ""), "--layers"),
    (("extract", "--run", R, "--layers", "pool", "--shard", "99"), "shard 99"),
    (("extract", "--run", "{root}/nowhere", "--layers", "pool"), "not a run"),
    (("embed", "--run", R, "--layer", "pool", "--perplexity", "0"), "--perplexity"),
    (("embed", "--run", R, "--layer", "pool", "--pca-dims", "0"), "--pca-dims"),
    (("embed", "--run", R, "--layer", "pool", "--pca-dims", "-3"), "--pca-dims"),
    (("embed", "--run", R, "--layer", "nolayer"), "nolayer"),
    (("embed", "--run", R, "--layer", "pool", "--perplexity", "nan"), "--perplexity must be a finite number"),
    (("units", "render", "--run", R, "--layer", "pool", "--lr", "inf"), "--lr must be a finite number, got inf"),
    (("mosaic", "scatter", "--run", R, "--layer", "pool", "--size", "0"), "--size"),
    (("mosaic", "grid", "--run", R, "--layer", "pool", "--side", "0"), "--side"),
    (("mosaic", "grid", "--run", R, "--layer", "pool"), "embed"),
    (("index", "evaluate", "--run", R, "--queries", "0"), "--queries"),
    (("index", "evaluate", "--run", R, "-k", "0"), "-k"),
    (("index", "build", "--run", R, "--layer", "pool", "--kind", "tree"), "--kind"),
    (("index", "build", "--run", R, "--layer", "pool", "--max-memory", "lots"), "--max-memory"),
    (("index", "build", "--run", R, "--layer", "nolayer"), "nolayer"),
    (("neighbours", "--run", R, "--layer", "pool", "--ids", "0", "-k", "0"), "-k"),
    (("neighbours", "--run", R, "--layer", "pool", "--ids", "9999"), "9999"),
    (("neighbours", "--run", R, "--layer", "pool", "--ids", "x"), "--ids"),
    (("query", "--run", R, "--layer", "pool", "--id", "9999"), "9999"),
    (("query", "--run", R, "--layer", "pool", "--image", "{root}/missing.png"), "missing.png"),
    (("query", "--run", R, "--layer", "pool", "--image", "{root}/binary.bin"), "binary.bin"),
    (("query", "--run", R, "--layer", "pool", "--id", "0", "-k", "0"), "-k"),
    (("topk", "render", "--run", R, "--layer", "pool", "--tile", "0"), "--tile"),
    (("topk", "merge", "--run", R, "--layer", "pool"), "--topk"),
    (("saliency", "--run", R, "--method", "magic"), "--method"),
    (("saliency", "--run", R, "--method", "gradcam", "--workers", "0"), "--workers"),
    (("saliency", "--run", R, "--method", "gradcam", "--select", "label="), "--select"),
    (("saliency", "--run", R, "--method", "gradient", "--slurm-jobs", "1", "--slurm-memory", "lots"),
     "--slurm-memory must match"),
    (("saliency", "--run", R, "--method", "gradient", "--slurm-jobs", "1", "--slurm-walltime", "2h"),
     "--slurm-walltime must match"),
    (("saliency", "--run", R, "--method", "gradient", "--slurm-memory", "32GB"),
     "--slurm-memory is for SLURM workers, started only with --slurm-jobs"),
    (("saliency", "--run", R, "--method", "gradient", "--workers", "2", "--slurm-gpus", "0"), "--slurm-gpus"),
    (("viz", "class-model", "--run", R, "--classes", ""), "--classes: needs at least one value"),
    (("viz", "texture", "--run", R, "--layers", "layer1,layer2", "--image", "{root}/binary.bin", "--weights", "0,0"),
     "--weights must be 0 or more, one of them above 0"),
    (("index", "build", "--run", R, "--layer", "pool", "--seed", "-1"), "--seed must be at least 0"),
    (("index", "build", "--run", R, "--layer", "pool", "--seed", str(2**64)), "--seed must be at most 4294967295"),
    (("query", "--run", R, "--layer", "pool", "--id", "0", "-k", str(2**70)), "--k must be at most 100000"),  # numpy
    (("neighbours", "--run", R, "--layer", "pool", "--ids", "0", "-k", "5000"), "--k must be at most 100"),  # JPEG
    (("extract", "--run", R, "--layers", "pool", "--topk", "5000"), "--topk must be at most 1000"),
    (("extract", "--run", R, "--layers", "pool", "--batch-size", "100000"), "--batch-size must be at most 4096"),
    (("config", "schema", "--check", "{root}/binary.bin"), "not UTF-8 text"),
    (("serve", "--run", R, "--port", "99999"), "--port"),
    (("serve", "--run", R, "--port", "-1"), "--port"),
    (("serve", "--run", R, "--host", "256.1.1.1"), "--host"),
    (("serve", "--run", R, "--port", "{busy}"), "in use"),
    (("serve", "--run", R, "--max-upload", "-1"), "--max-upload"),
    (("status", "--run", "{root}/nowhere"), "not a run"),
    (("report", "--run", R, "-k", "0"), "-k"),
    (("viz", "filters", "--run", R, "--layers", "nolayer"), "nolayer"),
    (("neighbours", "--run", R, "--layer", "pool", "--ids", "0", "--out", "/proc/featscope-sheet.jpg"),
     "at /proc/featscope-sheet.jpg: check it"),  # the file asked for, not its temporary name
    (("style", "train", "--styles", "{root}/binary.bin", "--content", "{images}", "--out", "/proc"),
     "at /proc: check it"),  # the folder asked for, not its writer lock
    (("viz", "adversarial", "--run", R, "--ids", "0", "--target", "1000"), "--target must be one of the model's"),
    (("config", "schema", "--check", "{root}/missing.yaml"), "missing.yaml"),
    (("nosuchcommand",), "invalid choice"),
    (("weights", "fetch", "nosuchmodel"), "unknown architecture 'nosuchmodel'"),
    (("index", "build", "--run", R), "--layer"),
    (("mosaic", "scatter", "--run", R, "--layer", "pool", "--tile", "100000"), "--tile must be at most 256"),
    (("viz", "class-model", "--run", R, "--classes", "1", "--size", "22400"), "--size must be at most 4096"),
    (("index", "build", "--run", R, "--layer", "pool", "--max-memory", "100B"), "need at least 0.6 KB even compressed"),
    (("index", "build", "--run", R, "--layer", "pool", "--kind", "hnsw"), "PCA to 256 dimensions needs at least 256"),
]


@pytest.mark.parametrize("args, phrase", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_invocation_is_one_line_and_exit_2(made, small_dataset_module, args, phrase, capsys):
    """Run in-process: an exception other than the CLI's own one-line exit fails the test."""
    root, rd, busy = made
    args = [a.format(run=rd.root, root=root, images=small_dataset_module, busy=busy) for a in args]
    try:
        code = cli.main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err[-800:])
    assert err.count("\n") == 1 and re.match(r"featscope[a-z -]*: error: ", err), err[-800:]
    assert phrase in err, err
