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

import functools
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import torch

from featscope.pipelines.core.cpus import usable_cpus
from featscope.pipelines.core.images import DEFAULT_MAX_PIXELS, BadImage, Unreadable, read_pixels
from featscope.pipelines.core.models import Preprocessing


class ImageBatch(NamedTuple):
    image_ids: torch.Tensor  # (B,) int64 of the images that decoded
    pixels: torch.Tensor  # (B,3,crop,crop) uint8
    errors: list[tuple[int, str, str, str]]  # (image_id, path, kind, reason) of those that did not: kind
    # "unreadable" (the bytes could not be read: may work again) or "bad_image" (they do not decode)


def available_cores() -> int:
    """The CPU threads this job may use (see `core.cpus`)."""
    return usable_cpus()


def default_workers() -> int:
    """Decode threads: every core, up to 16."""
    return min(16, available_cores())


def _lower_priority() -> None:
    """Decoding yields to the model's threads (Linux nice values are per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (OSError, AttributeError):
        pass


@contextmanager
def _decode_pool(workers: int, low_priority: bool) -> Iterator[ThreadPoolExecutor]:
    """Decode threads whose torch ops (the resize) run on the thread alone.

    Otherwise each decode thread starts its own OpenMP team, whose threads spin after
    every resize and then slow the model's next forward pass: 9% end to end on 2 cores
    over three paired runs. `torch.set_num_threads` also sets the default for threads
    started later, so the caller's value is put back when the pool is gone; threads that
    already ran torch ops, the caller's among them, keep their own."""
    threads = torch.get_num_threads()

    def start_thread() -> None:
        torch.set_num_threads(1)
        if low_priority:
            _lower_priority()

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="decode", initializer=start_thread) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _decode_rows(rows: Iterator[int], lock: threading.Lock, paths: list[str], preprocessing: Preprocessing,
                 max_pixels: int, pixels: torch.Tensor) -> list[tuple[int, str, str]]:
    """Decode `paths[row]` into `pixels[row]` for each row taken from the shared iterator;
    returns (row, kind, reason) of the files that could not be read (see `ImageBatch`)."""
    failed = []
    while True:
        with lock:
            row = next(rows, None)
        if row is None:
            return failed
        try:
            image = read_pixels(paths[row], max_pixels=max_pixels, min_size=preprocessing.resize)
        except BadImage as e:
            failed.append((row, "unreadable" if isinstance(e, Unreadable) else "bad_image", str(e)))
            continue
        pixels[row] = preprocessing.to_uint8(image)


class _Batch(NamedTuple):
    """One batch being decoded: its rows' pixel buffer and the decoders' results."""
    start: int
    pixels: torch.Tensor
    results: list[Future]


def image_batches(image_ids: list[int], paths: list[str], preprocessing: Preprocessing, *, batch_size: int,
                  workers: int, pin_memory: bool = False, prefetch: int = 2, overlap: bool = True,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[ImageBatch]:
    """`ImageBatch`es in manifest order, decoded by `workers` threads (0: inline): `prefetch`
    batches ahead at low priority with `overlap`, else each batch when asked for.

    Each decoder writes straight into the batch's buffer and takes the next row from a
    shared counter, so there is no per-image future and no collate copy (together 0.1
    ms/img of a 0.6 ms/img decode phase on 2 cores)."""
    crop = preprocessing.crop

    def submit(start: int, pool: ThreadPoolExecutor | None) -> _Batch:
        chunk = paths[start:start + batch_size]
        pixels = torch.empty((len(chunk), 3, crop, crop), dtype=torch.uint8, pin_memory=pin_memory)
        decode = functools.partial(_decode_rows, iter(range(len(chunk))), threading.Lock(), chunk, preprocessing,
                                   max_pixels, pixels)
        if pool is None:
            done: Future = Future()
            done.set_result(decode())
            return _Batch(start, pixels, [done])
        return _Batch(start, pixels, [pool.submit(decode) for _ in range(min(workers, len(chunk)))])

    def finish(batch: _Batch) -> ImageBatch:
        failed = sorted(f for result in batch.results for f in result.result())
        ids = image_ids[batch.start:batch.start + len(batch.pixels)]
        bad = {row for row, _, _ in failed}
        good = [row for row in range(len(ids)) if row not in bad]
        pixels = batch.pixels
        if failed:  # move the good rows up, in place (a pinned buffer stays pinned)
            pixels[:len(good)] = pixels[good]
            pixels = pixels[:len(good)]
        errors = [(ids[row], paths[batch.start + row], kind, reason) for row, kind, reason in failed]
        return ImageBatch(torch.tensor([ids[row] for row in good], dtype=torch.int64), pixels, errors)

    starts = iter(range(0, len(paths), batch_size))
    if workers == 0:
        for start in starts:
            yield finish(submit(start, None))
        return
    if not overlap:
        with _decode_pool(workers, low_priority=False) as pool:
            for start in starts:
                yield finish(submit(start, pool))
        return
    with _decode_pool(workers, low_priority=True) as pool:
        in_flight = deque(submit(s, pool) for _, s in zip(range(prefetch + 1), starts))
        while in_flight:
            batch = in_flight.popleft()
            nxt = next(starts, None)
            if nxt is not None:
                in_flight.append(submit(nxt, pool))
            yield finish(batch)
