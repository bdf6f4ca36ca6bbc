"""Numbers every worker contributes to: each function here is a collective — every rank calls it, in the same
order, or the group hangs. The training loop uses them to log one figure for the whole worker group."""
from __future__ import annotations

import ray
import torch
import torch.distributed as dist


def peak_memory(device: torch.device) -> float:
    """Peak bytes per device, the largest over ranks: allocated GPU memory, or on CPU the worker's peak RSS."""
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device))
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
    t = torch.tensor([peak], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def sum_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def mean_and_max(value: float, device: torch.device) -> tuple[float, float]:
    """(mean, max) of a number over the workers."""
    t = torch.tensor([float(value), float(value)], dtype=torch.float64, device=device)
    total, most = t[:1].clone(), t[1:].clone()
    dist.all_reduce(total)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return total.item() / dist.get_world_size(), most.item()


def sample_mean(loss_sum: torch.Tensor, samples: int, device: torch.device) -> float:
    """The mean loss over every sample of every worker since the last log (workers may hold unequal shares)."""
    t = torch.stack([loss_sum.detach().double(), torch.tensor(float(samples), dtype=torch.float64)]).to(device)
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_positions(mine: dict) -> dict:
    """Every data partition's position, from the ranks that own them."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {p: pos for part in everyone for p, pos in part.items()}


def gather_lists(mine: list) -> list:
    """Every rank's list, concatenated."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sum(everyone, [])


def distinct_nodes() -> int:
    """How many Ray nodes the workers ran on (the placement strategy's effect)."""
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return len(set(nodes))

