"""Driver side: plan first (`train/plan.py`, no Ray), then start or join Ray and run the trainer (`fit`; `train/trainer.py`).

`run` is a job's whole sequence: the plan, the cost plan (which refuses what cannot fit), Ray, the cluster check,
training, and the run's record (`run.json`: how it ended) and summary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time

from vitray import cost, runs, storage
from vitray.config.jobs import RunInterrupted, TrainingFailed
from vitray.config.schema import Config
from vitray.session import check_cluster, init_ray
from vitray.train.failures import classify
from vitray.train.phases import RunHooks
from vitray.train.plan import Plan, prepare  # noqa: F401  (prepare: the first half of `run`, which tests call alone)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler or `kill`), raised in the driver's main thread like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise _Terminated()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(plan: Plan, how: str) -> RunInterrupted:
    """Record a stopped driver in run.json (with the step it can resume from) and say how to resume."""
    from vitray.checkpoints import scan

    complete, _ = scan(plan.run_uri, plan.endpoint)
    step = complete[-1] if complete else None
    runs.write_state(plan.run_uri, plan.endpoint, "interrupted", error=f"interrupted ({how})", committed_step=step)
    if step is None:
        return RunInterrupted(f"run {plan.run_name!r} interrupted ({how}) before its first checkpoint; start it"
                              " again (the attempt is moved aside)")
    return RunInterrupted(f"run {plan.run_name!r} interrupted ({how}); its last committed checkpoint is step {step}:"
                          f" resume it with the same command plus --resume --run-name {plan.run_name}")


def fit(cfg: Config, plan: Plan, timeline: dict | None = None, callbacks: list | None = None,
        hooks: RunHooks | None = None):
    """Run training on the current Ray cluster; returns Ray Train's `Result`. `timeline` (wall-clock times of
    earlier start-up phases) is passed through to the run's start-up record; `callbacks` are Ray Train callbacks
    (a scaling study passes Tune's, which forwards each checkpoint's metrics to its trial); `hooks` are what the
    workers tell at each phase (a rehearsal's measurements)."""
    if cfg is not plan.cfg:  # a caller that changed the config after planning: the workers get that one
        plan = dataclasses.replace(plan, cfg=cfg)
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from vitray.data.reading import build_dataset, stream_splits_config
    from vitray.data.spec import ReadSpec
    from vitray.tasks import make_task
    from vitray.train import checkpoint
    from vitray.train.elastic import trainer_class
    from vitray.train.loop import train_loop_per_worker
    from vitray.train.trainer import LeanTorchTrainer
    from vitray.train.universal import InBackground

    ray.data.DataContext.get_current().enable_progress_bars = False
    d = cfg.data
    # Training data is read by each worker itself (`TrainStream`: reproducible per rank); Ray Train splits only
    # the held-out set.
    datasets = {}
    if d.val_uri:
        spec = ReadSpec.from_config(d, cfg.seed, make_task(cfg).decoder(), train=False)
        datasets["val"] = build_dataset(d.val_uri, plan.endpoint, spec, field="data.val_uri")

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    # Read by Ray Train's controller, which takes it from the driver's environment.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(s.group_start_timeout_s)
    fs, runs_path = storage.resolve(plan.run_uri.rsplit("/", 1)[0], plan.endpoint)  # Ray adds the run name
    checkpoint.forget_rays_record(plan.run_uri, plan.endpoint)  # a resumed run: it may name folders vitray deleted
    fit_called = time.time()
    trainer = (trainer_class() if s.min_workers else LeanTorchTrainer)(
        train_loop_per_worker,
        train_loop_config={"plan": plan, "hooks": hooks, "timeline": {**(timeline or {}), "fit_called": fit_called}},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        # Elastic (scaling.min_workers): Ray Train runs as many workers as the cluster has room for, between the two,
        # restarting the group from the latest checkpoint when a node is lost (sized on the nodes alive then:
        # `train/elastic.py`) and, at its next resize check, when room returns. Each lost node counts against
        # max_failures; a resize to grow does not.
        scaling_config=ScalingConfig(
            num_workers=(s.min_workers, s.num_workers) if s.min_workers else s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker=resources, accelerator_type=s.accelerator or None,
            placement_strategy=s.placement_strategy, elastic_resize_monitor_interval_s=s.resize_check_s,
        ),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=runs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # vitray keeps them by marker: checkpoint.commit
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=stream_splits_config(),
    )
    # Elastic: each checkpoint's universal form is made beside training, not when a resize needs it.
    with InBackground(plan.run_uri, plan.endpoint, fit_called) if s.min_workers else contextlib.nullcontext():
        return trainer.fit()


def run(cfg: Config, resume: bool = False, embedded: storage.EmbeddedS3 | None = None, timeline: dict | None = None,
        callbacks: list | None = None, hooks: RunHooks | None = None, elastic: bool = False) -> dict:
    """The driver's whole sequence: plan (no Ray) → the cost plan → join or start Ray → check the cluster → fit.
    Returns the run's summary: run URI, final step, loss, held-out metrics, final checkpoint URI, the plan's
    figures. `hooks`/`elastic`: a rehearsal's (`train/rehearse.py`; `elastic`: see `prepare`)."""
    cfg, plan = prepare(cfg, resume, embedded, elastic=elastic)
    print(f"run {plan.run_name}: {plan.train_samples} training images, {plan.total_steps} steps → {plan.run_uri}", flush=True)
    estimate = _cost_plan(cfg, plan)
    import ray

    if not ray.is_initialized():
        init_ray()
    check_cluster(cfg)
    from vitray.tasks import make_task

    task = make_task(cfg)
    runs.write_state(plan.run_uri, plan.endpoint, "running", config=cfg.to_dict(), total_steps=plan.total_steps,
                     metric=task.metric, better=task.better, started=time.time(), error=None)
    try:
        with _sigterm_as_interrupt():
            task.before_fit(plan)
            result = fit(cfg, plan, timeline, callbacks, hooks)
        if result.error:
            raise result.error
    except (KeyboardInterrupt, SystemExit) as e:  # Ray Train turns Ctrl-C into SystemExit
        raise _interrupted(plan, "SIGTERM" if isinstance(e, _Terminated) else "Ctrl-C") from None
    except Exception as e:  # Ray Train V2 raises the workers' error (e.g. a non-finite loss) from fit()
        runs.write_state(plan.run_uri, plan.endpoint, classify(e), error=str(e)[-4000:])
        raise TrainingFailed(f"run {plan.run_uri} failed: {e}") from e
    return _summary(cfg, plan, result, estimate)


def _cost_plan(cfg: Config, plan: Plan) -> cost.Estimate:
    """The cost plan, before any cluster resource: refuses a configuration that cannot fit on its accelerator."""
    estimate = cost.estimate(cfg.replace(optim=dict(total_steps=plan.total_steps)), plan.train_samples,
                             host=not cfg.scaling.use_gpu)
    if not cfg.scaling.use_gpu and os.environ.get("RAY_ADDRESS", "local") == "local":
        from vitray.train.attached import Attached  # CPU workers on this machine share its memory

        estimate = dataclasses.replace(estimate, device_memory=Attached.here().budget(cfg.scaling.num_workers, "CPU"))
    cost.check_fits(estimate)
    print(estimate.summary(), flush=True)
    return estimate


def _summary(cfg: Config, plan: Plan, result, estimate: cost.Estimate) -> dict:
    """The run's record (finished or stopped), its cost row, and the summary a job prints."""
    from vitray.train.metrics import DATA_BOUND, data_bound_message, restart_totals

    m = dict(result.metrics or {})
    # Restarts from the run's log, which every worker group adds to: the last group's report may predate some.
    if storage.exists(storage.join(plan.run_uri, "metrics.jsonl"), plan.endpoint):
        text = storage.read_bytes(storage.join(plan.run_uri, "metrics.jsonl"), plan.endpoint).decode()
        m.update(restart_totals(text.splitlines()))
    runs.write_state(plan.run_uri, plan.endpoint, "finished" if m.get("step") == plan.total_steps else "stopped")
    summary = {"run": plan.run_uri, "data": {"train_uri": cfg.data.train_uri, "val_uri": cfg.data.val_uri},
               "step": m.get("step"), "loss": m.get("loss"),
               **({k: v for k, v in m.items() if k.startswith("val_")} or {"val_top1": None}),
               "accelerator": estimate.accelerator,
               "plan": {"params": estimate.params, "train_flops_per_image": estimate.train_flops_per_image,
                        "accelerator_days": estimate.accelerator_days}}
    for key in ("skipped_samples", "data_position", "worker_nodes", "restarts", "resizes", "time_lost_s",
                "data_wait", "data_wait_max"):
        if key in m:
            summary[key] = m[key]
    summary["checkpoint"] = storage.join(plan.run_uri, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    if "images_per_s_per_accelerator" in m:
        from vitray.train.cost_log import append_jsonl, cost_row

        row = cost_row(cfg, plan, m, estimate)
        summary["cost"] = {k: row[k] for k in ("images_per_s_per_accelerator", "mfu", "accelerator_days",
                                                "memory_per_device_gib", "planned_memory_per_device_gib", "data_wait")
                           if k in row}
        print(f"actual: {row['images_per_s_per_accelerator']:.1f} img/s per {row['accelerator']}, MFU {row['mfu']:.1%}, "
              f"{row['accelerator_days']:.5f} accelerator-days, peak memory/device {row['memory_per_device_gib']:.2f} GiB "
              f"(planned {row['planned_memory_per_device_gib']:.2f})"
              + (f", data wait {row['data_wait']:.0%}" if "data_wait" in row else ""), flush=True)
        if row.get("data_wait", 0) >= DATA_BOUND:
            print(data_bound_message(row["data_wait"], row["data_wait_max"]), flush=True)
        log_uri = cfg.storage.cost_log or storage.join(plan.run_uri.rsplit("/", 1)[0], "accelerator_days.jsonl")
        if log_uri != "none":
            append_jsonl(log_uri, row, plan.endpoint)
    return summary
