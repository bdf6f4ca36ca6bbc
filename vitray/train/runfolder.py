"""A run's folder, `<runs root>/<name>`: its name, whether a new run may take it, and whether a run may resume from it.

Checks here only check (and say what they found); the two actions on a folder — moving an earlier attempt aside,
and adding the universal checkpoint a resize needs — are separate functions that `train/plan.py` calls by name.
"""
from __future__ import annotations

import time

from vitray import runs, storage
from vitray.config.schema import Config, ConfigError
from vitray.storage import Endpoint

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it once a checkpoint is fully registered


def locate(cfg: Config, runs_root: str, endpoint: Endpoint) -> tuple[str, str]:
    """(name, folder) of the run: storage.run_name, or `<model>-<UTC time>`; a plain name inside a runs root that
    can be written (checked before anything is read or moved)."""
    import re

    default = f"{re.sub(r'[^A-Za-z0-9._-]', '_', cfg.model.name)}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    name = cfg.storage.run_name or default
    run_uri = runs.run_folder(runs_root, name)
    try:
        storage.check_writable(runs_root, endpoint)
    except storage.StorageError as e:
        raise ConfigError(f"storage.uri: {e}") from None
    return name, run_uri


def has_checkpoint(run_uri: str, endpoint: Endpoint) -> bool:
    """Whether the run has a checkpoint to resume from (what `--resume` needs at least): one Ray Train registered,
    or a committed one. An asynchronous save is committed once every rank's upload is done, which may be before
    Ray Train's controller registers it: a run killed in between has a complete checkpoint and no snapshot."""
    from vitray.checkpoints import scan

    try:
        return storage.exists(storage.join(run_uri, RAY_SNAPSHOT), endpoint) or bool(scan(run_uri, endpoint)[0])
    except storage.StorageError as e:
        raise ConfigError(f"storage.uri: {e}") from None


def check_new_name(name: str, run_uri: str, endpoint: Endpoint) -> dict | None:
    """A new run under the name of an existing one: refused when that run has a committed checkpoint (it can be
    resumed) or says it is running. Returns the earlier attempt's record when it may be moved aside (it ended before
    its first checkpoint), None when the folder does not exist."""
    from vitray.checkpoints import scan

    if not storage.exists(run_uri, endpoint):
        return None
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
    return record


def move_aside(name: str, run_uri: str, endpoint: Endpoint, record: dict) -> None:
    """Keep an earlier attempt that ended before its first checkpoint whole, beside the new run."""
    moved = runs.move_aside(run_uri, endpoint)
    print(f"run {name!r}: the earlier attempt ({record.get('state', 'no record')}) ended before its first"
          f" checkpoint; what it wrote is kept at {moved}", flush=True)


def check_resumable(cfg: Config, run_uri: str, endpoint: Endpoint) -> dict:
    """The run has a complete checkpoint, and when it was saved by another number of workers it can be resharded
    (ZeRO-1/2/3 with Adam, through DeepSpeed's universal checkpoint). Names the interrupted saves the resume will
    skip. Returns the newest complete checkpoint's record (step, world size, config) with its URI as "uri"."""
    from vitray.checkpoints import COMMIT, read_meta, scan, step_dir

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
    if world != cfg.scaling.num_workers and cfg.deepspeed.zero_stage != stage:
        raise ConfigError(
            f"scaling.num_workers: {latest} was saved by {world} workers under ZeRO-{stage}; vitray reshards"
            f" ZeRO-1/2/3 checkpoints to another worker count keeping deepspeed.zero_stage={stage}: resume with"
            f" --set scaling.num_workers={world} or --set deepspeed.zero_stage={stage}"
        )
    if world != cfg.scaling.num_workers and saved["config"]["optim"]["optimizer"] != "adam":
        raise ConfigError(
            f"scaling.num_workers: {latest} was saved by {world} workers with {saved['config']['optim']['optimizer']};"
            " DeepSpeed's universal checkpoint, which reshards ZeRO states, carries Adam's moments only: resume"
            f" with --set scaling.num_workers={world}"
        )
    return {**saved, "uri": latest}


def add_universal(saved: dict, workers: int, endpoint: Endpoint) -> None:
    """Resuming on another number of workers: DeepSpeed's universal form of the checkpoint `saved` names, made once
    on the driver before any worker starts (an elastic restart makes it in rank 0 instead)."""
    from vitray.train.checkpoint import make_universal

    print(f"resharding {saved['uri'].rsplit('/', 1)[1]} from {saved['world_size']} to {workers} workers (DeepSpeed"
          " universal checkpoint)", flush=True)
    make_universal(saved["uri"], endpoint)
