"""Where on an image a unit fires: NetDissect's activation mask, drawn on the original image.

Bau et al. 2017 ("Network Dissection") upsample a unit's activation map to the input
(bilinear) and keep the cells above a dataset-wide quantile of that unit (its top 0.5%).
For deep layers this says far more than the theoretical receptive field, which can cover
the whole image. Here the mask is computed at the model's input (the centre crop), mapped
back through the crop and resize to the original image, and drawn there: outside the mask
dimmed, its outline in yellow, the patch cropped around the masked region.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, ImageFilter, ImageOps

OUTLINE = (255, 214, 0)


def input_masks(maps: torch.Tensor, thresholds: torch.Tensor, side: int) -> torch.Tensor:
    """(N, h, w) activation maps, (N,) thresholds -> (N, side, side) bool masks at the model
    input: each map upsampled bilinearly (align_corners=False, as NetDissect) and thresholded."""
    up = F.interpolate(maps[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return up > thresholds.view(-1, 1, 1).to(up.dtype)


def original_mask(mask: np.ndarray, crop_box: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
    """A (side, side) mask at the model input -> an 'L' mask of the original image's `size`,
    placed on `crop_box` (the centre crop's region of the original, inclusive)."""
    x0, y0, x1, y1 = crop_box
    small = Image.fromarray(mask.astype(np.uint8) * 255)
    full = Image.new("L", size, 0)
    full.paste(small.resize((x1 - x0 + 1, y1 - y0 + 1), Image.Resampling.NEAREST), (x0, y0))
    return full


def masked_patch(image: Image.Image, mask: Image.Image, tile: int, margin: float = 0.15) -> Image.Image | None:
    """The image around its masked region (with a margin), dimmed outside the mask and the
    mask outlined, padded to tile x tile; None when the mask is empty."""
    box = mask.getbbox()
    if box is None:
        return None
    x0, y0, x1, y1 = box
    pad_x, pad_y = int((x1 - x0) * margin) + 2, int((y1 - y0) * margin) + 2
    crop = (max(0, x0 - pad_x), max(0, y0 - pad_y), min(image.width, x1 + pad_x), min(image.height, y1 + pad_y))
    part, inside = image.crop(crop), mask.crop(crop)
    scale = tile / max(part.size)
    size = (max(1, round(part.width * scale)), max(1, round(part.height * scale)))
    part, inside = part.resize(size, Image.Resampling.BILINEAR), inside.resize(size, Image.Resampling.NEAREST)
    dim = Image.blend(part, Image.new("RGB", part.size, (20, 20, 20)), 0.6)
    drawn = Image.composite(part, dim, inside)
    edge = ImageChops.subtract(inside.filter(ImageFilter.MaxFilter(3)), inside)
    drawn.paste(Image.new("RGB", part.size, OUTLINE), (0, 0), edge)
    return ImageOps.pad(drawn, (tile, tile), color=(255, 255, 255))
