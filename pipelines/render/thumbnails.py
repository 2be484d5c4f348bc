"""Thumbnails of a run's images, made once and shared: the report shows them, and the
mosaics are drawn from them, so a rerun decodes only the new images' files (a 128-px JPEG
decodes in a fraction of the time of a full-size photo) and every mosaic of the same map is
drawn from the same pixels whatever the run's history."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featscope.pipelines.core.atomic import atomic_path
from featscope.pipelines.core.images import BadImage, Unreadable, open_image
from featscope.pipelines.core.rundir import RunDir

THUMB = 128  # longest side
PLACEHOLDER = (90, 90, 90)  # the report's square for an image that cannot be read


def _grey_mark(thumbnail: Path) -> Path:
    """Beside a grey square stored for an image that could not be read: it is not the image's
    thumbnail, and the image is read again next time (it may have been away for a while)."""
    return thumbnail.with_suffix(".unreadable")


def make_thumbnail(rd: RunDir, image_id: int, path: str, at_least: int = THUMB) -> Image.Image | None:
    """The image's thumbnail (its longest side THUMB px), made and stored if missing; None if
    the image cannot be read now (the report then stores a grey square in its place, marked
    as one, and reads the image again next time). Bytes that do not decode get a grey square
    for good, unmarked: an id keeps its bytes (an edited file gets a new id), so reading them
    again would fail again, and every workflow run would build the report anew to try. A
    stored one is decoded at the smallest JPEG scale whose sides stay >= `at_least` (a 22-px
    mosaic tile needs an eighth of the pixels)."""
    out = rd.thumbnail(image_id)
    mark = _grey_mark(out)
    stored = None if mark.exists() else _stored(out, at_least)
    if stored is not None:
        return stored
    try:
        img = ImageOps.contain(open_image(path, min_size=THUMB), (THUMB, THUMB))
    except Unreadable:
        return None
    except BadImage:
        img = Image.new("RGB", (THUMB, THUMB), PLACEHOLDER)
    with atomic_path(out) as tmp:
        img.save(tmp, format="JPEG", quality=82)
    mark.unlink(missing_ok=True)  # after the thumbnail: a stop in between only reads the image again
    return _stored(out, at_least) or img  # the stored pixels: every later drawing decodes those


def _stored(path: Path, at_least: int) -> Image.Image | None:
    """The stored thumbnail at `path`, decoded no larger than needed; None if it is missing or
    cannot be read (then it is made again from the image)."""
    if not path.exists():
        return None
    try:
        with Image.open(path) as stored:
            stored.draft("RGB", (at_least, at_least))
            return stored.convert("RGB")
    except OSError:
        return None


def stored_thumbnails(rd: RunDir) -> tuple[set[int], set[int]]:
    """The ids whose thumbnails are stored, and of those the ones stored as grey squares of
    an image that could not be read (one directory listing per 1,000 images, instead of a
    file lookup per image)."""
    found: set[int] = set()
    grey: set[int] = set()
    if not rd.thumbnails_dir.is_dir():
        return found, grey
    for folder in os.scandir(rd.thumbnails_dir):
        if folder.is_dir():
            for entry in os.scandir(folder.path):
                stem, _, suffix = entry.name.rpartition(".")
                if stem.isdigit() and suffix in ("jpg", "unreadable"):
                    (found if suffix == "jpg" else grey).add(int(stem))
    return found, grey & found


def is_grey(rd: RunDir, image_id: int) -> bool:
    """Whether the image's stored thumbnail is a grey square (it could not be read)."""
    return _grey_mark(rd.thumbnail(image_id)).exists()


def ensure_thumbnail(rd: RunDir, image_id: int, path: str) -> bool:
    """Make the thumbnail if missing or a grey square (an image that could not be read is
    read again; while it cannot be, the page shows a grey square); True if made."""
    out = rd.thumbnail(image_id)
    mark = _grey_mark(out)
    if out.exists() and not mark.exists():
        return False
    if make_thumbnail(rd, image_id, path) is not None:
        return True
    if out.exists():
        return False  # still unreadable: the grey square stays, marked
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.touch()  # first: a grey square is never left without its mark
    with atomic_path(out) as tmp:
        Image.new("RGB", (THUMB, THUMB), PLACEHOLDER).save(tmp, format="JPEG", quality=82)
    return True


def square_tiles(rd: RunDir, items: list[tuple[int, str, int]], threads: int = 4,
                 keep_as: str | None = None) -> list[Image.Image | None]:
    """For each (image_id, path, side): the thumbnail centre-cropped to a side x side square
    (None if unreadable), loaded on `threads` threads.

    With `keep_as`, the tiles are also kept in one file (thumbs/tiles-<keep_as>.npz) for the
    next call, which then decodes only the images it has not seen: a rerun's 20,000-image
    scatter plot reads one 50 MB array instead of 20,000 JPEGs (8 s). An image id never
    changes its pixels (an edited file gets a new id), so a kept tile never goes stale; the
    file keeps exactly this call's tiles, so retired images leave it."""
    def tile(item: tuple[int, str, int]) -> Image.Image | None:
        image_id, path, side = item
        thumb = make_thumbnail(rd, image_id, path, at_least=side)
        return None if thumb is None else ImageOps.fit(thumb, (side, side))

    store = rd.thumbnail_tiles(keep_as) if keep_as else None
    kept = _kept_tiles(store) if store else {}
    out: list[Image.Image | None] = [None] * len(items)
    missing = []
    for n, (image_id, _, side) in enumerate(items):
        found = kept.get(side, {}).get(image_id)
        if found is None:
            missing.append(n)
        else:
            out[n] = Image.fromarray(found)
    with ThreadPoolExecutor(threads) as pool:
        for n, made in zip(missing, pool.map(tile, [items[n] for n in missing])):
            out[n] = made
    if store and (missing or len(items) != sum(len(by_id) for by_id in kept.values())):
        _keep_tiles(store, items, out)
    return out


def _kept_tiles(path: Path) -> dict[int, dict[int, np.ndarray]]:
    """side -> image_id -> tile pixels, from a file `square_tiles` kept ({} if missing or unreadable)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {int(key.split("_")[1]): dict(zip(stored[key].tolist(), stored[f"tiles_{key.split('_')[1]}"]))
                    for key in stored.files if key.startswith("ids_")}
    except (OSError, ValueError, KeyError):
        return {}


def _keep_tiles(path: Path, items: list[tuple[int, str, int]], tiles: list[Image.Image | None]) -> None:
    by_side: dict[int, dict[int, np.ndarray]] = {}
    for (image_id, _, side), made in zip(items, tiles):
        if made is not None:
            by_side.setdefault(side, {})[image_id] = np.asarray(made.convert("RGB"))
    arrays = {}
    for side, by_id in by_side.items():
        arrays[f"ids_{side}"] = np.fromiter(by_id, np.int64, len(by_id))
        arrays[f"tiles_{side}"] = np.stack(list(by_id.values()))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
