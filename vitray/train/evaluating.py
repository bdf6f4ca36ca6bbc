"""Held-out evaluation at the end of a run, on every worker in step: the task's metrics (top-1, or COCO AP) of the
trained weights — and, when the run keeps a Polyak average, of the averaged ones too."""
from __future__ import annotations

import logging

import ray.train
import torch
import torch.distributed as dist

logger = logging.getLogger("vitray")


def held_out(engine, ema, task, device, dtype, cfg, export: tuple) -> dict[str, float]:
    """The run's held-out results: the averaged weights' (reported as val_*, what the paper evaluates) and the raw
    ones' (val_*_raw) when there is an average, else the trained weights'. `export`: (run URI, endpoint), where a
    task may write what it predicted."""
    results = {}
    if ema is not None:
        raw = evaluate(engine, task, ray.train.get_dataset_shard("val"), device, dtype, cfg)
        results.update({f"{k}_raw": v for k, v in raw.items()})
    results.update(evaluate(ema.module if ema else engine, task, ray.train.get_dataset_shard("val"), device, dtype,
                            cfg, export=export))
    if ray.train.get_context().get_world_rank() == 0:
        logger.info(f"held-out {task.metric.removeprefix('val_')}: {results[task.metric]:.4f}")
    return results


@torch.no_grad()
def evaluate(model, task, split, device, dtype, cfg, export: tuple | None = None) -> dict[str, float]:
    """The task's held-out metrics of `model` (the engine, or the averaged weights) over a split that may give ranks
    unequal shares: ranks that run out keep stepping with an empty batch until all are done, because with ZeRO-3
    every forward pass is a collective."""
    model.eval()
    state = task.eval_start()
    batches = iter(split.iter_batches(batch_size=cfg.optim.micro_batch, batch_format="numpy"))
    while True:
        batch = next(batches, None)
        more = torch.tensor([0.0 if batch is None else 1.0], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if more.item() == 0:
            break
        if batch is None:  # keep in step with the other ranks; counts nothing
            task.eval_batch(model, task.to_tensors(task.empty_batch(), device, dtype), None)
            continue
        task.eval_batch(model, task.to_tensors(batch, device, dtype), state)
    model.train()
    return task.eval_end(state, device, export)
