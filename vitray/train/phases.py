"""The worker loop's calls out, and what a rehearsal measures with them.

`RunHooks` are what the loop tells whoever launched it at each phase of a worker's run; a real run's hooks do
nothing. `Rehearsal` (`--rehearse`, `train/rehearse.py`) records memory after each phase (`Phases`) and the times
of the three phases a real run pays for: "train" (the steps and the save: the stall the loop saw and the save's
total), "restart" (Ray Train's new worker group after a failure, on as many workers, restoring the checkpoint, to
its first step) and "resize" (one worker fewer, through the elastic path's universal conversion, to its first step).
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

    def restored(self, plan, start, timeline: dict, restoring: float) -> bool:
        """After the engine restored its checkpoint (`start`: a resume.Resume); True stops the worker there."""
        return False

    def stepped(self, plan, start, timeline: dict) -> bool:
        """After this worker group's first step; True stops the worker there (no save)."""
        return False

    def saved(self, plan, step: int, start, timeline: dict, saving: float, stalled: float, settle=None) -> None:
        """After a periodic save returned (`stalled`: the seconds the loop stood still for it since `saving`;
        `settle`, collective, waits until it is committed: an asynchronous save is still uploading)."""


class RehearsedFailure(RuntimeError):
    """Raised by every worker of a rehearsal once its save is committed, so that Ray Train restarts the group within
    the same fit (`FailureConfig`), exactly as after a lost node: what the "restart" phase measures."""


class Rehearsal(RunHooks):
    """--rehearse: `phase` "train" measures the steps and the save, then fails on purpose; the group Ray Train starts
    in its place is the "restart" phase. A "resize" (a fit of its own on fewer workers) is the elastic path. Both
    stop at their first step after the restore, so the checkpoint they restored stays the newest."""

    evaluates = False  # a rehearsal has no held-out set

    def __init__(self, phase: str):
        assert phase in ("train", "resize"), phase  # "restart" is what a "train" group becomes when restarted
        self.half, self.phases = phase, None

    def start(self, device) -> None:
        self.phases = Phases(device)
        self.phases.mark("started")

    def phase(self, name: str) -> None:
        self.phases.mark(name)

    def restored(self, plan, start, timeline, restoring) -> bool:
        if start.found:
            self.half = "restart" if self.half == "train" else self.half
            self.phases.mark("restored")
        return False

    def stepped(self, plan, start, timeline) -> bool:
        if self.half == "train":
            return False
        memory = self.phases.over_ranks()
        if _rank() == 0:  # the restart's parts, in the order a restarted run pays them
            t = timeline
            # A restart counts from the failure (Ray Train notices it, stops the group, starts another); a resize,
            # a fit of its own here, from the fit's start.
            began = read_measured(plan.run_uri, plan.endpoint, "train")["failed_at"] if self.half == "restart" else t["fit_called"]
            write_measured(plan.run_uri, plan.endpoint, self.half, {
                "group_start_s": t["worker_start"] - began, "universal_s": start.universal_s,
                "engine_s": t["engine_ready"] - t["worker_start"] - start.universal_s,
                "restore_s": t["restored"] - t["engine_ready"], "first_step_s": t["first_step"] - t["restored"],
                "to_first_step_s": t["first_step"] - began, "resharded": start.resharded,
                "step": start.step, "optimizer_digest": start.digest, "memory": memory})
        return True

    def saved(self, plan, step, start, timeline, saving, stalled, settle=None) -> None:
        self.phases.mark("saved")
        trained = step - (start.step or 0)
        first = timeline["first_step"] - timeline["engine_ready"]
        if settle is not None:  # every rank: the commit needs each rank's word that its upload is done
            settle()
        committed = _committed(plan, step) if _rank() == 0 else 0.0  # an asynchronous save commits after the stall
        memory = self.phases.over_ranks()
        if _rank() == 0:
            write_measured(plan.run_uri, plan.endpoint, "train", {
                "save_stall_s": stalled, "save_s": committed - saving, "first_step_s": first, "memory": memory,
                "step_s": (saving - timeline["first_step"]) / (trained - 1) if trained > 1 else first,
                "failed_at": time.time()})
        _barrier()  # the record is in storage before any rank fails
        raise RehearsedFailure(f"rehearsal: step {step} saved; failing on purpose so that Ray Train restarts the"
                               " workers from it (the restart phase)")


def _committed(plan, step: int, timeout_s: float = 3600.0) -> float:
    """When the checkpoint of `step` got its commit marker (polled: the save may still be uploading)."""
    from vitray.checkpoints import COMMIT, step_dir

    marker, deadline = storage.join(plan.run_uri, step_dir(step), COMMIT), time.time() + timeout_s
    while not storage.exists(marker, plan.endpoint):
        if time.time() > deadline:
            raise TimeoutError(f"rehearsal: {marker} not written {timeout_s:.0f} s after the save began")
        time.sleep(0.05)
    return time.time()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


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
