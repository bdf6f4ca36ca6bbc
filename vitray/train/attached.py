"""What a run executes on here: the GPUs attached (with their memory) or, without any, the host's CPUs and memory
below Ray's out-of-memory threshold. The cost plan checks local CPU runs against it; `--rehearse` adapts a recipe to
it."""
from __future__ import annotations

import dataclasses
import os

from vitray import cost

RAY_RESERVE = 2 * cost.GIB  # host memory the driver, raylet, GCS and dashboard keep (measured: ~1.6 GiB here)
OOM_FRACTION = 0.95  # Ray's memory monitor kills a worker when the host passes this share of its memory


@dataclasses.dataclass(frozen=True)
class Attached:
    """What the rehearsal runs on: GPUs (with their memory) or, without any, the host's CPUs and memory."""

    gpus: int
    cpus: float
    memory: float  # bytes of host memory
    gpu_memory: float = 0.0  # bytes per GPU

    @staticmethod
    def here() -> "Attached":
        """This machine, or the Ray cluster RAY_ADDRESS names (as under `ray job submit`)."""
        if os.environ.get("RAY_ADDRESS", "local") != "local":
            import ray

            from vitray.session import init_ray

            init_ray()
            have = ray.cluster_resources()
            return Attached(int(have.get("GPU", 0)), have.get("CPU", 0), have.get("memory", 0))
        import torch

        gpu_memory = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
        return Attached(torch.cuda.device_count(), float(os.cpu_count() or 1),
                        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), gpu_memory)

    def budget(self, workers: int, accelerator: str) -> float:
        """Bytes one worker may use: a GPU's memory, or its share of the host's below Ray's OOM threshold."""
        if self.gpus:
            _, gib = cost._lookup(cost.ACCELERATOR_MEMORY_GIB, accelerator)
            return self.gpu_memory or (gib * cost.GIB if gib else float("inf"))
        return (OOM_FRACTION * self.memory - RAY_RESERVE) / workers
