"""What a Ray Train fit costs before it trains: wall-clock and CPU seconds by process, vitray's trainer
(`vitray/train/trainer.py`: only the helper actors a fit uses) against Ray Train's own `TorchTrainer` callbacks,
alternating in one Ray session so both meet the same machine.

    python benchmarks/fit_startup.py [--fits 3]      # writes benchmarks/results/fit_startup.json

Each fit is the smoke model for 2 steps on the digits (2 workers, no checkpoint), in a local Ray this script starts
(as a laptop run or the test session does). Every process's CPU time is sampled from /proc every 0.2 s; a fit's
share is what each process used between its start and its end. The first fit of the session (Ray's own actors
starting) is left out of the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from common import write_result

TICK = os.sysconf("SC_CLK_TCK")
KINDS = ("RayTrainWorker", "TrainController", "PlacementGroupCleaner", "DatasetManager", "SynchronizationActor",
         "ray::IDLE", "raylet", "gcs_server", "dashboard")


class CpuSampler:
    """Every process's CPU seconds, by kind (the first of KINDS in its command line, else "other"); a process that
    exits keeps its last sampled value."""

    def __init__(self):
        self.cpu: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                    line = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                # A Ray worker's title changes from ray::IDLE to its actor's: the latest names it.
                self.cpu[pid] = (next((k for k in KINDS if k in line), "other"), (int(stat[11]) + int(stat[12])) / TICK)

    def snapshot(self) -> dict[str, float]:
        return {pid: t for pid, (_, t) in self.cpu.items()}

    def since(self, before: dict[str, float]) -> dict[str, float]:
        by: dict[str, float] = {}
        for pid, (kind, t) in list(self.cpu.items()):
            used = t - before.get(pid, 0.0)
            if used > 0.01:
                by[kind] = by.get(kind, 0.0) + used
        return by

    def stop(self) -> None:
        self._stop.set()


def one_fit(base: str, s3, name: str, lean: bool) -> float:
    from ray.train.torch import TorchTrainer

    from vitray.config import smoke
    from vitray.train import launch, trainer

    # Ray Train's own callbacks, every helper actor included, for the comparison.
    trainer.LeanTorchTrainer._create_default_callbacks = (LEAN if lean else TorchTrainer._create_default_callbacks)
    cfg = smoke().replace(
        model=dict(name="vit_smoke", num_classes=10),
        data=dict(builtin="", train_uri=f"{base}/train", val_uri="", image_size=16, shuffle_buffer=128, crop_area_min=1.0),
        optim=dict(global_batch=32, micro_batch=8, warmup_steps=1, lr=3e-3, schedule="linear", total_steps=2),
        storage=dict(uri=f"s3://{s3.bucket}/fit-startup", endpoint_url=s3.endpoint.url, run_name=name, checkpoint_every=0),
        log_every=1)
    cfg, plan = launch.prepare(cfg)
    started = time.time()
    launch.fit(cfg, plan)
    return time.time() - started


def main() -> None:
    global LEAN
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fits", type=int, default=3, help="fits of each kind after the first (default 3)")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import ray

    from vitray.data.datasets import write_digits
    from vitray.session import init_ray
    from vitray.storage import EmbeddedS3
    from vitray.train import trainer

    LEAN = trainer.LeanTorchTrainer._create_default_callbacks
    runs: dict[str, list[dict]] = {"vitray": [], "ray_train_default": []}
    with EmbeddedS3() as s3:
        base = f"s3://{s3.bucket}/datasets/digits"
        write_digits(base, s3.endpoint)
        init_ray(num_cpus=4, object_store_memory=1 << 30)
        sampler = CpuSampler()
        one_fit(base, s3, "warm-up", lean=True)  # Ray's own actors start with the session's first fit
        for i in range(args.fits):
            for kind in runs:  # alternating: both meet the same machine
                time.sleep(2)
                before = sampler.snapshot()
                wall = one_fit(base, s3, f"{kind}-{i}", lean=kind == "vitray")
                time.sleep(1)  # the fit's helper actors exit after it returns
                cpu = sampler.since(before)
                runs[kind].append({"wall_s": round(wall, 2), "cpu_s": round(sum(cpu.values()), 2),
                                   "cpu_s_by_process": {k: round(v, 2) for k, v in sorted(cpu.items(), key=lambda x: -x[1])}})
        sampler.stop()
        ray.shutdown()
    summary = {kind: {"wall_s": statistics.median(r["wall_s"] for r in rs), "cpu_s": statistics.median(r["cpu_s"] for r in rs)}
               for kind, rs in runs.items()}
    ratios = {f"vitray_over_default_{k}": round(summary["vitray"][k] / summary["ray_train_default"][k], 3)
              for k in ("wall_s", "cpu_s")}
    write_result("fit_startup", {
        "measured": "a 2-step smoke fit (2 CPU workers, ZeRO-2, no checkpoint) in a local Ray this script started: "
                    "wall-clock of launch.fit and the CPU seconds every process used meanwhile, medians of "
                    f"{args.fits} fits each, alternating; vitray's trainer against Ray Train's default callbacks",
        "median": summary, "ratios": ratios, "fits": runs})


LEAN = None

if __name__ == "__main__":
    main()
