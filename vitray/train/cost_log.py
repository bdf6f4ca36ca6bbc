"""The run's accelerator-days row: its configuration, what it measured, and its projection to the paper's
schedules, appended to `<runs>/accelerator_days.jsonl` (or `storage.cost_log`) when a run ends."""
from __future__ import annotations

import time

from vitray import cost, paper_cost, storage
from vitray.config.schema import Config
from vitray.storage import Endpoint


def cost_row(cfg: Config, plan, metrics: dict, estimate) -> dict:
    """One accelerator-days row: the configuration, what it measured, and its projection to the paper's schedules
    (accelerator-days at the measured images/s per accelerator)."""
    from vitray.config.recipes import DATASETS

    per_accel = metrics["images_per_s_per_accelerator"]
    return {
        "run": plan.run_name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.model.name, "image_size": cfg.data.image_size, "global_batch": cfg.optim.global_batch,
        "micro_batch": cfg.optim.micro_batch, "zero_stage": cfg.deepspeed.zero_stage,
        "workers": cfg.scaling.num_workers, "nodes": _nodes(), "accelerator": estimate.accelerator,
        **({"min_workers": cfg.scaling.min_workers} if cfg.scaling.min_workers else {}),
        **{k: metrics[k] for k in ("restarts", "resizes", "time_lost_s", "data_wait", "data_wait_max") if k in metrics},
        "steps": metrics.get("step"), "images_per_s_per_accelerator": per_accel, "mfu": metrics["mfu"],
        "mfu_peak_source": metrics.get("mfu_peak_source"), "train_flops_per_image": metrics["train_flops_per_image"],
        "accelerator_days": metrics["accelerator_hours"] / 24.0,
        "memory_per_device_gib": metrics["memory_per_device"] / cost.GIB,
        "planned_memory_per_device_gib": estimate.memory_total / cost.GIB,
        "projected_accelerator_days": {
            f"{name}_{epochs}ep": epochs * d["num_images"] / per_accel / 86400
            for name, d in DATASETS.items() for epochs in paper_cost.SCHEDULES[name]},
        "machine": cost.machine(),
    }


def append_jsonl(uri: str, row: dict, endpoint: Endpoint | None) -> None:
    """Append one JSON line by rewriting the object whole (S3 has no append; each write is atomic)."""
    import json

    old = storage.read_bytes(uri, endpoint).decode() if storage.exists(uri, endpoint) else ""
    storage.write_bytes(uri, (old + json.dumps(row) + "\n").encode(), endpoint)


def _nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))
