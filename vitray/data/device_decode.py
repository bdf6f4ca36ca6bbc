"""`data.decode_on=gpu`: JPEGs travel to the training worker still encoded and are decoded on its accelerator.

At ~4,000 img/s per H100 for ViT-B/16 (more for B/32), decoding on CPUs needs more cores than a GPU node has
(`jobs/plan.py` says how many). With this option the Ray Data tasks only parse the shard and draw each sample's
crop and flip from the JPEG header (the same draws as the CPU path), and ship the JPEG's bytes; the worker decodes
the batch with nvJPEG (`torchvision.io.decode_jpeg(device="cuda")`), crops, resizes bilinearly and flips it there.
Whatever nvJPEG does not take (PNG, CMYK, EXIF-rotated JPEGs) is decoded on the CPU as before and travels as the
crop's pixels.

On a CPU worker the same code runs as its reference path: the JPEG is decoded by libjpeg-turbo (simplejpeg) at
full size, then cropped and resized by the same torch code. As on the CPU path, a crop 2× the output or more is
first averaged over k×k blocks (there the DCT-scaled decode does it), then resized bilinearly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the worker-side functions only: every Ray Data decode task imports this module for
# `ship`, and torch would cost each of those processes ~2.5 CPU-seconds and ~300 MB before its first image.

RAW, JPEG = 0, 1  # what a sample's "encoded" bytes hold: the crop's uint8 pixels, or the whole JPEG file


def ship(data: bytes, box: tuple[int, int, int, int], flip: bool) -> dict:
    """One JPEG sample as it travels: its bytes, crop (x, y, width, height) and flip."""
    return {"encoded": data, "kind": JPEG, "box": box, "flip": flip}


def ship_pixels(pixels: np.ndarray) -> dict:
    """One sample the CPU already decoded and augmented (size×size×3 uint8)."""
    return {"encoded": np.ascontiguousarray(pixels).tobytes(), "kind": RAW, "box": (0, 0, 0, 0), "flip": False}


def decode_batch(batch: dict[str, np.ndarray], size: int, device: torch.device) -> torch.Tensor:
    """A shipped batch → uint8 (B, size, size, 3) on `device`."""
    import torch
    import torch.nn.functional as F

    encoded, kinds, boxes, flips = batch["encoded"], batch["kind"], batch["box"], batch["flip"]
    out = torch.empty((len(encoded), size, size, 3), dtype=torch.uint8, device=device)
    jpegs = [i for i, k in enumerate(kinds) if k == JPEG]
    for i, image in zip(jpegs, _decode_jpegs([encoded[i] for i in jpegs], device)):
        x, y, w, h = (int(v) for v in boxes[i])
        k = 1  # as the CPU path: average k×k blocks (what its DCT-scaled decode does), then bilinear (`resize.py`)
        while k < 8 and min(w, h) >= 2 * k * size:
            k *= 2
        # The crop snapped to the k-grid of the whole image, where the CPU path's scaled pixels lie (libjpeg scales
        # a W×H image to ceil(W/k)×ceil(H/k), hence these factors, not exactly 1/k).
        sx, sy = -(-image.shape[2] // k) / image.shape[2], -(-image.shape[1] // k) / image.shape[1]
        x0, y0 = round(x * sx), round(y * sy)
        x1, y1 = max(round((x + w) * sx), x0 + 1), max(round((y + h) * sy), y0 + 1)
        crop = image[:, y0 * k:y1 * k, x0 * k:x1 * k].unsqueeze(0).float()
        if k > 1:
            crop = F.avg_pool2d(crop, k, ceil_mode=True)
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        pixels = resized.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
        out[i] = pixels.flip(1) if flips[i] else pixels
    for i in (i for i, k in enumerate(kinds) if k == RAW):
        out[i] = torch.from_numpy(np.frombuffer(encoded[i], np.uint8).reshape(size, size, 3).copy()).to(device)
    return out


def _decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """uint8 (3, H, W) RGB images on `device`: nvJPEG in one batched call on a GPU, libjpeg-turbo on a CPU."""
    import torch

    if not data:
        return []
    if device.type == "cpu":
        try:
            import simplejpeg  # the CPU pipeline's own decoder: the reference path decodes exactly as it does
        except ImportError:  # a GPU box with torchvision only (benchmarks/gpu_decode.py)
            simplejpeg = None
        if simplejpeg is not None:
            return [torch.from_numpy(simplejpeg.decode_jpeg(b, colorspace="rgb")).permute(2, 0, 1) for b in data]
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
