"""Time lost to one worker failure on the smoke run: a Ray Train worker is SIGKILLed a few steps after a committed
checkpoint; Ray Train restarts the worker group, every rank restores the newest complete checkpoint and the data
position, and training goes on. Measured: seconds from the kill to the next completed step, and how they split
into restart (kill → first step after the restore) and replay (re-running the steps since the checkpoint).

    python benchmarks/worker_failure.py [--every 100] [--kill-after 20]
"""
from __future__ import annotations

import argparse
import json
import threading
import time

from common import write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--delay", type=float, default=2.0, help="kill a worker this many seconds after the checkpoint")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()

    import os

    import ray

    # The embedded server takes any keys; the run treats it as a real endpoint (standard AWS chain).
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "benchmark")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "benchmark")
    from vitray import faults, storage
    from vitray.config import smoke
    from vitray.train import checkpoint, launch

    with storage.EmbeddedS3() as s3:
        cfg = smoke().replace(
            optim=dict(total_steps=args.steps),
            storage=dict(uri=f"s3://{s3.bucket}", endpoint_url=s3.endpoint.url, checkpoint_every=args.every,
                         run_name="worker-failure", cost_log="none"),
            data=dict(val_uri=""), log_every=1, max_failures=1,
        )
        cfg, plan = launch.prepare(cfg)
        ray.init(address="local", logging_level="WARNING")
        outcome: dict = {}
        runner = threading.Thread(target=lambda: outcome.setdefault("result", launch.fit(cfg, plan)), daemon=True)
        runner.start()
        faults.wait_for(lambda: args.every in checkpoint.scan(plan.run_uri, s3.endpoint)[0], 600, what="checkpoint")

        time.sleep(args.delay)  # let the run go past the checkpoint: those steps are lost and redone
        killed_at = time.time()
        faults.kill_train_worker()
        runner.join(1200)
        result = outcome["result"]
        assert result.error is None, result.error
        rows = [json.loads(x) for x in storage.read_bytes(storage.join(plan.run_uri, "metrics.jsonl"), s3.endpoint).decode().splitlines()]
        ray.shutdown()
    resumed = next(r for r in rows if r.get("event") == "resumed")
    after = [r for r in rows if "loss" in r and "final" not in r and r["time"] > killed_at]
    first = after[0]
    steady = [r for r in rows if "loss" in r and "final" not in r and r["step"] > args.every + 100]
    per_step = (steady[-1]["time"] - steady[0]["time"]) / max(1, steady[-1]["step"] - steady[0]["step"]) if len(steady) > 1 else None
    write_result("worker_failure", {
        "checkpoint_every": args.every, "killed_seconds_after_checkpoint": args.delay,
        "resumed_from_step": resumed["step"], "first_step_after_restart": first["step"],
        "seconds_kill_to_next_step": first["time"] - killed_at,
        "seconds_per_step_steady": per_step,
        "steps_redone_at_most": args.every,
        "note": "kill -> next step = Ray Train's worker-group restart + DeepSpeed engine build + checkpoint download"
                " + data pipeline start; on top of it the run redoes the steps since the last committed checkpoint"
                " (at most checkpoint_every x seconds_per_step_steady)",
    })


if __name__ == "__main__":
    main()
