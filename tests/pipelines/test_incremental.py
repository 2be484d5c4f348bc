"""Seeded random sequences of additions, removals and edits, each followed by the stages'
incremental update (manifest, extract, index update, top-k merge, map placement), end
equal to a fresh run on the final files: features, exact-index neighbours, top-k tables and
map ids. (tests/e2e/test_changing_dataset.py runs one such sequence through Snakemake.)"""

import random
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import write_dataset
from PIL import Image

from featscope.pipelines import load_features
from featscope.pipelines.core import manifest
from featscope.pipelines.core.neighbours import open_index
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import embed, extract, topk
from featscope.pipelines.stages import index as neighbours

SEQUENCES = 12
STEPS = 4


def update(rd: RunDir, images, **first) -> dict:
    """What a scheduled rerun does, stage by stage; returns how the index and map were made."""
    manifest.run(rd, images, **first)
    extract.extract(rd, ["pool"], precision="fp32", batch_size=4, workers=0, topk=2, progress=False, **(
        {"model": "resnet18", "weights": "random"} if first else {}))
    made = {"index": neighbours.build(rd, "pool", progress=False).how}
    topk.merge(rd, "pool")
    made["map"] = embed.embed(rd, "pool", perplexity=2).how
    return made


def change(images, rng: random.Random, digits, step: int) -> str:
    kind = rng.choice(["add", "remove", "edit"])
    files = sorted(images.rglob("*.png"))
    if kind == "add":
        write_dataset(images / f"new{step}", digits, n_photos=0, labels=(rng.choice([2, 3, 4]),),
                      digits_per_label=rng.randint(1, 3))
    elif kind == "remove":
        for p in rng.sample(files, rng.randint(1, 3)):
            p.unlink()
    else:
        victim = rng.choice(files)
        other = rng.choice([p for p in files if p != victim])
        Image.open(other).convert("RGB").rotate(90).save(victim)
    return kind


def relative(rd: RunDir) -> dict[int, str]:
    return {r["image_id"]: r["path"].rsplit("/images/", 1)[1] for r in manifest.read(rd).to_pylist()}


@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_incremental_updates_equal_a_fresh_run(tmp_path, digits, seed):
    rng = random.Random(seed)
    images = tmp_path / "images"
    write_dataset(images, digits, n_photos=2, labels=(0, 1, 7), digits_per_label=3)
    rd = RunDir(tmp_path / "run")
    update(rd, images, shard_size=4, model="resnet18", weights="random")
    made = [update(rd, images) for _ in [change(images, rng, digits, step) for step in range(STEPS)]]
    fresh_images = tmp_path / "fresh" / "images"
    shutil.copytree(images, fresh_images)
    fresh = RunDir(tmp_path / "fresh" / "run")
    update(fresh, fresh_images, shard_size=4, model="resnet18", weights="random")

    ours, theirs = relative(rd), relative(fresh)
    assert sorted(ours.values()) == sorted(theirs.values())
    a, b = load_features(rd, "pool"), load_features(fresh, "pool")
    va = {ours[int(i)]: v for i, v in zip(a.image_ids, a.vectors)}
    vb = {theirs[int(i)]: v for i, v in zip(b.image_ids, b.vectors)}
    assert va.keys() == vb.keys()
    for path in va:
        np.testing.assert_allclose(va[path], vb[path], rtol=1e-4, atol=1e-4)

    ia, ib = open_index(rd, "pool"), open_index(fresh, "pool")
    their_id = {p: i for i, p in theirs.items()}
    ids = np.array(sorted(ours))
    found_a = ia.search_ids(ids, k=5)
    found_b = ib.search_ids([their_id[ours[i]] for i in ids], k=5)
    # equal distances (images the model sees as the same) may come in either order: ties go
    # to the smaller id, and the two runs number images differently
    rows = lambda found, names: [sorted((round(float(d), 4), names[int(i)]) for d, i in zip(ds, row))  # noqa: E731
                                 for ds, row in zip(found.distances, found.image_ids)]
    assert rows(found_a, ours) == rows(found_b, theirs)
    np.testing.assert_allclose(found_a.distances, found_b.distances, atol=1e-4)

    ta, tb = pq.read_table(rd.topk("pool")).to_pylist(), pq.read_table(fresh.topk("pool")).to_pylist()
    values = lambda rows: sorted((r["channel"], r["rank"], round(r["value"], 3)) for r in rows)  # noqa: E731
    assert values(ta) == values(tb)
    # the images too, where no tie decides (ties go to the smaller id, and ids differ between runs)
    last = {r["channel"]: round(r["value"], 3) for r in sorted(tb, key=lambda r: r["rank"])}
    untied = lambda rows, names: {(r["channel"], names[r["image_id"]]) for r in rows  # noqa: E731
                                  if round(r["value"], 3) > last[r["channel"]]}
    assert untied(ta, ours) == untied(tb, theirs)
    assert {ours[int(i)] for i in pq.read_table(rd.embedding("pool"))["image_id"].to_numpy()} == set(theirs.values())
    assert any(m["index"] == "updated" for m in made) and any(m["map"] == "placed" for m in made), made
