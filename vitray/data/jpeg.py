"""Decode only what a training crop needs, for JPEGs: libjpeg-turbo's DCT-domain scaling (through `simplejpeg`).

A training crop is resized to the model's input (224 px), so a crop much larger than that was decoded at full
resolution only to be shrunk. libjpeg-turbo can decode at 1/2, 1/4 or 1/8 of the size in the DCT domain, for a
fraction of the work: the crop is chosen from the header first (`transforms.crop_box`, the same draws as before),
then the image is decoded at the smallest scale at which the crop still has at least the output's pixels, and the
crop is resized from there. The paper's pipeline did the same kind of thing (TensorFlow's `decode_and_crop_jpeg`).

Only what the scaled decode reproduces takes this path: YCbCr or grayscale JPEGs without an EXIF rotation.
Everything else (PNG, CMYK, rotated photos, broken files) goes through Pillow as before (`decode_rgb`).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def scalable_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the scaled decode handles; None for anything else."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        import simplejpeg  # noqa: F401
    except ImportError:  # an optional speed-up: Pillow decodes everything without it
        return None
    try:
        img = Image.open(io.BytesIO(data))  # the header only: no pixel is decoded here
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.getexif().get(0x0112, 1) != 1:
            return None
        return img.size
    except Exception:  # unreadable: Pillow's path names the sample and the reason
        return None


def decode_crop(data: bytes, wh: tuple[int, int], box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The crop `box` = (x, y, width, height) of a w×h JPEG (full-resolution pixels), as size×size×3 uint8 RGB:
    decoded at the smallest 1/k (k = 1, 2, 4, 8) at which the crop keeps at least size pixels each way, then
    resized (bilinear)."""
    import simplejpeg

    from vitray.data.resize import resize_crop

    (w, h), (x, y, cw, ch) = wh, box
    k = 1
    while k < 8 and min(cw, ch) >= 2 * k * size:
        k *= 2
    # libjpeg scales to ceil(w / k) × ceil(h / k); ask for at least that, and it picks exactly 1/k.
    pixels = simplejpeg.decode_jpeg(data, colorspace="rgb", min_width=-(-w // k), min_height=-(-h // k))
    sx, sy = pixels.shape[1] / w, pixels.shape[0] / h  # the exact scale it took
    return resize_crop(pixels, (x * sx, y * sy, (x + cw) * sx, (y + ch) * sy), size)
