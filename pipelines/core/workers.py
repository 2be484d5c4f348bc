"""What the per-image stages (saliency maps, their evaluation) share: which images a user
selected, the model reference a Dask task carries, the model loaded once per worker process,
the model's view of an image, and the Dask client to a local cluster, a running scheduler or
SLURM jobs."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
from torchvision.transforms import functional as TF

from featscope.kernels.cpu_gradients import for_cpu_gradients
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.transforms import PixelModel
from featscope.pipelines.core import manifest
from featscope.pipelines.core.cpus import split
from featscope.pipelines.core.device import inference_model, resolve_device
from featscope.pipelines.core.models import LoadedModel, Preprocessing, load_model
from featscope.pipelines.core.onnx_forward import fast_forward
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.runtime import keep_freed_memory

T = TypeVar("T")


def select(rd: RunDir, selection: str = "all") -> list[dict]:
    """Manifest rows (image_id, path, label) chosen by `all`, `label=NAME` or `ids=1,2,3`."""
    return manifest.choose(manifest.read(rd).select(["image_id", "path", "label"]).to_pylist(), selection)


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to load the run's model itself (small, sent with every task)."""

    arch: str
    weights: str
    seed: int
    weights_sha256: str | None
    device: str = "auto"
    threads: int | None = None
    class_names: tuple[str, ...] | None = None  # the run's own names of its classes


_MODEL_IN_USE = threading.Lock()


def one_task_at_a_time(task: Callable[..., T]) -> Callable[..., T]:
    """A Dask task that uses the worker's model only when no other task of the process does.
    A worker may run tasks at once on several threads (a SLURM job's worker has one per
    core, and so may an external cluster's), and they share the process's cached model:
    hooks one task puts on it (guided rectifiers, layer taps) would act on the others' passes
    (a gradient map beside a guided one came out guided, silently), and a model copy's
    batch-norm fold, traced with torch.fx, breaks any pass running meanwhile."""

    @functools.wraps(task)
    def in_turn(*args, **kwargs) -> T:
        with _MODEL_IN_USE:
            return task(*args, **kwargs)

    return in_turn


@functools.lru_cache(maxsize=2)
def worker_model(ref: ModelRef) -> tuple[LoadedModel, torch.device, list[str] | None]:
    """The model, loaded once per worker process and kept for every later task."""
    keep_freed_memory()
    if ref.threads:
        torch.set_num_threads(ref.threads)
    loaded = load_model(ref.arch, ref.weights, seed=ref.seed)
    if ref.weights_sha256 not in (None, loaded.weights_sha256):
        raise FeatscopeError(f"the weights '{ref.weights}' are not the ones this run was extracted with")
    device = resolve_device(ref.device)
    loaded.module.to(device).to(memory_format=torch.channels_last)
    return loaded, device, list(ref.class_names) if ref.class_names else loaded.categories


@functools.lru_cache(maxsize=2)
def forward_model(ref: ModelRef) -> torch.nn.Module:
    """The worker's model with its batch norms folded, for work that only runs it forward
    (occlusion, deletion and insertion curves): 1.3x faster on MobileNet-V2 (see
    `kernels.batchnorm_folding`). Gradient methods keep the model as it is: a fold rounds
    differently, which moves a few max-pool gradients."""
    loaded, _, _ = worker_model(ref)
    return inference_model(loaded, []).to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=4)
def curves_model(ref: ModelRef, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`forward_model` as the deletion and insertion curves run it: in float32 on a CPU in ONNX
    Runtime (`onnx_forward`: 1.6-2.0x the images a second of PyTorch's pass on MobileNet-V2),
    else (an autocast `dtype`, a GPU) the PyTorch model."""
    loaded, device, _ = worker_model(ref)
    side = loaded.preprocessing.crop
    return fast_forward(forward_model(ref), torch.zeros(1, 3, side, side, device=device), dtype)


def visualisation_model(loaded: LoadedModel, specs: list, device: torch.device | str = "cpu") -> PixelModel:
    """The model as images are optimised through it (feature visualisations, atlas cells):
    [0, 1] pixels in, batch norms folded into their convs except where that would change a
    tapped layer, channels-last weights, no parameter asking for a gradient (a copy: the
    shared model is left alone), on a CPU `for_cpu_gradients`'s activations and convs, each
    conv's clamp fused in where no tapped layer reads between.
    1.7x faster per step than the model as loaded on MobileNet-V2 up to block13 on a CPU
    (benchmarks/units_bench.py); the same function of the image. Every step allocates the
    same large activations again, so glibc is told to keep freed blocks (`keep_freed_memory`,
    as a worker's model does): otherwise each comes back as fresh pages, faulted in anew
    (bf16, one thread, batches of 4: 16-17 ms an image-step against 19-20)."""
    keep_freed_memory()
    net = inference_model(loaded, specs).to(device).to(memory_format=torch.channels_last)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    if torch.device(device).type == "cpu":
        for_cpu_gradients(net, keep=[spec.module_path for spec in specs if spec.kind != "pixels"])
    return PixelModel(net, loaded.preprocessing.mean, loaded.preprocessing.std).to(device)


def visualisation_layer(loaded: LoadedModel, spec, device: torch.device | str = "cpu"
                        ) -> tuple[PixelModel, torch.nn.Module]:
    """A fresh `visualisation_model` for `spec` and the module of it that the layer taps."""
    model = visualisation_model(loaded, [spec], device)
    return model, model.model.get_submodule(spec.module_path)


def model_ref(rd: RunDir, device: str = "auto", threads: int | None = None) -> ModelRef:
    """The run's model as its run.json records it; a one-line error if it records none."""
    config = rd.read_config()
    if not config.get("model"):
        raise FeatscopeError(f"run {rd.root} records no model: run `featscope manifest --model ...` first")
    return ModelRef(config["model"], config.get("weights") or "imagenet", int(config.get("seed", 0)),
                    config.get("weights_sha256"), device, threads,
                    tuple(config["class_names"]) if config.get("class_names") else None)



def model_view(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(3,H,W) uint8 -> the whole image resized so its shorter side is the model's crop size,
    not centre-cropped, so a map covers every pixel (the longer side at most twice that)."""
    return TF.resize(pixels, [prep.crop], antialias=True, max_size=2 * prep.crop)


@dataclass(frozen=True)
class SlurmWorkers:
    """Dask workers as SLURM jobs (dask-jobqueue's SLURMCluster). Without GPUs, a job runs a
    single-threaded worker process per core, each with its own model, as local workers do
    (tasks of one process take turns with its model: `one_task_at_a_time`); with GPUs, one
    worker process per job, its tasks taking turns on the GPU."""

    jobs: int = 2
    cores: int = 4
    memory: str = "16GB"
    walltime: str = "02:00:00"
    gpus: int = 0
    queue: str | None = None
    account: str | None = None

    @property
    def processes(self) -> int:
        """Worker processes per job."""
        return 1 if self.gpus else self.cores

    def cluster(self):
        from dask_jobqueue import SLURMCluster

        extra = [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        return SLURMCluster(cores=self.cores, processes=self.processes, memory=self.memory, walltime=self.walltime,
                            queue=self.queue, account=self.account, job_extra_directives=extra,
                            scheduler_options={"dashboard_address": None}, silence_logs="error")


@contextmanager
def dask_client(workers: int | None, scheduler: str | None, threads: int | None,
                slurm: SlurmWorkers | None = None) -> Iterator[tuple[object, int]]:
    """A Dask client: to the cluster at `scheduler`, to workers submitted as SLURM jobs, or
    to a local cluster of worker processes."""
    from distributed import Client, LocalCluster

    if slurm is not None:
        with slurm.cluster() as cluster, Client(cluster) as client:
            cluster.scale(jobs=slurm.jobs)
            client.wait_for_workers(1, timeout=3600)
            yield client, slurm.jobs * slurm.processes
        return
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise FeatscopeError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
        with client:
            yield client, len(client.scheduler_info()["workers"])
        return
    workers = workers or split(None, threads)[0]
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client, workers

