"""Goodput: the share of a run's wall-clock that trains, what the rest is lost to — saves, failures (the work since
the last checkpoint, done again) and restarts — and the checkpoint interval that maximises it.

First order (Young 1974; Daly 2006 to first order), for τ seconds of training between saves, a save that stalls
training δ seconds, a job MTBF M (a node's MTBF ÷ the nodes: the job stops when any of them does) and a restart
of R seconds (a new worker group, its engine, the restore, to its first step):

    lost to saves      δ / (τ + δ)
    lost to failures   (τ + δ) / 2M      a failure lands on average half an interval after the last save
    lost to restarts   R / M
    goodput            1 − the three          best τ = sqrt(2δM) (Young: where the first two balance)

It holds while τ, δ and R are small beside M — minutes against the days a job runs between failures. An elastic run
(scaling.min_workers) pays two resizes per lost node, one to shrink and one to grow back, in place of a restart.

Figures carry their source: `measured` by a rehearsal (`--rehearse`, its `rehearsal.json` row) or `modelled` by the
planner (`vitray.cost`). Only arithmetic and the reading of a rehearsal row here; no vitray imports.
"""
from __future__ import annotations

import dataclasses
import math

# Long runs lose nodes; checkpoints and restart budgets are planned with a node failure rate that is stated, not
# measured here. Llama 3's pretraining (Dubey et al. 2024, Sec. 3.3.4) saw 419 unexpected interruptions in 54 days
# on 2,048 nodes of 8 GPUs: one per node every ~6,300 hours.
NODE_MTBF_HOURS = 6300.0
CHECKPOINT_WRITE_GB_S = 1.0  # per node, into object storage and back (modelled)
# A new worker group's start, imports and engine build before its restore begins (modelled): the smoke model's
# rehearsal measures ~10 s of it on this 2-core host, an H/14 one 64 s of engine build alone.
RESTART_START_S = 60.0


@dataclasses.dataclass(frozen=True)
class Figure:
    seconds: float
    source: str  # "measured: …" or "modelled: …", printed beside the figure

    def __post_init__(self):
        if not self.seconds >= 0:  # also refuses NaN
            raise ValueError(f"a time figure must be ≥ 0 s, got {self.seconds!r} ({self.source})")


@dataclasses.dataclass(frozen=True)
class Goodput:
    save: Figure  # training stalled by one save
    restart: Figure  # one failure's restart to the first step (an elastic run: both resizes)
    mtbf_s: float  # the job's mean time between failures; math.inf: it never fails
    mtbf_source: str

    def __post_init__(self):
        if not self.mtbf_s > 0:
            raise ValueError(f"the job's MTBF must be > 0 s, got {self.mtbf_s!r}")

    @property
    def best_interval_s(self) -> float:
        """Young's interval: saving more often costs more stalls, less often more work redone after a failure."""
        if self.save.seconds == 0 or math.isinf(self.mtbf_s):
            return 0.0 if self.save.seconds == 0 else math.inf
        return math.sqrt(2 * self.save.seconds * self.mtbf_s)

    def lost(self, interval_s: float) -> dict[str, float]:
        """Fractions of wall-clock lost to saves, failures and restarts, saving every `interval_s` of training."""
        if interval_s < 0:
            raise ValueError(f"a checkpoint interval must be ≥ 0 s, got {interval_s}")
        cycle = interval_s + self.save.seconds
        return {"saves": self.save.seconds / cycle if cycle else 0.0,
                "failures": 0.0 if math.isinf(self.mtbf_s) else min(1.0, cycle / (2 * self.mtbf_s)),
                "restarts": min(1.0, self.restart.seconds / self.mtbf_s)}

    def goodput(self, interval_s: float | None = None) -> float:
        """The share of wall-clock that trains, at `interval_s` (None: the best interval)."""
        interval = self.best_interval_s if interval_s is None else interval_s
        if math.isinf(interval):
            return 1.0 - self.lost(0.0)["restarts"]  # never fails: no save is worth its stall
        return max(0.0, 1.0 - sum(self.lost(interval).values()))

    def to_dict(self, step_s: float | None = None, configured_every: int = 0, run_s: float | None = None) -> dict:
        """`run_s`: the run's wall-clock, beyond which no interval means anything but the final save."""
        best = self.best_interval_s if not run_s else min(self.best_interval_s, run_s)
        out = {"save_stall_s": self.save.seconds, "save_stall_source": self.save.source,
               "restart_s": self.restart.seconds, "restart_source": self.restart.source,
               "job_mtbf_s": self.mtbf_s, "mtbf_source": self.mtbf_source, "best_interval_s": best,
               "best_every_steps": every_steps(best, step_s), "goodput": self.goodput(best),
               "lost": self.lost(0.0 if math.isinf(best) else best), "longer_than_run": bool(run_s) and best == run_s}
        if configured_every and step_s:
            out.update(configured_every_steps=configured_every,
                       configured_goodput=self.goodput(configured_every * step_s),
                       configured_lost=self.lost(configured_every * step_s))
        return out

    def lines(self, step_s: float | None = None, configured_every: int = 0,
              run_s: float | None = None) -> list[tuple[str, str]]:
        """(row name, text) for a plan's table or a rehearsal's report: the goodput, then each figure's source."""
        d = self.to_dict(step_s, configured_every, run_s)
        parts = ", ".join(f"{k} {_share(v)}" for k, v in d["lost"].items())
        steps = d["best_every_steps"]
        if math.isinf(d["best_interval_s"]) or d["longer_than_run"]:
            at = "no checkpoint but the last is worth its stall (failures are rarer than the run is long)"
        else:
            at = f"saving every {_duration(d['best_interval_s'])}" + (f" (storage.checkpoint_every ≈ {steps:,})" if steps else "")
        rows = [("goodput", f"{d['goodput']:.1%} at best, {at}; lost to {parts}")]
        if "configured_goodput" in d:
            rows.append(("", f"{d['configured_goodput']:.1%} at the configured storage.checkpoint_every="
                             f"{configured_every:,}; lost to " + ", ".join(f"{k} {_share(v)}" for k, v in d["configured_lost"].items())))
        rows += [("save stall", f"{self.save.seconds:,.1f} s per save — {self.save.source}"),
                 ("restart", f"{self.restart.seconds:,.1f} s to the first step — {self.restart.source}"),
                 ("failures", self.mtbf_source)]
        return rows


def every_steps(interval_s: float, step_s: float | None) -> int | None:
    if not step_s or math.isinf(interval_s):
        return None
    return max(1, round(interval_s / step_s))


def _share(v: float) -> str:
    return "<0.1%" if 0 < v < 0.0005 else f"{v:.1%}"


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else (f"{seconds / 60:,.0f} min" if seconds < 7200 else
                                                       f"{seconds / 3600:,.1f} h")


def measured(row: dict, where: str = "") -> dict[str, Figure]:
    """The figures a rehearsal row measured, each with its source: "save" (the stall the loop saw; a row from before
    `save_stall_s` had synchronous saves, so its whole save stalled), "restart" and "resize" (to the first step)."""
    host = row.get("machine") or {}
    said = (f"measured: rehearsal of {row.get('model')} @ {row.get('image_size')} px on"
            f" {(row.get('rehearsed') or {}).get('workers', '?')} {'GPU' if (row.get('rehearsed') or {}).get('gpu') else 'CPU'}"
            f" workers, {host.get('cpu') or host.get('gpu') or 'this host'}, {row.get('time', '?')[:10]}"
            + (f" ({where})" if where else ""))
    out = {}
    stall = row.get("save_stall_s", row.get("save_s"))
    if stall is not None:
        out["save"] = Figure(float(stall), said)
    for name in ("restart", "resize"):
        phase = row.get(name) or {}
        if phase.get("to_first_step_s") is not None:
            out[name] = Figure(float(phase["to_first_step_s"]), said)
    return out


def matching(rows: list[dict], model: str, image_size: int) -> dict | None:
    """The newest rehearsal row of `model` at `image_size` (rows in the order they were written)."""
    found = [r for r in rows if r.get("model") == model and r.get("image_size") == image_size]
    return found[-1] if found else None


def for_run(checkpoint_bytes: float, nodes: int, measured_figures: dict[str, Figure] | None = None,
            elastic: bool = False) -> Goodput:
    """A run's goodput: the measured figures where a rehearsal gave them, else modelled — a save stalls training
    while every node writes its share; a restart starts a group and reads the checkpoint back at the same rate;
    a resize first merges the whole checkpoint into DeepSpeed's universal form on one node (read and write)."""
    got = measured_figures or {}
    share = checkpoint_bytes / max(nodes, 1) / (CHECKPOINT_WRITE_GB_S * 1e9)
    rate = f"{checkpoint_bytes / 1e9:,.3g} GB at {CHECKPOINT_WRITE_GB_S:g} GB/s per node"
    save = got.get("save") or Figure(share, f"modelled: {rate}, training stopped")
    if elastic:
        one = got.get("resize") or Figure(RESTART_START_S + share + 2 * checkpoint_bytes / (CHECKPOINT_WRITE_GB_S * 1e9),
                                          f"modelled: {RESTART_START_S:g} s start + universal conversion on one node"
                                          f" + restore, {rate}")
        restart = Figure(2 * one.seconds, f"two resizes per lost node (shrink, grow back) of {one.seconds:,.1f} s;"
                                          f" {one.source}")
    else:
        restart = got.get("restart") or Figure(RESTART_START_S + share,
                                               f"modelled: {RESTART_START_S:g} s start + restore, {rate}")
    mtbf = NODE_MTBF_HOURS * 3600 / max(nodes, 1)
    return Goodput(save, restart, mtbf, f"stated: a node fails every {NODE_MTBF_HOURS:,.0f} h (Llama 3's rate) → the"
                                        f" job every {mtbf / 3600:,.0f} h on {nodes:,} nodes")


def churn_ideal(quiet_s: float, every_s: float, away_s: float, workers: int = 2) -> float:
    """The best goodput a run can have under a churn schedule that leaves all `workers` for `every_s` seconds, then
    one fewer for `away_s`, over and over (benchmarks/elastic.py's): if its work went as the worker-time present and
    no resize cost anything, it would finish when that worker-time equals the quiet run's (`workers` × `quiet_s`).
    The quiet run's time over that finish. Modelled from the schedule; the measured goodput is set against it.
    Start-up, which the benchmark's churn does not touch, counts as work here: the ideal comes out slightly low."""
    if not (quiet_s > 0 and every_s > 0 and away_s >= 0 and workers >= 2):
        raise ValueError(f"churn_ideal needs quiet_s, every_s > 0, away_s ≥ 0 and ≥ 2 workers, got "
                         f"{quiet_s!r}, {every_s!r}, {away_s!r}, {workers!r}")
    need, at, done = workers * quiet_s, 0.0, 0.0
    while True:
        for span, present in ((every_s, workers), (away_s, workers - 1)):
            if done + span * present >= need:
                return quiet_s / (at + (need - done) / present)
            done, at = done + span * present, at + span
