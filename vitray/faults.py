"""Fault injection for the reliability tests and benchmarks: kill a Ray Train worker process, and an S3 proxy on
127.0.0.1 that fails a share of the requests it forwards (timeouts, 500, 503, throttling) or denies access.

Nothing here runs in a normal training job; it exists so that recovery paths are exercised for real.
"""
from __future__ import annotations

import http.client
import http.server
import os
import random
import signal
import socketserver
import threading
import time

TRAIN_WORKER = "ray::RayTrainWorker"  # the process title Ray gives each Train worker


def train_worker_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(TRAIN_WORKER):
            pids.append(p.info["pid"])
    return sorted(pids)


def kill_train_worker(index: int = -1) -> int:
    """SIGKILL one live Ray Train worker process (as a preempted node would lose it); its pid."""
    pids = train_worker_pids()
    if not pids:
        raise RuntimeError("no Ray Train worker process is running")
    pid = pids[index]
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll until `predicate()` is truthy; its value. Raises TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
