"""`featscope data demo`: deterministic, counted, and never silently overwrites another dataset."""

import hashlib

import pytest
from PIL import Image

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.data import demo as demo_data


def tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_is_deterministic_with_every_label(tmp_path):
    a = demo_data.build(tmp_path / "a", digits=30)
    demo_data.build(tmp_path / "b", digits=30)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert (a.digits, a.photos, a.written) == (30, len(demo_data.PHOTOS), 30 + len(demo_data.PHOTOS))
    labels = {p.parent.name for p in (tmp_path / "a").rglob("*.*")}
    assert labels == {str(d) for d in range(10)} | {"photo"}
    digit = Image.open(next((tmp_path / "a" / "7").iterdir()))
    assert digit.size == (28, 28)
    photos = [Image.open(p) for p in (tmp_path / "a" / "photo").iterdir()]
    assert all(p.mode == "RGB" and min(p.size) >= 200 for p in photos)


def test_rerun_writes_nothing_and_a_different_dataset_is_refused(tmp_path):
    out = tmp_path / "demo"
    demo_data.build(out, digits=10)
    assert demo_data.build(out, digits=10).written == 0
    (out / "mine.png").write_bytes(b"someone else's")
    with pytest.raises(FeatscopeError, match="holds a different dataset"):
        demo_data.build(out, digits=10)
    assert (out / "mine.png").exists()
    assert demo_data.build(out, digits=10, force=True).written == 0
    assert not (out / "mine.png").exists()
