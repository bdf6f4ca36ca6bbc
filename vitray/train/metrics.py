"""Per-step training metrics: loss, LR, throughput, FLOPs, MFU, accelerator-hours, ETA — printed and kept as
JSONL next to the run's checkpoints (`<run>/metrics.jsonl`), where benchmarks, `jobs/runs.py` and later studies read
them, and as TensorBoard events beside it (`tensorboard --logdir <storage>/runs` shows every run).

The event file is written locally by tensorboardX and uploaded whole at each flush, like the JSONL: object stores
have no append, and a reader never sees a torn file. A resumed run starts a new event file (TensorBoard merges
the files of one folder)."""
from __future__ import annotations

import contextlib
import json
import logging
import time

from vitray import storage
from vitray.storage import Endpoint

# Not print(): Ray Train tees worker prints to both stdout and its logger, so each line would show twice.
logger = logging.getLogger("vitray")

DATA_BOUND = 0.10  # a run whose workers wait for data this share of the step time or more says it is data-bound


def data_bound_message(share: float, slowest: float) -> str:
    return (f"data-bound: the workers waited for their next batch {share:.0%} of the step time (the slowest"
            f" {slowest:.0%}); decoding needs more CPUs than the cluster gives it: add CPU nodes or cores per"
            " worker, or lower data.image_size / store pre-resized shards")


class MetricsLog:
    """Every line of `<run>/metrics.jsonl` goes through here: `record` (a training step's numbers), `event` (what
    happened at a step: resumed, restart, checkpoint, startup, samples) and `final` (the held-out results)."""

    def __init__(
        self, uri: str, endpoint: Endpoint | None, world_size: int, total_steps: int, global_batch: int,
        train_flops_per_image: float, peak_flops: float, peak_source: str, start_step: int, write: bool,
        log_every: int = 1, last_step: int | None = None,
    ):
        self.uri, self.endpoint, self.write = uri, endpoint, write
        self.world, self.total_steps, self.global_batch = world_size, total_steps, global_batch
        self.flops_per_image, self.peak, self.peak_source = train_flops_per_image, peak_flops, peak_source
        self.start_step = start_step
        self.t0 = self.t_window = time.perf_counter()
        self.cpu_window = time.process_time()
        self.step_window = start_step
        self.lines: list[str] = []
        self.rewound = start_step
        self.last_upload = 0.0
        self.events = None
        if write:
            import tempfile

            from tensorboardX import SummaryWriter

            self.events = SummaryWriter(tempfile.mkdtemp(prefix="vitray-events-"), flush_secs=3600)
        self.log_every, self.last_step = log_every, last_step or total_steps
        target = storage.join(uri, "metrics.jsonl")
        if write and start_step > 0 and storage.exists(target, endpoint):  # resumed: keep the history up to here
            old = storage.read_bytes(target, endpoint).decode().splitlines()
            self.lines = [line for line in old if line and json.loads(line)["step"] <= start_step]
            # The furthest step the previous attempt logged: a restart redoes the steps from start_step to it.
            self.rewound = max([start_step] + [json.loads(line)["step"] for line in old if line])

    def due(self, step: int) -> bool:
        """Whether `step` gets a metrics line: every `log_every` steps, and the last one."""
        return step % self.log_every == 0 or step == self.last_step

    def event(self, step: int, name: str, **fields) -> None:
        """A line saying what happened at `step` (kept on every rank; rank 0's are written)."""
        self.lines.append(json.dumps({"step": step, "event": name, **fields}))

    def record(self, step: int, loss: float, lr: float, data_wait_s: tuple[float, float] | None = None,
               **extra) -> dict:
        """`data_wait_s`: seconds the workers waited for data since the last record, (mean, max) over workers."""
        now = time.perf_counter()
        steps, seconds = step - self.step_window, max(now - self.t_window, 1e-9)
        cpu = time.process_time()
        images_per_s = steps * self.global_batch / seconds
        per_accel = images_per_s / self.world
        elapsed = now - self.t0
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        row = {
            "step": step, "loss": loss, "lr": lr,
            "images_per_s": images_per_s, "images_per_s_per_accelerator": per_accel,
            "train_flops": step * self.global_batch * self.flops_per_image,
            "mfu": per_accel * self.flops_per_image / self.peak, "mfu_peak_source": self.peak_source,
            "accelerator_hours": elapsed * self.world / 3600.0,
            "eta_s": (self.total_steps - step) / rate if rate > 0 else None,
            # This worker's CPU seconds per step (all its threads): on oversubscribed CPUs, what separates the
            # compute from the waiting in a step's wall time (benchmarks/worker_scaling.py).
            "cpu_s_per_step": (cpu - self.cpu_window) / max(steps, 1),
            **({"data_wait": data_wait_s[0] / seconds, "data_wait_max": data_wait_s[1] / seconds} if data_wait_s else {}),
            "time": time.time(), **extra,
        }
        self.t_window, self.step_window, self.cpu_window = now, step, cpu
        if self.write:
            self.lines.append(json.dumps(row))
            self.scalars(step, {"train/loss": loss, "train/lr": lr, "throughput/images_per_s": images_per_s,
                                "throughput/mfu": row["mfu"], "cost/accelerator_hours": row["accelerator_hours"]})
            logger.info(
                f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} {images_per_s:.1f} img/s "
                f"({per_accel:.1f}/accel) MFU {row['mfu']:.1%} [{self.peak_source}] "
                f"accel-h {row['accelerator_hours']:.4f} ETA {row['eta_s'] or 0:.0f}s"
                + (f" data wait {row['data_wait']:.0%}" if data_wait_s else "")
                + (" (data-bound)" if row.get("data_wait", 0) >= DATA_BOUND else "")
            )
            if now - self.last_upload > 60:
                self.flush()
        return row

    def totals(self, step: int) -> dict:
        """Whole-run averages since this process started (or resumed): what the accelerator-days log records."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        per_accel = (step - self.start_step) * self.global_batch / elapsed / self.world
        return {"images_per_s_per_accelerator": per_accel, "mfu": per_accel * self.flops_per_image / self.peak,
                "accelerator_hours": elapsed * self.world / 3600.0, "train_flops_per_image": self.flops_per_image,
                "mfu_peak_source": self.peak_source}

    def scalars(self, step: int, values: dict) -> None:
        """TensorBoard scalars (rank 0); non-numbers are left out."""
        if self.events is not None:
            for tag, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.events.add_scalar(tag, value, step)

    def final(self, step: int, results: dict) -> None:
        """The run's last line (held-out metrics, totals) in both logs."""
        self.lines.append(json.dumps({"step": step, "final": True, **results}))
        self.scalars(step, {f"val/{k.removeprefix('val_')}": v for k, v in results.items() if k.startswith("val_")})

    @contextlib.contextmanager
    def kept_on_error(self):
        """Writes the log out when training raises (a worker lost, the group torn down for a resize): the next
        group counts the steps this one trained past its checkpoint from it (`rewound`, the restart's
        `steps_redone`). Only what a surviving rank 0 logged: a lost rank 0 writes nothing more."""
        try:
            yield
        except BaseException:
            try:
                self.flush()
            except Exception as e:  # storage may be what failed; the training error is the one to raise
                logger.warning(f"metrics.jsonl not written after the error: {e}")
            raise

    def flush(self) -> None:
        """Rewrite `<run>/metrics.jsonl` and the event file whole: each upload is one atomic object."""
        if self.write and self.lines:
            storage.write_bytes(storage.join(self.uri, "metrics.jsonl"), ("\n".join(self.lines) + "\n").encode(), self.endpoint)
            self.last_upload = time.perf_counter()
        if self.events is not None:
            import os

            self.events.flush()
            folder = self.events.logdir
            for name in os.listdir(folder):
                with open(os.path.join(folder, name), "rb") as f:
                    storage.write_bytes(storage.join(self.uri, name), f.read(), self.endpoint)


class LossMeter:
    """The running training loss since the last metrics line. It stays on the device: a .item() per micro-step
    would stall a GPU every step."""

    def __init__(self, device):
        import torch

        self.device, self.sum, self.count, self.last = device, torch.zeros((), dtype=torch.float64, device=device), 0, float("nan")

    def add(self, loss, samples: int) -> None:
        self.sum += loss.detach().double() * samples
        self.count += samples

    def mean(self) -> float:
        """Collective: the mean over every sample of every worker since the last call; starts a new window."""
        from vitray.train.collectives import sample_mean

        self.last = sample_mean(self.sum, self.count, self.device)
        self.sum.zero_()
        self.count = 0
        return self.last


class DataWait:
    """Seconds the workers waited for data (`WaitWatch.waited_s`): per metrics window, and for the run from its first
    step on (the first pull also waited for the pipeline to start, which the start-up timeline records)."""

    def __init__(self, watch, device):
        self.watch, self.device, self.mark, self.before = watch, device, 0.0, 0.0

    def first_step(self) -> None:
        self.before = self.watch.waited_s

    def window(self) -> tuple[float, float]:
        """Collective: (mean, max) over workers of the seconds waited since the last window."""
        from vitray.train.collectives import mean_and_max

        waited, self.mark = mean_and_max(self.watch.waited_s - self.mark, self.device), self.watch.waited_s
        return waited

    def run_share(self, trained_s: float) -> dict:
        """Collective: each worker's share of the time since the first step spent waiting: mean and slowest."""
        from vitray.train.collectives import mean_and_max

        if trained_s <= 0:
            return {}
        mean, most = mean_and_max(self.watch.waited_s - self.before, self.device)
        return {"data_wait": mean / trained_s, "data_wait_max": most / trained_s}


class SampleAudit:
    """data.audit_samples: every sample (key, epoch) each step trained on, as a `samples` line — exactly-once checks
    read it. A rewound step's line is dropped with the rest of its attempt's log (`MetricsLog`)."""

    def __init__(self, on: bool):
        self.on, self.mine = on, []

    def add(self, micro) -> None:
        if self.on:
            self.mine += zip(micro.batch["key"][:micro.samples].tolist(), micro.batch["_epoch"][:micro.samples].tolist())

    def flush(self, step: int, log: MetricsLog) -> None:
        """Collective when on."""
        if self.on:
            from vitray.train.collectives import gather_lists

            log.event(step, "samples", samples=sorted(gather_lists(self.mine)))
            self.mine = []


def positions_json(positions: dict) -> dict[str, list[int]]:
    """Data partition → [epoch, consumed], as logged and compared."""
    return {str(p): [pos.epoch, pos.consumed] for p, pos in sorted(positions.items())}


def restart_totals(lines: list[str]) -> dict:
    """What restarts cost this run: how many (resizes among them) and the wall time lost to each (from the
    checkpoint it resumed from to the moment the new workers had restored it)."""
    events = [e for e in (json.loads(line) for line in lines if line) if e.get("event") == "restart"]
    return {"restarts": len(events), "resizes": sum(e["from_workers"] != e["to_workers"] for e in events),
            "time_lost_s": sum(e["lost_s"] for e in events)}
