"""Hungarian matching of predictions to ground truth (DETR Sec. 3.1): the one-to-one assignment that minimises
the summed matching cost, found by `scipy.optimize.linear_sum_assignment`.

cost(query i, object j) = w_class · (−p_i(class_j)) + w_L1 · ‖b_i − b_j‖₁ + w_GIoU · (−GIoU(b_i, b_j))

with the paper's weights 1, 5, 2. The class term uses the probability, not its log (as the reference code: it
keeps the terms on comparable scales). With more queries than objects, the unmatched queries predict "no object".
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from vitray.models import box_ops


@torch.no_grad()
def match(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]],
          cost_class: float = 1.0, cost_l1: float = 5.0, cost_giou: float = 2.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """logits (B, Q, classes + 1), boxes (B, Q, 4) normalised cxcywh; targets[b] = {"labels": (n_b,), "boxes":
    (n_b, 4)}. Returns per image (query indices, target indices), both of length min(Q, n_b)."""
    out = []
    prob = logits.float().softmax(-1)
    for b, t in enumerate(targets):
        if len(t["labels"]) == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        cost = cost_matrix(prob[b], boxes[b].float(), t["labels"], t["boxes"].float(), cost_class, cost_l1, cost_giou)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        out.append((rows.astype(np.int64), cols.astype(np.int64)))
    return out


def cost_matrix(prob: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
                cost_class: float = 1.0, cost_l1: float = 5.0, cost_giou: float = 2.0) -> torch.Tensor:
    """(Q, n) matching cost for one image."""
    c_class = -prob[:, labels]
    c_l1 = torch.cdist(boxes, target_boxes, p=1)
    c_giou = -box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(target_boxes))
    return cost_class * c_class + cost_l1 * c_l1 + cost_giou * c_giou
