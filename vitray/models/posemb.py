"""2-D interpolation of learned position embeddings when the patch grid changes (paper Sec. 3.2).

Fine-tuning at a higher resolution keeps the patch size, so the sequence gets longer: the class-token embedding is
kept, the patch embeddings are laid out on their (rows, cols) grid, resized to the new grid, and flattened again.

Two methods:
- "bilinear" (default): `scipy.ndimage.zoom(order=1)` of the grid, exactly what the released vit_jax / big_vision
  code does. Corner embeddings stay where they were (the zoom maps corner to corner).
- "bicubic": `torch.nn.functional.interpolate(mode="bicubic", antialias=True)`, timm's default; smoother, and the
  corners move by half a cell. Results differ slightly from the official checkpoints' fine-tuning.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("bilinear", "bicubic")


def resize_pos_embed(
    posemb: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], method: str = "bilinear",
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """(1, prefix + gh·gw, D) → (1, prefix + nh·nw, D); prefix tokens (the class token) are untouched."""
    if method not in METHODS:
        raise ValueError(f"position-embedding resize method {method!r}: use one of {METHODS}")
    (gh, gw), (nh, nw) = old_grid, new_grid
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    if grid.shape[1] != gh * gw:
        raise ValueError(f"position embedding has {grid.shape[1]} patch tokens, not {gh}×{gw}={gh * gw}")
    if (gh, gw) == (nh, nw):
        return posemb.clone()
    d = grid.shape[-1]
    if method == "bilinear":
        import scipy.ndimage  # here: every Train worker imports this module, few resize (0.5 s of CPU each)

        arr = grid.detach().reshape(gh, gw, d).to(torch.float64).cpu().numpy()
        zoomed = scipy.ndimage.zoom(arr, (nh / gh, nw / gw, 1), order=1)
        resized = torch.from_numpy(np.ascontiguousarray(zoomed)).reshape(1, nh * nw, d)
    else:
        img = grid.detach().reshape(1, gh, gw, d).permute(0, 3, 1, 2).to(torch.float32)
        resized = F.interpolate(img, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        resized = resized.permute(0, 2, 3, 1).reshape(1, nh * nw, d)
    return torch.cat([prefix, resized.to(posemb.dtype).to(posemb.device)], dim=1)
