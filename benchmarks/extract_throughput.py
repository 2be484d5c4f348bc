"""Extraction throughput: featscope end-to-end vs the model alone vs a tutorial-style loop.

On the same JPEG photos (default 2,000 at about 500x375, made from the demo photographs),
in one process run, after a warm-up (featscope, model-only and decode-only interleaved
`--repeats` times, medians compared):
  model_only  the same model, batch size and precision on tensors already in memory: the
              module featscope runs (batch norms folded, kernels/batchnorm_folding.py, and
              on a CPU each conv fused with its clamp, kernels/conv_fusion.py), the folded
              module without that fusion (`fused/folded_only`), and torchvision's module
              as shipped (`model_as_shipped`)
  featscope   `extract.run` end to end: decode, resize, forward, summaries, Parquet
  naive       torchvision ImageFolder + DataLoader + fp32 loop with forward hooks, in a
              fresh Python process as a notebook runs it
  decode_only featscope's batches of decoded, resized, cropped pixels with no model
and prints `pipeline/model_only` (target >= 0.85) and `pipeline/naive` (target >= 2.0).
`ceiling/model_only` is the ratio featscope would reach if decoding shared the cores with
the model at no cost beyond its own (1/ceiling = 1 + decode time / model time): on a CPU,
where the two take turns on the same cores, `pipeline/model_only` cannot exceed it.
`ceiling_perfect_split/model_only` (CPU only) does the same with decoding timed on one core
and divided by the number of cores: the ceiling even a decoder that split its work across
the cores with no loss would put on the ratio.
`pipeline/naive_same_process` runs the naive loop inside this process too, where it also
profits from featscope's allocator setting (pipelines/runtime.py), to separate that effect.

    python benchmarks/extract_throughput.py [--images 2000] [--models mobilenet_v2,resnet18] [--device cpu]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from featscope.pipelines.core import device as device_mod
from featscope.pipelines.core import manifest
from featscope.pipelines.core.dataset import available_cores, default_workers, image_batches
from featscope.pipelines.core.features import extraction_model
from featscope.pipelines.core.models import Preprocessing, load_model
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.data.demo import PHOTOS, _package_file
from featscope.pipelines.stages import extract

LAYERS = {"mobilenet_v2": ("pool", "classifier.0"), "resnet18": ("pool", "avgpool")}


def make_photos(out: Path, n: int, seed: int = 0) -> None:
    """n JPEGs of about 500x375 (some portrait): random crops, flips and tints of real photos."""
    rng = np.random.default_rng(seed)
    sources = [Image.open(_package_file(p, r)).convert("RGB") for p, r in PHOTOS]
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((500, 375) if i % 4 else (375, 500))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tint = np.asarray(img, np.float32) * rng.uniform(0.8, 1.2, size=3)
        img = Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8))
        path = out / f"class{i % 4}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)


def model_only(model: torch.nn.Module, preprocessing: Preprocessing, n: int, batch: int, device: torch.device,
               precision: str) -> float:
    model = model.to(device).to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    dtype = device_mod.PRECISIONS[precision]
    batches = -(-n // batch)

    def step():
        inp = preprocessing.normalize(x).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=bool(dtype)):
            model(inp)

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        step()
    _sync(device)
    return batches * batch / (time.perf_counter() - start)


def decode_only(paths: list[str], batch: int, workers: int | None, preprocessing: Preprocessing) -> float:
    """img/s of featscope's decode phase alone: the batches `extract` feeds to the model, on
    every core and with no model between them (workers=0: inline, on one core)."""
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # the inline resize would otherwise use every core
    try:
        start = time.perf_counter()
        for _ in image_batches(list(range(len(paths))), paths, preprocessing, batch_size=batch, overlap=False,
                               workers=default_workers() if workers is None else workers):
            pass
        return len(paths) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def featscope_e2e(arch: str, images: Path, work: Path, batch: int, device: str, precision: str,
                  workers: int | None) -> float:
    rd = RunDir(work / f"run-{arch}-{time.monotonic_ns()}")
    n = manifest.run(rd, images, num_shards=1).total
    start = time.perf_counter()
    extract.extract(rd, [LAYERS[arch][0]], model=arch, weights="random", device=device, precision=precision,
                batch_size=batch, workers=workers, progress=False)
    return n / (time.perf_counter() - start)


def naive(arch: str, images: Path, batch: int, device: torch.device, limit: int | None = None) -> float:
    """As a tutorial writes it: ImageFolder, DataLoader, fp32, a forward hook, features to a list."""
    model = torchvision.models.get_model(arch, weights=None).eval().to(device)
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    dataset = torchvision.datasets.ImageFolder(str(images), transform=tf)
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(limit))
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=2)
    features = []
    handle = dict(model.named_modules())[LAYERS[arch][1]].register_forward_hook(
        lambda _m, _i, out: features.append(out.flatten(1).cpu().numpy()))
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x.to(device))
    handle.remove()
    return len(dataset) / (time.perf_counter() - start)


def naive_fresh_process(arch: str, images: Path, batch: int, device: torch.device) -> float:
    cmd = [sys.executable, __file__, "--naive-only", arch, "--dir", str(images), "--batch-size", str(batch),
           "--device", device.type]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="featscope, model-only and decode-only runs per model, interleaved; medians are compared")
    parser.add_argument("--workers", type=int, help="featscope decode workers (default: its own choice)")
    parser.add_argument("--naive-only", metavar="ARCH", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = device_mod.resolve_device(args.device)
    if args.naive_only:  # the fresh-process baseline
        naive(args.naive_only, args.dir, args.batch_size, device, limit=args.batch_size)
        print(naive(args.naive_only, args.dir, args.batch_size, device))
        return
    precision = device_mod.resolve_precision("auto", device)
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "photos"
        make_photos(images, args.images)
        paths = sorted(str(p) for p in images.rglob("*.jpg"))
        print(f"# {args.images} JPEG photos ~500x375, batch {args.batch_size}, {device.type} {precision}, "
              f"{torch.get_num_threads()} threads")
        for arch in args.models.split(","):
            featscope_e2e(arch, images, Path(tmp), args.batch_size, device.type, precision, args.workers)  # warm-up
            naive(arch, images, args.batch_size, device, limit=args.batch_size)  # warm-up
            loaded = load_model(arch, "random")
            specs = [loaded.layer(LAYERS[arch][0])]
            same_model = extraction_model(loaded, specs, device)
            folded_only = device_mod.inference_model(loaded, specs)  # before conv_fusion
            runs = {"ours": [], "alone": [], "folded": [], "shipped": [], "decode": [], "one_core": []}
            for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits them all alike
                runs["ours"].append(featscope_e2e(arch, images, Path(tmp), args.batch_size, device.type, precision,
                                                  args.workers))
                runs["alone"].append(model_only(same_model, loaded.preprocessing, args.images, args.batch_size,
                                                device, precision))
                runs["folded"].append(model_only(folded_only, loaded.preprocessing, args.images, args.batch_size,
                                                 device, precision))
                runs["shipped"].append(model_only(loaded.module, loaded.preprocessing, args.images, args.batch_size,
                                                  device, precision))
                runs["decode"].append(decode_only(paths, args.batch_size, args.workers, loaded.preprocessing))
                if device.type == "cpu":
                    runs["one_core"].append(decode_only(paths, args.batch_size, 0, loaded.preprocessing))
            ours, alone, folded, shipped, decode, one_core = (
                float(np.median(runs[k])) if runs[k] else 0.0
                for k in ("ours", "alone", "folded", "shipped", "decode", "one_core"))
            cores = available_cores()
            same_process = naive(arch, images, args.batch_size, device)
            fresh = naive_fresh_process(arch, images, args.batch_size, device)
            print(f"pipeline/model_only {arch} {device.type} {precision}: {ours / alone:.2f} "
                  f"(featscope {ours:.0f} img/s, the same model alone {alone:.0f} img/s)")
            print(f"fused/folded_only {arch} {device.type} {precision}: {alone / folded:.2f} "
                  f"(the model featscope runs {alone:.0f} img/s, batch norms folded but no conv fused with its "
                  f"clamp {folded:.0f} img/s)")
            print(f"pipeline/model_as_shipped {arch} {device.type} {precision}: {ours / shipped:.2f} "
                  f"(featscope {ours:.0f} img/s, torchvision's module without folded batch norms {shipped:.0f} img/s)")
            print(f"ceiling/model_only {arch} {device.type} {precision}: {1 / (1 + alone / decode):.2f} "
                  f"(decoding alone {decode:.0f} img/s, {1e3 / decode:.2f} ms/img; the model alone "
                  f"{1e3 / alone:.2f} ms/img)")
            if device.type == "cpu":
                print(f"ceiling_perfect_split/model_only {arch} {device.type} {precision}: "
                      f"{1 / (1 + alone / (one_core * cores)):.2f} (decoding on one core {1e3 / one_core:.2f} ms/img, "
                      f"split across {cores} cores with no loss {1e3 / (one_core * cores):.2f} ms/img)")
            print(f"pipeline/naive {arch} {device.type} {precision}: {ours / fresh:.2f} "
                  f"(featscope {ours:.0f} img/s, naive fp32 {fresh:.0f} img/s)")
            print(f"pipeline/naive_same_process {arch} {device.type} {precision}: {ours / same_process:.2f} "
                  f"(featscope {ours:.0f} img/s, naive fp32 with tuned allocator {same_process:.0f} img/s)")


if __name__ == "__main__":
    main()
