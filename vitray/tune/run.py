"""The study driver: check everything cheap, start (or resume) the Ray Tune experiment, then turn the trials'
records into the table, the fits and Figure 5.

    check grid (no Ray) → study folder (refuse to overwrite or to resume a different grid) → write built-in data
    → read every manifest → join/start Ray → trials fit the cluster? → Tuner.fit (or Tuner.restore(...).fit)
    → results.csv / results.json / fits.json / figure5.png
"""
from __future__ import annotations

import json
import os

from vitray import storage
from vitray.config.schema import Config, ConfigError
from vitray.storage import Endpoint
from vitray.tune import scaling
from vitray.tune.study import Study, check, data_overrides, max_concurrent, prepare_data
from vitray.tune.trial import record_uri, run_trial


def run_study(study: Study, overrides: list[str], study_uri: str, endpoint: Endpoint, resume: bool = False,
              local_cpus: float = 0) -> dict:
    """Run `study` into `study_uri` (local folder or s3://); returns {"rows", "fits", "compute_optimal", "files"}.
    `local_cpus`: logical CPUs of the local Ray started when there is no cluster to join (0 = the cores)."""
    if not storage.is_s3(study_uri):
        study_uri = os.path.abspath(study_uri)
    overrides = data_overrides(study, study_uri) + list(overrides)
    configs = check(study, overrides, study_uri, endpoint)  # no storage, no Ray yet
    _claim_folder(study, study_uri, endpoint, resume, dry_run=True)

    import ray
    from ray import tune

    if not ray.is_initialized():
        from vitray.session import init_ray

        init_ray(**({"num_cpus": local_cpus} if local_cpus else {}))
    concurrent = max_concurrent(configs, ray.cluster_resources())  # before anything is written
    _claim_folder(study, study_uri, endpoint, resume)
    study = prepare_data(study, study_uri, endpoint)
    configs = _with_steps(study, configs, endpoint)
    keys = [c.storage.run_name for c in configs]
    done = sum(storage.exists(record_uri(study_uri, k), endpoint) for k in keys)
    print(f"study {study.name}: {len(keys)} trials ({done} finished earlier), up to {concurrent} at a time"
          f" → {study_uri}", flush=True)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, study=study, study_uri=study_uri, endpoint=endpoint,
                             configs={c.storage.run_name: c.to_dict() for c in configs}),
        # The trial only drives its TorchTrainer: its Train workers hold the CPUs and GPUs. Tune needs a non-empty
        # request, and even a sliver of CPU would leave the trial's Ray Data tasks (1 CPU each) unschedulable on a
        # cluster sized exactly for them, so the trial reserves memory instead.
        {"CPU": 0, "memory": 256 * 2**20})
    fs, path = _tune_storage(study_uri, endpoint)
    if resume and tune.Tuner.can_restore(f"{path}/tune", storage_filesystem=fs):
        tuner = tune.Tuner.restore(f"{path}/tune", trainable, resume_unfinished=True, restart_errored=True,
                                   storage_filesystem=fs)
    else:
        points = [{"key": c.storage.run_name, "model": c.model.name, "budget": b}
                  for c, (_, b) in zip(configs, study.points)]
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=_scheduler(study, configs),
                                        trial_dirname_creator=lambda t: t.config["point"]["key"],
                                        trial_name_creator=lambda t: t.config["point"]["key"]),
            run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=1),
        )
    grid = tuner.fit()
    return write_results(study, configs, grid, study_uri, endpoint)


def _claim_folder(study: Study, study_uri: str, endpoint: Endpoint, resume: bool, dry_run: bool = False) -> None:
    """study.json marks the folder as this study's: a new study never reuses one, a resumed one must match it.
    `dry_run`: only check."""
    marker = storage.join(study_uri, "study.json")
    try:
        exists = storage.exists(marker, endpoint)
    except storage.StorageError as e:
        raise ConfigError(f"--study-uri: {e}") from None
    if exists and not resume:
        raise ConfigError(f"--study-uri: a study already lives in {study_uri}; pass --resume to continue it or"
                          " choose another folder")
    if resume and not exists:
        raise ConfigError(f"--resume: no study in {study_uri} (no study.json)")
    if exists:
        saved = json.loads(storage.read_bytes(marker, endpoint))
        if saved != study.describe():
            changed = [k for k in saved if saved[k] != study.describe().get(k)]
            raise ConfigError(f"--resume: the study in {study_uri} was started with other settings ({', '.join(changed)});"
                              " resume it with the same preset and flags, or start a new one elsewhere")
        return
    if not dry_run:
        storage.write_bytes(marker, json.dumps(study.describe(), indent=1).encode(), endpoint)


def _with_steps(study: Study, configs: list[Config], endpoint: Endpoint) -> list[Config]:
    """Read every dataset's manifest (a clear error naming the URI, before Ray) and, with ASHA, checkpoint each trial
    four times so the scheduler gets intermediate losses."""
    from vitray.data.catalog import read_manifest
    from vitray.data.manifest import DataError
    from vitray.train.plan import total_steps

    sizes = {}
    try:
        for uri, field in [(c.data.train_uri, "data.train_uri") for c in configs] + [
                (study.transfer_train, "--transfer-train"), (study.transfer_test, "--transfer-test")]:
            if uri not in sizes:
                sizes[uri] = read_manifest(uri, endpoint, field).num_samples
    except DataError as e:
        raise ConfigError(str(e)) from None
    if not study.asha:
        return configs
    return [c.replace(storage=dict(checkpoint_every=max(1, total_steps(c, sizes[c.data.train_uri]) // 4)))
            for c in configs]


def _scheduler(study: Study, configs: list[Config]):
    if not study.asha:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Trials are compared at equal optimizer steps by training loss, the only signal before transfer is scored.
    # ASHA stops every trial that reaches max_t, so it lies one step past the longest run: a trial that trained
    # to the end must still get to its transfer evaluation.
    longest = max(c.storage.checkpoint_every * 4 for c in configs) + 1
    return ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=longest,
                         grace_period=min(c.storage.checkpoint_every for c in configs), reduction_factor=2)


def _tune_storage(study_uri: str, endpoint: Endpoint):
    fs, path = storage.resolve(study_uri, endpoint)
    return (fs if storage.is_s3(study_uri) else None), path


def write_results(study: Study, configs: list[Config], grid, study_uri: str, endpoint: Endpoint) -> dict:
    """One row per grid point — a finished trial's record, or what Tune knows of a stopped or failed one — then
    the fits, the compute-optimal models and the plot, all into the study folder."""
    from vitray.models.registry import get_spec

    by_key = {}
    for result in grid:
        point = (result.config or {}).get("point", {})
        by_key[point.get("key")] = result
    rows = []
    for cfg, (_, budget) in zip(configs, study.points):
        key = cfg.storage.run_name
        uri = record_uri(study_uri, key)
        if storage.exists(uri, endpoint):
            rows.append(json.loads(storage.read_bytes(uri, endpoint)))
            continue
        result = by_key.get(key)
        metrics = (result.metrics or {}) if result else {}
        rows.append({"trial": key, "family": get_spec(cfg.model.name).family, "model": cfg.model.name,
                     "budget": budget, "budget_unit": study.budget_unit, "steps": metrics.get("step"),
                     "final_loss": metrics.get("loss"), "transfer_accuracy": None,
                     "status": "error" if result is not None and result.error else "stopped",
                     "error": str(result.error) if result is not None and result.error else None})
    fit_table = scaling.fits(rows)
    optimal = scaling.compute_optimal(fit_table["models"], scaling.budget_grid(rows))
    files = {
        "results.csv": scaling.table_csv(rows).encode(),
        "results.json": json.dumps(rows, indent=1).encode(),
        "fits.json": json.dumps({**fit_table, "compute_optimal": optimal}, indent=1).encode(),
        "figure5.png": scaling.figure5(rows, fit_table, f"vitray scaling study {study.name!r}: transfer vs compute"),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(study_uri, name), data, endpoint)
    print(scaling.report(rows, fit_table, optimal), flush=True)
    return {"rows": rows, "fits": fit_table, "compute_optimal": optimal,
            "files": [storage.join(study_uri, n) for n in files]}
