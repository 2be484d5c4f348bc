"""`featscope serve`: a run's report and a JSON query API over HTTP (FastAPI under uvicorn).

  GET  /                             -> the report (redirect to /report/index.html)
  GET  /report/..., /mosaic/..., ... -> the report and the pictures its pages show
  GET  /api/image/{id}               -> the image's label, file name and shard
  GET  /api/neighbours?id=N&layer=L&k=K
  POST /api/neighbours?layer=L&k=K   -> body: an image file; embedded with the run's own model
  GET  /docs, /openapi.json          -> the API's description (no CDN: it works offline)

What it is built to survive (the connection level in `serve_connections`): a 2048-connection
backlog, keep-alive with idle, header and body deadlines (a client that does not finish its
headers or body in time is answered 408 and let go), a cap on requests in flight (503 past
it), and graceful shutdown on SIGTERM (uvicorn's). An answer given before the request has
wholly arrived (413 for a body past the limit) reaches a client that sends its whole body
before it reads (urllib does): the rest is read and dropped while it keeps coming (a
"lingering close", as nginx and Apache do). Bodies are counted as they arrive, whatever
Content-Length says; an upload's pixel count is checked from its header before it is
decoded. Every error is a JSON body {"error": ...} with its status.

Uploads decode on a pool of threads, outside the model's lock, and the model embeds them in
dynamic batches (`DynamicBatcher`: the first waiting upload opens a batch that takes whoever
arrives within a few milliseconds), so throughput grows with concurrency: where a batch costs
the model much less an image (a GPU; bf16 on a CPU with fast bf16) on one model thread, with
the decoders yielding the CPU to it; elsewhere on as many model threads as fill the cores,
each with its own copy of the model (`model_workers`). Searches are batched too, on
one thread: those that arrive while one batch searches form the next, which an exact index
searches in one pass over its vectors (up to 8 queries). An upload passes from decoder to
model to search thread without the event loop (`search_upload`). GETs never wait for the model.
Memory does not grow with the dataset beyond Arrow columns of the manifest (`Catalogue`) and
the indexes, memory-mapped where the kind allows. Only the report and the pictures it shows
are served: raw run files (manifest, run.json, features, indexes, checkpoints) only with
`--expose-run-files`.

It follows the run while a rerun changes it (`RunState`): each request answers from the
manifest and indexes as they are on disk, read together; a layer whose index still holds
images the rerun retired answers 503 until the workflow updates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi import Path as FastPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from featscope.index import recall_shortfall
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.params import ParamError
from featscope.pipelines.app.serve_connections import (
    HEADER_TIMEOUT,
    KEEP_ALIVE,
    SEND_TIMEOUT,
    CloseWhileBodyArrives,
    InFlightLimit,
    MalformedRequestLog,
    allow_open_connections,
    guarded_protocol,
)
from featscope.pipelines.core import derived
from featscope.pipelines.core.cpus import usable_cpus
from featscope.pipelines.core.neighbours import check_current, neighbours_of, open_index, rewritten_note
from featscope.pipelines.core.options import Command, Options, option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import RunIdentity

if TYPE_CHECKING:  # imported where a service starts (it brings torch), not for `featscope --help`
    import pyarrow as pa

    from featscope.index.search import NeighbourIndex
    from featscope.pipelines.core.features import ImageEmbedder

MAX_ID = 2**63 - 1  # image ids are int64: a larger number is a bad request, not an overflow inside
API_NEIGHBOURS = ("/api/neighbours", "/api/neighbors")  # the US spelling still answers, for this release
PUBLIC_FOLDERS = {"report", "mosaic", "patches", "saliency", "viz", "neighbours", "explain", "units"}  # what report pages show
PUBLIC_SUFFIXES = {".html", ".js", ".css", ".png", ".jpg", ".jpeg", ".svg", ".gif", ".webp"}
DEFAULT_MAX_PIXELS = 50_000_000  # an upload may declare at most this many pixels (Pillow's bomb limit: 89M)
BODY_TIMEOUT = 30.0  # seconds an upload's body may stall (then 408)
MAX_IN_FLIGHT = 256  # requests at once; past it 503 (`InFlightLimit`)
CHECK_EVERY = 0.05  # seconds between looks at whether the run changed on disk (see RunState)


class ApiError(Exception):
    """An answer other than 200: its status, a one-line reason and any headers it needs."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


# ---- the data the service answers from ----------------------------------------------------

class Catalogue:
    """The live manifest as Arrow columns sorted by image_id: lookups by binary search, no
    Python object per image (at 10M images a dict of rows would take about 10 GB)."""

    def __init__(self, live: pa.Table):
        """`live`: the manifest's live rows (`manifest.read`)."""
        import pyarrow.compute as pc

        table = live.select(["image_id", "path", "label", "shard"]).sort_by("image_id")
        self.ids = table["image_id"].to_numpy()
        self.names = pc.replace_substring_regex(table["path"], pattern=".*/", replacement="").combine_chunks()
        self.labels = table["label"].combine_chunks()
        self.shards = table["shard"].to_numpy()

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, image_ids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where the run has no such image (one binary search for all)."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.ids, image_ids), max(len(self.ids) - 1, 0))
        return np.where((len(self.ids) > 0) & (self.ids[at] == image_ids), at, -1)

    def describe_many(self, image_ids) -> list[dict]:
        """Label, file name and shard of each image (all in the run), a few Arrow calls in all."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        rows = self.rows(image_ids)
        if (rows < 0).any():
            raise ApiError(404, f"no image {int(image_ids[rows < 0][0])} in this run")
        labels, names = self.labels.take(rows).to_pylist(), self.names.take(rows).to_pylist()
        return [{"image_id": int(i), "label": label, "name": name, "shard": int(shard)}
                for i, label, name, shard in zip(image_ids, labels, names, self.shards[rows])]

    def describe(self, image_id: int) -> dict:
        return self.describe_many([image_id])[0]


def run_signature(rd: RunDir) -> tuple:
    """What a rerun changes of what the service answers from: the manifest and run.json (each
    rewritten by an atomic rename: a new inode), the index folder's entries (each index save
    adds a version folder with a fresh name and switches the layer's link to it) and each
    layer's feature folder (a shard extracted again renames a new part into it, which the
    answers of an index not updated since must mention). A few system calls, about 50 us
    (looked at most every CHECK_EVERY)."""
    def file_key(path: Path):
        try:
            found = os.stat(path)
        except FileNotFoundError:
            return None
        return found.st_ino, found.st_mtime_ns, found.st_size

    try:
        entries = tuple(sorted(os.listdir(rd.index_root)))
    except FileNotFoundError:
        entries = ()
    try:
        with os.scandir(rd.root / "features") as folders:
            features = tuple(sorted((e.name, e.stat().st_mtime_ns) for e in folders if e.is_dir()))
    except FileNotFoundError:
        features = ()
    return file_key(rd.manifest), file_key(rd.run_json), entries, features


@dataclass(frozen=True)
class RunState:
    """The live manifest and each layer's index, read together. A request takes the state
    once and answers from it alone, so no answer mixes two versions of the run; a rerun that
    changes the run on disk gets a new state (`QueryService.current_state`). A layer whose
    index cannot answer for the manifest read with it (it still holds images the rerun
    retired: the workflow has not updated it yet; or it was built for another model) is
    unavailable, with the reason, until it can."""

    signature: tuple
    identity: RunIdentity  # the model, weights and preprocessing run.json records
    catalogue: Catalogue
    indexes: dict[str, NeighbourIndex]
    versions: dict[str, str]  # layer -> the version folder its index was read from
    unavailable: dict[str, str] = field(default_factory=dict)  # layer -> why it cannot answer now
    # layer -> live images with features that its index lacks (added since its last update):
    # every answer says so, since its neighbours are searched among the others only
    unindexed: dict[str, int] = field(default_factory=dict)
    # layer -> what its answers lack while shards it holds were extracted again since it was
    # built (`rewritten_note`; their vectors may have changed): every answer says so
    rewritten: dict[str, str] = field(default_factory=dict)
    failures: dict[int, str] | None = field(default=None, compare=False)  # read when first asked (`failure`)

    def failure(self, rd: RunDir, image_id: int) -> str | None:
        """Why extraction could not give the image features (errors.parquet), or None: read
        once per state, when an answer first needs it."""
        if self.failures is None:
            from featscope.pipelines.core import manifest

            object.__setattr__(self, "failures", manifest.extraction_failures(rd))
        return self.failures.get(image_id)

    @classmethod
    def read(cls, rd: RunDir, previous: RunState | None = None) -> RunState:
        """The run as it is on disk; an index whose version folder is the one `previous` read
        is not read again, only checked against the new manifest (a rerun switches the link
        of each index it updates, one at a time)."""
        from featscope.pipelines.core import manifest

        signature = run_signature(rd)  # first: a change while reading makes the next look read again
        live = manifest.read(rd)
        live_ids = live["image_id"].to_numpy()
        identity = RunIdentity.of_run(rd.read_config())  # read once: the state and every check use the same
        indexes, versions, unavailable = {}, {}, {}
        for layer in rd.index_layers():
            versions[layer] = os.path.realpath(rd.index_dir(layer))
            try:
                if previous and previous.versions.get(layer) == versions[layer] and layer in previous.indexes:
                    indexes[layer] = previous.indexes[layer]
                    check_current(rd, layer, indexes[layer], live_ids, identity)
                else:
                    indexes[layer] = _open_mapped(rd, layer, live_ids, identity)
            except FeatscopeError as e:
                indexes.pop(layer, None)
                unavailable[layer] = str(e)
        featured = np.setdiff1d(live_ids, manifest.featureless(rd))  # the others have no vector to index
        unindexed = {layer: int(np.isin(featured, index.ids, invert=True).sum()) for layer, index in indexes.items()}
        rewritten = {layer: note for layer, index in indexes.items() if (note := rewritten_note(rd, layer, index.meta))}
        return cls(signature, identity, Catalogue(live), indexes, versions, unavailable, unindexed, rewritten)

    @property
    def layers(self) -> list[str]:
        return sorted(self.indexes.keys() | self.unavailable.keys())


class DynamicBatcher:
    """Runs requests in dynamic batches on `workers` threads, as inference servers do: the
    first request waiting opens a batch, which takes every request that arrives within `wait_s`
    (up to `max_batch`) while `coming()` says more are on their way; a lone request does not
    wait. `run_batch` maps a list of requests to the list of their answers; with several
    workers, it runs on them at once (one batch each)."""

    def __init__(self, run_batch, *, name: str, max_batch: int = 16, wait_s: float = 0.0, coming=lambda: 0,
                 initializer=None, workers: int = 1):
        self.run_batch, self.max_batch, self.wait_s, self.coming = run_batch, max_batch, wait_s, coming
        self.initializer = initializer  # run first on each of the batcher's threads
        self.waiting: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # sizes, for the load test and tests
        self.threads = [threading.Thread(target=self._loop, name=f"{name}_{n}" if workers > 1 else name, daemon=True)
                        for n in range(workers)]
        for thread in self.threads:
            thread.start()

    def submit(self, request) -> Future:
        done: Future = Future()
        self.waiting.put((request, done))
        return done

    def _loop(self) -> None:
        if self.initializer is not None:
            self.initializer()
        while True:
            batch = [self.waiting.get()]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter() if self.coming() > 0 else 0
                try:
                    batch.append(self.waiting.get(timeout=left) if left > 0 else self.waiting.get_nowait())
                except queue.Empty:
                    break
            self.batches.append(len(batch))
            try:
                answers = self.run_batch([request for request, _ in batch])
            except Exception as e:  # every waiting request gets the failure, none hangs
                for _, done in batch:
                    done.set_exception(e)
                continue
            for (_, done), answer in zip(batch, answers):
                done.set_result(answer)


def search_batch(requests: list[tuple[NeighbourIndex, int | np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(index, image id or vector, k) requests -> (neighbour ids, distances) each, with one
    search call per index and kind of query. An image is never its own neighbour.
    An exact index searches a batch in one pass over its vectors (`_open_mapped`; FAISS's own
    search of a few queries costs several: `NeighbourIndex.scan_batches_at_once`)."""
    answers: list = [None] * len(requests)
    for index in {id(index): index for index, _, _ in requests}.values():
        for by_id in (True, False):
            rows = [n for n, (ix, query, _) in enumerate(requests)
                    if ix is index and isinstance(query, (int, np.integer)) == by_id]
            if not rows:
                continue
            k = max(requests[n][2] for n in rows)
            queries = [requests[n][1] for n in rows]
            found = neighbours_of(index, queries, k) if by_id else index.search_vectors(np.stack(queries), k=k)
            for row, n in enumerate(rows):
                keep = found.image_ids[row][:requests[n][2]]
                answers[n] = (keep, found.distances[row][:requests[n][2]])
    return answers


def batching_pays(device: str, precision: str) -> bool:
    """Whether the model embeds a batch of uploads for much less an image than one by one: on
    a GPU, and on a CPU with fast bf16 running a bf16 run (oneDNN's AMX kernels; MobileNet-V2
    on one core of an AMX Xeon: 4.3 ms an image in 4 and 4.2 in 8, against 7.3 alone). Not in
    float32 on a CPU: 11.2 alone, 9.6 in 4 and 12.5 in 8 on the same core; 17.2 alone and
    18.8 in 8 on a 2-core AVX2 machine."""
    from featscope.pipelines.core.device import cpu_has_fast_bf16

    return device == "cuda" or (precision == "bf16" and cpu_has_fast_bf16())


# Uploads embedded in one forward pass, at most, where batching pays and where it does not.
# On the CPU an image costs more in a larger batch once its activations leave the cache
# (in bf16 on the AMX Xeon, 16 cost 5.5 ms an image against 4.2 for 8); a smaller batch
# also holds the uploads behind it for less: on the AVX2 machine, at 16 clients, 45/s and
# p99 491 ms with 4 against 41/s and 589 ms with 8 (means of four paired runs).
EMBED_BATCH = {"cpu": 8, "cuda": 16}
EMBED_BATCH_UNBATCHED = 4


def model_workers(device: str, batching: bool) -> int:
    """Threads that run the model at once, each on its own copy and on `op_threads()` cores.
    One where batching pays (a GPU, whose kernels queue anyway; a CPU in bf16), in batches of
    8 on the CPU, with the decoders yielding to it (`decoder_setup`): the 2-core AMX Xeon
    embedded 16 clients' uploads at 136.8-139.2/s (p50 107-110 ms) against 116.6-126.2/s
    (p50 124-134 ms) with two threads of 4 (three paired runs). Elsewhere as many as fill the
    cores (2 of 1 thread on 2 cores; one OpenMP team over all cores contends with the
    decoders, see `limit_threads`): there batching alone does not fill a CPU, and on a 2-core
    AVX2 machine the one model thread was the service's bottleneck at 95% of a core with the
    other core 60% idle."""
    return 1 if batching else max(1, usable_cpus() // op_threads())


class QueryService:
    """The run's catalogue, indexes and (when first needed) model, shared by all requests."""

    def __init__(self, rd: RunDir, *, max_upload: int = 16 * 2**20, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_k: int = 100, expose_run_files: bool = False, decode_threads: int | None = None,
                 model_threads: int | None = None):
        from featscope.pipelines.core.device import resolve_device, resolve_precision
        from featscope.pipelines.core.features import ImageEmbedder

        self.rd, self.root = rd, rd.root.resolve()
        self.max_upload, self.max_pixels, self.max_k = max_upload, max_pixels, max_k
        self.expose_run_files = expose_run_files
        # a layer whose index cannot answer is 503 until it can, from the start too: a service
        # (re)started while the workflow reruns comes up, and follows the rerun to its end
        self.state = RunState.read(rd)
        self._state_lock = threading.Lock()
        self._reading: Future | None = None  # the read of a changed run, when one is under way
        self._checked_at = time.monotonic()
        self.device = resolve_device("auto").type  # where uploads are embedded
        # the model embeds uploads into every layer indexed now; a layer indexed later is
        # searched by id only (POST answers 503 for it) until the service restarts
        config = rd.read_config()
        precision = resolve_precision(config.get("precision", "auto"), resolve_device(self.device))
        batching = batching_pays(self.device, precision)
        self.model_threads = model_threads or model_workers(self.device, batching)
        self.embed_batch = EMBED_BATCH[self.device] if batching else EMBED_BATCH_UNBATCHED
        self.embedded_layers, self.embedder_identity = self.state.layers, RunIdentity.of_run(config)
        self.embedder = ImageEmbedder(config, self.embedded_layers, device=self.device, copies=self.model_threads)
        # decoders run torch on themselves alone, the model and the searches on half the cores:
        # see limit_threads
        self.op_threads = op_threads()
        self.decoders = ThreadPoolExecutor(decode_threads or usable_cpus(), thread_name_prefix="decode",
                                           initializer=decoder_setup,
                                           initargs=(self.model_threads == 1 and self.device == "cpu",))
        self._batcher: DynamicBatcher | None = None
        self._thread_models = threading.local()  # each model thread's embedder: see _embedder_of_this_thread
        self._spare_embedder: ImageEmbedder | None = self.embedder  # the first model thread takes this one
        self.decoding = 0  # uploads between arrival and the batcher (read by it, so lone ones never wait)
        self._decoding_lock = threading.Lock()  # counted on the event loop, counted off on a decoder
        self._batcher_lock = threading.Lock()
        # searches need no wait: requests that arrive while one batch searches form the next
        self.searches = DynamicBatcher(search_batch, name="search", max_batch=64,
                                       initializer=partial(limit_threads, self.op_threads))
        self._explainer = None  # loads the model on the first /api/explain
        self._explainer_state: RunState | None = None  # the state whose manifest it holds

    # -- the run as it is now on disk --

    def current_state(self) -> RunState:
        """The run's state as it is on disk now (looked at most every CHECK_EVERY seconds):
        read anew, on the calling thread, if a rerun changed it (a reader already under way is
        waited for, not repeated)."""
        return self._state_or_reading().result() if self._changed() else self.state

    async def current_state_async(self) -> RunState:
        """`current_state` for the event loop: a changed run is read on another thread, and
        the requests that arrive meanwhile wait for that read instead of blocking the loop."""
        if not self._changed():
            return self.state
        return await asyncio.wrap_future(self._state_or_reading(threaded=True))

    def _changed(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at < CHECK_EVERY and self._reading is None:
            return False
        self._checked_at = now
        return self._reading is not None or run_signature(self.rd) != self.state.signature

    def _state_or_reading(self, threaded: bool = False) -> Future:
        """The read under way, or a new one, started (outside the lock, which it takes to end)."""
        with self._state_lock:
            reading, start = self._reading, self._reading is None
            if start:
                self._reading = reading = Future()
        if start and threaded:
            threading.Thread(target=self._read_state, args=(reading,), daemon=True).start()
        elif start:
            self._read_state(reading)
        return reading

    def _read_state(self, reading: Future) -> None:
        try:
            state = RunState.read(self.rd, previous=self.state)
        except Exception as e:  # e.g. the manifest removed: every waiting request hears why
            self._checked_at = float("-inf")  # and the next one looks again, never answering from the old state
            reading.set_exception(ApiError(503, f"the run changed on disk and cannot be read now: {e}",
                                           {"Retry-After": "1"}))
        else:
            self.state = state
            reading.set_result(state)
        finally:
            with self._state_lock:
                self._reading = None

    def explain(self, a: int, b: int, layer: str, similarity: str = "cosine") -> dict:
        """The answer to GET /api/explain: both maps, the similarity, the method and a picture
        (a PNG data URL). 404 for an unknown image, 400 for a layer that cannot be explained."""
        import base64
        import io

        from featscope.pipelines.stages import explain

        state = self.current_state()
        for image_id in (a, b):
            state.catalogue.describe(image_id)  # 404 for an id the run does not have
        with self._batcher_lock:
            if self._explainer is None:
                self._explainer = explain.PairExplainer(self.rd)
            elif self._explainer_state is not state:
                self._explainer.read_manifest()  # the run changed: its image paths with it
            self._explainer_state = state
        try:
            found = self._explainer.explain(a, b, layer, similarity)
        except FeatscopeError as e:
            raise ApiError(400, str(e)) from None
        buffer = io.BytesIO()
        explain.pair_picture(found).save(buffer, format="PNG")
        return found.to_json() | {"picture": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}

    @property
    def batcher(self) -> DynamicBatcher:
        """The model's batcher, started by the first upload (the model loads then), on the event
        loop's thread: a thread inherits the scheduling priority of the thread that starts it,
        and a decoder's is lower (`decoder_setup`)."""
        with self._batcher_lock:
            if self._batcher is None:
                self._batcher = DynamicBatcher(self._embed_batch, name="embed", wait_s=0.004,
                                               max_batch=self.embed_batch, coming=lambda: self.decoding,
                                               initializer=partial(limit_threads, self.op_threads),
                                               workers=self.model_threads)
            return self._batcher

    def _embedder_of_this_thread(self) -> ImageEmbedder:
        """The calling model thread's own embedder: the service's for the first thread, a
        replica (its own copy of the model, made when the model loaded) for each other. Two
        forward passes cannot share one model: its layer taps are hooks on its modules."""
        embedder = getattr(self._thread_models, "embedder", None)
        if embedder is None:
            with self._batcher_lock:
                embedder, self._spare_embedder = self._spare_embedder, None
            embedder = self._thread_models.embedder = embedder or self.embedder.replica()
            embedder.extractor  # loaded, with every copy, by now
            gc.freeze()  # the models' million objects: see make_server
        return embedder

    def _embed_batch(self, inputs: list) -> list[dict[str, np.ndarray]]:
        import torch

        out = self._embedder_of_this_thread().embed_batch(torch.stack(inputs))
        return [{layer: vectors[i] for layer, vectors in out.items()} for i in range(len(inputs))]

    def checked_index(self, state: RunState, layer: str, k: int) -> NeighbourIndex:
        """The index of `layer` in `state`, if there is one and k is in range (else 400), and
        it can answer now (else 503, with the reason)."""
        if layer in state.unavailable:
            raise ApiError(503, f"layer '{layer}' cannot be searched now: {state.unavailable[layer]}",
                           {"Retry-After": "5"})
        if layer not in state.indexes:
            raise ApiError(400, f"no index for layer '{layer}'; indexed: {', '.join(state.layers) or 'none'}")
        if not 1 <= k <= self.max_k:
            raise ApiError(400, f"k must be between 1 and {self.max_k}")
        return state.indexes[layer]

    def checked_upload_layer(self, state: RunState, layer: str, k: int) -> NeighbourIndex:
        """`checked_index`, and 503 where the service's model cannot embed for it: run.json
        names another model than at the service's start, or the layer was indexed since."""
        index = self.checked_index(state, layer, k)
        if state.identity != self.embedder_identity or layer not in self.embedded_layers:
            raise ApiError(503, f"the run's model or layers changed since this service started (layer '{layer}'): "
                                "restart `featscope serve` to query it by upload")
        return index

    def answer(self, state: RunState, layer: str, query: int | None, found: tuple[np.ndarray, np.ndarray]) -> dict:
        """The JSON answer for one search's (neighbour ids, distances), with the number of the
        run's live images with features that the layer's index lacks (`unindexed`: added since
        its last update), which no answer can name until the workflow updates it, and the
        index's measured recall@10 (1 for an exact one), with a `warning` when an approximate
        index misses the recall aimed for (its answers miss some nearest neighbours) or holds
        shards extracted again since it was built (their images' vectors may have changed)."""
        ids, distances = found
        kept = ids >= 0
        neighbours = [about | {"distance": float(d)}
                      for about, d in zip(state.catalogue.describe_many(ids[kept]), distances[kept])]
        meta = state.indexes[layer].meta
        answer = {"layer": layer, "query": query, "neighbours": neighbours, "unindexed": state.unindexed.get(layer, 0),
                  "recall_at_10": 1.0 if meta.get("kind") == "flat" else meta.get("recall_at_10")}
        shortfall = recall_shortfall(meta)
        warnings = [state.rewritten.get(layer), shortfall and f"the '{layer}' index's {shortfall}"]
        if any(warnings):
            answer["warning"] = "; ".join(w for w in warnings if w)
        return answer

    def checked_query(self, state: RunState, image_id: int, layer: str, k: int) -> NeighbourIndex:
        """The index to search: 400 for a bad layer or k, 503 for a layer that cannot answer
        now, 404 for an image the run or the layer's index lacks."""
        index = self.checked_index(state, layer, k)
        state.catalogue.describe(image_id)  # 404 for an id the run does not have
        if image_id not in index:
            why = state.failure(self.rd, image_id)
            raise ApiError(404, f"image {image_id} has no {layer} features: {why} (errors.parquet)" if why else
                           f"image {image_id} is in the run but not in the '{layer}' index yet (added since it was "
                           "last updated): the workflow's next run updates it")
        return index

    def neighbours_of_id(self, image_id: int, layer: str, k: int) -> dict:
        """The answer to GET /api/neighbours, searched on this thread (tests, scripts)."""
        state = self.current_state()
        index = self.checked_query(state, image_id, layer, k)
        return self.answer(state, layer, image_id, search_batch([(index, image_id, k)])[0])

    def model_input(self, upload: bytes):
        """Decode an upload (on a decoder thread): 400 empty, 415 not an image, 422 too many pixels."""
        if not upload:
            raise ApiError(400, "empty upload: send the image file as the request body")
        try:
            return self.embedder.model_input(upload, max_pixels=self.max_pixels)
        except FeatscopeError as e:
            message = str(e)
            raise ApiError(422 if "too large" in message else 415, message) from None

    def search_upload(self, upload: bytes, index: NeighbourIndex, layer: str, k: int) -> Future:
        """(vector, (neighbour ids, distances)) of an upload at `layer`, in `index`, as a future:
        decoded on a decoder thread, embedded in the model's next batch and searched in the
        next search batch, each step started by the thread that ends the one before (`_then`).
        The event loop waits for the last step alone: under a storm of GETs every return to it
        waits its turn behind them, and an upload that came back between steps (three times)
        waited three turns. Errors: as `model_input`'s; 422 for a vector that is not finite."""
        answer: Future = Future()
        batcher = self.batcher  # started here, not on a decoder: see `batcher`

        def embed(model_input) -> None:
            _then(batcher.submit(model_input), search, answer)

        def search(vectors: dict[str, np.ndarray]) -> None:
            from featscope.pipelines.core.features import checked_vector  # torch: loaded by the model by now

            try:
                vector = checked_vector(vectors[layer], layer)
            except FeatscopeError as e:
                raise ApiError(422, str(e)) from None
            _then(self.searches.submit((index, vector, k)), lambda found: answer.set_result((vector, found)), answer)

        with self._decoding_lock:
            self.decoding += 1
        decoded = self.decoders.submit(self.model_input, upload)
        _then(decoded, embed, answer)
        decoded.add_done_callback(self._count_decoded)  # after `embed` handed it to the batcher
        return answer

    def _count_decoded(self, _: Future) -> None:
        with self._decoding_lock:
            self.decoding -= 1

    def file(self, url_path: str) -> Path:
        """The file a URL path names, if it may be served: inside the run directory (after '..',
        encoded characters and symlinks: else 403), and one the report shows (else 404 unless
        raw run files are exposed)."""
        relative = unquote(url_path).lstrip("/")
        if "\x00" in relative:
            raise ApiError(403, "outside the run directory")
        candidate = (self.root / relative).resolve()
        if not candidate.is_relative_to(self.root):
            raise ApiError(403, "outside the run directory")
        if not candidate.is_file():
            raise ApiError(404, "not found")
        inside = candidate.relative_to(self.root)
        public = inside.parts[0] in PUBLIC_FOLDERS and candidate.suffix.lower() in PUBLIC_SUFFIXES
        if not (public or self.expose_run_files):
            raise ApiError(404, "not served: raw run files are served only with `featscope serve --expose-run-files`")
        return candidate


def _then(future: Future, step, answer: Future) -> None:
    """Run `step(result)` on the thread that completes `future` (at once if it is done), unless
    `answer` is done already (cancelled: its request went); `future`'s error, or `step`'s, ends
    `answer` instead."""

    def done(finished: Future) -> None:
        if answer.done():
            return
        try:
            step(finished.result())
        except Exception as e:  # handed to whoever waits for the answer
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile
                answer.set_exception(e)

    future.add_done_callback(done)


def op_threads() -> int:
    """Threads for one op of the model or of a search in the service: half the usable cores."""
    return max(1, usable_cpus() // 2)


def limit_threads(count: int) -> None:
    """Run the calling thread's torch and faiss ops on `count` threads (OpenMP's thread count
    is per thread). The service's parallelism is mostly its requests, on its decoder, model
    and search threads; with every one of them running ops on all cores, each starts an
    OpenMP team, there are more threads than cores, and each team either spins for its next
    op, taking the cores the others need, or sleeps and is woken through the kernel on each
    of the model's hundred-odd ops. Decoders get 1, the model and the searches half the
    cores: on 2 cores, 1 (`benchmarks/serve_load.py`: uploads at 1 client 25 -> 43/s, at 16
    clients 76 -> 91/s against every thread on 2; the model alone on 2, 37/s and 50/s)."""
    import faiss
    import torch

    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)


DECODER_NICENESS = 10  # how much lower a decoder thread's scheduling priority is, where it yields


def decoder_setup(yield_to_model: bool) -> None:
    """A decoder thread's setup: torch and faiss ops on itself alone (`limit_threads`) and,
    where `yield_to_model` (one model thread on the CPU), a lower scheduling priority, so that
    thread, the service's bottleneck under load, gets a core whenever it has a batch, and
    decoding takes the time it and the event loop leave (Linux only: a thread's own nice
    value; elsewhere the call could name a process). With two decoders at the same priority
    the model thread ran about two thirds of the time it had work at 16 clients. On the 2-core
    AMX Xeon, 16 clients' uploads: 134-141/s at +10, 129-133 at +5, 119-132 at the same
    priority. The price: one upload among 128 GET clients, whose event loop and searches now
    come first, p50 175-229 ms at +10 against 164-176 (two paired runs of two)."""
    limit_threads(1)
    if yield_to_model and sys.platform.startswith("linux"):
        me = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + DECODER_NICENESS))
        except OSError:  # not allowed here: decoding still works, at the same priority
            pass


def _open_mapped(rd: RunDir, layer: str, live: np.ndarray, identity: RunIdentity) -> NeighbourIndex:
    """The layer's index memory-mapped (its pages shared with the page cache), or read if the
    kind cannot be mapped; an exact one searches each batch of `searches` in one pass."""
    try:
        index = open_index(rd, layer, mmap=True, live=live, identity=identity)
    except RuntimeError:
        index = open_index(rd, layer, live=live, identity=identity)
    index.scan_batches_at_once()
    return index


# ---- HTTP ---------------------------------------------------------------------------------

def create_app(service: QueryService, *, max_in_flight: int = MAX_IN_FLIGHT,
               body_timeout: float = BODY_TIMEOUT) -> FastAPI:
    """The ASGI application over `service`."""
    # FastAPI's /docs loads its script and styles from a CDN: blank on an offline machine.
    # fastapi-offline is FastAPI's own self-hosting recipe with the files in its package. No
    # /redoc: its page still fetches a logo from the web.
    app = FastAPIOffline(title="featscope query service", version="1", static_url="/api-docs-assets", redoc_url=None,
                         description="Neighbours in feature space of a featscope run, by image id or by uploaded "
                                     "image.")
    app.add_middleware(InFlightLimit, limit=max_in_flight)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        status = 400 if first.get("type") == "missing" else 422
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=status)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {str(e)[:200]}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    @app.get("/report", include_in_schema=False)
    @app.get("/report/", include_in_schema=False)
    def home():
        return RedirectResponse("/report/index.html", status_code=302)

    # Lookups run on the event loop; searches on the search batcher's thread (concurrent ones
    # share one pass over an exact index); the model never runs for a GET. Each request answers
    # from one state of the run, as it is on disk when the request arrives. Answers are
    # JSONResponses: returned as they are, not validated against a response model.
    @app.get("/api/image/{image_id}", summary="An image's label, file name and shard")
    async def image(image_id: int = FastPath(ge=0, le=MAX_ID)) -> JSONResponse:
        state = await service.current_state_async()
        return JSONResponse(state.catalogue.describe(image_id))

    @app.get("/api/neighbours", summary="Nearest images to an image of the run")
    @app.get("/api/neighbors", include_in_schema=False)
    async def neighbours(id: int = Query(description="an image id of the run", ge=0, le=MAX_ID),  # noqa: A002
                   layer: str = Query(description="an indexed layer"),
                   k: int = Query(10, description="neighbours returned")) -> JSONResponse:
        state = await service.current_state_async()
        index = service.checked_query(state, id, layer, k)
        found = await asyncio.wrap_future(service.searches.submit((index, id, k)))
        return JSONResponse(service.answer(state, layer, id, found))

    @app.post("/api/neighbours", summary="Nearest images to an uploaded image (the request body)")
    @app.post("/api/neighbors", include_in_schema=False)
    async def neighbours_of_upload(request: Request, layer: str = Query(description="an indexed layer"),
                                   k: int = Query(10, description="neighbours returned")) -> JSONResponse:
        state = await service.current_state_async()
        index = service.checked_upload_layer(state, layer, k)  # before reading the body
        upload = await _read_body(request, service.max_upload, body_timeout)
        vector, found = await asyncio.wrap_future(service.search_upload(upload, index, layer, k))
        now = await service.current_state_async()  # the run may have changed while its body came or it was embedded
        if now is not state:
            if service.checked_upload_layer(now, layer, k) is not index:
                found = await asyncio.wrap_future(service.searches.submit((now.indexes[layer], vector, k)))
            state = now
        return JSONResponse(service.answer(state, layer, None, found))

    @app.get("/api/report", summary="Whether the report describes the run as it is now, and what changed since")
    async def report() -> JSONResponse:
        state = await service.current_state_async()
        behind = derived.report_behind(service.rd)  # asked anew each time: the report may be rebuilt any time
        return JSONResponse({"current": not behind, "live_images": len(state.catalogue),
                             "dataset_changed": derived.dataset_changed(service.rd, behind), "behind": behind,
                             "message": f"this report was {derived.report_staleness(service.rd, behind)}; "
                                        "searches and uploads here answer from the run as it is now. The next "
                                        "workflow run or `featscope report` builds it again" if behind else ""})

    @app.get("/api/explain", summary="Why two images of the run are alike at a layer: a map on each")
    def explain(a: int = Query(description="an image id of the run", ge=0, le=MAX_ID),
                b: int = Query(description="another image id of the run", ge=0, le=MAX_ID),
                layer: str = Query(description="a layer of the model, e.g. pool or block13"),
                similarity: str = Query("cosine", description="cosine | dot")) -> JSONResponse:
        # a plain def: FastAPI runs it on its thread pool, so the model's work never blocks the loop
        return JSONResponse(service.explain(a, b, layer, similarity))

    @app.api_route("/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: link checkers, curl -I
    def file(path: str):
        if path.startswith("api/"):
            raise ApiError(404, f"no such API: /{path}")
        return FileResponse(service.file(path))

    return app


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, counted as it arrives (Content-Length may lie or be absent): 413 past
    `limit`, 408 if it stalls for `timeout` seconds. Either answer, given while the body still
    arrives, closes the connection (`CloseWhileBodyArrives`)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {declared} bytes is over the limit of {limit}")
    # one deadline, moved on with each chunk: `asyncio.wait_for` per chunk would make each
    # chunk a task of its own, and each costs a turn of the event loop, which under load
    # (128 GET clients) is tens of milliseconds
    chunks, size, loop = [], 0, asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout) as deadline:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"upload over the limit of {limit} bytes")
                chunks.append(chunk)
                deadline.reschedule(loop.time() + timeout)
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout:g}s") from None
    return b"".join(chunks)


@dataclass
class Server:
    """A bound, ready server: `serve_forever()` runs it (on this thread), `shutdown()` stops it
    from another; `server_address` is where it listens (port 0 picks a free port)."""

    server: object  # uvicorn.Server
    sock: socket.socket
    service: QueryService
    stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def server_address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def serve_forever(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.stopped.set()

    def shutdown(self) -> None:
        """Stop serving (graceful: requests in flight finish) and wait until it has."""
        self.server.should_exit = True
        self.stopped.wait(timeout=15)

    def server_close(self) -> None:
        self.sock.close()


def make_server(rd: RunDir, *, host: str = "127.0.0.1", port: int = 8000, max_upload: int = 16 * 2**20,
                max_pixels: int = DEFAULT_MAX_PIXELS, expose_run_files: bool = False, verbose: bool = False,
                header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                send_timeout: float = SEND_TIMEOUT, max_in_flight: int = MAX_IN_FLIGHT) -> Server:
    """A bound server over the run (bad hosts and ports in use are one-line errors here)."""
    import uvicorn

    if not (rd.report_dir / "index.html").exists():
        raise FeatscopeError(f"run {rd.root} has no report yet: run `featscope report --run {rd.root}` first")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError, OverflowError):
        raise ParamError("host", f"'{host}' is not an address or a host name of this network") from None
    allow_open_connections()
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ParamError("port", f"{port} is in use on {host}: choose another, or 0 for any free one") from None
        raise ParamError("host", f"cannot listen on {host}:{port}: {e.strerror}") from None
    service = QueryService(rd, max_upload=max_upload, max_pixels=max_pixels, expose_run_files=expose_run_files)
    # Objects that live as long as the server (modules, the catalogue, later the model) leave
    # the collector's generations: a full collection, which request churn triggers every few
    # seconds, then walks only what requests made, instead of pausing every request in flight
    # while it walks torch's million objects.
    gc.collect()
    gc.freeze()
    # outside the application, so that it sees every answer: InFlightLimit's 503s, and the 500
    # of an unexpected error, which Starlette sends from outside every added middleware
    app = CloseWhileBodyArrives(create_app(service, max_in_flight=max_in_flight, body_timeout=body_timeout))
    config = uvicorn.Config(app,
                            http=guarded_protocol(header_timeout, send_timeout),
                            ws="none",  # no WebSocket endpoints: an upgrade request is answered as plain HTTP
                            loop="uvloop",  # libuv's event loop: less CPU per request than asyncio's
                            backlog=2048,
                            timeout_keep_alive=KEEP_ALIVE, timeout_graceful_shutdown=10,
                            log_level="info" if verbose else "warning", access_log=verbose, lifespan="off")
    error_log = logging.getLogger("uvicorn.error")  # configured by the line above
    if not any(isinstance(f, MalformedRequestLog) for f in error_log.filters):
        error_log.addFilter(MalformedRequestLog())
    return Server(uvicorn.Server(config), sock, service)


def run(rd: RunDir, *, host: str = "127.0.0.1", port: int = 8000, max_upload: int = 16 * 2**20,
        max_pixels: int = DEFAULT_MAX_PIXELS, expose_run_files: bool = False) -> None:
    limit_threads(op_threads())  # this thread too, and the default of later ones (explain's)
    server = make_server(rd, host=host, port=port, max_upload=max_upload, max_pixels=max_pixels,
                         expose_run_files=expose_run_files)
    address = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    print(f"serving {rd.root} at {address} (report: {address}report/index.html, API: {address}docs); "
          "Ctrl-C or SIGTERM stops", flush=True)
    for layer, why in server.service.state.unavailable.items():
        print(f"featscope serve: warning: layer '{layer}' answers 503 until its index can answer: {why}",
              file=sys.stderr, flush=True)
    for layer, index in server.service.state.indexes.items():
        if shortfall := recall_shortfall(index.meta):
            print(f"featscope serve: warning: the '{layer}' index's {shortfall}; every answer says so",
                  file=sys.stderr, flush=True)
    for note in server.service.state.rewritten.values():
        print(f"featscope serve: warning: {note}; every answer says so until then", file=sys.stderr, flush=True)
    if behind := derived.report_behind(rd):
        print(f"featscope serve: warning: the report was {derived.report_staleness(rd, behind)}; its pages say so "
              "until the workflow or `featscope report` builds it again", file=sys.stderr, flush=True)
    if "precision" not in server.service.embedder.config:
        print("featscope serve: warning: run.json records no precision (extracted before featscope recorded it): "
              "uploads are embedded in this machine's `auto` one, and their distances may be a few percent off if "
              "the features were made in another", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# ---- the command ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeOptions(Options):
    host: str = option("127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, help="port to listen on", min=0, max=65535)
    max_upload: int = option(16 * 2**20, help="largest upload in bytes", min=1)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="most pixels an upload may declare (checked before decoding)",
                             min=1)
    expose_run_files: bool = option(False, help="also serve raw run files (manifest, run.json, features, indexes, "
                                                "checkpoints); by default only the report and its pictures")


def _serve(rd: RunDir, options: ServeOptions) -> None:
    run(rd, host=options.host, port=options.port, max_upload=options.max_upload, max_pixels=options.max_pixels,
        expose_run_files=options.expose_run_files)


COMMANDS = [
    Command("serve", ServeOptions, _serve, records_timing=False,
            help="serve a run's report and a JSON query API on 127.0.0.1",
            description="GET /api/neighbours?id=N&layer=L&k=K, POST /api/neighbours?layer=L&k=K with an image as the "
                        "body, GET /api/image/N, GET /api/explain?a=N&b=M&layer=L, GET /api/report (whether the "
                        "report is current); the API is described at /docs. Serves the report and the pictures "
                        "its pages show; raw run files only with --expose-run-files. Uploads are embedded in "
                        "dynamic batches. Leave it running across reruns: it answers from the run as it is on disk "
                        "(a layer whose index still holds images the rerun retired answers 503 until updated)."),
]
