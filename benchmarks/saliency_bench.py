"""Saliency: featscope's kernels against a straightforward PyTorch loop and against Captum.

Same model, images, targets, window and stride for every contender, one process, after a
warm-up; each figure is the best of `--repeats`. Prints per method the ratio
baseline time / featscope time (higher is better; targets: occlusion >= 3 against Captum's
best `perturbations_per_eval`, gradient and guided >= 1), then images/s of the whole
`featscope saliency` stage with 1 and 2 Dask workers. Captum is optional
(`pip install captum`); without it only the plain-PyTorch baseline is printed.

`--part evaluate`: the deletion curves of `saliency evaluate` against Quantus's PixelFlipping
(`pip install quantus`) on the same model, photos, gradient maps, steps and replacement
(zeros): images/s of each, their ratio (target >= 3), and how far the curves differ.

    python benchmarks/saliency_bench.py [--model mobilenet_v2] [--images 4] [--window 32 --stride 16]
    python benchmarks/saliency_bench.py --part evaluate [--model resnet18] [--images 8] [--size 224x300]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from featscope.kernels.saliency import attribute
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.runtime import keep_freed_memory


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def demo_batch(n: int, preprocessing) -> torch.Tensor:
    """n real photos (scikit-image, scikit-learn, matplotlib), preprocessed to 224 px."""
    from featscope.pipelines.core.images import read_pixels
    from featscope.pipelines.data.demo import PHOTOS, _package_file

    chosen = [PHOTOS[i] for i in (0, 1, 2, 5, 8, 9, 10, 11)][:n]  # chelsea, coffee, rocket, ...: objects
    paths = [_package_file(package, relative) for package, relative in chosen]
    return preprocessing.normalize(torch.stack([preprocessing.to_uint8(read_pixels(p)) for p in paths]))


def plain_occlusion(model, x, target, window, stride):
    """The straightforward loop: one forward pass per window position, float32."""
    maps = torch.zeros(x.shape[0], *x.shape[2:])
    count = torch.zeros(x.shape[2:])
    with torch.no_grad():
        clean = model(x)[torch.arange(len(x)), target]
        for y in range(0, x.shape[2] - window + 1, stride):
            for x0 in range(0, x.shape[3] - window + 1, stride):
                covered = x.clone()
                covered[:, :, y:y + window, x0:x0 + window] = 0
                drop = clean - model(covered)[torch.arange(len(x)), target]
                maps[:, y:y + window, x0:x0 + window] += drop.view(-1, 1, 1)
                count[y:y + window, x0:x0 + window] += 1
    return maps / count


def plain_gradient(model, x, target):
    x = x.clone().requires_grad_(True)
    model(x)[torch.arange(len(x)), target].sum().backward()
    return x.grad.abs().amax(1)


def agreement(a: torch.Tensor, b: torch.Tensor) -> str:
    """Max abs difference as a fraction of the reference map's range, and correlation."""
    a, b = a.float().flatten(), b.float().flatten()
    err = (a - b).abs().max() / (b.max() - b.min())
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    return f"max err {err:.2%} of range, r={corr:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dask-images", type=int, default=16, help="images for the Dask stage figures (0: skip)")
    parser.add_argument("--dask-method", default="occlusion")
    parser.add_argument("--size", default="192x192", help="evaluate: the photos' HxW (224x300: about a 4:3 photo "
                                                              "as the stage sees it)")
    parser.add_argument("--steps", type=int, default=24, help="evaluate: deletion steps (each whole pixels)")
    parser.add_argument("--part", choices=("maps", "evaluate", "all"), default="all",
                        help="maps: the saliency methods; evaluate: deletion curves against Quantus")
    args = parser.parse_args()
    keep_freed_memory()
    if args.part in ("evaluate", "all"):
        height, width = (int(v) for v in args.size.split("x"))
        evaluate_against_quantus(args.model, args.weights, max(args.images, 8), args.repeats, (height, width),
                                 args.steps)
    if args.part == "evaluate":
        return
    warnings.filterwarnings("ignore", module="captum")  # "input did not require gradients", on every call
    loaded = load_model(args.model, args.weights)
    model = loaded.module
    x = demo_batch(args.images, loaded.preprocessing)
    with torch.no_grad():
        target = model(x).argmax(1)
    w, s, n = args.window, args.stride, args.images
    print(f"# {args.model} ({args.weights}), {n} photos at 224 px, window {w} stride {s}, "
          f"{torch.get_num_threads()} threads")

    # featscope: the model as the stage loads it (channels_last), bf16 autocast where the CPU has it.
    # The stage also folds batch norms for occlusion; left out here, so all contenders run one module.
    fast = load_model(args.model, args.weights).module.to(memory_format=torch.channels_last)
    ours_occ = lambda: attribute(fast, x, target, "occlusion", window=w, stride=s, dtype=torch.bfloat16)  # noqa: E731
    ours_fp32 = attribute(fast, x, target, "occlusion", window=w, stride=s)
    ours_occ()
    t_ours, occ_bf16 = best_of(args.repeats, ours_occ)
    t_plain, occ_plain = best_of(1, lambda: plain_occlusion(model, x, target, w, s))
    print(f"saliency/occlusion vs plain loop: {t_plain / t_ours:.2f} "
          f"(featscope bf16 {n / t_ours:.2f} img/s, plain fp32 {n / t_plain:.2f} img/s)")
    print(f"  featscope fp32 vs plain loop: {agreement(ours_fp32, occ_plain)}")
    print(f"  featscope bf16 vs fp32:       {agreement(occ_bf16, ours_fp32)}")

    grad = lambda: attribute(fast, x, target, "gradient")  # noqa: E731
    guided = lambda: attribute(fast, x, target, "guided")  # noqa: E731
    grad(), guided()
    t_grad, g_ours = best_of(args.repeats * 3, grad)
    t_guided, gb_ours = best_of(args.repeats * 3, guided)
    t_plain_grad, g_plain = best_of(args.repeats * 3, lambda: plain_gradient(model, x, target))
    print(f"saliency/gradient vs plain autograd: {t_plain_grad / t_grad:.2f} "
          f"(featscope {n / t_grad:.1f} img/s, plain {n / t_plain_grad:.1f} img/s; {agreement(g_ours, g_plain)})")

    if args.dask_images:
        dask_throughput(args.dask_images, args.dask_method, args.model, args.weights)
    try:
        from captum.attr import GuidedBackprop, Occlusion, Saliency
    except ImportError:
        print("captum not installed: `pip install captum` for the Captum comparison")
        return
    # Captum's best setting: every perturbations_per_eval, on the model as loaded and on the
    # channels_last copy featscope uses, whichever is faster.
    captum_times, captum_maps = {}, {}
    for layout, net in (("plain", model), ("channels_last", fast)):
        occ = Occlusion(net)
        for per_eval in (1, 4, 16, 32, 64, 169):
            run = lambda: occ.attribute(x, target=target, sliding_window_shapes=(3, w, w),  # noqa: E731
                                        strides=(3, s, s), baselines=0, perturbations_per_eval=per_eval)
            key = f"perturbations_per_eval={per_eval} {layout}"
            captum_times[key], captum_maps[key] = best_of(1, run)
            print(f"  captum Occlusion {key}: {n / captum_times[key]:.2f} img/s")
    best = min(captum_times, key=captum_times.get)
    print(f"saliency/occlusion vs captum: {captum_times[best] / t_ours:.2f} "
          f"(featscope {n / t_ours:.2f} img/s, captum best {best} {n / captum_times[best]:.2f} img/s; "
          f"captum vs featscope fp32: {agreement(captum_maps[best].amax(1), ours_fp32)})")
    sal, gbp = Saliency(model), GuidedBackprop(model)
    sal.attribute(x, target=target)
    t_cs, c_grad = best_of(args.repeats * 3, lambda: sal.attribute(x, target=target, abs=True))
    t_cg, c_guided = best_of(args.repeats * 3, lambda: gbp.attribute(x, target=target))
    print(f"saliency/gradient vs captum: {t_cs / t_grad:.2f} (featscope {n / t_grad:.1f} img/s, "
          f"captum Saliency {n / t_cs:.1f} img/s; {agreement(g_ours, c_grad.amax(1))})")
    print(f"saliency/guided vs captum: {t_cg / t_guided:.2f} (featscope {n / t_guided:.1f} img/s, "
          f"captum GuidedBackprop {n / t_cg:.1f} img/s; {agreement(gb_ours, c_guided.abs().amax(1))})")
    # Captum guides nn.ReLU modules only, so on mobilenet_v2 (ReLU6) its maps are not guided;
    # on a ReLU network the two must agree.
    relu_net = load_model("resnet18", "random").module
    gb_relu = GuidedBackprop(relu_net).attribute(x, target=target).abs().amax(1)
    print(f"  guided vs captum on resnet18 (ReLU only): {agreement(attribute(relu_net, x, target, 'guided'), gb_relu)}")


def evaluate_against_quantus(arch: str, weights: str, n: int, repeats: int, size: tuple[int, int] = (192, 192),
                             steps: int = 24) -> None:
    """Deletion curves of n photos' gradient maps: featscope's `perturbation_curves` as the
    stage runs them (the model's batch norms folded; on a CPU one single-threaded lane per
    core, as the stage's one single-threaded worker process per core, each with its share of
    the photos and `forward_batch` perturbed copies a pass; fp32, and bf16 autocast where the
    CPU has fast bf16) against Quantus's PixelFlipping (its loop: one forward pass of the
    images per step, on all the cores). The photos are resized to `size`; at 192x192, 24
    steps are 1,536 whole pixels each, which Quantus's step rule (features_in_step must
    divide H*W) allows, so both perturb exactly the same pixels (at 224x300, about the
    shape of a 4:3 photo as the stage sees it, 2,800)."""
    import copy

    import numpy as np

    from featscope.kernels.faithfulness import perturbation_curves
    from featscope.pipelines.core.device import cpu_has_fast_bf16, inference_model
    from featscope.pipelines.core.lanes import chunks_of, lane_plan, map_in_lanes
    from featscope.pipelines.core.onnx_forward import fast_forward
    from featscope.pipelines.stages.saliency_trust import forward_batch

    height, width = size
    # Quantus removes features_in_step = 3HW/steps values a step and asserts that this divides
    # H*W: steps must split the pixels into whole pixels and be a multiple of 3
    if (height * width) % steps or steps % 3:
        raise SystemExit(f"{steps} steps do not split {height}x{width} pixels into whole pixels as Quantus's "
                         "step rule needs (H*W divisible by steps, steps a multiple of 3: e.g. 24)")
    loaded = load_model(arch, weights)
    model = loaded.module
    fast = load_model(arch, weights).module.to(memory_format=torch.channels_last)
    folded = inference_model(loaded, []).to(memory_format=torch.channels_last)  # as `saliency evaluate` runs it
    x = torch.nn.functional.interpolate(demo_batch(n, loaded.preprocessing), size=size, mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        target = model(x).argmax(1)
    maps = attribute(fast, x, target, "gradient")
    lanes, threads, chunk = lane_plan(n, n, x.device)
    parts = chunks_of(list(range(n)), chunk)
    print(f"# deletion curves: {arch} ({weights}), {n} photos at {height}x{width} px, {steps} steps, zeros, gradient "
          f"maps; featscope on {lanes} lane(s) of {threads} thread(s), {forward_batch(x.device)} images a pass; "
          f"Quantus on {torch.get_num_threads()} threads")

    # as `saliency evaluate` runs it in float32 on a CPU: in ONNX Runtime, one session on each
    # lane's thread (`workers.curves_model`)
    onnx = fast_forward(folded, x[:1], threads=threads)

    def ours(dtype, net=onnx):
        def curves(model, picked):
            return perturbation_curves(model, x[picked], maps[picked], target[picked], mode="deletion", steps=steps,
                                       replacement=0.0, score="probability", batch=forward_batch(x.device),
                                       dtype=dtype)
        return torch.cat(list(map_in_lanes(curves, parts, lambda: copy.deepcopy(net), lanes=lanes,
                                           threads=threads)))

    ours(None)
    t_fp32, curves = best_of(repeats, lambda: ours(None))
    ours(None, folded)
    t_torch, curves_torch = best_of(repeats, lambda: ours(None, folded))
    print(f"saliency/evaluate featscope ({type(onnx).__name__}) vs featscope (PyTorch, folded, channels-last): "
          f"{t_torch / t_fp32:.2f} ({n / t_fp32:.2f} against {n / t_torch:.2f} img/s; curves differ by at most "
          f"{(curves - curves_torch).abs().max():.1e})")
    bf16 = cpu_has_fast_bf16()  # elsewhere bf16 is emulated, many times slower than fp32: not worth timing
    t_bf16, curves_bf16 = best_of(repeats, lambda: ours(torch.bfloat16, folded)) if bf16 else (float("nan"), None)
    try:
        import quantus
    except ImportError:
        print(f"saliency/evaluate featscope: fp32 {n / t_fp32:.2f} img/s, bf16 {n / t_bf16:.2f} img/s "
              "(nan: no fast bf16 on this CPU); quantus not installed: `pip install quantus` for the comparison")
        return
    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid  # Quantus 0.6 calls the name NumPy 2.4 removed (same function)
    metric = quantus.PixelFlipping(features_in_step=3 * height * width // steps, perturb_baseline=0.0, normalise=False,
                                   abs=False, disable_warnings=True)
    colour = maps[:, None].expand_as(x).numpy()

    def theirs():
        return np.array(metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=colour, softmax=True,
                               device="cpu", batch_size=64))

    t_quantus, quantus_curves = best_of(max(1, repeats - 1), theirs)
    gap = np.abs(curves[:, 1:].numpy() - quantus_curves).max()
    print(f"saliency/evaluate vs quantus (fp32): {t_quantus / t_fp32:.2f} (featscope {n / t_fp32:.2f} img/s, "
          f"quantus PixelFlipping {n / t_quantus:.2f} img/s; curves differ by at most {gap:.1e}); featscope in "
          f"PyTorch: {t_quantus / t_torch:.2f}")
    if bf16:
        gap_bf16 = np.abs(curves_bf16[:, 1:].numpy() - quantus_curves).max()
        print(f"saliency/evaluate vs quantus (featscope bf16): {t_quantus / t_bf16:.2f} (featscope {n / t_bf16:.2f} "
              f"img/s; curves differ by at most {gap_bf16:.3f})")


def dask_throughput(n: int, method: str, model: str, weights: str) -> None:
    """images/s of the whole `featscope saliency` stage (cluster start included) with 1 and 2
    local Dask workers, on n synthetic 500x375 JPEGs."""
    import tempfile
    from pathlib import Path

    from extract_throughput import make_photos

    from featscope.pipelines.core import manifest
    from featscope.pipelines.core.rundir import RunDir
    from featscope.pipelines.stages import saliency

    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp) / "photos", n)
        rates = {}
        for workers in (1, 2):
            rd = RunDir(Path(tmp) / f"run{workers}")
            manifest.run(rd, Path(tmp) / "photos", num_shards=1, model=model, weights=weights)
            summary = saliency.run(rd, saliency.SaliencyOptions(method=method, workers=workers), progress=False)
            rates[workers] = summary.computed / summary.seconds
            print(f"saliency/dask {method} {workers} worker(s): {rates[workers]:.2f} img/s "
                  f"({n} images, {summary.seconds:.1f}s with cluster start)")
        print(f"saliency/dask 2 vs 1 workers: {rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
