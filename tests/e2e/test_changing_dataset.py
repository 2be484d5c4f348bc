"""A dataset that changes between scheduled runs, through `snakemake` itself: after a seeded
random sequence of additions, removals and in-place edits (which keep the file's size and
times), each followed by a rerun, every output equals a run from scratch on the final files,
and a further rerun has nothing to do."""

import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import snakemake, snakemake_imports, write_dataset
from PIL import Image, PngImagePlugin

from featscope.pipelines import load_features
from featscope.pipelines.app.status import status
from featscope.pipelines.core import manifest
from featscope.pipelines.core.history import read_history
from featscope.pipelines.core.neighbours import neighbours_of, open_index
from featscope.pipelines.core.rundir import RunDir

SEED = 7


def config(tmp_path: Path, images: Path, run: str) -> Path:
    cfg = {
        "run": run, "runs_dir": str(tmp_path / "runs"), "images": str(images), "shard_size": 3,
        "model": {"arch": "resnet18", "weights": "random"}, "layers": ["pool"],
        "extract": {"batch_size": 4, "workers": 0, "threads": 1, "precision": "fp32"},
        "index": {"queries": [0, 4], "k": 3, "pixels": False},
        "topk": {"k": 2, "units": "0-3"},
        "embed": {"layers": ["pool"], "perplexity": 2, "grid_side": 2, "tile": 16},
        "saliency": {"methods": ["gradcam"], "select": "label=photo", "workers": 1},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def png_of_size(picture: Image.Image, size: int) -> bytes:
    """`picture` as a PNG of exactly `size` bytes (a text chunk makes up the difference)."""
    room = size - len(encoded := _png(picture)) - 14  # a chunk's length, type and CRC, and "c\0"
    assert room >= 0, f"{len(encoded)} bytes do not fit in {size}"
    info = PngImagePlugin.PngInfo()
    info.add_text("c", "x" * room)
    return _png(picture, info)


def _png(picture: Image.Image, info: PngImagePlugin.PngInfo | None = None) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=9, pnginfo=info)
    return out.getvalue()


def change(images: Path, rng: random.Random, digits, step: int, kind: str) -> None:
    """One change of the image folder: add, remove or edit in place, at random places."""
    files = sorted(p for p in images.rglob("*.png"))
    if kind == "add":
        write_dataset(images / f"new{step}", digits, n_photos=0, labels=(rng.choice([2, 3]),), digits_per_label=2)
    elif kind == "remove":
        for p in rng.sample(files, 2):
            p.unlink()
    else:  # the same path, other bytes: a different picture, in a file of the same size and
        # times, as tools that put the modification time back leave it (`exiftool -P`, `cp -p`)
        victim = rng.choice(files)
        other = rng.choice([p for p in files if p != victim])
        picture = Image.open(other).convert("L").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        st = victim.stat()
        victim.write_bytes(png_of_size(picture.point(lambda v: 255 if v > 127 else 0), st.st_size))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def by_path(rd: RunDir) -> dict[int, str]:
    return {r["image_id"]: r["path"].rsplit("/images/", 1)[1] for r in manifest.read(rd).to_pylist()}


def report_ids(rd: RunDir) -> set[int]:
    """Every image id the report's data files mention (pages, neighbours, thumbnails)."""
    ids = set()
    for path in (rd.report_dir / "data").glob("images-*.js"):
        text = path.read_text()
        entries = json.loads(text[text.index("}, ") + 3: text.rindex(")")])
        for key, entry in entries.items():
            ids.add(int(key))
            ids |= {n for found in entry["neighbours"].values() for n, _ in found}
    ids |= {int(p.stem) for p in (rd.report_dir / "thumbs").rglob("*.jpg")}
    return ids


@pytest.mark.slow
def test_random_changes_then_reruns_equal_a_run_from_scratch(tmp_path, digits):
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=3, labels=(0, 1, 7), digits_per_label=3)
    configfile = config(tmp_path, images, "scheduled")
    first = snakemake(tmp_path, configfile)
    assert first.returncode == 0, first.stderr[-3000:]
    rng = random.Random(SEED)
    kinds, made = [], []
    run = RunDir(tmp_path / "runs" / "scheduled")
    for step in range(2):  # each step: two different kinds of change, then a rerun
        for kind in rng.sample(["add", "remove", "edit"], 2):
            change(images, rng, digits, step, kind)
            kinds.append(kind)
        before = manifest.read(run, include_removed=True).to_pylist()
        parts = {p: p.stat().st_mtime_ns for p in run.root.glob("features/pool/part-*.parquet")}
        rerun = snakemake(tmp_path, configfile)
        assert rerun.returncode == 0, (kinds, rerun.stderr[-3000:])
        # work in proportion: the new shards are extracted, and of the old ones at most those
        # that lost an image (only where a unit's spare top-k candidates ran out)
        after = manifest.read(run, include_removed=True).to_pylist()
        was_live = {r["image_id"] for r in before if not r["removed"]}
        lost = {r["shard"] for r in after if r["removed"] and r["image_id"] in was_live}
        new = {r["shard"] for r in after[len(before):]}
        redone = {int(p.stem.split("-")[1]) for p, t in parts.items() if not p.exists() or p.stat().st_mtime_ns != t}
        live_shards = {r["shard"] for r in after if not r["removed"]}
        assert redone <= lost, kinds
        assert rerun.stderr.count("rule extract:") == len(new | (redone & live_shards)), kinds
        again = snakemake(tmp_path, configfile, "-n")
        assert "Nothing to be done" in again.stdout + again.stderr, (kinds, again.stdout[-2000:])
        made.append((json.loads(run.index_stamp("pool").read_text())["how"],
                     pq.read_schema(run.embedding("pool")).metadata[b"how"].decode()))
    assert set(kinds) == {"add", "remove", "edit"}, kinds  # the seed covers every kind of change
    # through Snakemake too (which deletes a job's outputs before it runs) the reruns update
    # the index and place new images into the map instead of starting over
    assert all(how == ("updated", "placed") for how in made), made
    history = read_history(run)  # one line per run that did work, with what changed
    assert [h["status"] for h in history] == ["ok"] * 3 and history[0]["added"] == 12
    assert all(h["added"] + h["edited"] + h["retired"] > 0 for h in history[1:])
    assert all(any(j.startswith("extract-shard") for j in h["jobs"]) for h in history)
    now = status(run)
    assert now.stale == [] and now.pending == {"new": 0, "edited": 0, "vanished": 0, "relabelled": 0}

    scratch_images = tmp_path / "scratch" / "images"  # the same files, fresh
    shutil.copytree(images, scratch_images)
    fresh = snakemake(tmp_path, config(tmp_path, scratch_images, "fresh"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    ours, theirs = RunDir(tmp_path / "runs" / "scheduled"), RunDir(tmp_path / "runs" / "fresh")
    our_paths, their_paths = by_path(ours), by_path(theirs)
    assert sorted(our_paths.values()) == sorted(their_paths.values())  # the same live images

    # features: every live image from its current bytes, nothing else
    a, b = load_features(ours, "pool"), load_features(theirs, "pool")
    va = {our_paths[i]: v for i, v in zip(a.image_ids, a.vectors)}
    vb = {their_paths[i]: v for i, v in zip(b.image_ids, b.vectors)}
    assert sorted(va) == sorted(vb)
    for path in va:
        np.testing.assert_allclose(va[path], vb[path], rtol=1e-2, atol=1e-2)

    # exact index: the same neighbours for every image
    ia, ib = open_index(ours, "pool"), open_index(theirs, "pool")
    assert sorted(our_paths[i] for i in ia.ids) == sorted(their_paths.values())
    their_id = {p: i for i, p in their_paths.items()}
    for image_id, path in our_paths.items():
        found_a = [our_paths[int(i)] for i in neighbours_of(ia, [image_id], 3).image_ids[0]]
        found_b = [their_paths[int(i)] for i in neighbours_of(ib, [their_id[path]], 3).image_ids[0]]
        assert found_a == found_b, path

    # top-k: the same values per unit, from live images only
    ta, tb = pq.read_table(ours.topk("pool")).to_pylist(), pq.read_table(theirs.topk("pool")).to_pylist()
    assert {r["image_id"] for r in ta} <= set(our_paths)
    values = lambda rows: sorted((r["channel"], r["rank"], round(r["value"], 2)) for r in rows)  # noqa: E731
    assert values(ta) == values(tb)

    # map, saliency and report: live images only
    assert set(pq.read_table(ours.embedding("pool"))["image_id"].to_pylist()) == set(our_paths)
    photos = {i for i, p in our_paths.items() if p.startswith("photo/")}
    assert {int(p.stem) for p in ours.saliency_dir("gradcam").glob("*.npz")} == photos
    assert set(pq.read_table(ours.saliency_summary("gradcam"))["image_id"].to_pylist()) == photos
    assert report_ids(ours) <= set(our_paths)

    # A start of the workflow with config and code unchanged imports no model library (the
    # validated config and the job commands come from workflow_cache), and what it derives
    # equals what a start without the cache derives.
    change(images, rng, digits, 9, "add")
    cached, imported = snakemake_imports(tmp_path, configfile, "-n")
    assert cached.returncode == 0 and imported == [], (imported, cached.stderr[-2000:])
    cache_dir = tmp_path / ".snakemake" / "featscope"
    [kept] = [p for p in cache_dir.glob("*.json") if "/runs/scheduled" in p.read_text()]
    kept_entries = json.loads(kept.read_text())
    shutil.rmtree(cache_dir)
    uncached, imported = snakemake_imports(tmp_path, configfile, "-n")
    assert uncached.returncode == 0 and "torch" in imported
    derived = json.loads(kept.read_text())  # (the runs before derived more: the jobs they ran)
    assert derived == {key: kept_entries[key] for key in derived}
    assert "config:null" in derived and any(k.startswith('command:["manifest"') for k in derived)
    jobs = lambda done: sorted(line for line in (done.stdout + done.stderr).splitlines()  # noqa: E731
                               if line.startswith(("rule ", "checkpoint ", "localrule ")))
    assert jobs(cached) == jobs(uncached) and "checkpoint manifest:" in jobs(cached)
