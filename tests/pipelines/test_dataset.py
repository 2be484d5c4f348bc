"""Threaded decoding gives exactly the batches inline decoding gives, bad files included."""

from __future__ import annotations

import pytest
import torch
from helpers import write_dataset
from PIL import Image

from featscope.pipelines.core.dataset import image_batches
from featscope.pipelines.core.images import read_pixels
from featscope.pipelines.core.models import load_model


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory, digits) -> list[str]:
    """Readable photos and digits with unreadable files among them, the last one at a batch end."""
    root = tmp_path_factory.mktemp("mixed")
    good = [str(p) for p in write_dataset(root, digits, n_photos=4, digits_per_label=2, labels=(0, 5))]
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not a picture")
    Image.open(good[0]).convert("RGB").save(root / "whole.jpg")
    (root / "cut.jpg").write_bytes((root / "whole.jpg").read_bytes()[:500])
    return [good[0], str(root / "empty.jpg"), *good[1:5], str(root / "text.png"), *good[5:], str(root / "cut.jpg")]


@pytest.mark.parametrize("workers, overlap", [(1, False), (2, False), (2, True), (3, True)])
def test_threaded_batches_equal_inline_ones(mixed_files, workers, overlap):
    prep = load_model("resnet18", "random").preprocessing
    ids = list(range(100, 100 + len(mixed_files)))
    inline = list(image_batches(ids, mixed_files, prep, batch_size=3, workers=0))
    threaded = list(image_batches(ids, mixed_files, prep, batch_size=3, workers=workers, overlap=overlap))
    assert len(threaded) == len(inline) == 4
    for a, b in zip(threaded, inline):
        assert torch.equal(a.image_ids, b.image_ids)
        assert torch.equal(a.pixels, b.pixels)
        assert a.errors == b.errors
    bad = [(i, p) for batch in inline for i, p, _, _ in batch.errors]
    assert [p.rsplit("/", 1)[1] for _, p in bad] == ["empty.jpg", "text.png", "cut.jpg"]
    assert {kind for batch in inline for _, _, kind, _ in batch.errors} == {"bad_image"}  # all read, none decodes
    good = torch.cat([b.image_ids for b in inline]).tolist()
    assert sorted(good + [i for i, _ in bad]) == ids
    for batch in inline:  # every row holds its own image, also after a bad file was dropped
        for image_id, pixels in zip(batch.image_ids.tolist(), batch.pixels):
            expected = prep.to_uint8(read_pixels(mixed_files[image_id - 100], min_size=prep.resize))
            assert torch.equal(pixels, expected)
