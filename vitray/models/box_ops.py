"""Box utilities for set prediction (DETR): format conversion, IoU and generalised IoU, all batched.

Boxes are (..., 4) tensors. DETR predicts normalised (cx, cy, w, h) in [0, 1]; IoU and GIoU work on corner form
(x0, y0, x1, y1). GIoU (Rezatofighi et al. 2019) = IoU − |C \\ (A ∪ B)| / |C|, C the smallest box enclosing both:
1 for identical boxes, in (−1, 1] always, and unlike IoU still informative (negative) for disjoint boxes.
"""
from __future__ import annotations

import torch


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """COCO's (x, y, width, height), top-left corner, → corner form."""
    x, y, w, h = b.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 4) × (M, 4) corner boxes → IoU (N, M) and union (N, M)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return inter / union, union


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) × (M, 4) corner boxes → GIoU (N, M). Degenerate boxes (x1 < x0) would give meaningless values, so
    they are refused rather than silently scored."""
    if not ((a[:, 2:] >= a[:, :2]).all() and (b[:, 2:] >= b[:, :2]).all()):
        raise ValueError("generalized_iou: boxes must have x1 >= x0 and y1 >= y0")
    iou, union = pairwise_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    enclosing = (rb - lt).clamp(min=0).prod(-1)
    return iou - (enclosing - union) / enclosing
