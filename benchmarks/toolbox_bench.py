"""The optimising toolbox: images optimised through the model as `visualisation_model`
prepares it (batch norms folded, channels-last weights) against the model as loaded, which
is what `viz` and `style train` optimised through before.

Each contender runs the same stage function on the same run, images, layers, seeds and step
counts in one process, one after the other, `--repeats` times (best of); the baseline is the
same code with `visualisation_model` swapped for the plain model. Prints per method the
seconds of each, their ratio (baseline / featscope, higher is better) and how far the results
differ (the fold is the same function of the image, rounded differently, so the optimised
images drift apart a little over hundreds of steps; the final losses should agree closely).

    python benchmarks/toolbox_bench.py [--model mobilenet_v2] [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from featscope.kernels.architectures import profile_for
from featscope.kernels.transforms import PixelModel
from featscope.pipelines.core import manifest
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.stages import style, viz


def as_loaded(loaded, specs, device="cpu") -> PixelModel:
    """The baseline: the model as loaded, no parameter asking for a gradient."""
    for parameter in loaded.module.parameters():
        parameter.requires_grad_(False)
    return PixelModel(loaded.module, loaded.preprocessing.mean, loaded.preprocessing.std).to(device)


@contextmanager
def model_as_loaded():
    """Within the block, the stages optimise through the model as loaded (their code of before)."""
    saved = viz.visualisation_model, style.visualisation_model
    viz.visualisation_model = style.visualisation_model = as_loaded
    try:
        yield
    finally:
        viz.visualisation_model, style.visualisation_model = saved


def timed(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def final_losses(path: Path, key: str) -> np.ndarray:
    record = json.loads(path.read_text())
    return np.array(record[key] if isinstance(record, dict) else [r[key] for r in record], dtype=float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--steps", type=int, default=60, help="steps of every method (the demo runs 96-300)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from extract_throughput import make_photos

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "photos", 4)
        rd = RunDir(tmp / "run")
        manifest.run(rd, tmp / "photos", num_shards=1, model=args.model, weights=args.weights)
        texture_image = tmp / "photos" / "class1" / "img00001.jpg"
        profile = profile_for(args.model)  # the architecture's style-transfer layers, as `style train` takes them
        if profile is None:
            raise SystemExit(f"{args.model} has no profile with style-transfer layers")
        content_layer, style_layers = profile.content_layer, list(profile.style_layers)
        n = args.steps
        methods = {
            "texture": (lambda: viz.texture(rd, texture_image, style_layers, size=128, steps=n, progress=False),
                        lambda: final_losses(rd.viz_texture(texture_image.stem).with_suffix(".json"),
                                             "loss_all_layers")[-1:]),
            "style transfer": (lambda: viz.style_transfer(rd, 0, texture_image, content_layer=content_layer,
                                                          style_layers=style_layers, steps=n, progress=False),
                               lambda: final_losses(rd.viz_style(0, texture_image.stem).with_suffix(".json"),
                                                    "losses")[-1:]),
            "inversion": (lambda: viz.inversion(rd, [0], [style_layers[1], style_layers[3]], steps=n, progress=False),
                          lambda: np.array([r["feature_error"] for r in json.loads(
                              rd.viz_inversion(0).with_suffix(".json").read_text())["layers"]])),
            "class models": (lambda: viz.class_model(rd, [130, 309], steps=n, octaves=1, progress=False),
                             lambda: final_losses(rd.viz_class_models.with_suffix(".json"), "final_score")),
            "style train": (lambda: style.train(tmp / f"net{time.perf_counter_ns()}", [texture_image],
                                                tmp / "photos", style.TrainOptions(steps=n // 2, size=128,
                                                                                   model=args.model,
                                                                                   weights=args.weights),
                                                progress=False), None),
        }
        print(f"# {args.model} ({args.weights}), {n} steps a method ({n // 2} for style train), "
              f"{torch.get_num_threads()} threads; baseline: the model as loaded")
        for name, (run, result) in methods.items():
            run()  # warm-up
            t_ours, ours = timed(args.repeats, run)
            mine = result() if result else getattr(ours, "last_loss", None)
            with model_as_loaded():
                t_base, theirs = timed(args.repeats, run)
                base = result() if result else getattr(theirs, "last_loss", None)
            agree = "" if mine is None else f"; result {np.round(mine, 4)} against {np.round(base, 4)}"
            print(f"toolbox/{name} vs model as loaded: {t_base / t_ours:.2f} "
                  f"(featscope {t_ours:.2f}s, as loaded {t_base:.2f}s{agree})")


if __name__ == "__main__":
    main()
