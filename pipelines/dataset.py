"""Batches of preprocessed images, decoded by threads.

Each file goes through the one loader (`images.read_pixels`), is resized and cropped, and
becomes a uint8 tensor; an unreadable file becomes an error entry in its batch instead of
stopping the run. Decoding uses threads, not DataLoader worker processes: the decoder and
the resize release the GIL, and on a 2-core CPU worker processes measured slower than even
decoding inline (every batch crossing processes through fresh shared memory page-faults on
both sides).

When the model runs on a GPU, decoding runs batches ahead, overlapped with it. When the
model runs on the same CPU cores, it does not: each batch is decoded when asked for, on
every core. Overlapped decode threads preempt the model's OpenMP threads, and every
parallel region then waits for its slowest thread; on 2 cores the alternation measured
3-13% faster end to end (benchmarks/extract_throughput.py).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from featscope.pipelines.images import DEFAULT_MAX_PIXELS, BadImage, read_pixels
from featscope.pipelines.models import Preprocessing


class ImageBatch(NamedTuple):
    image_ids: torch.Tensor  # (B,) int64 of the images that decoded
    pixels: torch.Tensor  # (B,3,crop,crop) uint8
    errors: list[tuple[int, str, str]]  # (image_id, path, reason) of those that did not


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Decode threads: every core, up to 16."""
    return min(16, available_cores())


def _lower_priority() -> None:
    """Decoding yields to the model's threads (Linux nice values are per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):
        pass


def _load(path: str, preprocessing: Preprocessing, max_pixels: int) -> torch.Tensor | str:
    try:
        pixels = read_pixels(path, max_pixels=max_pixels, min_size=preprocessing.resize)
    except BadImage as e:
        return str(e)
    return preprocessing.to_uint8(pixels)


def _collate(ids: list[int], paths: list[str], loaded: list[torch.Tensor | str], crop: int,
             pin_memory: bool) -> ImageBatch:
    good = [i for i, item in enumerate(loaded) if isinstance(item, torch.Tensor)]
    pixels = torch.empty((len(good), 3, crop, crop), dtype=torch.uint8, pin_memory=pin_memory)
    for row, i in enumerate(good):
        pixels[row] = loaded[i]
    errors = [(ids[i], paths[i], item) for i, item in enumerate(loaded) if isinstance(item, str)]
    return ImageBatch(torch.tensor([ids[i] for i in good], dtype=torch.int64), pixels, errors)


def image_batches(image_ids: list[int], paths: list[str], preprocessing: Preprocessing, *, batch_size: int,
                  workers: int, pin_memory: bool = False, prefetch: int = 2, overlap: bool = True,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[ImageBatch]:
    """`ImageBatch`es in manifest order, decoded by `workers` threads (0: inline): `prefetch`
    batches ahead at low priority with `overlap`, else each batch when asked for."""
    starts = iter(range(0, len(paths), batch_size))

    def load_all(start: int, mapper) -> tuple[int, object]:
        chunk = paths[start:start + batch_size]
        return start, mapper(lambda p: _load(p, preprocessing, max_pixels), chunk)

    def collate(start: int, loaded) -> ImageBatch:
        end = start + batch_size
        return _collate(image_ids[start:end], paths[start:end], list(loaded), preprocessing.crop, pin_memory)

    if workers == 0:
        for start in starts:
            yield collate(*load_all(start, map))
        return
    if not overlap:
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
            for start in starts:
                yield collate(*load_all(start, pool.map))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode", initializer=_lower_priority) as pool:
        in_flight = deque(load_all(s, pool.map) for _, s in zip(range(prefetch + 1), starts))
        while in_flight:
            start, loaded = in_flight.popleft()
            nxt = next(starts, None)
            if nxt is not None:
                in_flight.append(load_all(nxt, pool.map))
            yield collate(start, loaded)
