"""The worker loop's calls out, and what a rehearsal measures with them.

`RunHooks` are what the loop tells whoever launched it at each phase of a worker's run; a real run's hooks do
nothing. `Rehearsal` (`--rehearse`, `train/rehearse.py`) records memory after each phase (`Phases`) and the times
of the three phases a real run pays for: "train" (the steps and the save: the stall the loop saw and the save's
total), "restart" (a new worker group on as many workers, restoring the checkpoint, to its first step) and
"resize" (one worker fewer, through the elastic path's universal conversion, to its first step).
"""
from __future__ import annotations

import json
import os
import time

from vitray import storage

PHASES = ("train", "restart", "resize")


class RunHooks:
    """A real run: nothing to record, held-out evaluation at the end."""

    evaluates = True

    def start(self, device) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def restored(self, plan, start, timeline: dict, restoring: float) -> bool:
        """After the engine restored its checkpoint (`start`: a resume.Resume); True stops the worker there."""
        return False

    def stepped(self, plan, start, timeline: dict) -> bool:
        """After this worker group's first step; True stops the worker there (no save)."""
        return False

    def saved_final(self, plan, step: int, restored_step: int | None, timeline: dict, saving: float,
                    stalled: float) -> None:
        """After the final save was committed; `stalled`: the seconds the loop stood still for it."""


class Rehearsal(RunHooks):
    """--rehearse: `phase` "train" measures the steps and the save; "restart" and "resize" stop at the first step
    after the restore, so the checkpoint they restored stays the newest for the next phase."""

    evaluates = False  # a rehearsal has no held-out set

    def __init__(self, phase: str):
        assert phase in PHASES, phase
        self.half, self.phases = phase, None

    def start(self, device) -> None:
        self.phases = Phases(device)
        self.phases.mark("started")

    def phase(self, name: str) -> None:
        self.phases.mark(name)

    def restored(self, plan, start, timeline, restoring) -> bool:
        if self.half != "train":
            self.phases.mark("restored")
        return False

    def stepped(self, plan, start, timeline) -> bool:
        if self.half == "train":
            return False
        memory = self.phases.over_ranks()
        t = timeline
        if _rank() == 0:  # the restart's parts, in the order a restarted run pays them
            write_measured(plan.run_uri, plan.endpoint, self.half, {
                "group_start_s": t["worker_start"] - t["fit_called"], "universal_s": start.universal_s,
                "engine_s": t["engine_ready"] - t["worker_start"] - start.universal_s,
                "restore_s": t["restored"] - t["engine_ready"], "first_step_s": t["first_step"] - t["restored"],
                "to_first_step_s": t["first_step"] - t["fit_called"], "resharded": start.resharded,
                "step": start.step, "optimizer_digest": start.digest, "memory": memory})
        return True

    def saved_final(self, plan, step, restored_step, timeline, saving, stalled) -> None:
        self.phases.mark("saved")
        first, saved = timeline["first_step"] - timeline["engine_ready"], time.time() - saving
        steps = step - (restored_step or 0)
        memory = self.phases.over_ranks()
        if _rank() == 0:
            write_measured(plan.run_uri, plan.endpoint, "train", {
                "save_stall_s": stalled, "save_s": saved, "first_step_s": first, "memory": memory,
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
    """Rank 0's record of one phase ("train": steps and save; "restart", "resize": a new group to its first step)."""
    storage.write_bytes(storage.join(run_uri, f"rehearsal-{half}.json"), json.dumps(measured).encode(), endpoint)


def read_measured(run_uri: str, endpoint, half: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(run_uri, f"rehearsal-{half}.json"), endpoint))
