"""Time from `ray job submit` to the first optimizer step, against a running head (goal, warm: ≤ 20 s).

Starts a head with `ray start --head`, submits the smoke preset (3 steps, metrics every step) several times, and
reads each run's metrics.jsonl: latency = wall time of step 1's record − wall time just before `ray job submit`.
The first submission is cold (runtime-env upload, fresh worker processes); the later ones are warm.

    python benchmarks/submit_latency.py [--submissions 3]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import ROOT, write_result


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--submissions", type=int, default=3)
    args = p.parse_args()

    from vitray import storage

    bin_dir = os.path.dirname(sys.executable)
    ray = os.path.join(bin_dir, "ray")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    port, dash = _port(), _port()
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                             "--dashboard-host=127.0.0.1", "--num-cpus=4", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    latencies, phases = [], []
    try:
        while subprocess.run([ray, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            time.sleep(1)
        with tempfile.TemporaryDirectory() as runs:
            for _ in range(args.submissions):
                t0 = time.time()
                for _ in range(30):  # the job agent can come up a little after the dashboard answers
                    proc = subprocess.run(
                        [ray, "job", "submit", "--address", address, "--working-dir", ROOT, "--", "python",
                         "jobs/pretrain_vit_h14.py", "--preset", "smoke", "--set", "optim.total_steps=3",
                         "--set", "log_every=1", "--set", "data.val_uri=", "--set", f"storage.uri={runs}"],
                        env=env, capture_output=True, text=True,
                    )
                    if "No available agent to submit job" not in proc.stderr:
                        break
                    time.sleep(2)
                    t0 = time.time()
                proc.check_returncode()
                summary = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith('{"run"')))
                rows = storage.read_bytes(storage.join(summary["run"], "metrics.jsonl")).decode().splitlines()
                startup = next(json.loads(r) for r in rows if json.loads(r).get("event") == "startup")
                latencies.append(startup["first_step"] - t0)
                phases.append({"submit_to_driver_start": startup["driver_start"] - t0,
                               "driver_start_to_fit": startup["fit_called"] - startup["driver_start"],
                               "fit_to_worker_start": startup["worker_start"] - startup["fit_called"],
                               "worker_start_to_engine_ready": startup["engine_ready"] - startup["worker_start"],
                               "engine_ready_to_first_batch": startup["first_batch"] - startup["engine_ready"],
                               "first_batch_to_first_step": startup["first_step"] - startup["first_batch"]})
                print(f"submission {len(latencies)}: {latencies[-1]:.1f} s to the first optimizer step", flush=True)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait()
    write_result("submit_latency", {
        "what": "seconds from `ray job submit` to the first optimizer step (smoke preset, 2 CPU workers, ZeRO-2)",
        "cold_s": latencies[0], "phases_s": phases, "warm_s": latencies[1:], "warm_best_s": min(latencies[1:] or latencies),
        "goal": "warm <= 20 s",
    })


if __name__ == "__main__":
    main()
