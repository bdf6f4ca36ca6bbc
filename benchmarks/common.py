"""Shared by the benchmark scripts: the machine and versions every result is written with."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def machine() -> dict:
    import deepspeed
    import ray
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
        "deepspeed": deepspeed.__version__, "platform": platform.platform(),
    }


def write_result(name: str, result: dict) -> str:
    """benchmarks/results/<name>.json: the figures, the machine, the versions, the date."""
    path = os.path.join(ROOT, "benchmarks", "results", f"{name}.json")
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result, "machine": machine()}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(record, indent=1))
    return path
