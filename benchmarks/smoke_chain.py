"""The transfer smoke chain, timed: pretrain the tiny ViT on digits at 16 px, fine-tune it at 24 px (SGD, EMA),
evaluate on the 297 held-out digits. Records accuracies and wall-clock with the machine and versions.

    python benchmarks/smoke_chain.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common import ROOT, write_result


def main() -> None:
    t = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "finetune.py"), "--preset", "smoke"],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"pretrain_val_top1"')))
    write_result("smoke_chain", {
        "what": "jobs/finetune.py --preset smoke: pretrain vit_smoke 16 px (Adam, ZeRO-2) → fine-tune 24 px (SGD, EMA 0.99)",
        "pretrain_val_top1": summary["pretrain_val_top1"], "finetune_val_top1_ema": summary["val_top1"],
        "finetune_val_top1_raw": summary["val_top1_raw"], "wall_s": time.time() - t,
    })


if __name__ == "__main__":
    main()
