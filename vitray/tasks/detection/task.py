"""Object detection with DETR: the task interface the training loop knows (build the model, batch → tensors, loss,
evaluation), so DETR trains on the same loop, engine, data path and checkpoints as ViT.

Evaluation gathers every worker's predictions and ground truth on rank 0, scores them with pycocotools' COCOeval
(AP, AP50, AP75, AP_S/M/L, in the original images' pixels) and exports both in COCO format next to the run.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist

from vitray.config.schema import Config
from vitray.models.inputs import to_model_input
from vitray.models.registry import build_model
from vitray.tasks import Task
from vitray.tasks.detection import coco
from vitray.tasks.detection.criterion import LossWeights, set_loss


class DetectionTask(Task):
    metric = "val_AP50"
    shards = "detection"

    def __init__(self, cfg: Config, classes: list[str] | None = None, run_uri=None, endpoint=None):
        super().__init__(cfg, classes, run_uri, endpoint)
        self.classes = classes or [str(i) for i in range(cfg.model.num_classes)]
        d = cfg.detection
        self.weights = LossWeights(d.cost_class, d.cost_l1, d.cost_giou, d.eos_coef)

    def decoder(self) -> dict:
        """What the data pipeline needs to decode detection shards (`ReadSpec.decoder`, `vitray/data/spec.py`)."""
        d = self.cfg.detection
        return {"max_boxes": d.max_boxes, "num_classes": self.cfg.model.num_classes, "crop_min": d.crop_min}

    def pretrained_model(self) -> torch.nn.Module:
        """DETR's recipe starts from a classification-pretrained backbone: a BiT ResNet's weights (all but its head)
        go into DETR's backbone; the transformer, projection and heads start fresh."""
        from vitray.checkpoints import load_model

        source, meta = load_model(self.cfg.transfer.init_from, self.endpoint, self.cfg.model.dropout)
        return backbone_from_classifier(self.build_model(), source, meta["config"]["model"]["name"],
                                        self.cfg.transfer.init_from)

    @staticmethod
    def evaluate_checkpoint(checkpoint_uri: str, data_uri: str, endpoint) -> dict:
        return evaluate_checkpoint(checkpoint_uri, data_uri, endpoint)

    def lr_scales(self) -> dict[str, float]:
        return {"backbone.": self.cfg.detection.backbone_lr_scale}

    def build_model(self) -> torch.nn.Module:
        m = self.cfg.model
        return build_model(m.name, num_classes=m.num_classes, image_size=self.cfg.data.image_size, dropout=m.dropout)

    def to_tensors(self, batch: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype) -> dict:
        images = to_model_input(batch["image"], device, dtype)
        targets = [{"boxes": torch.from_numpy(np.ascontiguousarray(b[:n])).to(device),
                    "labels": torch.from_numpy(np.ascontiguousarray(lb[:n])).to(device)}
                   for b, lb, n in zip(batch["boxes"], batch["labels"], batch["num_boxes"])]
        return {"image": images, "targets": targets, "orig_size": batch.get("orig_size")}

    def num_boxes(self, targets: list[dict], device: torch.device) -> float:
        """Objects in the global batch per worker (summed over workers ÷ world size, at least 1), as DETR
        normalises its box losses."""
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            world = dist.get_world_size()
        return max(n.item() / world, 1.0)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = model(batch["image"])
        device = batch["image"].device
        return set_loss(outputs, batch["targets"], self.cfg.model.num_classes, self.num_boxes(batch["targets"], device),
                        self.weights)

    # --- evaluation: per batch on each rank, then one COCOeval on rank 0 ------------------------------------

    def empty_batch(self) -> dict[str, np.ndarray]:
        s, k = self.cfg.data.image_size, self.cfg.detection.max_boxes
        return {"image": np.zeros((1, s, s, 3), np.uint8), "boxes": np.zeros((1, k, 4), np.float32),
                "labels": np.full((1, k), -1, np.int64), "num_boxes": np.zeros(1, np.int64),
                "orig_size": np.full((1, 2), s, np.int64)}

    def eval_start(self) -> dict:
        return {"predictions": [], "truth": []}

    @torch.no_grad()
    def eval_batch(self, model, batch: dict, state: dict | None) -> None:
        from vitray.models.detr import postprocess

        out = model(batch["image"])
        if state is None:  # a rank keeping in step with the others: forward only
            return
        sizes = [tuple(int(v) for v in hw) for hw in batch["orig_size"]]
        for p, t, (h, w) in zip(postprocess(out["logits"], out["boxes"], sizes), batch["targets"], sizes):
            state["predictions"].append({k: v.cpu().numpy() for k, v in p.items()})
            cx, cy, bw, bh = (t["boxes"].float().cpu().numpy() * [w, h, w, h]).T  # normalised cxcywh → pixel xywh
            state["truth"].append(((h, w), np.stack([cx - bw / 2, cy - bh / 2, bw, bh], 1), t["labels"].cpu().numpy()))

    def eval_end(self, state: dict, device: torch.device, export: tuple | None = None) -> dict[str, float]:
        """COCO metrics over every rank's images (computed on rank 0, shared with all); `export` = (run URI,
        endpoint): rank 0 writes coco/val_ground_truth.json and coco/val_results.json there."""
        world = dist.get_world_size()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, state)
        metrics: list = [None]
        if dist.get_rank() == 0:
            predictions = [p for s in gathered for p in s["predictions"]]
            truth = [t for s in gathered for t in s["truth"]]
            gt = coco.ground_truth([t[0] for t in truth], [t[1] for t in truth], [t[2] for t in truth], self.classes)
            results = coco.results(predictions)
            metrics[0] = {f"val_{k}": v for k, v in coco.evaluate(gt, results).items()}
            metrics[0]["val_images"] = len(truth)
            if export is not None:
                from vitray import storage

                uri, endpoint = export
                storage.write_bytes(storage.join(uri, "coco", "val_ground_truth.json"), json.dumps(gt).encode(), endpoint)
                storage.write_bytes(storage.join(uri, "coco", "val_results.json"), json.dumps(results).encode(), endpoint)
        dist.broadcast_object_list(metrics, src=0)
        return metrics[0]


def evaluate_checkpoint(checkpoint_uri: str, data_uri: str, endpoint=None, batch_size: int = 50) -> dict[str, float]:
    """COCO metrics of a saved DETR checkpoint on a detection shard dataset, in one process without Ray (tools,
    benchmarks, the AP-against-steps curve). The same numbers as the run's own evaluation."""
    from vitray import storage
    from vitray.data.detection import decode_detection_shards
    from vitray.data.catalog import read_manifest, shard_paths
    from vitray.data.reading import shard_table
    from vitray.models.detr import postprocess
    from vitray.checkpoints import load_model

    model, meta = load_model(checkpoint_uri, endpoint)
    model.eval()
    cfg = meta["config"]
    manifest = read_manifest(data_uri, endpoint, "data_uri")
    predictions, truth = [], []
    for path in shard_paths(data_uri, manifest):
        batch = {"path": np.array([path]), "bytes": np.array([storage.read_bytes(path, endpoint)], dtype=object)}
        out = decode_detection_shards(batch, shard_table(manifest), False, cfg["data"]["image_size"],
                                      cfg["detection"]["max_boxes"], cfg["model"]["num_classes"])
        for i in range(0, len(out["key"]), batch_size):
            images = to_model_input(out["image"][i:i + batch_size])
            sizes = [tuple(int(v) for v in hw) for hw in out["orig_size"][i:i + batch_size]]
            with torch.no_grad():
                o = model(images)
            predictions += [{k: v.numpy() for k, v in p.items()} for p in postprocess(o["logits"], o["boxes"], sizes)]
            for j, (h, w) in enumerate(sizes, start=i):
                n = out["num_boxes"][j]
                cx, cy, bw, bh = (out["boxes"][j, :n] * [w, h, w, h]).T
                truth.append(((h, w), np.stack([cx - bw / 2, cy - bh / 2, bw, bh], 1), out["labels"][j, :n]))
    gt = coco.ground_truth([t[0] for t in truth], [t[1] for t in truth], [t[2] for t in truth], manifest.classes)
    return {f"val_{k}": v for k, v in coco.evaluate(gt, coco.results(predictions)).items()}


def backbone_from_classifier(detr: torch.nn.Module, source: torch.nn.Module, name: str, uri: str) -> torch.nn.Module:
    """Copy a BiT ResNet's weights (all but its head) into `detr`'s backbone; refused unless the shapes agree."""
    from vitray.checkpoints import CheckpointError

    want = detr.spec
    got = getattr(source, "spec", None)
    if not want.accepts_backbone(got):
        raise CheckpointError(f"transfer.init_from: {uri} holds {name}; the backbone of a DETR with {want.backbone}"
                              f" blocks × width {want.backbone_width} needs a BiT ResNet of that shape")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "pre_logits."))}
    detr.backbone.load_state_dict(state)
    return detr
