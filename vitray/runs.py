"""Runs you can find afterwards: the run folder's own record of itself, and the listing `jobs/runs.py` prints.

    <storage>/runs/
        accelerator_days.jsonl       one cost row per finished run (vitray.train.launch)
        <run>/run.json               the driver's record: state, model, schedule, task metric, error if any
        <run>/metrics.jsonl          one line per log step; the last one, `final`, holds the held-out metrics
        <run>/events.out.tfevents.*  the same numbers for TensorBoard (`tensorboard --logdir <storage>/runs`)
        <run>/step_00001000/ ...     checkpoints (vitray.checkpoints); committed ones hold COMMIT

A run's state: running → finished | stopped (at storage's stop_at_step, to be resumed) | failed | diverged
(non-finite loss) | interrupted (Ctrl-C or SIGTERM; `committed_step` says where --resume starts). A driver killed
outright leaves "running"; the listing shows how long ago the run last wrote anything, so a stale one is plain to see.
A run's name is a plain name (`run_folder`), so its folder always sits directly inside the runs root.
"""
from __future__ import annotations

import json
import posixpath
import time

import pyarrow.fs as pafs

from vitray import storage
from vitray.checkpoints import scan, step_dir
from vitray.config.checks import plain_name
from vitray.config.schema import ConfigError
from vitray.storage import Endpoint

RUNS = "runs"  # <storage.uri>/runs/<run name>
STATE = "run.json"
METRICS = "metrics.jsonl"
COST_LOG = "accelerator_days.jsonl"
STATES = ("running", "finished", "stopped", "failed", "diverged", "interrupted")


def run_folder(runs_root: str, name: str) -> str:
    """`<runs root>/<name>`, for a plain name only (the config check's rule), and checked to sit directly inside
    the runs root: a run name is a name, never a path."""
    errors: list[str] = []
    if not plain_name(errors, "storage.run_name", name):
        raise ConfigError(errors[0])
    uri = storage.join(runs_root, name)
    if posixpath.dirname(posixpath.normpath(uri.split("://", 1)[-1])) != posixpath.normpath(runs_root.split("://", 1)[-1]):
        raise ConfigError(f"storage.run_name: {name!r} resolves to {uri}, outside the runs root {runs_root}")
    return uri


def runs_root(storage_uri: str) -> str:
    return storage.join(storage_uri, RUNS)


def run_uri(storage_uri: str, name: str) -> str:
    return run_folder(runs_root(storage_uri), name)


def read_state(run_uri: str, endpoint: Endpoint | None) -> dict | None:
    uri = storage.join(run_uri, STATE)
    if not storage.exists(uri, endpoint):
        return None
    return json.loads(storage.read_bytes(uri, endpoint))


def write_state(run_uri: str, endpoint: Endpoint | None, state: str, **fields) -> dict:
    """Set the run's state (keeping what the record already says); one atomic write."""
    assert state in STATES, state
    record = {**(read_state(run_uri, endpoint) or {}), **fields, "state": state, "updated": time.time()}
    storage.write_bytes(storage.join(run_uri, STATE), json.dumps(record, indent=1).encode(), endpoint)
    return record


def move_aside(run_uri: str, endpoint: Endpoint | None) -> str:
    """Move a run folder to the first free `<run>.failed-<k>` beside it (whole: copy, then delete the original)
    and return where it went. Its metrics, error and any unfinished checkpoint stay readable there."""
    k = 1
    while storage.exists(f"{run_uri}.failed-{k}", endpoint):
        k += 1
    dest = f"{run_uri}.failed-{k}"
    fs, src = storage.resolve(run_uri, endpoint)
    _, dst = storage.resolve(dest, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(src, dst)  # a rename
    else:
        pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(src)
    return dest


def metrics_rows(run_uri: str, endpoint: Endpoint | None) -> list[dict]:
    uri = storage.join(run_uri, METRICS)
    if not storage.exists(uri, endpoint):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri, endpoint).decode().splitlines() if line.strip()]


def accelerator_days(rows: list[dict]) -> float:
    """Accelerator-days over every process that trained the run: each resume starts its own clock."""
    total = segment = 0.0
    for r in rows:
        if r.get("event") == "resumed":
            total, segment = total + segment, 0.0
        elif "accelerator_hours" in r:
            segment = max(segment, r["accelerator_hours"])
    return (total + segment) / 24.0


def summary(run_uri: str, endpoint: Endpoint | None) -> dict:
    """One row of the listing: name, model, resolution, step / total, newest committed checkpoint, state,
    accelerator-days, best held-out metric, and when the run last wrote its record or metrics."""
    record = read_state(run_uri, endpoint) or {}
    rows = metrics_rows(run_uri, endpoint)
    complete, _ = scan(run_uri, endpoint)
    cfg = record.get("config") or {}
    final = next((r for r in reversed(rows) if r.get("final")), None)
    state = record.get("state") or ("finished" if final else "unknown")
    metric = record.get("metric") or next((k for k in (final or {}) if k.startswith("val_")), None)
    values = [r[metric] for r in rows if metric and r.get(metric) is not None]
    best = (min if record.get("better") == "min" else max)(values) if values else None
    steps = [r["step"] for r in rows if "loss" in r]
    fs, path = storage.resolve(run_uri, endpoint)
    times = [i.mtime.timestamp() for i in fs.get_file_info([f"{path}/{STATE}", f"{path}/{METRICS}"]) if i.mtime]
    return {
        "name": run_uri.rstrip("/").rsplit("/", 1)[-1], "uri": run_uri, "state": state,
        "model": cfg.get("model", {}).get("name"), "image_size": cfg.get("data", {}).get("image_size"),
        "step": max(steps + [complete[-1] if complete else 0]), "total_steps": record.get("total_steps"),
        "checkpoint": storage.join(run_uri, step_dir(complete[-1])) if complete else None,
        "accelerator_days": accelerator_days(rows), "metric": metric, "best": best,
        "updated_s_ago": time.time() - max(times) if times else None, "error": record.get("error"),
    }


def list_runs(root: str, endpoint: Endpoint | None) -> list[dict]:
    """Every run folder under `root` (`<storage>/runs`), oldest first."""
    fs, path = storage.resolve(root, endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"{root}: cannot list runs ({e})") from e
    runs = [summary(storage.join(root, i.base_name), endpoint) for i in infos if i.type == pafs.FileType.Directory]
    return sorted(runs, key=lambda r: (-(r["updated_s_ago"] or 0), r["name"]))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def table(runs: list[dict]) -> str:
    """The listing as aligned text columns."""
    head = ("name", "state", "model", "res", "step", "checkpoint", "accel-days", "best", "updated")
    lines = [head]
    for r in runs:
        best = f"{r['metric'].removeprefix('val_')} {r['best']:.4g}" if r["best"] is not None else "-"
        lines.append((r["name"], r["state"], r["model"] or "-", str(r["image_size"] or "-"),
                      f"{r['step']}/{r['total_steps'] or '?'}",
                      r["checkpoint"].rsplit("/", 1)[-1] if r["checkpoint"] else "-",
                      f"{r['accelerator_days']:.4g}", best, _age(r["updated_s_ago"])))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def plot(curves: dict[str, list[dict]], metric_of: dict[str, str | None]) -> bytes:
    """PNG: training loss against step for every run (left) and each run's held-out metric (right)."""
    import matplotlib

    matplotlib.use("Agg")  # cluster nodes have no display
    import io

    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for name, rows in curves.items():
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and not r.get("final")]
        if train:
            left.plot(*zip(*train), label=name)
        metric = metric_of.get(name)
        val = [(r["step"], r[metric]) for r in rows if metric and r.get(metric) is not None]
        if val:
            right.plot(*zip(*val), marker="o", label=f"{name}: {metric.removeprefix('val_')}")
    left.set(xlabel="step", ylabel="training loss", title="training loss")
    left.set_yscale("log")
    right.set(xlabel="step", title="held-out metric")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
