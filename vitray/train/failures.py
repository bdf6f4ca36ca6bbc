"""How a run ended, decided by the type of what was raised (never by matching message text)."""
from __future__ import annotations


class NonFiniteLoss(RuntimeError):
    """A worker's running loss became NaN or infinite: every rank stops together, before any save."""


def classify(error: BaseException) -> str:
    """The run state a failure leaves: "diverged" when a worker's loss went non-finite, else "failed". Ray Train
    hands the workers' own exceptions over (`WorkerGroupError.worker_failures`, rank → exception)."""
    failures = getattr(error, "worker_failures", None) or {}
    todo, visited = [error, *failures.values()], set()
    while todo:
        e = todo.pop()
        if id(e) in visited:
            continue
        visited.add(id(e))
        if isinstance(e, NonFiniteLoss):
            return "diverged"
        todo += [c for c in (getattr(e, "cause", None), e.__cause__) if isinstance(c, BaseException)]  # RayTaskError: .cause
    return "failed"


def group_closed() -> bool:
    """Whether Ray Train has closed this worker's process group under the running loop. It does so when it stops a
    worker group on purpose (an elastic resize, or a failure elsewhere that it restarts from): its backend's shutdown
    destroys torch's group first, and the loop's next collective then raises (DeepSpeed: "backend not set"). vitray
    never destroys the group itself while training, so an error raised after that is the teardown, not a fault."""
    import torch.distributed as dist

    return dist.is_available() and not dist.is_initialized()


def check_finite(loss_sum, step: int, saves, device) -> None:
    """Collective: stop every rank together when any rank's running loss is NaN or infinite, before anything is
    saved, so no checkpoint ever holds non-finite weights. A save still uploading (`saves`: the loop's
    `Checkpointer`) is committed first: it was taken from the finite weights of an earlier step."""
    import torch

    from vitray.train.collectives import any_rank

    if any_rank(not torch.isfinite(loss_sum).item(), device):
        saves.settle()
        last_good = saves.last_good
        kept = f"the latest checkpoint (step {last_good}) is kept as it was" if last_good else "no checkpoint was written"
        raise NonFiniteLoss(f"non-finite training loss by step {step}; stopping without saving: {kept}. Lower "
                            "optim.lr, raise optim.warmup_steps or check the data")
