"""Checkpoint saves with and without `storage.async_save`, side by side in one run of this script: the same training
run twice (by default ViT-B/16 at 224 px, ZeRO-1, 2 CPU workers, one image per step, the embedded S3 server),
saving every `--every` steps, first synchronously and then in the background.

Measured from each run's metrics.jsonl, per periodic save (the final save is synchronous in both and left out):
- the stall: seconds training stood still for the save (`save_stall_s` of the checkpoint event);
- for a background save, its parts: `gather_s` (digests and the full fp32 weights gathered to rank 0), `state_s`
  (DeepSpeed's state copied into host memory), `save_wait_s` (waiting for the previous save), and from the
  committed event, `upload_s` (writing the files and uploading them, beside training) and `save_s` (from the save's
  start to its COMMIT marker);
- step times: the median step not next to a save, and the steps during which an upload ran (they share the CPUs).

    python benchmarks/async_save.py [--model vit_b16] [--steps 7] [--every 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

from common import write_result


def one_run(s3, model: str, steps: int, every: int, background: bool) -> dict:
    from vitray import storage
    from vitray.config import smoke
    from vitray.train import launch
    from vitray.train.rehearse import checkpoint_bytes

    name = f"async-save-{'on' if background else 'off'}"
    cfg = smoke().replace(
        model=dict(name=model, num_classes=10), data=dict(image_size=224, val_uri="", crop_area_min=1.0),
        optim=dict(total_steps=steps, global_batch=2, micro_batch=1, warmup_steps=1),
        deepspeed=dict(zero_stage=1),
        storage=dict(uri=f"s3://{s3.bucket}", endpoint_url=s3.endpoint.url, checkpoint_every=every,
                     keep_checkpoints=steps, run_name=name, cost_log="none", async_save=background),
        log_every=1,
    )
    summary = launch.run(cfg)
    rows = [json.loads(x) for x in storage.read_bytes(storage.join(summary["run"], "metrics.jsonl"),
                                                      s3.endpoint).decode().splitlines()]
    saves = [r for r in rows if r.get("event") == "checkpoint"]
    committed = {r["step"]: r for r in rows if r.get("event") == "committed"}
    times = {r["step"]: r["time"] for r in rows if "loss" in r and "final" not in r}
    # A step's wall time: from the previous step's line to its own. The step after a save holds the stall; with
    # async saves the steps until its commit run beside the upload.
    walls = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    saved_at = {r["step"] for r in saves}
    quiet = [w for s, w in walls.items() if s - 1 not in saved_at and s - 2 not in saved_at]
    beside = [w for s, w in walls.items() if s - 2 in saved_at]  # the step after the stall: the upload is running
    return {
        "checkpoint_gb": checkpoint_bytes(storage.join(summary["run"], f"step_{every:08d}"), s3.endpoint) / 1e9,
        "saves": [{k: v for k, v in r.items() if k not in ("event",)} | (
            {"upload_s": committed[r["step"]]["upload_s"], "to_commit_s": committed[r["step"]]["save_s"]}
            if r["step"] in committed else {}) for r in saves],
        "stall_s_median": statistics.median(r["save_stall_s"] for r in saves),
        "step_s_median": statistics.median(quiet) if quiet else None,
        "step_s_beside_upload_median": statistics.median(beside) if beside else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--every", type=int, default=2)
    args = p.parse_args()

    # The embedded server takes any keys; the run treats it as a real endpoint (standard AWS chain).
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    from vitray import storage

    with storage.EmbeddedS3() as s3:
        sync = one_run(s3, args.model, args.steps, args.every, background=False)
        background = one_run(s3, args.model, args.steps, args.every, background=True)
    write_result("async_save", {
        "model": args.model, "image_size": 224, "workers": 2, "zero_stage": 1, "steps": args.steps,
        "checkpoint_every": args.every, "sync": sync, "async": background,
        "measured": "stall = seconds training stood still for one periodic save (save_stall_s); async parts:"
                    " gather_s (digests + full fp32 weights to rank 0), state_s (DeepSpeed state copied to host"
                    " memory), upload_s (files written and uploaded beside training, slowest rank), to_commit_s"
                    " (save start to COMMIT marker); step_s_beside_upload: a step run while the upload shares the"
                    " 2 cores",
    })


if __name__ == "__main__":
    main()
