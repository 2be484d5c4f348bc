"""Image-optimisation batches run at once on a few threads ("lanes"), each lane with its own
copy of the model and its share of the cores.

Feature visualisations and atlas cells are hundreds of small forward and backward passes.
One OpenMP team over all the cores spends much of each op starting and waiting, and on a CPU
where a larger batch does not cut the cost of an image, batching cannot make up for it. Two
lanes of one thread each rendered 8 MobileNet-V2 `features.13` units in 35-37 ms an
image-step, against 44-47 ms for one batch on both threads (2-core AVX2 machine, two paired
runs of `render_units`). Each lane needs its own model: layer taps are hooks on a model's
modules, which two passes at once would both fire.

What comes out does not depend on how the work is split: at a fixed thread count an image
is the same whatever else is in its batch, so lanes of one thread give exactly the images of
a one-thread run.

A lane optimises at most CPU_CHUNK images at a time, whatever `--batch` says: as for the
evaluation's forward passes, an image costs more in a larger batch once its activations leave
the cache. 16 units, batch 16 on two lanes (2-core AVX2 machine, `render_units`, two or three
interleaved runs each): MobileNet-V2 `features.13` 24.4-24.9 s with 4 a lane against
28.6-29.8 s with 8 at 128 px, 21.7-22.7 against 27.1-28.2 at 64 px, 12.1-13.8 against
14.4-15.8 at 224 px; ResNet-18 `layer3` at 128 px alike (23.8-24.2 against 23.6-25.9); 2 a
lane no better than 4.

Every lane's model is made before any lane starts: making one folds its batch norms through
a torch.fx trace, which patches `nn.Module.__call__` for the whole process while it runs, so
a forward pass on another thread at that moment fails.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from featscope.pipelines.core.cpus import MAX_LOCAL_WORKERS, usable_cpus

Chunk = TypeVar("Chunk")
State = TypeVar("State")
Result = TypeVar("Result")

CPU_CHUNK = 4  # images a CPU lane optimises at once, at most (see the module's note)


def lane_plan(items: int, batch: int, device: torch.device) -> tuple[int, int, int]:
    """(lanes, torch threads per lane, items per chunk) for `items` optimised `batch` at a
    time. On a GPU, one lane (its kernels queue anyway). On the CPU, a lane per usable core
    (at most MAX_LOCAL_WORKERS, at most one per item), the cores shared among them, and
    chunks of `batch // lanes`, at most CPU_CHUNK, so that up to `batch` images are in
    flight at once whatever the lanes: their activations take at most the memory `--batch`
    asks for, plus a copy of the model per lane (MobileNet-V2 14 MB, VGG16 528 MB).

    Lanes pay off for optimisation, hundreds of small forward and backward passes; not for
    forward-only batches, which one OpenMP team runs as well (deletion curves of 8 photos at
    224x300, 4 copies a pass: 2.34 images/s on both threads, 2.26 on two 1-thread lanes)."""
    if device.type != "cpu" or items <= 1:
        return 1, usable_cpus(), max(1, batch)
    budget = usable_cpus()
    lanes = max(1, min(budget, MAX_LOCAL_WORKERS, items, batch))
    return lanes, max(1, budget // lanes), max(1, min(batch // lanes, math.ceil(items / lanes), CPU_CHUNK))


def chunks_of(items: Sequence[Chunk], size: int) -> list[Sequence[Chunk]]:
    return [items[first:first + size] for first in range(0, len(items), size)]


def map_in_lanes(run: Callable[[State, Chunk], Result], chunks: Sequence[Chunk], make_state: Callable[[], State],
                 *, lanes: int, threads: int) -> Iterator[Result]:
    """`run(state, chunk)` for every chunk, yielded in order, on `lanes` threads of `threads`
    torch threads each, each lane with its own `make_state()` (a copy of the model), all made
    here first. One lane runs on the calling thread, with its thread count as it is."""
    lanes = max(1, min(lanes, len(chunks)))
    if lanes == 1:
        state = make_state()
        for chunk in chunks:
            yield run(state, chunk)
        return
    states = [make_state() for _ in range(lanes)]  # before any lane runs: see the module's note
    local = threading.local()

    def start_lane() -> None:
        torch.set_num_threads(threads)  # per thread: this lane's OpenMP team
        local.state = states.pop()  # atomic: each lane takes its own

    with ThreadPoolExecutor(lanes, thread_name_prefix="lane", initializer=start_lane) as pool:
        yield from pool.map(lambda chunk: run(local.state, chunk), chunks)
