"""The DETR smoke run, timed, with its learning curve: `jobs/train_detr.py --preset smoke` (backbone pretrained as
a digit classifier, then DETR on 64 px digit canvases, 2 CPU workers), a checkpoint every 250 steps, each scored
with COCOeval on the 300 held-out canvases. Records AP/AP50 against steps with the machine and versions.

    python benchmarks/detr_smoke.py [--epochs 24]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, write_result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=float, default=0, help="DETR epochs (default: the preset's)")
    args = p.parse_args()
    from vitray import storage
    from vitray.tasks.detection.task import evaluate_checkpoint

    with tempfile.TemporaryDirectory(prefix="vitray-detr-") as root:
        extra = ["--set", f"optim.epochs={args.epochs}"] if args.epochs else []
        t = time.time()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "train_detr.py"), "--preset", "smoke",
                               "--set", f"storage.uri={root}", "--set", "storage.checkpoint_every=250",
                               "--set", "storage.keep_checkpoints=100", *extra],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        wall = time.time() - t
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        backbone = next(x["backbone"] for x in lines if "backbone" in x)
        final = next(x for x in lines if "val_AP50" in x)
        val = os.path.join(root, "datasets", "digit_canvases_64", "val")
        curve = []
        for name in sorted(n for n in storage.list_files(final["run"]) if n.startswith("step_")):
            m = evaluate_checkpoint(os.path.join(final["run"], name), val)
            curve.append({"step": int(name.split("_")[1]), "AP": m["val_AP"], "AP50": m["val_AP50"]})
    write_result("detr_smoke", {
        "what": "jobs/train_detr.py --preset smoke: bit_smoke_s pretrained on digits (24 px), then detr_smoke on "
                "64 px digit canvases (2000 train / 300 held out), 2 CPU workers, ZeRO-2",
        "backbone_val_top1": backbone["val_top1"], "steps": final["step"],
        "final": {k: final[k] for k in ("val_AP", "val_AP50", "val_AP75", "val_AP_S")},
        "curve": curve, "wall_s": wall,
        "images_per_s_per_worker": final.get("cost", {}).get("images_per_s_per_accelerator"),
    })


if __name__ == "__main__":
    main()
