"""Unsupervised segmentation from a saliency map: OpenCV's GrabCut seeded by percentiles.

Pixels above the `foreground` percentile of the map are sure foreground, those below the
`background` percentile sure background, the rest probable foreground or background by the
map's median; GrabCut's colour models then decide the uncertain pixels (Simonyan et al.,
2014, section 3.2, used GrabCut the same way for weakly supervised localisation).
"""

from __future__ import annotations

import cv2
import numpy as np

from featscope.kernels.errors import FeatscopeError


def grabcut_mask(image: np.ndarray, saliency: np.ndarray, *, foreground: float = 95.0, background: float = 30.0,
                 iterations: int = 5) -> np.ndarray:
    """image (H,W,3) uint8 RGB, saliency (H,W) -> (H,W) bool foreground mask."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise FeatscopeError(f"GrabCut needs an (H,W,3) uint8 RGB image, got {image.shape} {image.dtype}")
    if saliency.shape != image.shape[:2]:
        raise FeatscopeError(f"saliency map {saliency.shape} does not match the image {image.shape[:2]}")
    if not 0 <= background < foreground <= 100:
        raise FeatscopeError(f"need 0 <= background < foreground <= 100 percentiles, got {background}, {foreground}")
    values = np.nan_to_num(saliency.astype(np.float32), nan=float(np.nanmin(saliency)))
    high, low, middle = np.percentile(values, [foreground, background, 50.0])
    mask = np.where(values > middle, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    mask[values <= low] = cv2.GC_BGD
    mask[values >= high] = cv2.GC_FGD
    if not (mask == cv2.GC_FGD).any() or not (mask == cv2.GC_BGD).any():
        return values >= high  # a flat map seeds no model; GrabCut would raise
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    background_model, foreground_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(bgr, mask, None, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
