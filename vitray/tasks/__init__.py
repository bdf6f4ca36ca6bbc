"""Tasks: how each kind of model trains. A model's spec says what data it trains on (`spec.kind`,
`vitray.models.specs`); `TASKS` maps that kind to the task that trains it. The training loop, the driver and the
evaluators ask the task; none of them branches on the family.

    task = make_task(cfg, classes, run_uri, endpoint)
    model = task.build_model()                          # the family's model for this config
    batch = task.to_tensors(numpy_batch, device, dtype) # what the data pipeline gives → what the model takes
    loss, counts = task.loss(engine, batch)
    state = task.eval_start(); task.eval_batch(model, batch, state); metrics = task.eval_end(state, device)

Kinds: classification (ViT, hybrids, BiT: `classification.py`), detection (DETR: `detection/task.py`), next or
masked pixels (iGPT: `pixels.py`). A new family (MAE, DINO, another detector) is a spec with its `kind`, a model
module and, for a new kind, a Task subclass and a line in `TASKS`; the trainer, launcher, checkpoints and
evaluators stay as they are.
"""
from __future__ import annotations

import importlib

from vitray.models.registry import get_spec

# spec.kind → the task that trains it ("module:Class"; imported when asked for, so configs stay torch-free)
TASKS = {
    "classification": "vitray.tasks.classification:ClassificationTask",
    "detection": "vitray.tasks.detection.task:DetectionTask",
    "pixels": "vitray.tasks.pixels:PixelTask",
}


class Task:
    """What every task provides. Class attributes are read before anything is built (the driver checks the data
    against `shards`, the runs listing ranks by `metric` and `better`)."""

    metric: str = ""  # the held-out number the loop logs after evaluation
    better: str = "max"  # which way `metric` improves: "max" or "min"
    shards: str = "classification"  # what the training shards must hold: "classification" or "detection"

    def __init__(self, cfg, classes: list[str] | None = None, run_uri: str | None = None, endpoint=None):
        """`run_uri`: the run folder, where a task keeps what it made before training (iGPT's palette)."""
        self.cfg, self.classes, self.run_uri, self.endpoint = cfg, classes, run_uri, endpoint

    # --- driver side, before Ray Train starts -------------------------------------------------------------------
    def before_fit(self, plan) -> None:
        """Work the run needs once, on the driver, before the workers start (iGPT: its colour palette, kept in the
        run folder where the workers' tasks find it)."""

    # --- the training loop ----------------------------------------------------------------------------------------
    def decoder(self):
        """What the data pipeline needs to decode this task's shards (None: image + class label)."""
        return None

    def pretrained_model(self):
        """The model to fine-tune from `transfer.init_from` (the paper's recipe: new zero head, position embeddings
        interpolated)."""
        from vitray.checkpoints import pretrained_for_finetuning

        return pretrained_for_finetuning(self.cfg, self.endpoint)

    def lr_scales(self) -> dict[str, float] | None:
        """Parameter-name prefix → LR multiplier (DETR's backbone trains at a tenth of the LR)."""
        return None

    def build_model(self):
        raise NotImplementedError

    def to_tensors(self, batch, device, dtype) -> dict:
        raise NotImplementedError

    def loss(self, model, batch):
        raise NotImplementedError

    # --- held-out evaluation, every rank in step ------------------------------------------------------------------
    def empty_batch(self):
        raise NotImplementedError

    def eval_start(self):
        raise NotImplementedError

    def eval_batch(self, model, batch, state) -> None:
        raise NotImplementedError

    def eval_end(self, state, device, export: tuple | None = None) -> dict[str, float]:
        raise NotImplementedError

    # --- a saved checkpoint, outside training (jobs/evaluate.py) -------------------------------------------------
    @staticmethod
    def evaluate_checkpoint(checkpoint_uri: str, data_uri: str, endpoint) -> dict | None:
        """The task's own held-out protocol for a saved checkpoint (DETR: COCO AP), or None: the classification
        protocols of jobs/evaluate.py (top-1, few-shot, linear probe) apply."""
        return None


def task_class(model_name: str | None = None, kind: str | None = None) -> type[Task]:
    """The task class of a registered model (or of a kind of model, e.g. a released .npz's `spec.kind`)."""
    module, _, name = TASKS[kind or get_spec(model_name).kind].partition(":")
    return getattr(importlib.import_module(module), name)


def make_task(cfg, classes: list[str] | None = None, run_uri: str | None = None, endpoint=None) -> Task:
    """The task a config trains: detection for DETR, next pixels for iGPT, classification for everything else."""
    return task_class(cfg.model.name)(cfg, classes, run_uri, endpoint)
