"""DETR's set loss (Sec. 3.1, Eq. 2): match predictions to objects one-to-one (`matcher.match`), then

    L = Σ_layers [ w_class · CE(all queries; unmatched → "no object", down-weighted by eos_coef)
                   + w_L1 · Σ_matched ‖b − b̂‖₁ / n_boxes + w_GIoU · Σ_matched (1 − GIoU(b, b̂)) / n_boxes ]

over the final decoder layer and every auxiliary one, each matched on its own. n_boxes is the number of objects in
the global batch (summed over workers, divided by the world size, as the reference code does), so every worker's
box terms are on the same scale whatever its share of objects.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vitray.models import box_ops
from vitray.tasks.detection.matcher import match


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The paper's weights, used both for matching and for the loss."""

    cls: float = 1.0
    l1: float = 5.0
    giou: float = 2.0
    eos_coef: float = 0.1  # relative weight of the "no object" class in the cross-entropy


def set_loss(outputs: dict, targets: list[dict[str, torch.Tensor]], num_classes: int, num_boxes: float,
             w: LossWeights = LossWeights()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """outputs: the model's {"logits", "boxes", "aux"}; targets[b] = {"labels": (n_b,), "boxes": (n_b, 4)
    normalised cxcywh}. Returns the total loss and its parts for the final layer (for logging)."""
    total, parts = None, {}
    for i, layer in enumerate([outputs, *outputs.get("aux", [])]):
        terms = _layer_loss(layer["logits"], layer["boxes"], targets, num_classes, num_boxes, w)
        loss = w.cls * terms["loss_ce"] + w.l1 * terms["loss_l1"] + w.giou * terms["loss_giou"]
        total = loss if total is None else total + loss
        if i == 0:
            parts = {k: v.detach() for k, v in terms.items()}
    return total, parts


def _layer_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], num_classes: int, num_boxes: float,
                w: LossWeights) -> dict[str, torch.Tensor]:
    indices = match(logits, boxes, targets, w.cls, w.l1, w.giou)
    batch_idx = torch.cat([torch.full((len(q),), b, dtype=torch.long) for b, (q, _) in enumerate(indices)])
    query_idx = torch.cat([torch.as_tensor(q, dtype=torch.long) for q, _ in indices])
    classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)  # all "no object"
    classes[batch_idx, query_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
    class_weight = torch.ones(num_classes + 1, device=logits.device)
    class_weight[-1] = w.eos_coef
    loss_ce = F.cross_entropy(logits.float().transpose(1, 2), classes, weight=class_weight)

    matched = boxes[batch_idx, query_idx].float()
    target = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(matched)
    loss_l1 = F.l1_loss(matched, target, reduction="sum") / num_boxes
    giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(matched), box_ops.cxcywh_to_xyxy(target))
    loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
    return {"loss_ce": loss_ce, "loss_l1": loss_l1, "loss_giou": loss_giou}
