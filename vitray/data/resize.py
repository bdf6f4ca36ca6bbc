"""The resize of every training crop: bilinear, as in the paper's input pipeline.

The paper's TensorFlow pipeline (big_vision's `inception_crop`) resizes the crop with `tf.image.resize`: bilinear,
half-pixel centres, no antialiasing. OpenCV's `INTER_LINEAR` is the same filter and runs ~10× faster than Pillow's
bicubic resize did here (0.13 ms against 1.24 ms for an ImageNet-sized crop to 224 px, one core), which made the
resize cost more than the JPEG decode itself. Without antialiasing, bilinear aliases when it shrinks by 2× or more;
a JPEG crop never does (`jpeg.decode_crop` decodes at the DCT scale that leaves it under 2×), and other images that
do are area-averaged instead (`INTER_AREA`), what bilinear would give with antialiasing.
"""
from __future__ import annotations

import cv2
import numpy as np

cv2.setNumThreads(1)  # one Ray Data task per CPU already: OpenCV's own thread pool would only oversubscribe it


def snap(box: tuple[float, float, float, float], w: int, h: int) -> tuple[int, int, int, int]:
    """The crop box = (x0, y0, x1, y1) on a w×h image snapped to whole pixels inside it, never empty."""
    x0, y0 = min(int(round(box[0])), w - 1), min(int(round(box[1])), h - 1)
    x1, y1 = max(int(round(box[2])), x0 + 1), max(int(round(box[3])), y0 + 1)
    return x0, y0, min(x1, w), min(y1, h)


def resize(crop: np.ndarray, size: int) -> np.ndarray:
    """A crop (H×W×3 uint8) as size×size×3."""
    shrink = min(crop.shape[0], crop.shape[1]) / size
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR)


def resize_crop(pixels: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The crop box = (x0, y0, x1, y1) of an H×W×3 uint8 image, snapped to whole pixels, as size×size×3."""
    x0, y0, x1, y1 = snap(box, pixels.shape[1], pixels.shape[0])
    return resize(pixels[y0:y1, x0:x1], size)


def mirror(pixels: np.ndarray) -> np.ndarray:
    """Left-right flip, contiguous: OpenCV's copies ~10× faster than numpy's copy of a reversed view."""
    return cv2.flip(pixels, 1)
