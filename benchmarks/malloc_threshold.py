"""What glibc's fixed mmap threshold (`vitray.train.engine.return_freed_layers`, ZeRO-3 on CPU only) costs a train
step: the same model and batch stepped in a fresh process with the threshold fixed at 1 MiB and with glibc's
default, alternating, on one CPU thread (a smoke Train worker's setting).

    python benchmarks/malloc_threshold.py [--pairs 2] [--steps 15]   # writes benchmarks/results/malloc_threshold.json

Measured: CPU time per step (user and system), minor page faults per step. A fixed threshold makes every freed
block over 1 MiB go back to the kernel, so the next tensor of that size is a fresh mapping that the kernel zeroes
page by page: system time and page faults grow with the size of the activations, not with the model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import ROOT, write_result

# (model, image size, micro-batch): each smoke preset's model at its own size and micro-batch.
MODELS = (("vit_smoke", 16, 32), ("bit_smoke_s", 24, 32), ("detr_smoke", 64, 16))

STEP = r"""
import json, resource, sys, time
import torch
from vitray.models.registry import build_model
from vitray.train.engine import return_freed_layers
from vitray.config import smoke

name, size, batch, steps, fixed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(1)
if fixed:
    assert return_freed_layers(smoke().replace(deepspeed=dict(zero_stage=3)), on_gpu=False)
model = build_model(name, num_classes=10, image_size=size)
opt = torch.optim.AdamW(model.parameters(), 1e-4)
x = torch.randn(batch, 3, size, size)

def step():
    out = model(x)
    parts = out.values() if isinstance(out, dict) else [out]
    sum(p.float().mean() for p in parts if torch.is_tensor(p)).backward()
    opt.step()
    opt.zero_grad()

for _ in range(3):
    step()
r0 = resource.getrusage(resource.RUSAGE_SELF)
for _ in range(steps):
    step()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"user_ms": (r1.ru_utime - r0.ru_utime) / steps * 1e3, "sys_ms": (r1.ru_stime - r0.ru_stime) / steps * 1e3,
                  "minor_faults": (r1.ru_minflt - r0.ru_minflt) / steps}))
"""


def measure(model: str, size: int, batch: int, steps: int, fixed: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", STEP, model, str(size), str(batch), str(steps), str(int(fixed))],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    rows = []
    for model, size, batch in MODELS:
        runs = {"fixed_1mib": [], "glibc_default": []}
        for _ in range(args.pairs):
            runs["fixed_1mib"].append(measure(model, size, batch, args.steps, True))
            runs["glibc_default"].append(measure(model, size, batch, args.steps, False))
        median = {k: {m: round(statistics.median(r[m] for r in v), 1) for m in v[0]} for k, v in runs.items()}
        cpu = {k: v["user_ms"] + v["sys_ms"] for k, v in median.items()}
        rows.append({"model": model, "image_size": size, "micro_batch": batch, **median,
                     "cpu_ratio_fixed_over_default": round(cpu["fixed_1mib"] / cpu["glibc_default"], 2)})
        print(rows[-1], flush=True)
    write_result("malloc_threshold", {
        "what": "CPU ms per train step (forward, backward, AdamW) on one thread, in a fresh process each, with glibc's "
                "mmap threshold fixed at 1 MiB (vitray under ZeRO-3 on CPU) and at glibc's default; medians of "
                f"{args.pairs} alternating pairs of {args.steps} steps",
        "rows": rows})


if __name__ == "__main__":
    main()
