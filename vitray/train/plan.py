"""A run's plan: everything the driver works out before Ray starts, made once from the config and frozen.

`prepare` validates the config, names the run folder, checks `--init-from`, writes the built-in dataset if asked,
reads the shard manifests and decides whether the run starts, resumes or is refused — all without Ray, so bad input
costs seconds. The result is a `Plan`, which the workers receive as it is.
"""
from __future__ import annotations

import dataclasses
import math
import os

from vitray import runs, storage
from vitray.config.checks import validate
from vitray.config.schema import Config, ConfigError
from vitray.data.catalog import read_manifest
from vitray.data.manifest import DataError, Manifest
from vitray.storage import Endpoint
from vitray.train import runfolder


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the driver worked out before Ray starts; handed to every worker as it is."""

    cfg: Config  # resolved: the data URIs, partitions and run name filled in; never changed after
    run_name: str
    run_uri: str
    endpoint: Endpoint
    train_samples: int
    total_steps: int
    classes: tuple[str, ...] = ()  # the training manifest's class (category) names
    # Parquet training data: its row groups, read from the footers here once, so no worker reads them again.
    train_manifest: Manifest | None = None

    @property
    def last_step(self) -> int:
        """Where this attempt stops: the run's last step, or `stop_at_step` before it."""
        return min(self.total_steps, self.cfg.stop_at_step or self.total_steps)


def prepare(cfg: Config, resume: bool = False, embedded: storage.EmbeddedS3 | None = None,
            elastic: bool = False) -> tuple[Config, Plan]:
    """The run's plan (and its resolved config, `plan.cfg`). `elastic`: a resume on another number of workers leaves
    the universal conversion to rank 0 (`resume.find`), as an elastic restart does (--rehearse's resize)."""
    validate(cfg)
    endpoint, root, runs_root = _storage(cfg, embedded)
    name, run_uri = runfolder.locate(cfg, runs_root, endpoint)
    _check_init_from(cfg, endpoint)  # before the built-in data is written: a bad file costs no time
    train_uri, val_uri = _data(cfg, root, endpoint)
    manifest = _read_manifests(cfg, train_uri, val_uri, endpoint)

    if resume and not runfolder.has_checkpoint(run_uri, endpoint):
        raise ConfigError(f"storage.run_name: --resume found no checkpoint of run {name!r} under {run_uri}")
    saved = runfolder.check_resumable(cfg, run_uri, endpoint) if resume else None
    parts = partition_count(cfg, name, saved)
    if len(manifest.shards) < parts:
        raise ConfigError(
            f"data.partitions: {len(manifest.shards)} shards cannot feed {parts} data partitions (each epoch deals"
            " whole shards to partitions; by default one per worker); rewrite the data with smaller shards"
            " (jobs/write_shards.py --shard-samples)"
        )
    total = total_steps(cfg, manifest.num_samples)
    if saved and saved["step"] >= min(total, cfg.stop_at_step or total):
        raise ConfigError(f"optim.total_steps: run {name!r} already reached step {saved['step']} of {total}; raise"
                          " optim.total_steps (or optim.epochs) to train it further")
    earlier = None if resume else runfolder.check_new_name(name, run_uri, endpoint)

    # Checked: now the two actions on the run folder.
    if saved and saved["world_size"] != cfg.scaling.num_workers and not elastic:
        runfolder.add_universal(saved, cfg.scaling.num_workers, endpoint)
    if earlier is not None:
        runfolder.move_aside(name, run_uri, endpoint, earlier)
    cfg = cfg.replace(data=dict(train_uri=train_uri, val_uri=val_uri, partitions=parts), storage=dict(run_name=name))
    return cfg, Plan(cfg, name, run_uri, endpoint, manifest.num_samples, total, tuple(manifest.classes),
                     train_manifest=manifest if manifest.format == "parquet" else None)


def _storage(cfg: Config, embedded: storage.EmbeddedS3 | None) -> tuple[Endpoint, str, str]:
    """(endpoint, storage root, runs root)."""
    if cfg.storage.uri:
        endpoint = Endpoint(url=cfg.storage.endpoint_url or None, region=cfg.storage.region)
        return endpoint, cfg.storage.uri, runs.runs_root(cfg.storage.uri)
    if embedded is not None:
        # The laptop default: the data streams from the embedded S3 server, but the run (checkpoints, metrics,
        # TensorBoard events, cost row) goes to a local folder, which outlives the server — so the tools and
        # --resume work on it afterwards. The server holds only what prepare writes again each time (the digits).
        return embedded.endpoint, f"s3://{embedded.bucket}", os.path.abspath(cfg.storage.runs_dir)
    raise ConfigError("storage.uri: no storage given and no embedded S3 server running")


def _check_init_from(cfg: Config, endpoint: Endpoint) -> None:
    if not cfg.transfer.init_from:
        return
    from vitray.checkpoints import CheckpointError, check_init_from

    try:
        check_init_from(cfg.transfer.init_from, cfg.model.name, cfg.model.num_classes, cfg.data.image_size, endpoint)
    except (CheckpointError, storage.StorageError) as e:
        raise ConfigError(str(e) if str(e).startswith("transfer.init_from") else f"transfer.init_from: {e}") from None


def _data(cfg: Config, root: str, endpoint: Endpoint) -> tuple[str, str]:
    """(train URI, held-out URI): the configured ones, or the built-in dataset's, written into storage first."""
    d = cfg.data
    if d.train_uri or not d.builtin:
        return d.train_uri, d.val_uri
    from vitray.data.datasets import builtin_uri

    if d.builtin == "digits":
        from vitray.data.datasets import write_digits

        base = builtin_uri(root, "digits")
        write_digits(base, endpoint)
    else:  # digit_canvases (the config check allows no other)
        from vitray.data.detection import write_digit_canvases

        base = builtin_uri(root, "digit_canvases", d.image_size)
        write_digit_canvases(base, endpoint, size=d.image_size)
    return storage.join(base, "train"), storage.join(base, "val")


def _read_manifests(cfg: Config, train_uri: str, val_uri: str, endpoint: Endpoint) -> Manifest:
    """The training manifest, after checking both sets hold what the model trains on and the head has room for
    every class."""
    try:
        columns = (cfg.data.image_column, cfg.data.label_column)  # Parquet data without a manifest
        manifest = read_manifest(train_uri, endpoint, "data.train_uri", columns)
        val_task = read_manifest(val_uri, endpoint, "data.val_uri", columns).task if val_uri else manifest.task
    except DataError as e:
        raise ConfigError(str(e)) from None
    from vitray.tasks import task_class

    wanted = task_class(cfg.model.name).shards
    for field, task in (("data.train_uri", manifest.task), ("data.val_uri", val_task)):
        if task != wanted:
            raise ConfigError(f"{field}: holds {task} shards but {cfg.model.name} is a {wanted} model")
    if cfg.model.num_classes < len(manifest.classes):
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(manifest.classes)}"
                          f" classes of {train_uri}")
    return manifest


def partition_count(cfg: Config, name: str, saved: dict | None) -> int:
    """The run's number of data partitions: data.partitions, else one per (most) worker; a resumed run keeps the
    number it was saved with (its data positions are per partition)."""
    if saved is None:
        return cfg.data.partitions or cfg.scaling.num_workers
    before = saved["config"]["data"].get("partitions") or saved["world_size"]  # older runs: one per worker
    if cfg.data.partitions and cfg.data.partitions != before:
        raise ConfigError(f"data.partitions: run {name!r} was saved with {before} data partitions;"
                          " a resumed run keeps that number (drop the override)")
    if cfg.scaling.num_workers > before or cfg.optim.global_batch % before:
        raise ConfigError(f"scaling.num_workers: run {name!r} has {before} data partitions, which"
                          f" cannot feed {cfg.scaling.num_workers} workers at optim.global_batch={cfg.optim.global_batch}"
                          f" (at most {before} workers)")
    return before


def total_steps(cfg: Config, num_samples: int) -> int:
    """Optimizer steps of a run: optim.total_steps, or its epochs over the samples."""
    return cfg.optim.total_steps or max(1, math.floor(cfg.optim.epochs * num_samples / cfg.optim.global_batch))
