"""Batches of preprocessed images, decoded in DataLoader worker processes.

Workers open each file through the one loader (`images.open_image`), resize and crop it,
and send uint8 tensors (4x smaller than float) to the model's process; an unreadable file
becomes an error entry in its batch instead of stopping the run.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from featscope.pipelines.images import DEFAULT_MAX_PIXELS, BadImage, open_image
from featscope.pipelines.models import Preprocessing


class ImageBatch(NamedTuple):
    image_ids: torch.Tensor  # (B,) int64 of the images that decoded
    pixels: torch.Tensor  # (B,3,crop,crop) uint8
    errors: list[tuple[int, str, str]]  # (image_id, path, reason) of those that did not


class ImageDataset(Dataset):
    def __init__(self, image_ids: list[int], paths: list[str], preprocessing: Preprocessing,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.image_ids, self.paths = image_ids, paths
        self.preprocessing, self.max_pixels = preprocessing, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str, torch.Tensor | None, str | None]:
        path = self.paths[i]
        try:
            img = open_image(path, max_pixels=self.max_pixels, min_size=self.preprocessing.resize)
        except BadImage as e:
            return self.image_ids[i], path, None, str(e)
        return self.image_ids[i], path, self.preprocessing.to_uint8(img), None


def _collate(items: list[tuple[int, str, torch.Tensor | None, str | None]], crop: int) -> ImageBatch:
    good = [(i, t) for i, _, t, _ in items if t is not None]
    ids = torch.tensor([i for i, _ in good], dtype=torch.int64)
    pixels = torch.stack([t for _, t in good]) if good else torch.empty((0, 3, crop, crop), dtype=torch.uint8)
    return ImageBatch(ids, pixels, [(i, p, err) for i, p, t, err in items if t is None])


class _Collate:
    """Picklable collate function (workers may be spawned, not forked)."""

    def __init__(self, crop: int):
        self.crop = crop

    def __call__(self, items):
        return _collate(items, self.crop)


def default_workers(device: torch.device) -> int:
    """Decode workers: on a CPU-only box leave the cores to the model; on a GPU box use them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores) if device.type == "cuda" else max(1, cores // 2)


def image_batches(image_ids: list[int], paths: list[str], preprocessing: Preprocessing, *, batch_size: int,
                  workers: int, pin_memory: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> DataLoader:
    """An iterable of `ImageBatch`es in manifest order."""
    dataset = ImageDataset(image_ids, paths, preprocessing, max_pixels)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
        collate_fn=_Collate(preprocessing.crop), prefetch_factor=4 if workers else None,
    )
