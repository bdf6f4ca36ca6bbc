"""Elastic training on a local multi-node Ray cluster: a node lost mid-run and returned, against a run that kept
its workers throughout — same losses, same samples in every step, every sample once per epoch, and the time each
resize costs.

    python benchmarks/elastic.py              # one loss and one return, then goodput with a node lost every 60 s
                                              # for 40 s, elastic and fixed-size (writes benchmarks/results/elastic.json)
    python benchmarks/elastic.py --json       # the loss-and-return scenario only, its figures and checks (the test)

The cluster (`ray.cluster_utils.Cluster`): a head with one CPU, where Ray Data decodes, and two "spot" nodes that
each fit one training worker (1.5 of their 2 CPUs). The runs are separate driver processes on that cluster (as
`ray job submit` starts them), training the smoke ViT on the digits with 2 data partitions, global batch 64,
micro-batch 16, dropout off, a checkpoint every 5 steps, every step's sample keys logged (`data.audit_samples`).
The elastic run has `scaling.min_workers=1`: this script removes one spot node after step 8, waits until the run
continues on one worker, adds a node back, and lets Ray Train grow the run at its next resize check (5 s here).

What 2 cores distort: the surviving worker and the two workers afterwards share the same 2 cores, so a step's wall
time is not a cluster's. Time lost per resize (from the checkpoint the new group resumed from until it had
restored it: the redone steps plus the restart) is measured here; on a cluster the restart dominates it. Once the
run has saved a checkpoint on one worker, its steps are held until it has grown back (the smoke model would
otherwise finish the run first), so the second resize's time lost includes that wait; `node_back_to_restart_s` is
the resize itself.
Writes benchmarks/results/elastic.json.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

from common import ROOT, write_result

from vitray import faults
from vitray.goodput import churn_ideal

# Steps enough that the run is still going when Ray Train grows it back: 25–50 s after the node returns here.
STEPS, EVERY, REMOVE_AT = 90, 5, 8
# A node that dies unannounced is found by Ray's health checks, 5 × 3 s (10 s timeout) by default; a cluster of spot
# nodes may tune them down, and this one does. (Removing a node here is graceful, and noticed at once.)
HEALTH_CHECKS = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}
# While this file exists, the workers wait before each step (`vitray.faults.hold_point`); the nodes inherit the name.
HOLD = os.path.join(tempfile.mkdtemp(prefix="vitray-elastic-"), "hold")
os.environ["VITRAY_TEST_HOLD"] = HOLD


def sets(s3, train_uri: str, name: str, steps: int, elastic: bool) -> list[str]:
    out = [f"data.train_uri={train_uri}", "data.val_uri=", "data.builtin=", "data.audit_samples=true",
           "model.dropout=0.0", "optim.global_batch=64", "optim.micro_batch=16", "optim.warmup_steps=3",
           "optim.lr=0.003", f"optim.total_steps={steps}", "scaling.num_workers=2", "scaling.cpus_per_worker=1.5",
           f"storage.uri=s3://{s3.bucket}/elastic", f"storage.endpoint_url={s3.endpoint.url}", f"storage.run_name={name}",
           f"storage.checkpoint_every={EVERY}", "storage.keep_checkpoints=2", "storage.cost_log=none", "log_every=1",
           "scaling.group_start_timeout_s=20"]
    if elastic:
        out += ["scaling.min_workers=1", "scaling.resize_check_s=5", "max_failures=-1"]
    return out


class Driver:
    """A training job in its own process on the cluster; its output lines, timestamped, as they come."""

    def __init__(self, address: str, overrides: list[str]):
        args = [sys.executable, os.path.join(ROOT, "jobs", "pretrain_vit_h14.py"), "--preset", "smoke"]
        for item in overrides:
            args += ["--set", item]
        self.proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": ROOT},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.text: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.text.append(line)
            self.lines.put((time.time(), line))
        self.lines.put((time.time(), None))

    def wait_for(self, match, timeout: float = 600) -> tuple[float, str]:
        """The first line from now on for which `match(line)` holds (its time and text)."""
        end = time.time() + timeout
        while time.time() < end:
            try:
                t, line = self.lines.get(timeout=max(end - time.time(), 0.01))
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError("the job ended first:\n" + "".join(self.text[-60:]))
            if match(line):
                return t, line
        raise TimeoutError("waited in vain:\n" + "".join(self.text[-60:]))

    def finish(self, timeout: float = 900) -> dict:
        self.proc.wait(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError("the job failed:\n" + "".join(self.text[-80:]))
        return json.loads([line for line in self.text if line.startswith("{")][-1])


def step_of(line: str) -> int | None:
    """The step of a worker's "step N/M loss …" line."""
    marker = line.find(" step ")
    if marker < 0 or " loss " not in line:
        return None
    head = line[marker + 6:].split("/", 1)[0]
    return int(head) if head.isdigit() else None


def read_run(summary: dict, endpoint) -> dict:
    from vitray import storage

    rows = [json.loads(r) for r in storage.read_bytes(storage.join(summary["run"], "metrics.jsonl"), endpoint).decode().splitlines()]
    return {"loss": {r["step"]: r["loss"] for r in rows if "loss" in r and "final" not in r},
            "samples": {r["step"]: r["samples"] for r in rows if r.get("event") == "samples"},
            "restarts": [r for r in rows if r.get("event") == "restart"]}


def lose_and_return(cluster, spot: list, driver: Driver, run_uri: str, endpoint) -> dict:
    """Remove a spot node after step REMOVE_AT; when the run goes on with one worker, add one back; wait for the
    run to grow. Wall times of each phase, as this script saw them."""
    from vitray.checkpoints import scan

    driver.wait_for(lambda line: (step_of(line) or 0) >= REMOVE_AT)
    # Saves upload in the background: the node goes once the first has committed, so the shrink has one to resume.
    faults.wait_for(lambda: scan(run_uri, endpoint)[0], 300, what="the first committed checkpoint")
    lost_at = time.time()
    cluster.remove_node(spot.pop())
    shrunk_at, line = driver.wait_for(lambda line: "restarted at step" in line and " on 1 workers" in line)
    first_small, _ = driver.wait_for(lambda line: step_of(line) is not None)
    # The smoke model's steps take milliseconds here, a real one's seconds: held from its first checkpoint until it
    # has grown, the one-worker group cannot finish the run before Ray Train grows it (25–50 s after the node
    # returns, on 2 cores), and the regrown group resumes from what the one worker saved.
    faults.wait_for(lambda: any(s > REMOVE_AT for s in scan(run_uri, endpoint)[0]), 300,
                    what="the one-worker group's first checkpoint")
    open(HOLD, "w").close()
    returned_at = time.time()
    spot.append(cluster.add_node(num_cpus=2))
    grown_at, _ = driver.wait_for(lambda line: "restarted at step" in line and " on 2 workers" in line)
    os.remove(HOLD)
    first_big, _ = driver.wait_for(lambda line: step_of(line) is not None)
    return {"node_lost_to_restart_s": shrunk_at - lost_at, "node_lost_to_first_step_s": first_small - lost_at,
            "node_back_to_restart_s": grown_at - returned_at, "node_back_to_first_step_s": first_big - returned_at}


def scenario(cluster, spot: list, s3, train_uri: str, keys: list[str]) -> dict:
    """The fixed run, then the elastic one with a node lost and returned; figures and checks."""
    started = time.time()
    fixed = Driver(cluster.address, sets(s3, train_uri, "fixed", STEPS, elastic=False))
    fixed_summary = fixed.finish()
    fixed_s, started = time.time() - started, time.time()
    elastic = Driver(cluster.address, sets(s3, train_uri, "elastic", STEPS, elastic=True))
    phases = lose_and_return(cluster, spot, elastic, f"s3://{s3.bucket}/elastic/runs/elastic", s3.endpoint)
    elastic_summary = elastic.finish()
    phases.update(fixed_run_s=fixed_s, elastic_run_s=time.time() - started)
    a, b = read_run(fixed_summary, s3.endpoint), read_run(elastic_summary, s3.endpoint)
    steps = sorted(a["loss"])
    diff = max(abs(a["loss"][s] - b["loss"][s]) / abs(a["loss"][s]) for s in steps)
    seen = [tuple(k) for s in sorted(b["samples"]) for k in b["samples"][s]]
    by_epoch: dict[int, list[str]] = {}
    for key, epoch in seen:
        by_epoch.setdefault(epoch, []).append(key)
    return {
        "phases": phases,
        "restarts": b["restarts"],
        "summary": {k: elastic_summary.get(k) for k in ("restarts", "resizes", "time_lost_s", "data_position", "step")},
        "fixed_data_position": fixed_summary.get("data_position"),
        "checks": {
            "steps": [steps[0], steps[-1], len(steps)], "elastic_steps": sorted(b["loss"]) == steps,
            "max_relative_loss_difference": diff,
            "relative_loss_difference": [(b["loss"][s] - a["loss"][s]) / a["loss"][s] for s in steps],
            "same_samples_every_step": sorted(a["samples"]) == steps and a["samples"] == b["samples"],
            "epochs": {e: {"samples": len(ks), "distinct": len(set(ks)), "all_keys": sorted(set(ks)) == keys}
                       for e, ks in sorted(by_epoch.items())},
            "samples_trained": len(seen),
            "workers": [r["to_workers"] for r in b["restarts"]],
            # What the user sees of the resizes: a traceback of a collective the teardown broke reads as a crash.
            "teardown_tracebacks": sum("backend not set" in line for line in elastic.text),
            "stopped_lines": sum("Ray Train closed this worker group" in line for line in elastic.text),
        },
    }


def goodput(cluster, spot: list, s3, train_uri: str, steps: int, every_s: float, away_s: float) -> dict:
    """Three runs of `steps`: fixed-size on a quiet cluster; then, with a spot node lost every `every_s` seconds and
    back `away_s` later, the elastic run and a fixed-size one that restarts only when it has all its workers
    again (`max_failures`). Wall times, restarts, time lost."""
    out = {"steps": steps, "node_lost_every_s": every_s, "node_away_s": away_s}
    for name, elastic, churn in (("quiet", False, False), ("elastic", True, True), ("fixed", False, True)):
        started = time.time()
        overrides = sets(s3, train_uri, f"goodput-{name}", steps, elastic=elastic)
        driver = Driver(cluster.address, overrides + ([] if elastic else ["max_failures=-1"]))
        lost = 0
        if churn:
            driver.wait_for(lambda line: step_of(line) is not None)  # training, not start-up
            while driver.proc.poll() is None:
                deadline = time.time() + every_s
                while time.time() < deadline and driver.proc.poll() is None:
                    time.sleep(0.5)
                if driver.proc.poll() is not None:
                    break
                cluster.remove_node(spot.pop())
                lost += 1
                time.sleep(away_s)
                spot.append(cluster.add_node(num_cpus=2))
        summary = driver.finish()
        out[name] = {"run_s": time.time() - started, "nodes_lost": lost,
                     **{k: summary.get(k) for k in ("restarts", "resizes", "time_lost_s")}}
    # The yardstick: the goodput the schedule allows at most (worker-time present ÷ the quiet run's).
    out["ideal"] = {"goodput": churn_ideal(out["quiet"]["run_s"], every_s, away_s),
                    "source": "modelled: worker-time present under the schedule ÷ the quiet run's (vitray.goodput.churn_ideal)"}
    for name in ("elastic", "fixed"):
        out[name]["goodput_vs_quiet"] = out["quiet"]["run_s"] / out[name]["run_s"]
        out[name]["share_of_ideal"] = out[name]["goodput_vs_quiet"] / out["ideal"]["goodput"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="the lose-and-return scenario only, as JSON; write no result")
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    from vitray import storage
    from vitray.data.datasets import write_digits
    from vitray.data.catalog import read_manifest
    from vitray.storage import EmbeddedS3

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # moto checks none; the nodes inherit the chain from here
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    with EmbeddedS3() as s3:
        base = f"s3://{s3.bucket}/datasets/digits"
        write_digits(base, s3.endpoint)
        train_uri = storage.join(base, "train")
        keys = sorted(k for shard in read_manifest(train_uri, s3.endpoint).shards for k in _keys(train_uri, shard.name, s3))
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": HEALTH_CHECKS})
        spot = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
        try:
            result = scenario(cluster, spot, s3, train_uri, keys)
            if not args.json:
                result["goodput"] = goodput(cluster, spot, s3, train_uri, steps=400, every_s=60, away_s=40)
        finally:
            cluster.shutdown()
    if args.json:
        print("RESULT " + json.dumps(result))
        return
    write_result("elastic", {
        "what": "a run that loses one of its two worker nodes after step 8 and gets it back, against a run that kept"
                " both: losses, samples per step, and the time each resize costs; then goodput with a node lost every"
                " 60 s for 40 s, elastic against fixed-size; on a local 3-node Ray cluster (2 physical cores), health checks 0.5 s × 4,"
                " scaling.group_start_timeout_s=20, resize check 5 s, a checkpoint every 5 steps", **result})


def _keys(train_uri: str, shard: str, s3) -> list[str]:
    """The sample keys in one tar shard, read directly (what the audit must find once per epoch)."""
    import io
    import tarfile

    from vitray import storage

    data = storage.read_bytes(storage.join(train_uri, shard), s3.endpoint)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


if __name__ == "__main__":
    main()
