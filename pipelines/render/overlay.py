"""Heat-map overlays: a saliency map blended over its image, with a labelled colour scale.

Drawn with Pillow and a matplotlib colour table (no figure per image, so thousands of
overlays cost little). Maps that can be negative (occlusion: covering a window can raise
the score) use a diverging scale centred on zero; the others run from zero up to their
99th percentile, since gradient maps are heavy-tailed and a scale up to the single largest
pixel would leave almost all of the map invisible.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

BAR_HEIGHT = 28
_FONT = ImageFont.load_default()


def _lut(name: str) -> np.ndarray:
    return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _normalise(heat: np.ndarray, diverging: bool) -> tuple[np.ndarray, float, float]:
    """heat -> values in [0,1] and the (low, high) the scale's ends stand for."""
    finite = np.nan_to_num(heat.astype(np.float32))
    if diverging:
        extent = float(np.abs(finite).max()) or 1.0
        return (finite / extent + 1) / 2, -extent, extent
    low, high = 0.0, float(np.percentile(finite, 99)) or float(finite.max()) or 1.0
    return np.clip(finite / high, 0, 1), low, high


def heat_overlay(image: np.ndarray, heat: np.ndarray, *, diverging: bool = False, title: str = "",
                 alpha: float = 0.55, max_side: int = 512) -> Image.Image:
    """image (H,W,3) uint8 and heat (H,W) -> RGB picture: the blend above a colour scale."""
    picture = Image.fromarray(image)
    if max(picture.size) > max_side:
        scale = max_side / max(picture.size)
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))
    lut = _lut("RdBu_r" if diverging else "inferno")
    values, low, high = _normalise(heat, diverging)
    coloured = lut[(values * 255).round().astype(np.uint8)]
    weight = alpha if diverging else alpha * np.sqrt(values)[..., None]  # faint where nothing matters
    blend = (np.asarray(picture, np.float32) * (1 - weight) + coloured * weight).round().astype(np.uint8)
    return _with_scale(Image.fromarray(blend), lut, low, high, title, diverging)


def map_picture(heat: np.ndarray, *, diverging: bool = False, title: str = "", max_side: int = 512) -> Image.Image:
    """heat (H,W) -> the map on its own, as the papers show it: grey from 0 to its 99th
    percentile (gradient maps are heavy-tailed: a scale to the largest pixel would leave them
    black), or a diverging blue-white-red scale centred on 0 for signed maps; with the scale."""
    heat = np.nan_to_num(heat.astype(np.float32))
    if max(heat.shape) > max_side:
        scale = max_side / max(heat.shape)
        size = (max(1, round(heat.shape[1] * scale)), max(1, round(heat.shape[0] * scale)))
        heat = np.asarray(Image.fromarray(heat).resize(size, Image.Resampling.BILINEAR))
    if diverging:
        extent = float(np.percentile(np.abs(heat), 99)) or float(np.abs(heat).max()) or 1.0
        values, low, high, lut = (np.clip(heat / extent, -1, 1) + 1) / 2, -extent, extent, _lut("RdBu_r")
    else:
        values, low, high = _normalise(heat, False)
        lut = _lut("gray")
    coloured = lut[(values * 255).round().astype(np.uint8)]
    return _with_scale(Image.fromarray(coloured), lut, low, high, title, diverging, robust=True)


def _with_scale(picture: Image.Image, lut: np.ndarray, low: float, high: float, title: str, diverging: bool,
                robust: bool = False) -> Image.Image:
    """The picture above its colour scale, the scale's ends and the title written beneath."""
    width, height = picture.size
    canvas = Image.new("RGB", (width, height + BAR_HEIGHT), "white")
    canvas.paste(picture, (0, 0))
    bar = lut[np.linspace(0, 255, max(width - 8, 1)).astype(np.uint8)][None].repeat(8, axis=0)
    canvas.paste(Image.fromarray(bar), (4, height + 3))
    draw = ImageDraw.Draw(canvas)
    left = f"{low:.3g}"
    right = f"{high:.3g}" + (" (p99)" if robust or not diverging else "")
    draw.text((4, height + 13), left, fill="black", font=_FONT)
    draw.text((width - 4 - draw.textlength(right, font=_FONT), height + 13), right, fill="black", font=_FONT)
    room = width - 24 - draw.textlength(left, font=_FONT) - 2 * draw.textlength(right, font=_FONT)
    if title and draw.textlength(title, font=_FONT) > room:
        title = title.split(" · ")[0]  # narrow picture: the method only
    if title and draw.textlength(title, font=_FONT) <= room:
        draw.text(((width - draw.textlength(title, font=_FONT)) / 2, height + 13), title, fill="black", font=_FONT)
    return canvas
