"""The public loader gives a layer's vectors and the manifest's columns, row for row."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
from helpers import write_dataset

from featscope.pipelines import load_features
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import extract


def test_load_features_matches_the_parts_and_joins_the_labels(tmp_path, digits):
    write_dataset(tmp_path / "images", digits, n_photos=3, labels=(0, 1))
    rd = RunDir(tmp_path / "run")
    manifest.run(rd, tmp_path / "images", shard_size=2, model="resnet18", weights="random")
    extract.extract(rd, ["pool"], workers=0, progress=False)
    f = load_features(tmp_path / "run", "pool")
    parts = pq.read_table(rd.features_dir("pool"))  # every part, read independently
    stored = {i: np.asarray(v, np.float32) for i, v in zip(parts["image_id"].to_pylist(),
                                                           parts["feature"].to_pylist())}
    assert list(f.image_ids) == sorted(stored) and f.vectors.dtype == np.float32 and f.vectors.shape == (5, 512)
    for i, vector in zip(f.image_ids, f.vectors):
        np.testing.assert_array_equal(vector, stored[int(i)])
    rows = {r["image_id"]: r for r in manifest.read(rd).to_pylist()}
    assert f.labels == [rows[int(i)]["label"] for i in f.image_ids]
    frame = f.to_pandas()
    assert list(frame.columns) == ["image_id", "path", "label", "shard", "feature"]
    np.testing.assert_array_equal(np.stack(frame["feature"]), f.vectors)
    table = f.to_arrow()
    assert table.column("feature").type.list_size == 512 and table.num_rows == 5
