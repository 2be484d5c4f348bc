"""The one image loader every stage that reads pixels goes through.

It turns any file into an upright RGB image (a PIL image, or a uint8 tensor for the model)
or raises `BadImage` with a reason fit for errors.parquet: empty, not an image, truncated,
larger than the decompression-bomb limit. Odd modes (grayscale, 16-bit, CMYK, palette,
alpha) are converted, never rejected; EXIF orientation is applied.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported where tensors are made: a manifest never needs it
    import torch

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
MAX_SIDE = 4096  # the largest side of an image a command makes (class models, textures, stylised images):
# optimised at full resolution, a larger one only runs the machine out of memory
_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as viewers do


class BadImage(Exception):
    """A file that cannot be read as an image; `str(e)` is the reason."""


class Unreadable(BadImage):
    """A file whose bytes could not be read (gone since it was listed, permissions, an I/O
    error): unlike bytes that do not decode, reading it again may work."""


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _read(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise Unreadable(f"unreadable: {e.strerror}") from None
    if not data:
        raise BadImage("empty file (0 bytes)")
    return data


def _decode(data: bytes, max_pixels: int, min_size: int | None, *, tensor: bool) -> Image.Image | torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImage(f"too large: {width}x{height} pixels is over the limit of {max_pixels}")
                if img.format == "JPEG":
                    # DCT scaling (`draft`) pays off only for JPEGs at least twice min_size;
                    # the others go to torchvision's libjpeg-turbo decoder, which with the
                    # tensor resize measured 2.2x faster than Pillow's decode + resize here.
                    scaled = min_size is not None and min(width, height) >= 2 * min_size
                    if tensor and not scaled and img.mode in ("RGB", "L", "CMYK"):
                        import torch
                        from torchvision.io import ImageReadMode, decode_jpeg

                        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                           mode=ImageReadMode.RGB, apply_exif_orientation=True)
                    if scaled:
                        img.draft(None, (min_size, min_size))
                elif tensor and img.format == "PNG" and img.mode in ("RGB", "L") and "transparency" not in img.info \
                        and b"eXIf" not in _png_chunk_types(data):
                    # opaque 8-bit colour or grey with no EXIF chunk (an orientation could be in
                    # it; Pillow's getexif would decode the whole image to look after the pixel
                    # data): torchvision's libpng decoder gives Pillow's pixels, 15% faster
                    pixels = _png_pixels(data)
                    if pixels is not None:
                        return pixels
                img.load()
                rgb = to_rgb(ImageOps.exif_transpose(img))
                if tensor:
                    from torchvision.transforms import functional as TF

                    return TF.pil_to_tensor(rgb)
                return rgb
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"too large: {e}") from None
        except UnidentifiedImageError:
            raise BadImage("not an image (unrecognised file format)") from None
        except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as e:
            raise BadImage(f"cannot decode: {str(e).splitlines()[-1].split(', ')[-1]}") from None


def _png_chunk_types(data: bytes) -> set[bytes]:
    """The types of a PNG's chunks, from their headers alone, up to IEND; {b"eXIf"} (as if it
    had one) where its chunks do not add up, which Pillow then reads or explains. Walking the
    headers holds the GIL for 3-24 us on the demo PNGs; searching the whole file for b"eXIf"
    took 0.24-0.72 ms, which the query service's other threads waited through."""
    types, position = set(), 8  # after the signature
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        types.add(kind)
        if kind == b"IEND":
            return types
        position += 12 + length  # length, type, data, CRC
    return {b"eXIf"}


def _png_pixels(data: bytes) -> torch.Tensor | None:
    """(3,H,W) uint8 by torchvision's PNG decoder, or None for a 16-bit PNG (Pillow scales those)
    or one it cannot decode (Pillow then reads it, or says why not).
    Laid out as Pillow's pixels are (channels last in memory), which the resize after it takes
    its fast path on: 7.6 ms a demo photo decoded and resized, against 8.9 through Pillow."""
    import torch
    from torchvision.io import ImageReadMode, decode_png

    try:
        pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # whatever libpng refuses, Pillow reads or explains
        return None
    if pixels.dtype != torch.uint8:
        return None
    return pixels.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def open_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> Image.Image:
    """Open `path` as an upright RGB PIL image.

    min_size: the smallest side length the caller needs; JPEGs are then decoded with DCT
    scaling (`draft`) to the smallest scale that still has both sides >= min_size.
    """
    return _decode(_read(path), max_pixels, min_size, tensor=False)


def read_pixels(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> torch.Tensor:
    """`open_image` as a (3,H,W) uint8 tensor, by the fastest decoder for the file."""
    return _decode(_read(path), max_pixels, min_size, tensor=True)


def decode_pixels(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> torch.Tensor:
    """`read_pixels` for bytes already in memory (an upload)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    return _decode(data, max_pixels, min_size, tensor=True)


_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the upright image, from the header alone."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112) in _SWAPS_SIDES:
                width, height = height, width
            return width, height
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot read header: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling high bit depths and flattening alpha."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0
        gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")
