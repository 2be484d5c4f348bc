"""Picture composition for the toolbox: tensors to images, captioned panels, curves.

Small Pillow helpers shared by every `featscope viz` method, so each gallery has the same
look: white background, a caption under each picture, a title line on top.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

GAP = (70, 90, 140)  # the colour between tiles: apart from every grey level
MARGIN = 8
LINE = 14
_FONT = ImageFont.load_default(size=11)
_TITLE = ImageFont.load_default(size=13)


def to_image(x: torch.Tensor) -> Image.Image:
    """(3,H,W) or (1,H,W) in [0,1], NaN for gaps -> RGB image."""
    x = x.detach().float().cpu()
    gaps = torch.isnan(x).any(0)
    x = x.nan_to_num(0).clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    rgb = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    rgb[gaps.numpy()] = GAP
    return Image.fromarray(rgb)


def enlarge(img: Image.Image, side: int) -> Image.Image:
    """Scale up by the largest whole factor (nearest) that keeps the longer side <= side."""
    factor = max(1, side // max(1, max(img.size)))
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST) if factor > 1 else img


def _text_height(lines: list[str]) -> int:
    return LINE * len(lines)


def panel(pictures: list[Image.Image], captions: list[str], title: str = "") -> Image.Image:
    """Pictures side by side, each with its caption (lines split at '\\n') beneath, and a title."""
    caption_lines = [c.split("\n") for c in captions]
    text_h = max((_text_height(lines) for lines in caption_lines), default=0)
    title_h = LINE + 6 if title else 0
    width = MARGIN + sum(p.width + MARGIN for p in pictures)
    if title:
        width = max(width, int(2 * MARGIN + ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=_TITLE)))
    height = title_h + MARGIN + max(p.height for p in pictures) + 4 + text_h + MARGIN
    canvas = Image.new("RGB", (max(width, 200), height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((MARGIN, 4), title, fill="black", font=_TITLE)
    x = MARGIN
    for picture, lines in zip(pictures, caption_lines):
        canvas.paste(picture, (x, title_h + MARGIN))
        for k, line in enumerate(lines):
            draw.text((x, title_h + MARGIN + picture.height + 4 + k * LINE), line, fill="black", font=_FONT)
        x += picture.width + MARGIN
    return canvas


def stack(panels: list[Image.Image]) -> Image.Image:
    """Panels one under another, left-aligned."""
    width = max(p.width for p in panels)
    canvas = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for p in panels:
        canvas.paste(p, (0, y))
        y += p.height
    return canvas


def curves(series: dict[str, list[float]], *, xlabel: str, ylabel: str, title: str,
           size: tuple[float, float] = (5, 3), log: bool = False) -> Image.Image:
    """A small line plot (matplotlib, Agg) of named series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    for name, values in series.items():
        ax.plot(range(len(values)), values, label=name)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
