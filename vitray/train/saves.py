"""The run's saves, as the training loop sees them: when one is due, making it (synchronously with `checkpoint.save`,
or in the background with `snapshot.begin`), committing a background save once every rank's upload is done, and
the newest committed step, which a non-finite loss must not overwrite."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from vitray.checkpoints import CheckpointError, step_dir
from vitray.train import snapshot
from vitray.train.checkpoint import commit, save


class Checkpointer:
    """The run's saves: every `storage.checkpoint_every` steps and at the end, each committed only once every rank's
    part is stored. Remembers the newest committed save (`last_good`), which a non-finite loss must not overwrite.

    With `storage.async_save` a periodic save only stalls training for the gather and the host copy
    (`snapshot.begin`); its upload runs in Ray Train's upload thread, and `poll`, called every step, commits it once
    every rank's upload is done. At most one save is in flight: the next one, the final one (synchronous) and a
    stop for a non-finite loss first wait for it (`settle`)."""

    POLL_S = 0.05  # between the ranks' checks while they wait for an upload

    def __init__(self, engine, ema, plan, world: int, last_good: int | None, log=None):
        self.engine, self.ema, self.plan, self.last_good, self.log = engine, ema, plan, last_good, log
        self.every, self.keep = plan.cfg.storage.checkpoint_every, plan.cfg.storage.keep_checkpoints
        # Not in an elastic run: on the churn of benchmarks/elastic.py (a node lost every 60 s for 40 s) the elastic
        # run took 772 s with background saves against 449 s with synchronous ones (goodput 0.26 against 0.45 of
        # the quiet run), its restarts slower and more of them; why is not yet found. Synchronous there until it is.
        self.background = plan.cfg.storage.async_save and not plan.cfg.scaling.min_workers
        self.run_info = {"world_size": world, "config": plan.cfg.to_dict(), "total_steps": plan.total_steps}
        self.pending = None  # a snapshot.Snapshot whose upload is in flight

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, positions: dict, metrics: dict, final: bool = False) -> dict:
        """Collective. The checkpoint event's figures: `save_stall_s`, the seconds training stood still for it
        (for a synchronous save, its whole time, also given as `save_s`)."""
        start = time.time()
        waited = self.settle()
        if final or not self.background:
            began = time.time()
            save(self.engine, step, positions, metrics, self.run_info, self.ema)
            if dist.get_rank() == 0:
                commit(self.plan.run_uri, self.plan.endpoint, step, self.keep)
            self.last_good = step
            return {"save_s": time.time() - began, "save_stall_s": time.time() - start, "save_wait_s": waited}
        self.pending, figures = snapshot.begin(self.engine, step, positions, {**metrics, "step": step},
                                               self.run_info, self.ema)
        return {"save_stall_s": time.time() - start, "save_wait_s": waited, **figures}

    def poll(self) -> None:
        """Collective while a save is in flight (one small all_reduce a step; nothing otherwise): commits it when
        every rank's upload is done."""
        if self.pending is not None and self._uploaded():
            self._commit()

    def settle(self) -> float:
        """Collective: wait for the save in flight, if any, and commit it. The seconds waited."""
        start = time.time()
        if self.pending is not None:
            while not self._uploaded():
                time.sleep(self.POLL_S)
            self._commit()
        return time.time() - start

    def _uploaded(self) -> bool:
        state = torch.tensor(self.pending.state(), dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
        not_done, failed, upload_s = state.tolist()
        if failed:
            step, self.pending = self.pending.step, None
            raise CheckpointError(f"{step_dir(step)}: a rank's upload failed; the checkpoint was not committed")
        self.upload_s = upload_s
        return not not_done

    def _commit(self) -> None:
        step, began = self.pending.step, self.pending.started
        if dist.get_rank() == 0:
            commit(self.plan.run_uri, self.plan.endpoint, step, self.keep)
        self.pending, self.last_good = None, step
        if self.log is not None:  # `step`: the checkpoint's; save_s: from its start to its commit marker
            self.log.event(step, "committed", upload_s=self.upload_s, save_s=time.time() - began)
