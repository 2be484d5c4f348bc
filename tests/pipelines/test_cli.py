"""The command line: stages run by hand, user mistakes are one line on stderr and exit 2."""

import subprocess
import sys

import pyarrow.parquet as pq


def featscope(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "featscope.pipelines.app.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_help_explains_every_stage():
    out = featscope("--help").stdout
    for command in ("data", "weights", "manifest", "extract"):
        assert command in out
    assert "--precision" in featscope("extract", "--help").stdout


def test_manifest_and_extract_by_hand(tmp_path, small_dataset):
    run = tmp_path / "run"
    done = featscope("manifest", "--images", small_dataset, "--run", run, "--num-shards", 2)
    assert done.returncode == 0 and "9 images in 2 shards" in done.stdout
    assert "manifest: 100%" in done.stderr and "9/9" in done.stderr  # a bar over the files it read
    quiet = featscope("manifest", "--images", small_dataset, "--run", run, "--quiet")
    assert quiet.returncode == 0 and "9 images in 2 shards; 0 new" in quiet.stdout and quiet.stderr == ""
    done = featscope("extract", "--run", run, "--model", "resnet18", "--weights", "random", "--layers", "pool,layer4",
                     "--workers", "0", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "extract: 9 images from 2 shards" in done.stdout
    assert pq.read_table(run / "features" / "layer4").num_rows == 9
    again = featscope("extract", "--run", run, "--layers", "pool,layer4", "--quiet")
    assert "2 shards already done" in again.stdout


def test_fp16_on_a_cpu_whose_onednn_lacks_it_works_and_says_it_is_slow(tmp_path, small_dataset, monkeypatch, capsys):
    """oneDNN's fp16 needs AVX512-FP16 or AVX-NE-CONVERT (an AMD EPYC lacks them; simulated
    here on any CPU): extraction works there, on PyTorch's kernels, 6x slower than fp32, and
    ends with a warning saying so, since the run keeps its precision; bf16 says nothing of fp16."""
    import torch

    from featscope.kernels import conv_fusion
    from featscope.pipelines.app.cli import main as cli

    monkeypatch.setattr(conv_fusion, "_ONEDNN_RUNS", {torch.float16: False})
    for precision in ("fp16", "bf16"):
        run = tmp_path / precision
        assert cli(["manifest", "--images", str(small_dataset), "--run", str(run), "--quiet"]) == 0
        assert cli(["extract", "--run", str(run), "--model", "resnet18", "--weights", "random", "--layers", "pool",
                    "--precision", precision, "--workers", "0", "--quiet"]) == 0
        said = capsys.readouterr()
        assert "extract: 9 images from 1 shard -> pool" in said.out and f"cpu {precision})" in said.out
        slow = "warning: fp16 runs on PyTorch's slow reference kernels on this CPU"
        assert (slow in said.err) == (precision == "fp16")


def test_user_mistakes_are_one_line_and_exit_2(tmp_path, small_dataset):
    cases = [
        ("extract", "--run", tmp_path / "nowhere", "--layers", "fc7"),
        ("manifest", "--images", tmp_path / "missing", "--run", tmp_path / "r"),
    ]
    for args in cases:
        done = featscope(*args)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("featscope: error: ")
    featscope("manifest", "--images", small_dataset, "--run", tmp_path / "r")
    done = featscope("extract", "--run", tmp_path / "r", "--model", "resnet9000", "--layers", "pool")
    assert done.returncode == 2 and "unknown architecture 'resnet9000'" in done.stderr


def test_bad_images_end_with_a_warning_count_not_a_failure(tmp_path, small_dataset):
    (small_dataset / "photo" / "broken.jpg").write_text("not a jpeg")
    featscope("manifest", "--images", small_dataset, "--run", tmp_path / "r")
    done = featscope("extract", "--run", tmp_path / "r", "--model", "resnet18", "--weights", "random",
                     "--layers", "pool", "--workers", "0", "--quiet")
    assert done.returncode == 0
    assert "1 image skipped (1 not decodable; see" in done.stdout
    assert "warning: 1 image skipped; see" in done.stderr


def test_output_into_a_pipe_closed_early_ends_quietly(tmp_path, small_dataset):
    """`featscope status ... | head` printed a BrokenPipeError traceback once head had its
    lines: a reader that stops early is no error of the command."""
    run = tmp_path / "run"
    assert featscope("manifest", "--images", small_dataset, "--run", run, "--quiet").returncode == 0
    done = subprocess.Popen([sys.executable, "-m", "featscope.pipelines.app.cli", "status", "--run", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done.stdout.close()  # the reader is gone before the command prints (it starts in about a second)
    assert done.wait(timeout=120) == 141 and done.stderr.read() == ""
