"""Can a run's saliency maps be trusted? Two checks, stored beside the maps.

`saliency evaluate` (faithfulness): for every image with maps, the deletion and insertion
curves of each map for its target class (`kernels.faithfulness`), with the same curves of two
baseline maps on the same image and class: a seeded random map and a centred Gaussian. AUCs go
to saliency/faithfulness.parquet/<method>.parquet (one row per image), the curves to
saliency/<method>/<id>.curves.npz. Each row records the options and the map file it measured
(size and modification time): a recomputed map makes its row stale, and a stale row is
recomputed or dropped, never shown. Runs on the saliency stage's Dask cluster.

`saliency sanity` (model randomisation, Adebayo et al. 2018): for a sample of images, each
method's map recomputed after each step of a cascading re-initialisation of the model from
the top, compared with the original map (Spearman of |map|, SSIM). A plot per method and a
one-line verdict: a map that barely changes when the weights it should explain are destroyed
shows the image, not the model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from tqdm import tqdm

from featscope.kernels import baselines
from featscope.kernels.architectures import profile_of_model
from featscope.kernels.errors import FeatscopeError
from featscope.kernels.faithfulness import area_under_curve, centre_map, perturbation_curves, random_map
from featscope.kernels.map_similarity import spearman_abs, ssim, unit_range
from featscope.kernels.randomisation import GRANULARITIES, cascading_randomisation, layer_groups, merge_groups
from featscope.kernels.saliency import METHODS, attribute
from featscope.kernels.scoring import SCORES
from featscope.pipelines.core import derived, manifest
from featscope.pipelines.core.atomic import atomic_path, one_writer, withdraw, write_json_atomic
from featscope.pipelines.core.cpus import split
from featscope.pipelines.core.device import DEVICES, PRECISION_CHOICES, autocast_dtype
from featscope.pipelines.core.images import BadImage, read_pixels
from featscope.pipelines.core.options import Command, Group, Options, option, seed_option
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.store import NON_FINITE, write_errors, write_table
from featscope.pipelines.core.text import plural, rate
from featscope.pipelines.core.trust import BASELINES, CURVES, EVALUATION_SCHEMA, map_stamp, read_evaluation
from featscope.pipelines.core.workers import (
    ModelRef,
    curves_model,
    dask_client,
    model_ref,
    model_view,
    one_task_at_a_time,
    select,
    worker_model,
)


def _methods_option(help_text: str):
    return option([], help=help_text, choices=tuple(METHODS))


@dataclass(frozen=True)
class EvaluateOptions(Options):
    methods: list[str] = _methods_option("methods whose maps are evaluated (default: every method with maps)")
    select: str = option("all", help="which images: all | label=NAME | ids=1,2,3",
                         pattern=r"^(all|label=.+|ids=[0-9, ]+)$")
    steps: int = option(20, help="perturbation steps: each removes or reveals 1/steps of the pixels", min=2,
                        max=200)
    replacement: str = option("blur", help="what a deleted pixel shows: " + baselines.HELP,
                              pattern=r"^(zeros|mean|blur|-?[0-9.]+)$")
    score: str = option("probability", help="the class score followed (RISE uses the probability)", choices=SCORES)
    seed: int = seed_option(0, help="seed of the random baseline maps (one per image)")
    batch: int | None = option(help="perturbed images per forward pass (default: 2 on a CPU, where a larger "
                                    "batch's activations leave the cache; 128 on a GPU)", min=1, max=1024,
                                tuning=True)
    precision: str = option("fp32", help="forward passes: fp32 (default; on a CPU run by ONNX Runtime, outputs equal "
                                         "to PyTorch's to 1e-5; bf16 moved MobileNet-V2's deletion curves by up to "
                                         "0.05 on the demo photos), or auto | bf16 | fp16 (PyTorch autocast)",
                            choices=PRECISION_CHOICES)
    workers: int | None = option(help="local Dask worker processes (default: one per usable CPU)", min=1,
                                 tuning=True)
    scheduler: str | None = option(help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786", tuning=True)
    images_per_task: int = option(2, help="images per Dask task", min=1, tuning=True)
    device: str = option("auto", help="where the workers run the model", choices=DEVICES, tuning=True)
    threads: int | None = option(help="torch threads per worker (default: the usable CPUs / workers)", min=1,
                                 tuning=True)


def evaluation_options(options: EvaluateOptions) -> str:
    """What one stored evaluation depends on, as JSON (each row records it)."""
    keys = ("steps", "replacement", "score", "seed", "precision")
    return json.dumps({k: getattr(options, k) for k in keys}, sort_keys=True)


def baseline_seed(seed: int, image_id: int) -> int:
    """A random baseline map per image that stays the same across runs and workers."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---- the worker side ---------------------------------------------------------------------

@one_task_at_a_time
def evaluate_batch(root: str, options: EvaluateOptions, ref: ModelRef, rows: list[dict]) -> dict:
    """One Dask task: the curves of every (image, method) in `rows`; each row is an image with
    the methods (and their map stamps) to evaluate. All maps of an image and its baselines go
    through the model together, so each forward batch is full."""
    rd = RunDir(root)
    loaded, device, _ = worker_model(ref)
    dtype = autocast_dtype(options.precision, device)
    model, prep = curves_model(ref, dtype), loaded.preprocessing  # forward passes only: batch norms folded
    wanted = evaluation_options(options)
    results, errors = [], []
    for row in rows:
        image_id = row["image_id"]
        try:
            pixels = read_pixels(row["path"])
        except BadImage as e:
            errors.append({"image_id": image_id, "path": row["path"], "stage": "saliency-evaluate",
                           "error": "bad_image", "message": str(e)})
            continue
        view = model_view(pixels, prep)
        x = prep.normalize(view[None].to(device))
        maps, targets = [], []
        for method, _ in row["methods"]:
            with np.load(rd.saliency_map(method, image_id)) as stored:
                heat = torch.from_numpy(stored["saliency"].astype(np.float32))
                targets.append(int(stored["target"]))
            maps.append(F.interpolate(heat[None, None], size=view.shape[1:], mode="bilinear",
                                      align_corners=False)[0, 0])
        classes = sorted(set(targets))
        chance = random_map(tuple(view.shape[1:]), baseline_seed(options.seed, image_id))
        centre = centre_map(tuple(view.shape[1:]))
        stacked = torch.stack(maps + [m for _ in classes for m in (chance, centre)]).to(device)
        target = torch.tensor(targets + [c for c in classes for _ in BASELINES], device=device)
        images = x.expand(len(stacked), -1, -1, -1)
        curves = {mode: perturbation_curves(model, images, stacked, target, mode=mode, steps=options.steps,
                                            replacement=_replacement(options.replacement), score=options.score,
                                            batch=options.batch or forward_batch(device), dtype=dtype)
              for mode in CURVES}
        areas = {mode: area_under_curve(c) for mode, c in curves.items()}
        for i, (method, stamp) in enumerate(row["methods"]):
            b = len(maps) + 2 * classes.index(targets[i])  # this target's random map; its centre map follows
            picked = {"": i, "random_": b, "centre_": b + 1}
            if not all(bool(torch.isfinite(curves[mode][j]).all()) for j in picked.values() for mode in CURVES):
                errors.append({"image_id": image_id, "path": row["path"], "stage": "saliency-evaluate",
                               "error": NON_FINITE, "message": f"the model's scores along its {method} curves are "
                                                               "NaN or inf"})  # an overflow: no area to compare
                continue
            facts = {f"{p}{mode}_auc": float(areas[mode][j]) for p, j in picked.items() for mode in CURVES}
            with atomic_path(rd.saliency_curves(method, image_id)) as tmp, open(tmp, "wb") as f:
                np.savez(f, fractions=np.linspace(0, 1, options.steps + 1, dtype=np.float32), target=targets[i],
                         map_stamp=stamp, options=wanted,
                         **{f"{p}{mode}": curves[mode][j].numpy() for p, j in picked.items() for mode in CURVES})
            results.append({"image_id": image_id, "method": method, "target": targets[i], **facts,
                            "map_stamp": stamp, "options": wanted})
    return {"rows": results, "errors": errors}


def forward_batch(device: torch.device) -> int:
    """Perturbed images per forward pass when not given. On a CPU an image costs more in a
    larger batch once its activations leave the cache: a 4:3 photo (224x298) through
    MobileNet-V2 in PyTorch with 11 maps and 20 steps took 12.1-12.4 s at batch 4 and
    16.9-17.0 at 16 on one thread of a 2-core AVX2 machine (the stage's worker). In ONNX
    Runtime (the float32 default on a CPU) 2 is best: 8.2-8.7 photos/s at 224x300 on two
    lanes against 7.4-7.9 at 4 (benchmarks/saliency_bench.py, AVX-512). 128 on a GPU."""
    return 128 if device.type == "cuda" else 2


def _replacement(text: str) -> str | float:
    return text if text in baselines.KINDS else float(text)


# ---- the client side ---------------------------------------------------------------------

@dataclass
class EvaluateSummary:
    pairs: int
    skipped: int
    bad: int
    workers: int
    seconds: float
    means: dict[str, dict[str, float]]  # method -> column -> mean over its images

    @property
    def failed(self) -> bool:
        return self.bad > 0 and self.pairs == 0

    def line(self) -> str:
        head = (f"saliency evaluate: {plural(self.pairs, 'map')} in {self.seconds:.1f}s "
                f"({rate(self.pairs, self.seconds, 'maps')}, "
                f"{f'{self.workers} workers' if self.workers else 'in this process'}); {self.skipped} already done"
                + (f"; {plural(self.bad, 'image')} failed (see errors.parquet)" if self.bad else ""))
        lines = [head, f"  {'method':<22}{'deletion':>10}{'insertion':>10}   (AUC, mean; random | centre maps)"]
        for method, m in self.means.items():
            lines.append(f"  {method:<22}{m['deletion_auc']:>10.3f}{m['insertion_auc']:>10.3f}   "
                         f"{m['random_deletion_auc']:.3f}/{m['random_insertion_auc']:.3f} | "
                         f"{m['centre_deletion_auc']:.3f}/{m['centre_insertion_auc']:.3f}")
        return "\n".join(lines)


def _methods(rd: RunDir, methods: list[str]) -> list[str]:
    present = [m for m in rd.saliency_methods() if m in METHODS and rd.saliency_maps(m)]
    if not methods:
        if not present:
            raise FeatscopeError(f"run {rd.root} has no saliency maps: run `featscope saliency compute` first")
        return present
    missing = [m for m in methods if m not in present]
    if missing:
        raise FeatscopeError(f"no {missing[0]} maps in {rd.root}: run `featscope saliency compute --method "
                             f"{missing[0]}` first")
    return list(dict.fromkeys(methods))


def evaluate(rd: RunDir, options: EvaluateOptions, progress: bool = True) -> EvaluateSummary:
    """Evaluate the selected images' maps that have no current evaluation; keep the rest."""
    start = time.perf_counter()
    methods = _methods(rd, options.methods)
    baselines.check_kind("replacement", _replacement(options.replacement))
    rows = {r["image_id"]: r for r in select(rd, options.select)}
    wanted = evaluation_options(options)
    stored = {m: read_evaluation(rd, m) for m in methods}
    maps = {m: rd.saliency_maps(m) for m in methods}
    stamps = {m: {i: map_stamp(p) for i, p in maps[m].items()} for m in methods}
    todo: dict[int, list[tuple[str, str]]] = {}
    skipped = 0
    for method in methods:
        for image_id in maps[method].keys() & rows.keys():
            old = stored[method].get(image_id)
            if old and old["options"] == wanted and old["map_stamp"] == stamps[method][image_id]:
                skipped += 1
            else:
                todo.setdefault(image_id, []).append((method, stamps[method][image_id]))
    work = [rows[i] | {"methods": todo[i]} for i in sorted(todo)]
    workers, threads = (options.workers, options.threads) if options.scheduler else split(options.workers,
                                                                                          options.threads)
    ref = model_ref(rd, options.device, threads)
    batches = [work[i:i + options.images_per_task] for i in range(0, len(work), options.images_per_task)]
    new, errors, used = [], [], 0
    if len(batches) == 1 and not options.scheduler:
        result = evaluate_batch(str(rd.root), options, ref, batches[0])  # starting workers would cost more
        new, errors = result["rows"], result["errors"]
    elif batches:
        from distributed import as_completed

        with dask_client(workers, options.scheduler, threads) as (client, used):
            futures = client.map(evaluate_batch, [str(rd.root)] * len(batches), [options] * len(batches),
                                 [ref] * len(batches), batches, pure=False, retries=1)
            with tqdm(total=len(work), unit="img", desc="saliency evaluate", disable=not progress) as bar:
                for future in as_completed(futures):
                    result = future.result()
                    new += result["rows"]
                    errors += result["errors"]
                    bar.update(len({r["image_id"] for r in result["rows"]}) + len(result["errors"]))
    live = set(manifest.read(rd)["image_id"].to_pylist())
    means = {}
    for method in methods:
        mine = [r for r in new if r["method"] == method]
        with one_writer(rd.faithfulness_dir.parent, "saliency evaluate"):  # read again: another job's rows stay
            table = _write_evaluation(rd, method, read_evaluation(rd, method), mine, stamps[method], live)
        if table.num_rows:
            means[method] = {c: float(np.mean(table[c].to_numpy())) for c in EVALUATION_SCHEMA.names if
                             c.endswith("_auc")}
    error_path = rd.error_part("saliency-evaluate", 0)
    if errors or error_path.exists():
        write_errors(error_path, errors)
    return EvaluateSummary(len(new), skipped, len(errors), used, time.perf_counter() - start, means)


def _write_evaluation(rd: RunDir, method: str, old: dict[int, dict], new: list[dict], stamps: dict[int, str],
                      live: set[int]) -> pa.Table:
    """Earlier rows whose map is still the one they measured, and this run's rows; curves of
    maps that are gone are deleted."""
    by_id = {i: r for i, r in old.items() if stamps.get(i) == r["map_stamp"] and i in live}
    by_id |= {r["image_id"]: r for r in new}
    table = pa.Table.from_pylist([by_id[i] for i in sorted(by_id)], schema=EVALUATION_SCHEMA)
    write_table(table, rd.faithfulness(method), {"method": method})
    for curves in rd.saliency_dir(method).glob("*.curves.npz"):
        if int(curves.name.split(".")[0]) not in stamps:
            curves.unlink(missing_ok=True)
    return table


# ---- the model-randomisation test ----------------------------------------------------------

@dataclass(frozen=True)
class SanityOptions(Options):
    methods: list[str] = _methods_option("methods checked (default: every method with maps)")
    sample: int = option(4, help="images checked (chosen by a fixed hash of their ids, among those with maps)",
                         min=1, max=256)
    granularity: str = option("block", help="one randomisation step per block (e.g. features.14, layer4.1) or "
                                            "per module with weights (Quantus's steps)", choices=GRANULARITIES)
    steps: int = option(0, help="at most this many steps: adjacent groups are merged, evenly (0: every group is a "
                                "step)", min=0)
    seed: int = seed_option(42, help="seed of the re-initialised weights")
    threshold: float = option(0.5, help="verdict: a method whose maps keep a mean rank correlation above this "
                                        "with the original ones across the cascade barely changes", min=0, max=1)
    device: str = option("auto", help="where the model runs", choices=DEVICES)


SANITY_SCHEMA = pa.schema([
    pa.field("method", pa.string()),
    pa.field("image_id", pa.int64()),
    pa.field("step", pa.int16()),
    pa.field("layer", pa.string()),  # the last group re-initialised (every one above it is too)
    pa.field("spearman", pa.float64()),
    pa.field("ssim", pa.float64()),
])


def method_options(rd: RunDir, method: str) -> dict:
    """The method's keyword arguments as its stored maps were made (options.json), else defaults."""
    path = rd.saliency_options(method)
    recorded = json.loads(path.read_text()) if path.exists() else {}
    values = {d.name: recorded.get(d.name, d.default) for d in METHODS[method].params}
    accepted = inspect.signature(METHODS[method].function).parameters
    if "score" in accepted:
        values["score"] = recorded.get("score", "logit")
    return values  # float32 throughout, also for methods whose maps were made in bf16: it is the model that changes


def sample_ids(candidates: list[int], count: int, seed: int) -> list[int]:
    """`count` ids chosen by a fixed hash of (seed, id): the same images on every run."""
    return sorted(candidates, key=lambda i: baseline_seed(seed, i))[:count]


def verdict(score: float, threshold: float) -> str:
    return "barely changes: treat with care" if score > threshold else "changes with the model"


@dataclass
class SanitySummary:
    verdicts: dict[str, dict]
    images: int
    steps: int
    seconds: float

    def line(self) -> str:
        lines = [f"saliency sanity: {plural(self.images, 'image')}, {self.steps} randomisation steps, "
                 f"in {self.seconds:.1f}s"]
        for method, v in self.verdicts.items():
            lines.append(f"  {method:<22} mean rank correlation {v['score']:.2f} "
                         f"(threshold {v['threshold']:.2f}): {v['verdict']}")
        return "\n".join(lines)


def sanity(rd: RunDir, options: SanityOptions, progress: bool = True) -> SanitySummary:
    """The cascading model-randomisation test of each method on a sample of the run's images."""
    start = time.perf_counter()
    methods = _methods(rd, options.methods)
    sources = derived.stamp(rd, derived.sanity_sources(rd, methods))  # the maps as they are now
    ref = model_ref(rd, options.device)
    loaded, device, _ = worker_model(ref)
    model, prep = loaded.module, loaded.preprocessing
    live = {r["image_id"]: r for r in select(rd)}
    with_maps = sorted(set.intersection(*(set(rd.saliency_maps(m)) for m in methods)) & live.keys())
    chosen = sample_ids(with_maps, options.sample, options.seed)
    images, kept = [], []
    for image_id in chosen:
        try:
            pixels = read_pixels(live[image_id]["path"])
        except BadImage:
            continue
        square = TF.center_crop(model_view(pixels, prep), [prep.crop, prep.crop])  # one batch: one size
        images.append(prep.normalize(square[None]))
        kept.append(image_id)
    if not images:
        raise FeatscopeError("no readable image has maps of every method checked")
    x = torch.cat(images).to(device)
    with torch.no_grad():
        target = model(x).float().argmax(1)
    kwargs = {m: method_options(rd, m) for m in methods}
    original = {m: attribute(model, x, target, m, **kwargs[m]).float().cpu() for m in methods}
    names = _display_names(model, layer_groups(model, options.granularity))
    groups = merge_groups(layer_groups(model, options.granularity), options.steps)
    names |= {name: " – ".join(names[part] for part in name.split(" – ")) for name, _ in groups}
    rows = []
    with tqdm(total=len(groups) * len(methods), desc="saliency sanity", unit="map", disable=not progress) as bar:
        for step, (name, randomised) in enumerate(cascading_randomisation(model, groups, seed=options.seed), 1):
            for method in methods:
                maps = attribute(randomised, x, target, method, **kwargs[method]).float().cpu()
                rho = spearman_abs(original[method], maps)
                similarity = ssim(unit_range(original[method]), unit_range(maps))
                rows += [{"method": method, "image_id": kept[i], "step": step, "layer": names[name],
                          "spearman": float(rho[i]), "ssim": float(similarity[i])} for i in range(len(kept))]
                bar.update(1)
    table = pa.Table.from_pylist(rows, schema=SANITY_SCHEMA)
    verdicts = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        per_step = [statistics.median(_finite(r["spearman"] for r in mine if r["step"] == s))
                    for s in range(1, len(groups) + 1)]
        score = float(np.mean(per_step))
        verdicts[method] = {"score": score, "threshold": options.threshold, "verdict": verdict(score, options.threshold),
                            "final_spearman": per_step[-1], "images": len(kept), "steps": len(groups),
                            "granularity": options.granularity}
    with one_writer(rd.sanity_table.parent, "saliency sanity"):  # another job's verdicts would vouch for these plots
        withdraw(rd.sanity_table, rd.sanity_verdicts)  # they vouch for the plots below: written again last
        derived.forget(rd.sanity_verdicts)
        for method in methods:
            _plot(rd, method, [r for r in rows if r["method"] == method], [names[n] for n, _ in groups],
                  verdicts[method])
        write_table(table, rd.sanity_table, {"granularity": options.granularity, "seed": str(options.seed)})
        write_json_atomic(rd.sanity_verdicts, verdicts)
        derived.remember(rd.sanity_verdicts, sources)
    return SanitySummary(verdicts, len(kept), len(groups), time.perf_counter() - start)


def _finite(values) -> list[float]:
    kept = [v for v in values if np.isfinite(v)]
    return kept or [0.0]  # a constant map everywhere: nothing is left of the original's ranking


def _display_names(model: torch.nn.Module, groups: list[tuple[str, list[str]]]) -> dict[str, str]:
    """Group path -> the architecture's alias for it where one exists (block13, layer4)."""
    profile = profile_of_model(model)
    by_path = {}
    for alias, path in (profile.aliases(model) if profile else {}).items():
        by_path.setdefault(path, alias)
    return {name: by_path.get(name, name) for name, _ in groups}


def _plot(rd: RunDir, method: str, rows: list[dict], layers: list[str], facts: dict) -> None:
    """Spearman and SSIM against the original map as the cascade goes down: median and range
    over the sampled images, as in the paper's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * len(layers) + 2), 3.4), dpi=100)
    steps = np.arange(len(layers) + 1)
    for key, colour in (("spearman", "tab:blue"), ("ssim", "tab:orange")):
        values = np.array([[1.0] * len({r["image_id"] for r in rows})] +
                          [[r[key] for r in rows if r["step"] == s] for s in range(1, len(layers) + 1)])
        with warnings.catch_warnings():  # a step where every map came out constant has no value: a gap
            warnings.simplefilter("ignore", RuntimeWarning)
            middle, low, high = (np.nanmedian(values, axis=1), np.nanmin(values, axis=1),
                                 np.nanmax(values, axis=1))
        ax.plot(steps, middle, color=colour, marker="o", ms=3,
                label="rank correlation (|map|)" if key == "spearman" else "SSIM")
        ax.fill_between(steps, low, high, color=colour, alpha=0.15)
    ax.axhline(facts["threshold"], color="grey", ls="--", lw=0.8)
    ax.set_xticks(steps, ["original", *layers], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(-0.3, 1.05)
    ax.set_ylabel("similarity to the original map")
    ax.set_title(f"{method}: {facts['verdict']} (mean rank corr. {facts['score']:.2f})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(rd.sanity_plot(method)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


COMMANDS = [
    Command("saliency evaluate", EvaluateOptions, evaluate,
            help="faithfulness of the maps: deletion and insertion curves and AUCs, against random and centre maps",
            description="For every image with maps, the target's score as the map's pixels are deleted (or "
                        "revealed) most important first, in --steps parts, and the same for a seeded random map "
                        "and a centred Gaussian. AUCs to saliency/faithfulness.parquet/<method>.parquet, curves to "
                        "saliency/<method>/<id>.curves.npz. Current rows are skipped; a recomputed map is "
                        "evaluated again. Runs on a local Dask cluster or the one at --scheduler.",
            groups=(Group(("workers", "scheduler")),)),
    Command("saliency sanity", SanityOptions, sanity,
            help="model-randomisation sanity check: do the maps change when the model's weights are destroyed?",
            description="Re-initialises the model's layers from the top, one block more per step (Adebayo et al. "
                        "2018), recomputes each method's maps on a sample of images after each step and compares "
                        "them with the original maps (Spearman of |map|, SSIM). Writes saliency/sanity.parquet, "
                        "a plot per method (saliency/sanity-<method>.png) and verdicts (saliency/sanity.json)."),
]
