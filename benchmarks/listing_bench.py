"""Listing an image folder: featscope's `manifest.scan` against `os.walk` with a stat of each
image name (`os.path.isfile`), the way featscope listed folders before and the way most
scripts do.

Both run every scheduled workflow invocation (the listing fingerprint) and every manifest
update. `scan` tells files, folders and links apart by the folder listing's file types, so a
plain file costs no stat (the manifest stats each image once, later), while `os.walk` +
`isfile` stats every image. Files are empty: this measures the listing, not the reading.

    python benchmarks/listing_bench.py [--folders 50] [--per-folder 1000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from featscope.pipelines.core.images import is_image_name
from featscope.pipelines.core.manifest import scan


def walk_and_stat(source: Path) -> list[str]:
    """The baseline: every image name under `source`, each checked with a stat."""
    found = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        dirnames.sort()
        found += [p for name in filenames if is_image_name(name) and os.path.isfile(p := os.path.join(dirpath, name))]
    return sorted(found)


def make(root: Path, folders: int, per_folder: int) -> None:
    """`folders` label folders of `per_folder` empty PNGs, and an annotation file for every
    other image (non-image files are listed too, and skipped)."""
    for f in range(folders):
        folder = root / f"label{f:03d}"
        folder.mkdir(parents=True)
        for i in range(per_folder):
            (folder / f"{i:06d}.png").touch()
            if i % 2 == 0:
                (folder / f"{i:06d}.xml").touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=50)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        make(root, args.folders, args.per_folder)
        times: dict[str, list[float]] = {"featscope scan": [], "os.walk + isfile": []}
        for _ in range(args.repeats):  # interleaved, so both see the same page cache and load
            for name, listing in (("featscope scan", lambda: [p for p, _ in scan(root)]),
                                  ("os.walk + isfile", lambda: walk_and_stat(root))):
                start = time.perf_counter()
                found = listing()
                times[name].append(time.perf_counter() - start)
                assert len(found) == args.folders * args.per_folder, (name, len(found))
        images = args.folders * args.per_folder
        ours, theirs = (statistics.median(times[k]) for k in times)
        print(f"{images:,} images (+{images // 2:,} other files) in {args.folders} folders, median of {args.repeats}:")
        for name, seconds in (("featscope scan", ours), ("os.walk + isfile", theirs)):
            print(f"  {name:18s} {seconds:6.3f} s  {images / seconds:10,.0f} files/s")
        print(f"listing/scan_vs_walk_isfile {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
