"""Feature visualisation: featscope's batched renderer against Lucent, as its users run it.

Same model, layer, image size, step count, parameterisation (Fourier, decorrelated colour,
Lucid's constants), transforms (Lucid's standard ones), optimiser (Adam, lr 0.05): Lucent's
`render_vis` one unit per call on the model as loaded, featscope's `feature_visualisations`
`--batch` units at a time as `units render` runs them (`render_units`: the model as
`visualisation_model` prepares it, batch norms folded, channels-last, the batch split over
the CPU's lanes, `pipelines.core.lanes`).
Prints units/s of each and their ratio (target >= 5), and the activation each reached on its
images (the unit's spatial maximum on the image at the model's input size): the median of
featscope's / Lucent's over the units, with a 95% bootstrap interval over the units (a single
unit's ratio moves by tens of percent with any change of rounding, so a median of 16 units
moves by a few percent: the interval says whether featscope's is below Lucent's or within
noise). Both start from seeded noise (featscope's from `--seeds`, 0 unless given; Lucent's
global generators, torch's and numpy's, seeded with the unit's number).
Lucent 0.1.8 pins kornia <= 0.4.1 (and with it an old torch); it runs on today's kornia with
two aliases restored here:

    pip install --no-deps torch-lucent==0.1.8 kornia kornia-rs ipython decorator
    python benchmarks/units_bench.py [--layer features.13] [--units 8] [--steps 64] [--batch 8]

`--seeds 0,1,2` renders featscope's images from each seed in turn (each timed and judged
against the same Lucent images), then judges them together, units resampled with their ratios
under every seed: featscope draws one sequence of transforms per seed for all the units
(Lucent one per unit), so a seed's luck can move every unit at once, which the interval over
one seed's units does not see (seed 0 gave a median 0.97 in float32 and bf16 on two machines,
seed 1 0.98-1.00; seeds 0-4 of 64 units, bf16: 0.97 to 1.01).
`--lucent-images FILE` keeps Lucent's images (and time) in a file and reuses them when the
settings match, since they depend only on the settings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featscope.kernels.layers import LayerSpec
from featscope.kernels.objectives import layer_outputs
from featscope.kernels.render import feature_visualisations
from featscope.kernels.transforms import PixelModel
from featscope.kernels.unit_objectives import channels
from featscope.pipelines.core.lanes import lane_plan
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.workers import visualisation_model
from featscope.pipelines.stages.units import RenderOptions, render_units


def peak(model: PixelModel, module: torch.nn.Module, images: torch.Tensor, units: list[int]) -> np.ndarray:
    """Each image's unit's spatial maximum with the image upsampled to 224 (as both render)."""
    with torch.no_grad():
        x = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=True)
        out = layer_outputs(model, x, [module])[0].float()
    return np.array([float(out[b, u].max()) for b, u in enumerate(units)])


def median_interval(ratios: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the median of `ratios` (one per unit, or seeds x units)
    with the units resampled with replacement, a unit's ratios under every seed kept together."""
    ratios = np.atleast_2d(ratios)
    picks = np.random.default_rng(seed).integers(ratios.shape[1], size=(draws, ratios.shape[1]))
    medians = np.median(ratios[:, picks].transpose(1, 0, 2).reshape(draws, -1), axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def lucent_render(model: torch.nn.Module, layer: str, unit: int, size: int, steps: int) -> torch.Tensor:
    import kornia
    from kornia.geometry import transform as geometry

    for name in ("get_rotation_matrix2d", "warp_affine"):  # moved out of kornia's top level after 0.4
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(geometry, name))
    from lucent.optvis import param, render

    torch.manual_seed(unit)  # Lucent's starting noise
    np.random.seed(unit)  # and its transforms' jitter, scale and angle
    images = render.render_vis(model, f"{layer.replace('.', '_')}:{unit}",
                               param_f=lambda: param.image(size, fft=True, decorrelate=True), thresholds=(steps,),
                               show_image=False, progress=False)
    return torch.from_numpy(images[-1]).permute(0, 3, 1, 2)


def name(run: tuple[str, int]) -> str:
    """A featscope run's label: its precision, and its seed where not 0."""
    precision, seed = run
    return precision if seed == 0 else f"{precision} seed {seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--layer", default="features.13", help="module path (Lucent names it features_13)")
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32,bf16", help="featscope's precisions, each timed and judged")
    parser.add_argument("--seeds", default="0", help="featscope's seeds (of its starting images and transforms)")
    parser.add_argument("--lucent-images", help="a .pt file keeping Lucent's images and time for these settings")
    args = parser.parse_args()
    runs = [(p, int(seed)) for seed in args.seeds.split(",") for p in args.precision.split(",")]
    loaded = load_model(args.model, args.weights)
    net = loaded.module.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    model = PixelModel(net, loaded.preprocessing.mean, loaded.preprocessing.std)  # as loaded: Lucent's, and the judge
    module = net.get_submodule(args.layer)
    spec = LayerSpec(args.layer, args.layer, "conv")
    ours_model = visualisation_model(loaded, [spec])  # as `units render` runs it: BN folded, channels-last
    ours_module = ours_model.model.get_submodule(args.layer)
    units = list(range(args.units))
    print(f"# {args.model} {args.layer}, {args.units} units, {args.size} px, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")

    feature_visualisations(ours_model, channels(ours_module, torch.tensor(units[:1])), [0], size=args.size,
                           steps=2)  # warm-up
    lanes, threads, chunk = lane_plan(len(units), args.batch, torch.device("cpu"))
    ours, t_ours = {}, {}
    for run in runs:
        precision, seed = run
        options = RenderOptions(layer=args.layer, size=args.size, steps=args.steps, batch=args.batch, seed=seed,
                                precision=precision)
        start = time.perf_counter()
        ours[run] = torch.cat([images for _, images, _, _ in render_units(loaded, spec, torch.device("cpu"), units,
                                                                           options)])
        t_ours[run] = time.perf_counter() - start
        print(f"units/featscope {name(run)}: {len(units) / t_ours[run]:.3f} units/s ({t_ours[run]:.1f}s, "
              f"batches of {args.batch} on {lanes} lane(s) of {threads} thread(s), {chunk} units each)")
    settings = {"model": args.model, "weights": args.weights, "layer": args.layer, "units": args.units,
                "steps": args.steps, "size": args.size}
    kept = torch.load(args.lucent_images) if args.lucent_images and Path(args.lucent_images).exists() else None
    if kept is not None and kept["settings"] == settings:
        theirs, t_lucent = kept["images"], kept["seconds"]
        print(f"units/lucent: {len(units) / t_lucent:.3f} units/s ({t_lucent:.1f}s, one unit per call; images and "
              f"time kept in {args.lucent_images})")
    else:
        try:
            import lucent  # noqa: F401
        except ImportError:
            print("Lucent not installed: see this script's docstring")
            return
        start = time.perf_counter()
        theirs = torch.cat([lucent_render(net, args.layer, u, args.size, args.steps) for u in units])
        t_lucent = time.perf_counter() - start
        print(f"units/lucent: {len(units) / t_lucent:.3f} units/s ({t_lucent:.1f}s, one unit per call)")
        if args.lucent_images:
            torch.save({"settings": settings, "images": theirs, "seconds": t_lucent}, args.lucent_images)
    their_peak = peak(model, module, theirs, units)
    ratios = {}
    for run in runs:
        ours_peak = peak(model, module, ours[run], units)
        ratios[run] = ours_peak / their_peak
        low, high = median_interval(ratios[run])
        print(f"units/featscope {name(run)} vs lucent: {t_lucent / t_ours[run]:.2f} (units/s ratio); "
              f"activation reached: median featscope / lucent {np.median(ratios[run]):.2f} "
              f"(95% interval {low:.2f}-{high:.2f}), mean "
              f"{ours_peak.mean() / their_peak.mean():.2f} (featscope higher on "
              f"{int((ours_peak >= their_peak).sum())} of {len(units)} units)")
    for precision in dict.fromkeys(p for p, _ in runs):  # the verdict over all seeds (see the docstring)
        seeds = [run for run in runs if run[0] == precision]
        if len(seeds) > 1:
            pooled = np.stack([ratios[run] for run in seeds])
            low, high = median_interval(pooled)
            print(f"units/featscope {precision} over {len(seeds)} seeds vs lucent: "
                  f"{t_lucent * len(seeds) / sum(t_ours[run] for run in seeds):.2f} (units/s ratio); activation "
                  f"reached: median featscope / lucent {np.median(pooled):.2f} (95% interval {low:.2f}-{high:.2f}), "
                  f"featscope higher on {int((pooled >= 1).sum())} of {pooled.size} images")


if __name__ == "__main__":
    main()
