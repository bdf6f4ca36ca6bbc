"""One trial of a scaling study, as Ray Tune runs it: pretrain (a full vitray run on Ray Train + DeepSpeed), score
transfer, write the trial's record, report it to Tune.

Trials are idempotent, because a study may be killed at any moment and resumed: a trial whose record exists
reports it again without training; a trial whose run reached its last step skips to the transfer evaluation; a
run interrupted after a complete checkpoint resumes from it; one interrupted before any is started afresh under
a new run name (the old folder is left as it was).
"""
from __future__ import annotations

import json
import logging
import time

from vitray import runs, storage
from vitray.config.schema import Config
from vitray.storage import Endpoint
from vitray.tune.study import Study, train_flops_per_image

logger = logging.getLogger("vitray")


def record_uri(study_uri: str, key: str) -> str:
    return storage.join(study_uri, "trials", f"{key}.json")


def run_trial(params: dict, study: Study, study_uri: str, endpoint: Endpoint, configs: dict) -> None:
    """The Tune function trainable. `params["point"]` is the grid point: its key, model and budget; `configs` maps
    keys to the trial configs the driver validated."""
    import ray.tune

    point = params["point"]
    key = point["key"]
    uri = record_uri(study_uri, key)
    if storage.exists(uri, endpoint):
        logger.info(f"trial {key}: finished in an earlier session; reporting its record")
        ray.tune.report(_for_tune(json.loads(storage.read_bytes(uri, endpoint))))
        return
    cfg = Config.from_dict(configs[key])
    started = time.time()
    summary, cfg = _pretrain(cfg, endpoint, study.asha)
    trained_s = time.time() - started
    accuracy = transfer_accuracy(study, cfg, summary["checkpoint"], endpoint)
    record = _record(study, point["budget"], cfg, summary, accuracy, trained_s, time.time() - started - trained_s)
    storage.write_bytes(uri, json.dumps(record, indent=1).encode(), endpoint)
    ray.tune.report(_for_tune(record))


def _for_tune(record: dict) -> dict:
    """The record under the names the intermediate (per-checkpoint) reports use, which a scheduler reads."""
    return {**record, "loss": record["final_loss"], "step": record["steps"]}


def _pretrain(cfg: Config, endpoint: Endpoint, asha: bool) -> tuple[dict, Config]:
    """Run (or resume, or reuse) the trial's pretraining; returns launch.run's summary and the config it ran."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from vitray.train import launch
    from vitray.checkpoints import read_meta, scan, step_dir

    # Intermediate reports (one per checkpoint) reach Tune only when a scheduler needs them.
    callbacks = [TuneReportCallback()] if asha else None
    base, attempt = cfg.storage.run_name, 0
    while True:
        run_uri = runs.run_uri(cfg.storage.uri, cfg.storage.run_name)
        # Each trial keeps its own accelerator-days log: concurrent trials appending to one object would race.
        cfg = cfg.replace(storage=dict(cost_log=storage.join(run_uri, "accelerator_days.jsonl")))
        if not storage.exists(run_uri, endpoint):
            return launch.run(cfg, callbacks=callbacks), cfg
        complete, _ = scan(run_uri, endpoint)
        if complete:
            saved = read_meta(storage.join(run_uri, step_dir(complete[-1])), endpoint)
            if saved["step"] >= saved["total_steps"]:  # trained to the end in an earlier session
                return _summary_of(run_uri, complete[-1], saved, endpoint), cfg
            logger.info(f"run {cfg.storage.run_name}: resuming from {step_dir(complete[-1])}")
            return launch.run(cfg, resume=True, callbacks=callbacks), cfg
        attempt += 1  # interrupted before its first checkpoint: start again beside it
        cfg = cfg.replace(storage=dict(run_name=f"{base}-r{attempt}"))


def _summary_of(run_uri: str, step: int, saved: dict, endpoint: Endpoint) -> dict:
    """launch.run's summary, rebuilt from a finished run's final checkpoint and accelerator-days row."""
    from vitray.checkpoints import step_dir

    summary = {"run": run_uri, "step": saved["step"], "loss": saved.get("loss"),
               "checkpoint": storage.join(run_uri, step_dir(step))}
    log = storage.join(run_uri, "accelerator_days.jsonl")
    if storage.exists(log, endpoint):
        row = json.loads(storage.read_bytes(log, endpoint).decode().splitlines()[-1])
        summary["cost"] = {k: row[k] for k in ("images_per_s_per_accelerator", "mfu", "accelerator_days")}
        summary["accelerator"] = row["accelerator"]
    metrics = storage.join(run_uri, "metrics.jsonl")
    if storage.exists(metrics, endpoint):
        final = [json.loads(line) for line in storage.read_bytes(metrics, endpoint).decode().splitlines() if line]
        summary["loss"] = next((r["loss"] for r in reversed(final) if r.get("final")), summary["loss"])
    return summary


def transfer_accuracy(study: Study, cfg: Config, checkpoint: str, endpoint: Endpoint) -> float:
    """fewshot: k-shot ridge regression on the frozen pre-logit features (mean over 5 draws of the shots);
    finetune: held-out top-1 after the study's fine-tuning recipe, started from the checkpoint."""
    if study.transfer == "fewshot":
        from vitray.eval.features import FINAL, extract_splits
        from vitray.eval.linear import fewshot

        common = dict(endpoint=endpoint, image_size=cfg.data.image_size, actors=1)
        (tx, ty), (vx, vy) = extract_splits(checkpoint, [study.transfer_train, study.transfer_test], **common)
        mean, _ = fewshot(tx[FINAL], ty, vx[FINAL], vy, shots=(study.shots,), seeds=tuple(range(5)))[study.shots]
        return mean
    from vitray.train import launch

    ft = study.finetune_recipe(cfg.model.name).replace(
        data=dict(train_uri=study.transfer_train, val_uri=study.transfer_test, builtin=""),
        transfer=dict(init_from=checkpoint),
        storage=dict(uri=cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region,
                     run_name=f"{cfg.storage.run_name}-finetune"),
    )
    return float(launch.run(ft)["val_top1"])


def _record(study: Study, budget: float, cfg: Config, summary: dict, accuracy: float, train_s: float,
            transfer_s: float) -> dict:
    from vitray.models.registry import get_spec

    plan = summary.get("plan", {})
    steps = int(summary["step"])
    images = steps * cfg.optim.global_batch
    flops_per_image = plan.get("train_flops_per_image") or train_flops_per_image(cfg)
    return {
        "trial": cfg.storage.run_name, "family": get_spec(cfg.model.name).family, "model": cfg.model.name,
        "params": plan.get("params"), "budget": budget,
        "budget_unit": study.budget_unit, "steps": steps, "images_seen": images,
        "pretrain_exaflops": images * flops_per_image / 1e18,
        "accelerator": summary.get("accelerator") or plan.get("accelerator"),
        "accelerator_days": (summary.get("cost") or {}).get("accelerator_days"),
        "planned_accelerator_days": plan.get("accelerator_days"),
        "wall_clock_s": train_s, "transfer_wall_clock_s": transfer_s,
        "final_loss": summary.get("loss"), "transfer": f"{study.shots}-shot" if study.transfer == "fewshot" else "finetune",
        "transfer_accuracy": accuracy, "status": "finished", "checkpoint": summary["checkpoint"], "run": summary["run"],
        "finished_at": time.time(),
    }
