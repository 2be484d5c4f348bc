"""Thumbnails of a run's images, made once and shared: the report shows them, and the
mosaics are drawn from them, so a rerun decodes only the new images' files (a 128-px JPEG
decodes in a fraction of the time of a full-size photo) and every mosaic of the same map is
drawn from the same pixels whatever the run's history."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from featscope.pipelines.core.atomic import atomic_path
from featscope.pipelines.core.images import BadImage, open_image
from featscope.pipelines.core.rundir import RunDir

THUMB = 128  # longest side
PLACEHOLDER = (90, 90, 90)  # the report's square for an image that cannot be read


def make_thumbnail(rd: RunDir, image_id: int, path: str, at_least: int = THUMB) -> Image.Image | None:
    """The image's thumbnail (its longest side THUMB px), made and stored if missing; None if
    the image cannot be read (the report then stores a grey square in its place). A stored
    one is decoded at the smallest JPEG scale whose sides stay >= `at_least` (a 22-px mosaic
    tile needs an eighth of the pixels)."""
    out = rd.thumbnail(image_id)
    stored = _stored(out, at_least)
    if stored is not None:
        return stored
    try:
        img = ImageOps.contain(open_image(path, min_size=THUMB), (THUMB, THUMB))
    except BadImage:
        return None
    with atomic_path(out) as tmp:
        img.save(tmp, format="JPEG", quality=82)
    return img


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


def ensure_thumbnail(rd: RunDir, image_id: int, path: str) -> bool:
    """Make the thumbnail if missing (a grey square for an unreadable image); True if made."""
    out = rd.thumbnail(image_id)
    if out.exists():
        return False
    if make_thumbnail(rd, image_id, path) is None:
        with atomic_path(out) as tmp:
            Image.new("RGB", (THUMB, THUMB), PLACEHOLDER).save(tmp, format="JPEG", quality=82)
    return True


def square_tiles(rd: RunDir, items: list[tuple[int, str, int]], threads: int = 4) -> list[Image.Image | None]:
    """For each (image_id, path, side): the thumbnail centre-cropped to a side x side square
    (None if unreadable), loaded on `threads` threads."""
    def tile(item: tuple[int, str, int]) -> Image.Image | None:
        image_id, path, side = item
        thumb = make_thumbnail(rd, image_id, path, at_least=side)
        return None if thumb is None else ImageOps.fit(thumb, (side, side))

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(tile, items))
