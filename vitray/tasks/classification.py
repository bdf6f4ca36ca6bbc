"""Image classification: the objective of ViT pretraining and fine-tuning.

A task is what the training loop knows about a problem: how to build the model, turn a data batch into tensors,
compute the loss, and count what evaluation needs. Detection (DETR) and autoregressive pixels (iGPT) provide
the same four methods, so the loop never changes for them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vitray.data import device_decode
from vitray.models.inputs import to_model_input
from vitray.models.registry import build_model
from vitray.tasks import Task


class ClassificationTask(Task):
    metric = "val_top1"

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        return build_model(
            m.name, num_classes=m.num_classes, image_size=self.cfg.data.image_size, dropout=m.dropout,
            pre_logits=m.pre_logits,
        )

    def to_tensors(self, batch: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """uint8 HWC images from the pipeline → [-1, 1] NCHW on the device (the paper's (x − 127.5)/127.5)."""
        images = batch["image"] if "image" in batch else device_decode.decode_batch(batch, self.cfg.data.image_size, device)
        return {"image": to_model_input(images, device, dtype), "label": torch.from_numpy(np.require(batch["label"], requirements="W")).to(device)}

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.cfg.optim.label_smoothing)
        return loss, {"correct": (logits.argmax(-1) == batch["label"]).sum(), "count": torch.tensor(len(logits))}

    # --- evaluation: exact top-1 over a split that may give ranks unequal shares -------------------------------

    def empty_batch(self) -> dict[str, np.ndarray]:
        s = self.cfg.data.image_size
        return {"image": np.zeros((1, s, s, 3), np.uint8), "label": np.zeros(1, np.int64)}

    def eval_start(self) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64)  # [correct top-1, samples]

    @torch.no_grad()
    def eval_batch(self, model, batch: dict[str, torch.Tensor], state: torch.Tensor | None) -> None:
        logits = model(batch["image"])
        if state is not None:
            state += torch.tensor([(logits.argmax(-1) == batch["label"]).sum().item(), len(logits)], dtype=torch.float64)

    def eval_end(self, state: torch.Tensor, device: torch.device, export: tuple | None = None) -> dict[str, float]:
        import torch.distributed as dist

        counts = state.to(device)
        dist.all_reduce(counts)
        return {"val_top1": (counts[0] / counts[1]).item()}

