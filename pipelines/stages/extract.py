"""Stage `extract`: one pass over a shard's images -> features/<layer>/part-NNNNN.parquet.

Fully-connected (vector) layers are stored whole; conv layers as per-channel spatial mean,
max and argmax cell (see `kernels.summary`). Decoding runs on threads (see `dataset`), the
model runs with its batch norms folded into the convs, channels_last, under bf16/fp16
autocast where the hardware has it, and Parquet writes happen on a background thread. A
shard is finished when all its layer parts exist; parts are renamed into place only at the
end, so a rerun resumes at the first unfinished shard.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import PIXELS
from featscope.kernels.params import ParamError
from featscope.kernels.quantile_sketch import ActivationSketch
from featscope.kernels.topk import RunningTopK
from featscope.pipelines.core import manifest
from featscope.pipelines.core.cpus import usable_cpus
from featscope.pipelines.core.dataset import default_workers, image_batches
from featscope.pipelines.core.device import (
    DEVICES,
    PRECISION_CHOICES,
    resolve_device,
    resolve_precision,
    slow_on_this_cpu,
)
from featscope.pipelines.core.features import FeatureExtractor, storable_rows
from featscope.pipelines.core.models import LoadedModel, checked_class_names, load_model
from featscope.pipelines.core.options import Command, Options, option, seed_option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.runtime import keep_freed_memory
from featscope.pipelines.core.store import (
    FLOAT16_MAX,
    NON_FINITE,
    OUT_OF_RANGE,
    TOPK_DEPTH,
    TOPK_MAX,
    FeaturePartWriter,
    RunIdentity,
    file_metadata,
    part_is_complete,
    topk_is_complete,
    write_errors,
    write_predictions,
    write_sketch,
    write_topk,
)
from featscope.pipelines.core.text import plural, rate


@dataclass
class ExtractSummary:
    layers: list[str]
    device: str
    precision: str
    done: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    made_for_other_images: list[int] = field(default_factory=list)  # shards whose old files were deleted
    images: int = 0
    bad: int = 0  # images skipped, of which
    unreadable: int = 0  # could not be read (the next manifest update tries them again)
    non_finite: int = 0  # the model computed NaN or inf for them
    out_of_range: int = 0  # it computed values past float16's range, the store's; the others do not decode
    seconds: float = 0.0

    errors_dir: Path | None = None

    def warning(self) -> str:
        said = [f"{plural(self.bad, 'image')} skipped; see {self.errors_dir}" if self.bad else ""]
        if slow := slow_on_this_cpu(self.precision, torch.device(self.device)):
            said.append(f"{slow}: several times slower than fp32 or bf16 here (MobileNet-V2 on a 2-core AMD EPYC: "
                        "7 img/s against 45 and 61); a run keeps its precision, so for speed use another run directory")
        return "; ".join(s for s in said if s)

    def line(self, rd: RunDir | None = None) -> str:
        rd = rd or RunDir(self.errors_dir.parent)
        text = (f"extract: {plural(self.images, 'image')} from {plural(len(self.done), 'shard')} -> "
                f"{', '.join(self.layers)} in {self.seconds:.1f}s ({rate(self.images, self.seconds)}, {self.device} "
                f"{self.precision})")
        if self.already_done:
            text += f"; {plural(len(self.already_done), 'shard')} already done"
        if self.made_for_other_images:
            text += (f"; shards {', '.join(map(str, self.made_for_other_images))} extracted again: their files were "
                     "made for other images than the manifest now gives them")
        if self.bad:
            undecodable = self.bad - self.unreadable - self.non_finite - self.out_of_range
            why = [f"{undecodable} not decodable" if undecodable else "",
                   f"{self.unreadable} not readable now, tried again by the next manifest update"
                   if self.unreadable else "",
                   f"{self.non_finite} with features that are not finite numbers (NaN or inf)"
                   + (": fp16 overflows past 65,504, a run in bf16 or fp32 does not" if self.precision == "fp16" else "")
                   if self.non_finite else "",
                   f"{self.out_of_range} with features past {FLOAT16_MAX:,.0f}, which the store's float16 cannot "
                   "hold (a model's unnormalised activations)" if self.out_of_range else ""]
            text += f"; {plural(self.bad, 'image')} skipped ({', '.join(w for w in why if w)}; see {rd.errors_dir})"
        return text


def _identity(loaded: LoadedModel) -> RunIdentity:
    return RunIdentity(model=loaded.arch, weights_sha256=loaded.weights_sha256,
                       preprocessing=loaded.preprocessing.to_json())


def _model_for_run(rd: RunDir, model: str | None, weights: str | None, seed: int) -> LoadedModel:
    """Load the run's model; the first extraction records it in run.json, later ones must match."""
    config = rd.read_config()
    for key, given in (("model", model), ("weights", weights)):
        recorded = config.get(key)
        if given is not None and recorded is not None and given != recorded:
            raise FeatscopeError(f"run {rd.root} uses {key} '{recorded}', not '{given}'; use another run directory")
    arch, source = model or config.get("model"), weights or config.get("weights") or "imagenet"
    if arch is None:
        raise ParamError("model", f"is needed: run {rd.root} records no model")
    loaded = load_model(arch, source, seed=seed)
    loaded.class_names = checked_class_names(loaded, config.get("class_names"))
    identity = {"model": arch, "weights": source, "weights_sha256": loaded.weights_sha256,
                "preprocessing": json.loads(loaded.preprocessing.to_json()), "seed": seed,
                "categories": loaded.categories}  # the names of the model's classes, for the report
    with rd.editing_config() as config:  # read again: another job may have recorded meanwhile
        recorded_sha = config.get("weights_sha256")
        if recorded_sha not in (None, loaded.weights_sha256):
            raise FeatscopeError(f"the weights '{source}' changed since run {rd.root} began "
                                 f"(sha256 {recorded_sha[:12]}… -> {loaded.weights_sha256[:12]}…)")
        config.update(identity)
    return loaded


def _precision_for_run(rd: RunDir, precision: str, device: torch.device) -> str:
    """The one precision of the run's features. bf16 and fp32 features of one image differ by
    about 5% (MobileNet-V2's pool, the demo's photos), so a run mixing them would rank
    neighbours by which machine extracted which shard. The first extraction records the
    precision it used (`auto`: this hardware's); later ones, and the query service's and
    `query --image`'s embeddings, use it; asking for another is a one-line error."""
    with rd.editing_config() as config:  # one job records it; jobs beside it read that record
        recorded = config.get("precision")
        if precision == "auto" and recorded:
            return recorded
        chosen = resolve_precision(precision, device)
        if recorded and chosen != recorded:
            raise ParamError("precision", f"<precision> {chosen}: run {rd.root} holds {recorded} features, and "
                                          f"{chosen} ones would differ from them by a few percent; give {recorded} "
                                          "(or auto), or use another run directory")
        config["precision"] = chosen
        return chosen


def _drop_files_made_for_other_images(rd: RunDir, digests: dict[int, str]) -> list[int]:
    """Delete every file of the shards whose feature parts record other images than the
    manifest now gives them (`manifest.shard_digests`: ids handed out anew), so they are
    extracted again; parts from before digests were recorded say nothing. The shards."""
    layers = sorted(p.name for p in (rd.root / "features").glob("*") if p.is_dir())
    dropped = []
    for shard, digest in digests.items():
        parts = [rd.feature_part(layer, shard) for layer in layers]
        if any(manifest.made_for_other_images(file_metadata(p).get("images"), digest) for p in parts if p.exists()):
            for path in rd.shard_files(shard):
                path.unlink(missing_ok=True)
            dropped.append(shard)
    return dropped


def extract(rd: RunDir, layers: list[str], *, model: str | None = None, weights: str | None = None,
        shard: int | None = None, device: str = "auto", precision: str = "auto", batch_size: int = 64,
        workers: int | None = None, threads: int | None = None, seed: int = 0, topk: int = 0,
        progress: bool = True) -> ExtractSummary:
    """Extract `layers` for one shard (or every unfinished shard) of the run.

    topk > 0 also collects, in the same pass, each unit's top-k images of the shard
    (topk/candidates/), which `featscope topk merge` turns into the dataset's top-k.
    """
    start = time.perf_counter()
    if not layers:
        raise ParamError("layers", "are needed, e.g. fc7,conv5")
    if batch_size < 1:
        raise ParamError("batch_size", "must be at least 1")
    keep_freed_memory()
    torch.set_num_threads(threads or usable_cpus())  # torch's own default counts every core of the node
    torch_device = resolve_device(device)
    loaded = _model_for_run(rd, model, weights, seed)
    chosen_precision = _precision_for_run(rd, precision, torch_device)
    identity = _identity(loaded)
    all_shards = manifest.shards(rd)
    if shard is not None and shard not in all_shards:
        raise FeatscopeError(f"shard {shard} is not in the manifest of {rd.root} (shards: 0-{max(all_shards, default=0)})")
    wanted = [shard] if shard is not None else all_shards
    summary = ExtractSummary(layers, torch_device.type, chosen_precision, errors_dir=rd.errors_dir)
    if topk < 0:
        raise ParamError("topk", "must be 0 (off) or more")
    digests = manifest.shard_digests(rd, wanted)
    summary.made_for_other_images = _drop_files_made_for_other_images(rd, digests)

    def complete(layer: str, s: int) -> bool:
        if not part_is_complete(rd.feature_part(layer, s), identity):
            return False
        return not topk or layer == PIXELS or (topk_is_complete(rd.topk_candidates_part(layer, s), identity, topk)
                                               and rd.topk_sketch_part(layer, s).exists())

    missing = {s: [layer for layer in layers if not complete(layer, s)] for s in wanted}
    summary.already_done = [s for s in wanted if not missing[s]]
    pending = [s for s in wanted if missing[s]]
    if pending:
        extractor = FeatureExtractor(loaded, layers, torch_device, chosen_precision)
        total = sum(len(manifest.read(rd, s)) for s in pending)
        with tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1) as bar:
            for s in pending:
                n, errors = _extract_shard(
                    rd, s, missing[s], extractor, identity, batch_size=batch_size, topk=topk,
                    workers=default_workers() if workers is None else workers, bar=bar, images=digests[s])
                summary.done.append(s)
                summary.images += n
                summary.bad += errors.total()
                summary.unreadable += errors["unreadable"]
                summary.non_finite += errors[NON_FINITE]
                summary.out_of_range += errors[OUT_OF_RANGE]
    summary.seconds = time.perf_counter() - start
    return summary


def _extract_shard(rd: RunDir, shard: int, layers: list[str], extractor: FeatureExtractor, identity: RunIdentity,
                   *, batch_size: int, workers: int, topk: int, bar: tqdm, images: str) -> tuple[int, Counter]:
    """Extract the shard's missing `layers` (finished parts of other layers are left alone);
    `images`: the shard's digest (manifest.shard_digests), recorded in each part. An image
    whose values at any layer cannot be stored (NaN, an overflow's inf, or past float16's
    range) is an error row, in no layer's part, top-k or predictions.
    -> (images written, error kind -> images)."""
    trackers = {layer: RunningTopK(extractor.dims[layer], topk * TOPK_DEPTH, extractor.device)
                for layer in layers if topk and layer != PIXELS}
    sketches = {layer: ActivationSketch(extractor.dims[layer], device=extractor.device) for layer in trackers}
    counted: dict[str, list[np.ndarray]] = {layer: [] for layer in sketches}  # the images each sketch counts
    rows = manifest.read(rd, shard)
    ids, paths = rows["image_id"].to_pylist(), rows["path"].to_pylist()
    path_of = dict(zip(ids, paths))
    writers = {
        layer: FeaturePartWriter(rd.feature_part(layer, shard), identity, layer=layer, kind=extractor.kinds[layer],
                                 dims=extractor.dims[layer], extra={"shard": shard, "images": images,
                                                                    "precision": extractor.precision,
                                                                    "device": extractor.device.type})
        for layer in layers
    }
    errors: list[dict] = []
    predicted: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (ids, classes, probabilities) per batch
    pending_writes: list[Future] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet") as io:
            batches = image_batches(ids, paths, extractor.loaded.preprocessing, batch_size=batch_size,
                                    workers=workers, pin_memory=extractor.device.type == "cuda",
                                    overlap=extractor.device.type != "cpu")
            for batch in batches:
                errors += [{"image_id": i, "path": p, "stage": "extract", "error": kind, "message": m}
                           for i, p, kind, m in batch.errors]
                if len(batch.image_ids):
                    outputs, predictions = extractor.forward_with_predictions(batch.pixels, sketches=sketches)
                    storable = {layer: storable_rows(cols) for layer, cols in outputs.items()}
                    for layer in sketches:  # a sketch counts a layer's storable rows (see forward_with_predictions)
                        counted[layer].append(batch.image_ids.numpy()[storable[layer].cpu().numpy()])
                    outputs, predictions, image_ids, broken = _without_unstorable(
                        outputs, predictions, batch.image_ids, storable, extractor.precision, path_of)
                    errors += broken
                    for layer, tracker in trackers.items():
                        cols = outputs[layer]
                        tracker.update(cols.get("max", cols["feature"]), image_ids, cols.get("argmax_y"),
                                       cols.get("argmax_x"))
                    batch_ids = image_ids.numpy()
                    if predictions is not None:  # an output past the taps may overflow alone: no prediction then
                        classes, probabilities = (t.cpu().numpy() for t in predictions)
                        told = np.isfinite(probabilities).all(1)
                        predicted.append((batch_ids[told], classes[told], probabilities[told]))
                    for layer, writer in writers.items():
                        cols = {k: v.cpu().numpy() for k, v in outputs[layer].items()}
                        pending_writes.append(io.submit(writer.write, batch_ids, cols["feature"], cols))
                bar.update(len(batch.image_ids) + len(batch.errors))
                bar.set_postfix(bad=len(errors), refresh=False)
            for f in pending_writes:
                f.result()
        error_part = rd.error_part("extract", shard)
        if errors:
            write_errors(error_part, errors)
        else:
            error_part.unlink(missing_ok=True)
        for layer, tracker in trackers.items():
            write_sketch(rd.topk_sketch_part(layer, shard), sketches[layer], identity,
                         image_ids=np.concatenate(counted[layer]) if counted[layer] else np.zeros(0, np.int64),
                         cells=extractor.cells[layer], layer=layer, shard=shard)
            columns = {name: t.numpy() for name, t in tracker.result().items()}
            write_topk(rd.topk_candidates_part(layer, shard), columns, identity, layer=layer, k=topk,
                       depth=topk * TOPK_DEPTH, shard=shard)
        if predicted:
            write_predictions(rd.prediction_part(shard), *(np.concatenate(c) for c in zip(*predicted)), identity,
                              shard=shard)
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return len(ids) - len(errors), Counter(e["error"] for e in errors)


def _without_unstorable(outputs: dict[str, dict[str, torch.Tensor]], predictions: tuple | None,
                        image_ids: torch.Tensor, storable: dict[str, torch.Tensor], precision: str,
                        path_of: dict[int, str]) -> tuple:
    """A batch's outputs, predictions and ids without the images whose values at some layer
    cannot be stored (`storable`: layer -> `storable_rows`), and an error row for each of
    those: a NaN would be ranked anywhere by an index, an inf is an overflow, not the image's
    value, and a value past float16's range would be stored as 65,504, not as computed."""
    keep = torch.stack(list(storable.values())).all(0)
    if bool(keep.all()):
        return outputs, predictions, image_ids, []
    errors = []
    for i in torch.nonzero(~keep).flatten().tolist():
        image_id = int(image_ids[i])
        layer = next(name for name, rows in storable.items() if not rows[i])
        values = [v[i] for name, v in outputs[layer].items() if name in ("feature", "max")]
        if all(bool(torch.isfinite(v).all()) for v in values):
            largest = max(float(v.abs().max()) for v in values)
            kind, message = OUT_OF_RANGE, (f"its {layer} features reach {largest:,.0f}, past the {FLOAT16_MAX:,.0f} "
                                           "that the store's float16 can hold")
        else:
            kind, message = NON_FINITE, f"the model computed NaN or inf in its {layer} features ({precision})"
        errors.append({"image_id": image_id, "path": path_of[image_id], "stage": "extract", "error": kind,
                       "message": message})
    outputs = {layer: {name: values[keep] for name, values in cols.items()} for layer, cols in outputs.items()}
    if predictions is not None:
        predictions = tuple(t[keep] for t in predictions)
    return outputs, predictions, image_ids[keep.cpu()], errors


# ---- the command ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ExtractOptions(Options):
    layers: list[str] = option(help="comma-separated aliases or module paths, e.g. fc7,conv5 (`pixels`: the "
                                    "input at 32x32x3)", required=True)
    model: str | None = option(help="torchvision architecture (default: the run's)")
    weights: str | None = option(help="imagenet | random | checkpoint path (default: the run's, else imagenet)")
    shard: int | None = option(help="only this shard (default: every unfinished shard)", min=0)
    device: str = option("auto", help="where the model runs", choices=DEVICES, tuning=True)
    precision: str = option("auto", help="auto: the run's (recorded by its first extraction), else bf16 on CPUs "
                                         "with AVX512-BF16/AMX and on GPUs that support it", choices=PRECISION_CHOICES)
    batch_size: int = option(64, help="images per forward pass", min=1, max=4096, tuning=True)
    workers: int | None = option(help="image decoding threads (default: min(16, cores); 0 = inline)", min=0,
                                 tuning=True)
    threads: int | None = option(help="torch CPU threads (default: the CPUs this job may use: affinity, cgroup "
                                      "quota, OMP_NUM_THREADS)", min=1, tuning=True)
    seed: int = seed_option(0, help="seed for --weights random")
    topk: int = option(0, help="also keep each unit's top-K images of every shard, in the same pass (0: off)",
                       min=0, max=TOPK_MAX)


def run(rd: RunDir, options: ExtractOptions, progress: bool = True) -> ExtractSummary:
    return extract(rd, options.layers, model=options.model, weights=options.weights, shard=options.shard,
                   device=options.device, precision=options.precision, batch_size=options.batch_size,
                   workers=options.workers, threads=options.threads, seed=options.seed, topk=options.topk,
                   progress=progress)


COMMANDS = [
    Command("extract", ExtractOptions, run, help="extract layer features of a run's images into Parquet",
            description="One pass over the images of a shard (or all unfinished shards). Finished shards are "
                        "skipped; bad images go to errors.parquet."),
]
