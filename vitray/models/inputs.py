"""What every vitray model takes as input: float NCHW pixels in [-1, 1], the paper's (x − 127.5) / 127.5.

The data pipeline hands over uint8 HWC (a quarter of float32's object-store traffic); `to_model_input` is the one
place that converts, on whatever device and in whatever precision the caller trains or evaluates.
"""
from __future__ import annotations

import numpy as np
import torch


def to_model_input(images, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) numpy or tensor → (B, 3, H, W) in [-1, 1] of `dtype` on `device`."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.require(images, requirements="W"))  # writable: torch warns on read-only
    x = images.to(device, non_blocking=True) if device is not None else images
    return x.permute(0, 3, 1, 2).to(dtype).div_(127.5).sub_(1.0)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """The inverse for one image: (3, H, W) in [-1, 1] → uint8 (H, W, 3)."""
    return ((x.detach().permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
