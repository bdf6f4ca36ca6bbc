"""The worker loop's calls out, and what a rehearsal measures with them.

`RunHooks` are what the loop tells whoever launched it at each phase of a worker's run; a real run's hooks do
nothing. `Rehearsal` (`--rehearse`, `train/rehearse.py`) records memory after each phase (`Phases`) and what each
half measured: the steps and the save ("train"), then fresh workers restoring that checkpoint ("restore").
"""
from __future__ import annotations

import json
import os
import time

from vitray import storage


class RunHooks:
    """A real run: nothing to record, held-out evaluation at the end."""

    evaluates = True

    def start(self, device) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def restored(self, plan, step: int | None, digest: float | None, timeline: dict, restoring: float) -> bool:
        """After the engine restored its checkpoint; True stops the worker there."""
        return False

    def saved_final(self, plan, step: int, restored_step: int | None, timeline: dict, saving: float) -> None:
        pass


class Rehearsal(RunHooks):
    """--rehearse: `half` "train" measures the steps and the save; "restore" stops once fresh workers restored it."""

    evaluates = False  # a rehearsal has no held-out set

    def __init__(self, half: str):
        assert half in ("train", "restore"), half
        self.half, self.phases = half, None

    def start(self, device) -> None:
        self.phases = Phases(device)
        self.phases.mark("started")

    def phase(self, name: str) -> None:
        self.phases.mark(name)

    def restored(self, plan, step, digest, timeline, restoring) -> bool:
        if self.half != "restore":
            return False
        self.phases.mark("restored")
        memory = self.phases.over_ranks()
        if _rank() == 0:
            write_measured(plan.run_uri, plan.endpoint, "restore", {
                "rebuild_s": restoring - timeline["worker_start"], "restore_s": time.time() - restoring,
                "step": step, "optimizer_digest": digest, "memory": memory})
        return True

    def saved_final(self, plan, step, restored_step, timeline, saving) -> None:
        self.phases.mark("saved")
        first, saved = timeline["first_step"] - timeline["engine_ready"], time.time() - saving
        steps = step - (restored_step or 0)
        memory = self.phases.over_ranks()
        if _rank() == 0:
            write_measured(plan.run_uri, plan.endpoint, "train", {
                "save_s": saved, "first_step_s": first, "memory": memory,
                "step_s": (timeline["last_step"] - timeline["first_step"]) / (steps - 1) if steps > 1 else first})


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _rss() -> tuple[float, float]:
    """This process's resident bytes now and at its peak (Linux)."""
    import resource

    with open("/proc/self/statm") as f:
        now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return float(now), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


class Phases:
    """Memory per worker after each phase: resident bytes on CPU, allocated bytes on a GPU."""

    def __init__(self, device):
        self.device, self.now, self.peak = device, {}, {}

    def mark(self, name: str) -> None:
        import torch

        if self.device.type == "cuda":
            self.now[name] = float(torch.cuda.memory_allocated(self.device))
            self.peak[name] = float(torch.cuda.max_memory_allocated(self.device))
        else:
            self.now[name], self.peak[name] = _rss()

    def over_ranks(self) -> dict:
        """The largest over ranks, phase by phase (every rank must call it)."""
        import torch
        import torch.distributed as dist

        names = list(self.now)
        t = torch.tensor([self.now[n] for n in names] + [self.peak[n] for n in names], dtype=torch.float64,
                         device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        values = t.tolist()
        return {"now": dict(zip(names, values[:len(names)])), "peak": dict(zip(names, values[len(names):]))}


def write_measured(run_uri: str, endpoint, half: str, measured: dict) -> None:
    """Rank 0's record of one half ("train": steps and save; "restore": fresh workers loading the checkpoint)."""
    storage.write_bytes(storage.join(run_uri, f"rehearsal-{half}.json"), json.dumps(measured).encode(), endpoint)


def read_measured(run_uri: str, endpoint, half: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(run_uri, f"rehearsal-{half}.json"), endpoint))
