"""Measure a configuration for N steps and append its accelerator-days row to benchmarks/results/accelerator_days.jsonl
(model, resolution, batch, ZeRO stage, nodes × accelerators, images/s per accelerator, MFU, memory per device, and
the projection to the paper's schedules). Every training run appends the same row to `<storage.uri>/runs/`.

    python benchmarks/accelerator_days.py --preset smoke --steps 40
    python benchmarks/accelerator_days.py --preset smoke --steps 40 --set model.name=bit_tiny_test --set data.image_size=32
    python benchmarks/accelerator_days.py --preset b16_jft --steps 50 --set data.train_uri=s3://... (on a GPU cluster)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common import ROOT

LOG = os.path.join(ROOT, "benchmarks", "results", "accelerator_days.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()

    from vitray.config import apply_overrides, preset
    from vitray.storage import embedded_unless
    from vitray.train import launch

    cfg = apply_overrides(preset(args.preset), args.overrides + [f"optim.total_steps={args.steps}",
                                                                 f"storage.cost_log={LOG}"])
    with embedded_unless(cfg.storage.uri) as embedded:
        summary = launch.run(cfg, embedded=embedded)
    print(json.dumps(summary["cost"]))


if __name__ == "__main__":
    sys.exit(main())
