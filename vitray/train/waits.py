"""A worker that waits says what it is waiting for, instead of hanging silently.

The training loop wraps each pull of a micro-batch in a `WaitWatch`, which also adds up the time spent waiting
(`waited_s`: the run's `data_wait`, its share of the step time). When one pull takes longer than
`data.wait_warn_s`, a background thread logs — and repeats every `wait_warn_s` while the wait lasts — how long
it has waited and what Ray has not been able to schedule (its pending tasks and actors with the resources they
ask for, from Ray's state API) beside what the cluster has free. The usual cause on a small machine: the Train
workers hold every CPU and Ray Data's read tasks, which ask for a CPU each, can never start.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable

logger = logging.getLogger("vitray")

def pending_demands(limit: int = 200) -> str:
    """One line: what Ray cannot schedule now (tasks and actors waiting for a node, with the resources each asks
    for), and the cluster's free resources. Never raises: a cluster without the state API still gets the latter."""
    import ray

    parts = []
    try:
        from ray.util.state import list_actors, list_tasks

        kw = dict(limit=limit, detail=True, raise_on_missing_output=False)
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], **kw)
        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], **kw)
        waiting = Counter(f"{t.name} {_resources(getattr(t, 'required_resources', None))}" for t in tasks)
        waiting.update(f"actor {a.class_name} {_resources(getattr(a, 'required_resources', None))}" for a in actors)
        parts.append("nothing pending in Ray" if not waiting else "pending in Ray: " + ", ".join(
            f"{n} × {what}" for what, n in waiting.most_common(5)))
    except Exception as e:  # the state API needs the dashboard; say what is known without it
        parts.append(f"Ray's pending tasks unknown ({type(e).__name__})")
    free, total = ray.available_resources(), ray.cluster_resources()
    parts.append("free now: " + ", ".join(f"{k} {free.get(k, 0):g} of {total[k]:g}" for k in ("CPU", "GPU")
                                          if total.get(k)))
    return "; ".join(parts)


def _resources(r) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted((r or {}).items())) + "}" if r else "{}"


class WaitWatch:
    """`with watch: item = next(stream)` — logs what the wait is for once it passes `after_s` (and again every
    `after_s` while it lasts). `after_s <= 0` turns it off. `describe` is `pending_demands` unless a test says."""

    def __init__(self, after_s: float, what: str, describe: Callable[[], str] = pending_demands,
                 log: Callable[[str], None] = logger.warning):
        self.after_s, self.what, self.describe, self.log = after_s, what, describe, log
        self._since: float | None = None
        self._next = 0.0
        self.warnings = 0
        self.waited_s = 0.0  # inside `with`, in all
        if after_s > 0:
            threading.Thread(target=self._watch, name="vitray-wait-watch", daemon=True).start()

    def __enter__(self) -> "WaitWatch":
        self._since, self._next = time.monotonic(), self.after_s
        return self

    def __exit__(self, *exc) -> None:
        self.waited_s += time.monotonic() - self._since
        self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.after_s / 4))
            since = self._since
            if since is None or time.monotonic() - since < self._next:
                continue
            waited = time.monotonic() - since
            self._next += self.after_s
            self.warnings += 1
            self.log(f"waited {waited:.0f} s for {self.what}: {self.describe()}")
