"""The suite's reference run: 40 steps of the smoke model on the digits (ZeRO-2, 2 CPU workers), a checkpoint every
10, dropout on (so the RNG state matters), a loss line every step. Run once per session (`conftest.reference_run`):
the stored known-good curve is checked against it, the fault tests replay it exactly, the ZeRO-2 test reads its
metrics and checkpoints, and the evaluation and fine-tuning tests start from its final checkpoint."""
from __future__ import annotations

import json
import os

from vitray import storage

CURVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "smoke_loss_curve.json")
STEPS, EVERY = 40, 10


def overrides(s3, digits, run_name: str) -> list[str]:
    """The reference run's settings as --set strings, so a subprocess job or another stage or cluster runs the same."""
    return [
        f"data.train_uri={digits['train']}", "data.val_uri=", "data.builtin=", "data.shuffle_buffer=128",
        "data.crop_area_min=0.5", "model.dropout=0.1", "optim.global_batch=32", "optim.micro_batch=8",
        "optim.warmup_steps=3", "optim.lr=0.003", f"optim.total_steps={STEPS}", f"storage.checkpoint_every={EVERY}",
        "storage.keep_checkpoints=5", f"storage.uri=s3://{s3.bucket}/reliability", f"storage.endpoint_url={s3.endpoint.url}",
        f"storage.run_name={run_name}", "storage.cost_log=none", "log_every=1",
    ]


def metrics(run_uri: str, endpoint) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(storage.join(run_uri, "metrics.jsonl"), endpoint).decode().splitlines()]


def losses(run_uri: str, endpoint) -> dict[int, float]:
    """{step: loss} of a run's logged training steps."""
    return {r["step"]: r["loss"] for r in metrics(run_uri, endpoint) if "loss" in r and "final" not in r}
