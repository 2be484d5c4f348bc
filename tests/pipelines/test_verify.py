"""`featscope verify`: a random bit flip anywhere in any kind of file of a run is found and
named with the command that rebuilds it; a rerun of that command repairs the file."""

import random
import shutil

import pytest
from helpers import write_dataset

from featscope.pipelines.app.verify import verify
from featscope.pipelines.core import manifest
from featscope.pipelines.core.atomic import write_bytes_atomic
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import embed, extract, topk
from featscope.pipelines.stages import index as neighbours

FLIPS = 12  # seeded random single-bit flips per kind of file


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("verify")
    write_dataset(root / "images", digits, n_photos=2, labels=(0, 1, 7), digits_per_label=3)
    rd = RunDir(root / "run")
    manifest.run(rd, root / "images", shard_size=6, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, topk=2, progress=False)
    topk.merge(rd, "pool")
    neighbours.build(rd, "pool", progress=False)
    embed.embed(rd, "pool", perplexity=3)
    return rd


def kinds(rd: RunDir) -> dict:
    return {
        "manifest": rd.manifest, "feature part": rd.feature_part("pool", 0),
        "top-k candidates": rd.topk_candidates_part("pool", 0), "top-k": rd.topk("pool"),
        "predictions": rd.prediction_part(0), "map": rd.embedding("pool"),
        "index": rd.index_dir("pool") / "index.faiss", "index ids": rd.index_dir("pool") / "ids.parquet",
    }


def test_a_clean_run_verifies(clean_run, capsys):
    result = verify(clean_run, progress=True)
    assert result.damaged == [] and result.checked >= 9
    assert "verify: 100%" in capsys.readouterr().err  # a bar over the files (millions in a large run)
    assert verify(clean_run).checked == result.checked and capsys.readouterr().err == ""


@pytest.mark.parametrize("kind", ["manifest", "feature part", "top-k candidates", "top-k", "predictions", "map",
                                  "index", "index ids"])
def test_every_bit_flip_is_found_and_named_with_its_fix(clean_run, tmp_path, kind):
    rng = random.Random(kind)
    for flip in range(FLIPS):
        copy = RunDir(tmp_path / f"copy{flip}")
        shutil.copytree(clean_run.root, copy.root)
        target = kinds(copy)[kind]
        data = bytearray(target.read_bytes())
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        result = verify(copy)
        named = [path for path, _, _ in result.damaged]
        where = target if target.suffix != ".faiss" and target.name != "ids.parquet" else target.parent / "meta.json"
        assert named == [where], (kind, position, named)
        assert "featscope" in result.damaged[0][2]  # the fix is a command


def test_a_changed_picture_is_found_by_its_registered_checksum(clean_run, tmp_path):
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(clean_run.root, copy.root)
    picture = copy.viz_filters("conv1")
    write_bytes_atomic(picture, b"\x89PNG\r\n\x1a\n" + bytes(range(200)))  # as a stage would write it
    assert verify(copy).damaged == []
    data = bytearray(picture.read_bytes())
    data[100] ^= 4
    picture.write_bytes(bytes(data))
    (path, problem, fix), = verify(copy).damaged
    assert path == picture and "sha256 differs" in problem and "viz/" in fix


def test_the_named_command_repairs_a_damaged_part(clean_run, tmp_path):
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(clean_run.root, copy.root)
    part = copy.feature_part("pool", 1)
    part.write_bytes(part.read_bytes()[:-40])  # truncated
    (path, problem, fix), = verify(copy).damaged
    assert path == part and "delete it, then featscope extract" in fix and "--shard 1" in fix
    part.unlink()
    extract.extract(copy, ["pool"], shard=1, workers=0, topk=2, progress=False)
    assert verify(copy).damaged == []


def test_damaged_report_files_are_named_and_the_fix_repairs_them(clean_run, tmp_path):
    """The report's script and style sheet were copied in place unregistered: a damaged
    report.js (every page runs it) passed verify. Each report file found damaged is named with
    the fix, which a build carries out (it skips thumbnails and kept pictures in place)."""
    from featscope.pipelines.app import report

    copy = RunDir(tmp_path / "copy")
    shutil.copytree(clean_run.root, copy.root)
    report.build(copy, progress=False)
    assert verify(copy).damaged == []
    targets = [copy.report_dir / "report.js", copy.report_dir / "report.css",
               next((copy.report_dir / "thumbs").rglob("*.jpg"))]
    for target in targets:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 8
        target.write_bytes(bytes(data))
    damaged = verify(copy).damaged
    assert [path for path, _, _ in damaged] == sorted(targets)
    assert all(fix == f"delete it, then featscope report --run {copy.root}" for _, _, fix in damaged)
    for target in targets:
        target.unlink()
    report.build(copy, progress=False)
    assert verify(copy).damaged == []


def test_a_registry_line_that_does_not_parse_is_named(clean_run, tmp_path):
    """Each registry line holds a file's checksum; one damaged used to be skipped in silence,
    and the file it registered went unchecked."""
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(clean_run.root, copy.root)
    picture = copy.viz_filters("conv1")
    write_bytes_atomic(picture, b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    registry = picture.parent / ".checksums.jsonl"
    lines = registry.read_text().splitlines()
    registry.write_text("\n".join([lines[0][:-9] + "\x00garbage"] + lines[1:]) + "\n")
    (path, problem, fix), = verify(copy).damaged
    assert path == registry and "1 line that does not parse (line 1)" in problem and "viz/filters/" in fix
