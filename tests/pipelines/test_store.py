"""Parquet parts: schema and metadata round-trip; foreign files are refused; writes are atomic."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.store import (
    FeaturePartWriter,
    RunIdentity,
    column_array,
    file_metadata,
    iter_features,
    non_finite_rows,
    read_feature_part,
)
from featscope.pipelines.core.version import FEATSCOPE_VERSION

IDENTITY = RunIdentity(model="resnet18", weights_sha256="ab" * 32, preprocessing=json.dumps({"crop": 224}))


def test_conv_part_round_trips_schema_values_and_metadata(tmp_path):
    path = tmp_path / "part-00000.parquet"
    rng = np.random.default_rng(0)
    ids = np.array([5, 9, 11])
    mean, peak = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    ys, xs = rng.integers(0, 7, (3, 4)), rng.integers(0, 7, (3, 4))
    w = FeaturePartWriter(path, IDENTITY, layer="layer3", kind="conv", dims=4, extra={"shard": 0}, row_group_rows=2)
    w.write(ids[:2], mean[:2], {"max": peak[:2], "argmax_y": ys[:2], "argmax_x": xs[:2]})
    w.write(ids[2:], mean[2:], {"max": peak[2:], "argmax_y": ys[2:], "argmax_x": xs[2:]})
    w.commit()

    schema = pq.read_schema(path)
    assert schema.field("feature").type == pa.list_(pa.float16(), 4)
    assert schema.field("argmax_y").type == pa.list_(pa.int16(), 4)
    meta = file_metadata(path)
    assert meta["layer"] == "layer3" and meta["kind"] == "conv" and meta["dims"] == "4"
    assert meta["model"] == "resnet18" and meta["featscope_version"] == FEATSCOPE_VERSION
    table = read_feature_part(path, IDENTITY)
    assert table["image_id"].to_pylist() == [5, 9, 11]
    np.testing.assert_array_equal(column_array(table, "feature"), mean.astype(np.float16))
    np.testing.assert_array_equal(column_array(table, "max"), peak.astype(np.float16))
    np.testing.assert_array_equal(column_array(table, "argmax_x"), xs)


def test_float16_storage_saturates_instead_of_overflowing_to_inf(tmp_path):
    path = tmp_path / "p.parquet"
    w = FeaturePartWriter(path, IDENTITY, layer="fc", kind="vector", dims=2)
    w.write(np.array([0]), np.array([[1e6, -1e6]], dtype=np.float32))
    w.commit()
    values = column_array(pq.read_table(path), "feature")
    assert np.isfinite(values).all() and values[0, 0] == np.finfo(np.float16).max


@pytest.mark.parametrize("field", ["model", "weights_sha256", "preprocessing"])
def test_reader_refuses_a_part_written_for_another_run(tmp_path, field):
    path = tmp_path / "p.parquet"
    w = FeaturePartWriter(path, IDENTITY, layer="fc", kind="vector", dims=2)
    w.write(np.array([0]), np.zeros((1, 2), np.float32))
    w.commit()
    other = RunIdentity(**{**IDENTITY.__dict__, field: "something-else"})
    with pytest.raises(FeatscopeError, match=f"written for {field}="):
        read_feature_part(path, other)
    with pytest.raises(FeatscopeError):
        list(iter_features([path], other))


def test_an_uncommitted_writer_leaves_no_file_under_the_final_name(tmp_path):
    path = tmp_path / "p.parquet"
    w = FeaturePartWriter(path, IDENTITY, layer="fc", kind="vector", dims=2)
    w.write(np.array([0]), np.zeros((1, 2), np.float32))
    assert not path.exists()
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_iter_features_streams_parts_in_order(tmp_path):
    paths = []
    for shard in range(3):
        path = tmp_path / f"part-{shard:05d}.parquet"
        w = FeaturePartWriter(path, IDENTITY, layer="fc", kind="vector", dims=3)
        w.write(np.arange(shard * 10, shard * 10 + 4), np.full((4, 3), shard, np.float32))
        w.commit()
        paths.append(path)
    batches = list(iter_features(paths, IDENTITY, batch_rows=3))
    ids = np.concatenate([b[0] for b in batches])
    assert ids.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert max(len(b[0]) for b in batches) == 3


def test_run_json_holds_preprocessing_as_an_object_and_old_runs_with_a_string_still_read():
    from featscope.pipelines.core.models import Preprocessing
    from featscope.pipelines.core.store import RunIdentity

    text = Preprocessing().to_json()
    new = RunIdentity.of_run({"model": "m", "weights_sha256": "s", "preprocessing": json.loads(text)})
    old = RunIdentity.of_run({"model": "m", "weights_sha256": "s", "preprocessing": text})
    assert new == old and Preprocessing.from_json(new.preprocessing) == Preprocessing()


def test_non_finite_rows_read_from_float16_bits_equal_numpys_isfinite():
    rng = np.random.default_rng(0)
    every_float16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # NaNs, infs, subnormals
    values = rng.permutation(np.concatenate([every_float16, np.zeros(2**16 * 3, np.float16)])).reshape(-1, 64)
    expected = ~np.isfinite(values.astype(np.float32)).all(axis=1)
    assert 0 < expected.sum() < len(values)
    assert (non_finite_rows(values) == expected).all()
    assert (non_finite_rows(values.astype(np.float32)) == expected).all()
    finite = values[~expected]
    assert not non_finite_rows(finite).any() and non_finite_rows(finite[:0]).shape == (0,)
