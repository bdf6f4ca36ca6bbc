"""Driver side: check everything cheap first (`prepare`, no Ray), then run the `TorchTrainer` (`fit`).

`prepare` validates the config, writes the built-in dataset if asked, reads the shard manifests, and decides the
run folder — refusing to silently overwrite or resume a run. Only then does `fit` start or join a Ray cluster.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import threading
import time

from vitray import cost, runs, storage
from vitray.config.jobs import RunInterrupted, TrainingFailed
from vitray.config.schema import Config, ConfigError, validate
from vitray.data.catalog import read_manifest
from vitray.data.manifest import DataError, Manifest
from vitray.storage import Endpoint

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it once a checkpoint is fully registered


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the driver worked out before Ray starts; handed to every worker as it is (typed, not a dict)."""

    run_name: str
    run_uri: str
    endpoint: Endpoint
    train_uri: str
    val_uri: str
    train_samples: int
    total_steps: int
    resume: bool
    reshard: bool = False  # resuming on another number of workers: through the universal checkpoint
    classes: tuple[str, ...] = ()  # the training manifest's class (category) names
    palette_uri: str = ""  # iGPT: the k-means colour palette the run trains with (<run>/palette.npy)
    rehearse: str = ""  # --rehearse: "train" (measure the steps and the save) | "restore" (fresh workers restore it)
    # Parquet training data: its row groups, read from the footers here once, so no worker reads them again.
    train_manifest: Manifest | None = None


def prepare(cfg: Config, resume: bool = False, embedded: storage.EmbeddedS3 | None = None,
            restore_only: bool = False) -> tuple[Config, Plan]:
    """`restore_only`: resume a finished run only to restore it (--rehearse's second half)."""
    validate(cfg)
    if cfg.storage.uri:
        endpoint = Endpoint(url=cfg.storage.endpoint_url or None, region=cfg.storage.region)
        root = cfg.storage.uri
        runs_root = runs.runs_root(root)
    elif embedded is not None:
        # The laptop default: the data streams from the embedded S3 server, but the run (checkpoints, metrics,
        # TensorBoard events, cost row) goes to a local folder, which outlives the server — so the tools and
        # --resume work on it afterwards. The server holds only what prepare writes again each time (the digits).
        endpoint, root = embedded.endpoint, f"s3://{embedded.bucket}"
        runs_root = os.path.abspath(cfg.storage.runs_dir)
    else:
        raise ConfigError("storage.uri: no storage given and no embedded S3 server running")

    default = f"{re.sub(r'[^A-Za-z0-9._-]', '_', cfg.model.name)}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    name = cfg.storage.run_name or default
    run_uri = runs.run_folder(runs_root, name)  # a plain name, inside the runs root
    try:
        storage.check_writable(runs_root, endpoint)
    except storage.StorageError as e:
        raise ConfigError(f"storage.uri: {e}") from None
    if cfg.transfer.init_from:  # before the built-in data is written: a bad file costs no time
        from vitray.checkpoints import CheckpointError, check_init_from

        try:
            check_init_from(cfg.transfer.init_from, cfg.model.name, cfg.model.num_classes, cfg.data.image_size,
                            endpoint)
        except (CheckpointError, storage.StorageError) as e:
            raise ConfigError(str(e) if str(e).startswith("transfer.init_from") else f"transfer.init_from: {e}") from None

    if cfg.data.builtin == "digits" and not cfg.data.train_uri:
        from vitray.data.datasets import builtin_uri, write_digits

        base = builtin_uri(root, "digits")
        write_digits(base, endpoint)
        cfg = cfg.replace(data=dict(train_uri=storage.join(base, "train"), val_uri=storage.join(base, "val")))
    elif cfg.data.builtin == "digit_canvases" and not cfg.data.train_uri:
        from vitray.data.datasets import builtin_uri
        from vitray.data.detection import write_digit_canvases

        base = builtin_uri(root, "digit_canvases", cfg.data.image_size)
        write_digit_canvases(base, endpoint, size=cfg.data.image_size)
        cfg = cfg.replace(data=dict(train_uri=storage.join(base, "train"), val_uri=storage.join(base, "val")))

    try:
        columns = (cfg.data.image_column, cfg.data.label_column)  # Parquet data without a manifest
        manifest = read_manifest(cfg.data.train_uri, endpoint, "data.train_uri", columns)
        val_task = (read_manifest(cfg.data.val_uri, endpoint, "data.val_uri", columns).task if cfg.data.val_uri
                    else manifest.task)
    except DataError as e:
        raise ConfigError(str(e)) from None
    from vitray.tasks import task_class

    wanted = task_class(cfg.model.name).shards
    for field, task in (("data.train_uri", manifest.task), ("data.val_uri", val_task)):
        if task != wanted:
            raise ConfigError(f"{field}: holds {task} shards but {cfg.model.name} is a {wanted} model")
    if cfg.model.num_classes < len(manifest.classes):
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(manifest.classes)} classes of"
            f" {cfg.data.train_uri}"
        )

    try:
        has_checkpoint = storage.exists(storage.join(run_uri, RAY_SNAPSHOT), endpoint)
    except storage.StorageError as e:
        raise ConfigError(f"storage.uri: {e}") from None
    if resume and not has_checkpoint:
        raise ConfigError(f"storage.run_name: --resume found no checkpoint of run {name!r} under {run_uri}")
    saved = check_resumable(cfg, run_uri, endpoint) if resume else None
    saved_world, saved_step = (saved["world_size"], saved["step"]) if saved else (cfg.scaling.num_workers, 0)
    parts = partition_count(cfg.replace(storage=dict(run_name=name)), saved)
    if len(manifest.shards) < parts:
        raise ConfigError(
            f"data.partitions: {len(manifest.shards)} shards cannot feed {parts} data partitions (each epoch deals"
            " whole shards to partitions; by default one per worker); rewrite the data with smaller shards"
            " (jobs/write_shards.py --shard-samples)"
        )
    cfg = cfg.replace(data=dict(partitions=parts))
    if not resume and storage.exists(run_uri, endpoint):
        reuse_name(name, run_uri, endpoint)

    total = total_steps(cfg, manifest.num_samples)
    if resume and saved_step >= min(total, cfg.stop_at_step or total) and not restore_only:
        raise ConfigError(f"optim.total_steps: run {name!r} already reached step {saved_step} of {total}; raise"
                          " optim.total_steps (or optim.epochs) to train it further")
    cfg = cfg.replace(storage=dict(run_name=name))
    return cfg, Plan(name, run_uri, endpoint, cfg.data.train_uri, cfg.data.val_uri, manifest.num_samples, total, resume,
                     saved_world != cfg.scaling.num_workers, tuple(manifest.classes),
                     train_manifest=manifest if manifest.format == "parquet" else None)


def partition_count(cfg: Config, saved: dict | None) -> int:
    """The run's number of data partitions: data.partitions, else one per (most) worker; a resumed run keeps the
    number it was saved with (its data positions are per partition)."""
    if saved is None:
        return cfg.data.partitions or cfg.scaling.num_workers
    before = saved["config"]["data"].get("partitions") or saved["world_size"]  # older runs: one per worker
    if cfg.data.partitions and cfg.data.partitions != before:
        raise ConfigError(f"data.partitions: run {cfg.storage.run_name!r} was saved with {before} data partitions;"
                          " a resumed run keeps that number (drop the override)")
    if cfg.scaling.num_workers > before or cfg.optim.global_batch % before:
        raise ConfigError(f"scaling.num_workers: run {cfg.storage.run_name!r} has {before} data partitions, which"
                          f" cannot feed {cfg.scaling.num_workers} workers at optim.global_batch={cfg.optim.global_batch}"
                          f" (at most {before} workers)")
    return before


def reuse_name(name: str, run_uri: str, endpoint: Endpoint) -> None:
    """A new run under the name of an existing one: refused when that run has a committed checkpoint (it can be
    resumed) or is running; an attempt that ended before its first checkpoint is moved aside, kept whole."""
    from vitray.checkpoints import scan

    complete, _ = scan(run_uri, endpoint)
    record = runs.read_state(run_uri, endpoint) or {}
    if complete:
        how = "was interrupted" if record.get("state") == "interrupted" else "already exists"
        raise ConfigError(f"storage.run_name: run {name!r} {how} at {run_uri} with a checkpoint (step"
                          f" {complete[-1]}); pass --resume to continue it or choose another name")
    if record.get("state") == "running":
        raise ConfigError(f"storage.run_name: run {name!r} at {run_uri} says it is running (last written"
                          f" {time.time() - record['updated']:.0f} s ago). Choose another name; if its driver is"
                          f" gone (killed), delete {run_uri} first")
    moved = runs.move_aside(run_uri, endpoint)
    print(f"run {name!r}: the earlier attempt ({record.get('state', 'no record')}) ended before its first"
          f" checkpoint; what it wrote is kept at {moved}", flush=True)


def total_steps(cfg: Config, num_samples: int) -> int:
    """Optimizer steps of a run: optim.total_steps, or its epochs over the samples."""
    usable = num_samples
    return cfg.optim.total_steps or max(1, math.floor(cfg.optim.epochs * usable / cfg.optim.global_batch))


def check_resumable(cfg: Config, run_uri: str, endpoint: Endpoint) -> dict:
    """Before Ray: the run has a complete checkpoint, and when it was saved by another number of workers it can be
    resharded (ZeRO-1/2/3 with Adam, through DeepSpeed's universal checkpoint, made here). Names the interrupted saves the
    resume will skip. Returns the checkpoint's record (step, world size, config)."""
    from vitray.checkpoints import COMMIT, read_meta, scan, step_dir
    from vitray.train.checkpoint import make_universal

    complete, incomplete = scan(run_uri, endpoint)
    if not complete:
        raise ConfigError(f"storage.run_name: {run_uri} holds no complete checkpoint (none has a {COMMIT} marker)")
    for s in incomplete:
        if s > complete[-1]:
            print(f"skipping incomplete checkpoint {step_dir(s)} (no {COMMIT} marker: its save was interrupted);"
                  f" resuming from {step_dir(complete[-1])}", flush=True)
    latest = storage.join(run_uri, step_dir(complete[-1]))
    saved = read_meta(latest, endpoint)
    world, stage = saved["world_size"], saved["config"]["deepspeed"]["zero_stage"]
    if world != cfg.scaling.num_workers:
        if cfg.deepspeed.zero_stage != stage:
            raise ConfigError(
                f"scaling.num_workers: {latest} was saved by {world} workers under ZeRO-{stage}; vitray reshards"
                f" ZeRO-1/2/3 checkpoints to another worker count keeping deepspeed.zero_stage={stage}: resume with"
                f" --set scaling.num_workers={world} or --set deepspeed.zero_stage={stage}"
            )
        if saved["config"]["optim"]["optimizer"] != "adam":
            raise ConfigError(
                f"scaling.num_workers: {latest} was saved by {world} workers with {saved['config']['optim']['optimizer']};"
                " DeepSpeed's universal checkpoint, which reshards ZeRO states, carries Adam's moments only: resume"
                f" with --set scaling.num_workers={world}"
            )
        print(f"resharding {step_dir(complete[-1])} from {world} to {cfg.scaling.num_workers} workers (DeepSpeed"
              " universal checkpoint)", flush=True)
        make_universal(latest, endpoint)
    return saved


DATA_CPUS = 1.0  # Ray Data's read and decode tasks ask for one CPU each: at least one must stay free for them


def check_cluster(cfg: Config) -> None:
    """Fail fast, before Ray Train asks for anything, when the workers need more than the cluster has (and cannot
    add), or would take every CPU and leave Ray Data none to read with — which otherwise waits forever, silently."""
    import ray

    s, have = cfg.scaling, ray.cluster_resources()
    s = dataclasses.replace(s, num_workers=s.min_workers or s.num_workers)  # an elastic run starts with its minimum
    gpus, cpus = have.get("GPU", 0), have.get("CPU", 0)
    if s.autoscale:  # the cluster grows on demand: what is up now says nothing
        return
    if s.use_gpu and gpus == 0:
        raise ConfigError(
            f"scaling.use_gpu: this recipe needs {s.num_workers} GPU workers but the Ray cluster has no"
            " GPUs. Submit it to a GPU cluster (see cluster/), set scaling.autoscale=true if the cluster adds GPU"
            " nodes on demand, or try the CPU recipe: --preset smoke"
        )
    if s.use_gpu and gpus < s.num_workers:
        raise ConfigError(f"scaling.num_workers: {s.num_workers} GPU workers, but the Ray cluster has {gpus:g} GPUs;"
                          " lower scaling.num_workers or set scaling.autoscale=true if it adds nodes on demand")
    need = s.num_workers * s.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"scaling.cpus_per_worker: {s.num_workers} workers × {s.cpus_per_worker:g} CPUs = {need:g}"
                          f" CPUs, but the Ray cluster has {cpus:g}; lower scaling.cpus_per_worker or"
                          " scaling.num_workers (or set scaling.autoscale=true if the cluster adds nodes)")
    if cpus - need < DATA_CPUS:
        fits = (cpus - DATA_CPUS) / s.num_workers
        raise ConfigError(f"scaling.cpus_per_worker: {s.num_workers} workers × {s.cpus_per_worker:g} CPUs take all"
                          f" {cpus:g} CPUs of the Ray cluster, leaving none for Ray Data's read and decode tasks"
                          f" (the run would wait forever); set scaling.cpus_per_worker to at most {fits:.2g}")


# glibc serves a freed block's size from its heap afterwards (its mmap threshold rises to it) and rarely returns
# that heap: ZeRO-3's gathered layers and buckets, freed and reallocated each step, then pile up. Measured on
# ViT-L/16, ZeRO-3, 2 CPU workers: 6.2 GiB resident per worker between steps instead of 3.7. A fixed threshold
# returns every block over 1 MiB to the system when freed.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def init_ray(**local: object) -> None:
    """Join the cluster RAY_ADDRESS names (as under `ray job submit`), or start a local Ray with `local`'s options.

    A local Ray gets its dashboard on a known port, named to its workers as RAY_API_SERVER_ADDRESS: Ray Train's
    placement-group cleaner calls the state API without an address, which otherwise resolves to the cluster the
    machine's last `ray start` recorded. A dead one costs ~13 s of GCS timeouts (and a core) at the end of every
    fit; a live one does not know our controller, and the cleaner would remove our workers' placement group."""
    import ray

    from vitray import ray_logs

    ray_logs.setup_worker()  # this process too: it runs Ray Data's executions for evaluation
    ray_logs.quiet_driver()
    hook = {"worker_process_setup_hook": ray_logs.HOOK}  # merged with a submitted job's own runtime_env
    address = os.environ.get("RAY_ADDRESS", "local")
    if address != "local":
        ray.init(address=address, logging_level="WARNING", runtime_env={**hook, "env_vars": MALLOC})
        return
    port = storage.free_port()
    ray.init(address="local", logging_level="WARNING", include_dashboard=True, dashboard_port=port,
             runtime_env={**hook, "env_vars": {**MALLOC, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
             **local)


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


def fit(cfg: Config, plan: Plan, timeline: dict | None = None, callbacks: list | None = None):
    """Run training on the current Ray cluster; returns Ray Train's `Result`. `timeline` (wall-clock times of
    earlier start-up phases) is passed through to the run's start-up record; `callbacks` are Ray Train callbacks
    (a scaling study passes Tune's, which forwards each checkpoint's metrics to its trial)."""
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vitray.data.reading import build_dataset, stream_splits_config
    from vitray.data.spec import ReadSpec
    from vitray.tasks import make_task
    from vitray.train.loop import train_loop_per_worker

    ray.data.DataContext.get_current().enable_progress_bars = False
    d = cfg.data
    # Training data is read by each worker itself (`TrainStream`: reproducible per rank); Ray Train splits only
    # the held-out set.
    datasets = {}
    if plan.val_uri:
        spec = ReadSpec.from_config(d, cfg.seed, make_task(cfg).decoder(), train=False)
        datasets["val"] = build_dataset(plan.val_uri, plan.endpoint, spec, field="data.val_uri")

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    # Read by Ray Train's controller, which takes it from the driver's environment.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(s.group_start_timeout_s)
    fs, runs_path = storage.resolve(plan.run_uri.rsplit("/", 1)[0], plan.endpoint)  # Ray adds the run name
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "plan": plan, "timeline": {**(timeline or {}), "fit_called": time.time()}},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        # Elastic (scaling.min_workers): Ray Train runs as many workers as the cluster has room for, between the two,
        # restarting the group from the latest checkpoint when a node is lost and, at its next resize check, when
        # room returns. Every restart counts against max_failures.
        scaling_config=ScalingConfig(
            num_workers=(s.min_workers, s.num_workers) if s.min_workers else s.num_workers, use_gpu=s.use_gpu,
            resources_per_worker=resources, accelerator_type=s.accelerator or None,
            placement_strategy=s.placement_strategy, elastic_resize_monitor_interval_s=s.resize_check_s,
        ),
        run_config=RunConfig(
            name=plan.run_name,
            storage_path=runs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=stream_splits_config(),
    )
    return trainer.fit()


def run(cfg: Config, resume: bool = False, embedded: storage.EmbeddedS3 | None = None, timeline: dict | None = None,
        callbacks: list | None = None, rehearse: int | None = None) -> dict:
    """The driver's whole sequence: prepare (no Ray) → join or start Ray → check the cluster → fit. Returns the
    run's summary: run URI, final step, loss, held-out accuracy, final checkpoint URI, the plan's figures.
    `rehearse`: instead, that many steps of the configured model on what is attached (`vitray/train/rehearse.py`)."""
    if rehearse is not None:
        from vitray.train import rehearse as rehearsal

        validate(cfg)
        if resume:
            raise ConfigError("--rehearse: a rehearsal is a fresh run of its own; drop --resume")
        return rehearsal.run(cfg, rehearse, embedded, timeline, _run)
    return _run(cfg, resume, embedded, timeline, callbacks)


def _run(cfg: Config, resume: bool, embedded, timeline: dict | None, callbacks: list | None,
         rehearsal: str = "") -> dict:
    cfg, plan = prepare(cfg, resume, embedded, restore_only=rehearsal == "restore")
    plan = dataclasses.replace(plan, rehearse=rehearsal)
    print(f"run {plan.run_name}: {plan.train_samples} training images, {plan.total_steps} steps → {plan.run_uri}", flush=True)
    # The cost plan, before any cluster resource: refuses a configuration that cannot fit on its accelerator.
    estimate = cost.estimate(cfg.replace(optim=dict(total_steps=plan.total_steps)), plan.train_samples,
                             host=not cfg.scaling.use_gpu)
    if not cfg.scaling.use_gpu and os.environ.get("RAY_ADDRESS", "local") == "local":
        from vitray.train.rehearse import Attached  # CPU workers on this machine share its memory

        estimate = dataclasses.replace(estimate, device_memory=Attached.here().budget(cfg.scaling.num_workers, "CPU"))
    cost.check_fits(estimate)
    print(estimate.summary(), flush=True)
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
            plan = task.before_fit(plan)
            result = fit(cfg, plan, timeline, callbacks)
        if result.error:
            raise TrainingFailed(f"run {plan.run_uri} failed: {result.error}")
    except (KeyboardInterrupt, SystemExit) as e:  # Ray Train turns Ctrl-C into SystemExit
        raise _interrupted(plan, "SIGTERM" if isinstance(e, _Terminated) else "Ctrl-C") from None
    except Exception as e:  # Ray Train V2 raises the workers' error (e.g. a non-finite loss) from fit()
        error = str(e).removeprefix(f"run {plan.run_uri} failed: ")
        diverged = "non-finite training loss" in error
        runs.write_state(plan.run_uri, plan.endpoint, "diverged" if diverged else "failed", error=error[-4000:])
        raise e if isinstance(e, TrainingFailed) else TrainingFailed(f"run {plan.run_uri} failed: {e}") from e
    from vitray.train.metrics import DATA_BOUND, data_bound_message, restart_totals

    m = dict(result.metrics or {})
    # Restarts from the run's log, which every worker group adds to: the last group's report may predate some.
    if storage.exists(storage.join(plan.run_uri, "metrics.jsonl"), plan.endpoint):
        text = storage.read_bytes(storage.join(plan.run_uri, "metrics.jsonl"), plan.endpoint).decode()
        m.update(restart_totals(text.splitlines()))
    runs.write_state(plan.run_uri, plan.endpoint, "finished" if m.get("step") == plan.total_steps or rehearsal == "restore" else "stopped")
    summary = {"run": plan.run_uri, "data": {"train_uri": plan.train_uri, "val_uri": plan.val_uri},
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
