"""How what is not compute grows with the number of workers: start-up, coordination per step, checkpoint commit,
data start-up — on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`), at 2, 4, 8 and 16 workers.

    python benchmarks/worker_scaling.py [--workers 2 4 8 16] [--steps 12]
    python benchmarks/worker_scaling.py --workers 8 --json     # one size, its figures and checks as JSON (the test)

Each size runs the smoke ViT on the digits (written in 40-sample shards, so every worker has its own), micro-batch
1 per worker, ZeRO-2, from the embedded S3 server: `--steps` steps with a checkpoint every quarter, stopped
half-way (`stop_at_step`) and resumed in a second fit. It checks what the many-worker path must keep: every
rank's data position in every checkpoint, the commit marker, the resume at the stopped step.

What 2 oversubscribed cores distort: N workers share 2 cores, so a step's wall time holds every worker's compute
in turn. Each worker logs its own CPU seconds per step; compute's share of the wall time is N × that ÷ 2 cores,
and coordination is what is left (collectives, Ray, waiting for data). Start-up phases are wall-clock, and include
N processes importing torch and DeepSpeed on 2 cores: the per-worker part of start-up is an upper bound.
Writes benchmarks/results/worker_scaling.json and worker_scaling.png.
"""
from __future__ import annotations

import argparse
import json
import os

from common import ROOT, write_result

CORES = os.cpu_count() or 2
NODES = 4  # the cluster: a head and 3 worker nodes, each with NODE_CPUS logical CPUs
NODE_CPUS = 4


def run_size(n: int, steps: int, s3, train_uri: str, name: str = "") -> dict:
    """One size: the fit to the half-way checkpoint, the resumed fit to the end; figures and checks."""
    from vitray import storage
    from vitray.checkpoints import COMMIT, scan, step_dir
    from vitray.config import smoke
    from vitray.train import launch

    half, every = steps // 2, max(1, steps // 4)
    cfg = smoke().replace(
        data=dict(builtin="", train_uri=train_uri, val_uri=""),
        optim=dict(micro_batch=1, global_batch=n, total_steps=steps, warmup_steps=1),
        scaling=dict(num_workers=n, cpus_per_worker=0.25, placement_strategy="SPREAD"),
        storage=dict(uri=f"s3://{s3.bucket}/scaling", endpoint_url=s3.endpoint.url, run_name=name or f"workers-{n}",
                     checkpoint_every=every, keep_checkpoints=steps, cost_log="none"),
        log_every=1, stop_at_step=half,
    )
    first = launch.run(cfg)
    second = launch.run(cfg.replace(stop_at_step=0), resume=True)
    run = first["run"]
    rows = [json.loads(r) for r in storage.read_bytes(storage.join(run, "metrics.jsonl"), s3.endpoint).decode().splitlines()]
    startups = [r for r in rows if r.get("event") == "startup"]
    steps_rows = [r for r in rows if "loss" in r and "final" not in r]
    saves = [r["save_stall_s"] for r in rows if r.get("event") == "checkpoint"]  # what training waited for
    # Steady steps: not a fit's first, none whose wall time holds a checkpoint save (the step after a save).
    saved_at = {s for s in range(1, steps + 1) if s % every == 0 or s == half}
    steady = [r for r in steps_rows if r["step"] not in (1, half + 1) and r["step"] - 1 not in saved_at]
    walls = [r for r in zip(steps_rows, steps_rows[1:]) if r[1] in steady and r[1]["step"] == r[0]["step"] + 1]
    wall = sorted(b["time"] - a["time"] for a, b in walls)
    cpu = sorted(r["cpu_s_per_step"] for r in steady)
    step_s, cpu_s = wall[len(wall) // 2], cpu[len(cpu) // 2]
    compute_s = n * cpu_s / min(CORES, n)
    s0 = startups[0]
    # Start-up on 2 cores holds every worker's imports and engine build in turn; on a cluster each worker has its
    # own cores. What is left after that CPU share is what grows with the worker count wherever it runs.
    startup_s = s0["first_step"] - s0["fit_called"]
    startup_cpu_s = n * s0["engine_cpu_s"] / min(CORES, n)
    complete, _ = scan(run, s3.endpoint)
    positions = {step: sorted(p for p in storage.list_files(storage.join(run, step_dir(step)), s3.endpoint)
                              if os.path.basename(p).startswith("position-rank")) for step in complete}
    return {
        "workers": n,
        "startup_s": startup_s, "startup_cpu_per_worker_s": s0["engine_cpu_s"],
        "startup_beyond_cpu_s": max(startup_s - startup_cpu_s, 0.0),
        "worker_group_start_s": s0["worker_start"] - s0["fit_called"],
        "engine_s": s0["engine_ready"] - s0["worker_start"],
        "data_start_s": s0["data_ready"] - s0["worker_start"],
        "step_s": step_s, "cpu_s_per_step_per_worker": cpu_s, "compute_share_s": compute_s,
        "coordination_s": max(step_s - compute_s, 0.0),
        "checkpoint_commit_s": sorted(saves)[len(saves) // 2] if saves else None,
        "checks": {
            "committed_steps": complete,
            "commit_markers": all(storage.exists(storage.join(run, step_dir(s), COMMIT), s3.endpoint) for s in complete),
            "position_files": {str(s): len(p) for s, p in positions.items()},
            "stopped_at": first["step"], "finished_at": second["step"],
            "resumed_at": [r["step"] for r in rows if r.get("event") == "resumed"],
            "worker_nodes": second.get("worker_nodes"),
            "final_loss": second["loss"],
        },
    }


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b·x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    return my - b * mx, b


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("startup_s", "start-up: fit() → first step"),
              ("startup_beyond_cpu_s", "start-up beyond the workers' CPU share"),
              ("data_start_s", "data: worker start → first batch ready"),
              ("coordination_s", "coordination per step (wall − compute share)"),
              ("checkpoint_commit_s", "checkpoint save stall")]
    fig, axes = plt.subplots(1, len(panels), figsize=(20, 3.6))
    xs = [r["workers"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        ys = [r[key] for r in rows]
        a, b = fit_line(xs, ys)
        ax.plot(xs, ys, "o-", label="measured")
        ax.plot(xs, [a + b * x for x in xs], "--", label=f"{a:.2f} + {b:.3f}·N s")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("workers")
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"vitray worker scaling, local {NODES}-node Ray cluster on {CORES} cores (smoke ViT, micro-batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", action="store_true", help="print the figures and checks as JSON; write no result")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from vitray.data.datasets import write_digits
    from vitray.storage import EmbeddedS3

    # The runs go to the embedded S3 server through the standard credential chain, as to any S3 (moto checks none);
    # the cluster's nodes inherit it from this process.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    rows = []
    with EmbeddedS3() as s3:
        base = f"s3://{s3.bucket}/datasets/digits40"
        write_digits(base, s3.endpoint, samples_per_shard=40)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS})
        for _ in range(NODES - 1):
            cluster.add_node(num_cpus=NODE_CPUS)
        ray.init(address=cluster.address, logging_level="WARNING")
        try:
            if not args.json:  # the first fit pays for cold caches (imports, DeepSpeed's op): not a size's cost
                run_size(args.workers[0], args.steps, s3, f"{base}/train", name="warm-up")
            for n in args.workers:
                rows.append(run_size(n, args.steps, s3, f"{base}/train"))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    if args.json:
        print("RESULT " + json.dumps(rows))
        return
    projection = {}
    for key in ("startup_s", "startup_beyond_cpu_s", "data_start_s", "coordination_s", "checkpoint_commit_s"):
        a, b = fit_line([r["workers"] for r in rows], [r[key] for r in rows])
        projection[key] = {"intercept_s": a, "per_worker_s": b, "at_1024_workers_s": a + b * 1024}
    plot(rows, os.path.join(ROOT, "benchmarks", "results", "worker_scaling.png"))
    write_result("worker_scaling", {
        "what": "non-compute time of a training run against its worker count on a local multi-node Ray cluster"
                f" ({NODES} nodes × {NODE_CPUS} logical CPUs on {CORES} physical cores); compute separated by each"
                " worker's CPU seconds per step; linear fits projected to 1,024 workers (modelled)",
        "rows": rows, "projection": projection,
    })


if __name__ == "__main__":
    main()
