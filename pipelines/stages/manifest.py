"""Stage `manifest`: list a dataset's images with stable ids and shards (see `core.manifest`).

Rerun it as the dataset grows: new images get new ids in new shards; vanished ones are
marked removed, never renumbered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featscope.pipelines.core import manifest
from featscope.pipelines.core.options import Command, Group, Options, option
from featscope.pipelines.core.rundir import RunDir


@dataclass(frozen=True)
class ManifestOptions(Options):
    images: str = option(help="image folder (label subfolders or flat), text list of paths, or Parquet/CSV with "
                              "a 'path' (and optional 'label') column", required=True)
    num_shards: int | None = option(help="split the new images into N shards", min=1)
    shard_size: int | None = option(help="images per shard (default 1000, or the run's)", min=1)
    model: str | None = option(help="record the run's architecture (extract then uses it)")
    weights: str | None = option(help="record the run's weights: imagenet | random | checkpoint path (a "
                                      "state dict; the number of classes is read from it)")
    classes: Path | None = option(help="the model's class names, one per line or a JSON list (for a model of "
                                       "your own; ImageNet weights have theirs)")
    check: str = option("stat", choices=manifest.CHECKS,
                        help="how a listed file's edit is told: stat (size, mtime and ctime; a file whose stat moved "
                             "is read and hashed), mtime (size and mtime only: for filesystems whose ctime moves on "
                             "its own) or content (every file read and hashed: slow, catches anything)")
    allow_empty: bool = option(False, help="retire the run's images when the source lists none, or those of a "
                                           "folder that is empty now, or make a new run of no images (otherwise "
                                           "refused: a folder whose file system is not mounted looks empty)")


def run(rd: RunDir, options: ManifestOptions, progress: bool = True) -> manifest.ManifestSummary:
    recorded = rd.read_config() if rd.run_json.exists() else {}
    names = None
    # The checks import torch (3-4 s): a scheduled rerun naming the model and weights the run
    # already records (checked when they were recorded) skips them. (A weights file deleted
    # since is named by the extraction that needs it.)
    if options.model not in (None, recorded.get("model")) or options.classes or (
            options.weights not in (None, recorded.get("weights"))):
        from featscope.pipelines.core.models import check_arch, check_checkpoint, check_weights, read_class_names

        if options.model is not None:
            check_arch(options.model)
        if options.weights is not None:
            check_weights(options.weights)
            arch = options.model or recorded.get("model")
            if arch and options.weights not in ("imagenet", "random"):
                check_checkpoint(arch, options.weights)  # a file that is no state dict of it, or holds NaN
        names = read_class_names(options.classes) if options.classes else None
    summary = manifest.run(rd, options.images, num_shards=options.num_shards, shard_size=options.shard_size,
                           model=options.model, weights=options.weights, check=options.check,
                           allow_empty=options.allow_empty, progress=progress)
    if names:
        with rd.editing_config() as config:
            config["class_names"] = names
    return summary


COMMANDS = [
    Command("manifest", ManifestOptions, run, help="list a dataset's images with stable ids and shards",
            description=__doc__.split("\n\n")[1].replace("\n", " "),
            groups=(Group(("num_shards", "shard_size")),)),
]
