"""Where a worker starts: fresh, or from the newest complete checkpoint — on the same number of workers (a restart,
a `--resume`) or on another (an elastic resize, through DeepSpeed's universal checkpoint) — with every data
partition's position and, when the worker count is unchanged, this rank's RNG state.

`find` runs first, before the engine exists, so the data stream can start from the saved positions while DeepSpeed
builds the engine; `restore` then loads the state into the engine; `record` writes what happened into the run's
log (a `resumed` line, and a `restart` line when Ray Train restarted the workers within this fit).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from vitray import storage
from vitray.train import checkpoint, universal
from vitray.train.metrics import positions_json

logger = logging.getLogger("vitray")


@dataclasses.dataclass
class Resume:
    checkpoint: object | None  # ray.train.Checkpoint, or None on a fresh start
    saved: dict  # its commit marker: step, the number of workers that saved it, when
    resharded: bool  # saved by another number of workers: restored from its universal form
    positions: dict  # data partition → Position
    rng_state: torch.Tensor | None  # this rank's torch RNG state (same worker count only)
    step: int | None = None  # the restored step, after `restore`
    digest: float | None = None  # the restored optimizer state's digest, after `restore`
    universal_s: float = 0.0  # seconds this group waited for the universal conversion (an elastic resize pays it)

    @property
    def found(self) -> bool:
        return self.checkpoint is not None


def find(plan, rank: int, world: int, fit: float | None = None) -> Resume:
    """The checkpoint this worker group starts from, and every partition's position in it. `fit`: when the driver
    called fit (whose driver may be making the universal form already: `train/universal.py`)."""
    found = checkpoint.latest_complete(plan.run_uri, plan.endpoint)
    saved = checkpoint.read_commit(found) if found is not None else {}
    if rank == 0:  # before any rank can save (a training step, a collective, comes first)
        checkpoint.remove_torn(plan.run_uri, plan.endpoint, saved.get("step"))
    resharded = found is not None and saved["world_size"] != world
    converting = time.time()
    if resharded and rank == 0:  # made by the driver for a --resume or beside an elastic run; else here
        uri = storage.join(plan.run_uri, checkpoint.step_dir(saved["step"]))
        universal.wait_for_background(uri, plan.endpoint, fit)
        checkpoint.make_universal(uri, plan.endpoint)  # nothing to do when the driver made it
    if resharded:
        dist.barrier()  # every rank waits for rank 0's conversion: it is on the restart's critical path
    positions, rng = checkpoint.read_positions(found, plan.cfg.data.partitions, same_world=not resharded)
    return Resume(found, saved, resharded, positions, rng, universal_s=time.time() - converting if resharded else 0.0)


def restore(resume: Resume, engine, ema, rank: int, world: int) -> int:
    """Load the checkpoint into the engine (and the averaged weights); the step to continue from (0: fresh)."""
    resume.step = checkpoint.restore(engine, resume.checkpoint, ema, resume.resharded)
    if resume.step is None:
        return 0
    resume.digest = checkpoint.optimizer_digest(engine)
    if rank == 0:
        epochs = sorted({pos.epoch for pos in resume.positions.values()})
        logger.info(f"resumed at step {resume.step} on {world} workers (saved by {resume.saved['world_size']}), data"
                    f" epoch {'–'.join(map(str, epochs))} of {len(resume.positions)} partitions")
    return resume.step


def seed(resume: Resume, seed: int, rank: int) -> None:
    """This rank's RNG (dropout draws): where the checkpoint left it, else its own seed."""
    if resume.rng_state is not None:
        torch.set_rng_state(resume.rng_state)
    else:
        torch.manual_seed(seed * 1_000_003 + rank + 1)


def record(resume: Resume, log, engine, ema, fit_called: float, rank: int, world: int, last_step: int) -> None:
    """The run log's `resumed` line (digests a test compares with the save's), and a `restart` line with what the
    restart cost when this fit() saved the checkpoint, i.e. Ray Train restarted the workers."""
    step = resume.step
    if step >= last_step and rank == 0:
        logger.info(f"step {step}: the run was already complete when Ray Train restarted its workers")
    log.event(step, "resumed", optimizer_digest=resume.digest, positions=positions_json(resume.positions),
              resharded=resume.resharded, model_digest=checkpoint.module_digest(engine.module),
              **({"ema_digest": checkpoint.module_digest(ema.module)} if ema else {}))
    if resume.saved["time"] <= fit_called:
        return
    lost = time.time() - resume.saved["time"]  # the steps since that checkpoint, and the restart itself
    log.event(step, "restart", from_workers=resume.saved["world_size"], to_workers=world,
              steps_redone=log.rewound - step, lost_s=lost)
    log.flush()  # now: the next restart may resume from this same checkpoint, before any save of this group
    if rank == 0:
        logger.warning(f"restarted at step {step} on {world} workers (were {resume.saved['world_size']}):"
                       f" {log.rewound - step} steps to redo, {lost:.0f} s lost since that checkpoint")
