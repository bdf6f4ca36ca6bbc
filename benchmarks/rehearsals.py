"""The paper's models rehearsed at each ZeRO stage on this machine: what fits, what is refused and why, and how far
the planner's peak memory per worker is from the measured one.

    python benchmarks/rehearsals.py [--models vit_b16 vit_l16 vit_h14] [--stages 1 2 3] [--steps 3]
    python benchmarks/rehearsals.py --replan     # the last run's measurements beside the planner as it is now

For each model and stage: the plan on this host (2 CPU workers, micro-batch 1, fp32, the JFT head of the H/14
recipe); a stage whose plan exceeds a worker's share of memory is refused by that figure (as `--rehearse` would
move past it); the others run `jobs/pretrain_vit_h14.py --rehearse` and report the measured peak beside the plan.
Writes benchmarks/results/rehearsal_table.jsonl (every row) and rehearsal_table.md (the table the README shows).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import ROOT, machine

from vitray import cost
from vitray.config import preset
from vitray.train.attached import Attached

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def plan(model: str, stage: int, host: Attached) -> cost.Estimate:
    cfg = preset("h14_jft").replace(model=dict(name=model), deepspeed=dict(zero_stage=stage),
                                    scaling=dict(num_workers=2, use_gpu=False), optim=dict(micro_batch=1, global_batch=2))
    return cost.estimate(cfg, 1, host=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16", "vit_h14"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--replan", action="store_true",
                        help="rewrite rehearsal_table.md from the last run's rows with today's planner; run nothing")
    args = parser.parse_args()
    host = Attached.here()
    budget = host.budget(2, "")
    if args.replan:
        with open(os.path.join(RESULTS, "rehearsal_table.jsonl")) as f:
            last = [json.loads(line) for line in f if line.strip()][-len(args.models) * len(args.stages):]
        for row in last:
            est = plan(row["model"], row["zero_stage"], host)
            row.update(planned_gib=est.memory_total / cost.GIB, planned={k: v / cost.GIB for k, v in est.memory.items()})
        with open(os.path.join(RESULTS, "rehearsal_table.md"), "w") as f:
            f.write(table(last, budget))
        print(table(last, budget))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitray-rehearsals-") as runs:
        for model in args.models:
            for stage in args.stages:
                est = plan(model, stage, host)
                row = {"model": model, "zero_stage": stage, "params": est.params,
                       "planned_gib": est.memory_total / cost.GIB, "budget_gib": budget / cost.GIB,
                       "planned": {k: v / cost.GIB for k, v in est.memory.items()}}
                if est.memory_total > budget:
                    row["result"] = "refused"
                    print(f"{model} ZeRO-{stage}: refused, plan {row['planned_gib']:.1f} GiB > {row['budget_gib']:.1f}",
                          flush=True)
                    rows.append(row)
                    continue
                job = [sys.executable, os.path.join(ROOT, "jobs", "pretrain_vit_h14.py"), "--model", model,
                       "--rehearse", str(args.steps), "--set", f"deepspeed.zero_stage={stage}",
                       "--set", f"storage.runs_dir={runs}", "--set", "storage.cost_log=none",  # rows: below
                       "--run-name", f"{model}-zero{stage}"]
                done = subprocess.run(job, capture_output=True, text=True, cwd=runs)
                if done.returncode != 0:
                    row.update(result="failed", error=done.stderr.strip().splitlines()[-1:])
                else:
                    measured = json.load(open(os.path.join(runs, f"{model}-zero{stage}", "rehearsal.json")))
                    row.update(result="ran", rehearsal=measured)
                print(f"{model} ZeRO-{stage}: {row['result']}"
                      + (f", measured {row['rehearsal']['peak_memory_per_worker_gib']:.2f} GiB, planned"
                         f" {row['planned_gib']:.2f} ({row['rehearsal']['plan_error']:+.0%})" if row["result"] == "ran" else ""),
                      flush=True)
                rows.append(row)
    with open(os.path.join(RESULTS, "rehearsal_table.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps({**row, "machine": machine()}) + "\n")
    with open(os.path.join(RESULTS, "rehearsal_table.md"), "w") as f:
        f.write(table(rows, budget))
    print(table(rows, budget))


def table(rows: list[dict], budget: float) -> str:
    m = machine()
    lines = [f"Rehearsals on {m['cores']} cores, {m['memory_gib']} GiB ({m['cpu']}; torch {m['torch']}, DeepSpeed"
             f" {m['deepspeed']}, Ray {m['ray']}): 2 CPU workers, fp32, micro-batch 1, 224 px, JFT head;"
             f" {budget / cost.GIB:.1f} GiB per worker below Ray's OOM threshold.", "",
             "| model | ZeRO | planned GiB/worker | measured peak | plan error | step s | checkpoint GB | save s | restore s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['zero_stage']} | {r['planned_gib']:.2f} |"
        if r["result"] == "ran":
            x = r["rehearsal"]
            error = r["planned_gib"] / x["peak_memory_per_worker_gib"] - 1
            lines.append(f"{head} {x['peak_memory_per_worker_gib']:.2f} | {error:+.0%} | {x['step_s']:.1f} |"
                         f" {x['checkpoint_gb']:.2f} | {x['save_s']:.1f} | {x['restore_s']:.1f} |")
        elif r["result"] == "refused":
            lines.append(f"{head} refused: the plan exceeds {r['budget_gib']:.1f} GiB | | | | | |")
        else:
            lines.append(f"{head} failed: {' '.join(r['error'])} | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
