"""Rehearse a run before paying for it: the configured model, resolution, precision and optimizer for a few steps on
whatever is attached, one checkpoint saved and restored into a fresh engine, measured beside the plan.

    python jobs/pretrain_vit_h14.py --rehearse          # the default ViT-H/14 recipe, 3 steps, on this machine

Driver side (`run`): `adapt` turns the configured run into one that fits what is attached, saying what it changed
and what the configured setting would need; the run trains and saves, then a fresh worker group restores the
checkpoint, as a restart would; `report` prints what was measured beside the plan and `write` keeps it
(`<run>/rehearsal.json` and a row of `<runs>/rehearsals.jsonl`). Worker side: the hooks of `train/phases.py`
(`Rehearsal`) record memory after each phase and what each half measured.
"""
from __future__ import annotations

import json
import time

from vitray import cost, storage
from vitray.config.jobs import TrainingFailed, rehearsal_data
from vitray.config.schema import Config, ConfigError
from vitray.train import launch
from vitray.train.attached import Attached
from vitray.train.phases import Rehearsal, read_measured

def adapt(cfg: Config, steps: int, host: Attached) -> tuple[Config, list[str], cost.Estimate]:
    """The rehearsal's config: the configured model, resolution and optimizer on `host`. Returns it, the changes
    (one line each: field, old → new, why) and its plan; raises ConfigError when nothing fits, with the figures."""
    s, changes = cfg.scaling, []
    if host.gpus:
        workers, micro = min(s.num_workers, host.gpus), [cfg.optim.micro_batch]
        cpus = min(s.cpus_per_worker, max(0.5, (host.cpus - 1) / workers))
    else:
        # Two CPU workers: the fewest that exercise ZeRO's partitioning and collectives. One sample per step, since
        # a CPU step is ~1000× a GPU's; the activations of the configured micro-batch are in the plan.
        workers, micro, cpus = 2, [1], min(s.cpus_per_worker, (host.cpus - 1) / 2)
    while micro[-1] > 1:
        micro.append(micro[-1] // 2)
    on = "GPU" if host.gpus else "CPU"
    base = cfg.replace(
        scaling=dict(num_workers=workers, use_gpu=bool(host.gpus), cpus_per_worker=cpus, autoscale=False),
        optim=dict(total_steps=steps, warmup_steps=min(cfg.optim.warmup_steps, 1)),
        data=dict(val_uri="", **({} if cfg.data.train_uri else {"builtin": rehearsal_data(cfg)})),
        storage=dict(checkpoint_every=0, keep_checkpoints=1, cost_log="none",
                     run_name=cfg.storage.run_name or f"rehearse-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"),
        log_every=1, max_failures=0,
    )
    budget = host.budget(workers, cfg.scaling.accelerator)
    tried = []
    for stage, offload in [(z, False) for z in range(cfg.deepspeed.zero_stage, 4)] + [(3, True)]:
        for m in micro:
            trial = base.replace(deepspeed=dict(zero_stage=stage, offload_optimizer=offload or cfg.deepspeed.offload_optimizer),
                                 optim=dict(micro_batch=m, global_batch=m * workers))
            est = cost.estimate(trial, 1, host=not host.gpus)
            tried.append(f"ZeRO-{stage}{' + optimizer offload' if offload else ''}, micro-batch {m}:"
                         f" {est.memory_total / cost.GIB:.1f} GiB")
            if est.memory_total <= budget:
                break
        else:
            continue
        break
    else:
        raise ConfigError(f"--rehearse: {cfg.model.name} @ {cfg.data.image_size} px fits none of the settings tried on"
                          f" {workers} {on} workers with {budget / cost.GIB:.1f} GiB each ({'; '.join(tried)})")

    def note(field: str, old, new, why: str) -> None:
        if old != new:
            changes.append(f"{field}: {old} → {new} ({why})")

    note("scaling.num_workers", s.num_workers, workers, f"{on} workers attached")
    note("scaling.use_gpu", s.use_gpu, bool(host.gpus), "no GPU attached" if not host.gpus else "GPUs attached")
    note("optim.micro_batch", cfg.optim.micro_batch, trial.optim.micro_batch,
         "one sample per CPU step" if not host.gpus else f"the configured one needs {tried[0].rsplit(': ', 1)[1]}")
    note("deepspeed.zero_stage", cfg.deepspeed.zero_stage, trial.deepspeed.zero_stage,
         "; ".join(t for t in tried if not t.startswith(f"ZeRO-{trial.deepspeed.zero_stage}"))
         + f" per worker, {budget / cost.GIB:.1f} GiB here")
    note("deepspeed.offload_optimizer", cfg.deepspeed.offload_optimizer, trial.deepspeed.offload_optimizer,
         "ZeRO-3 alone does not fit")
    if cfg.deepspeed.precision == "auto" and not host.gpus:
        changes.append("deepspeed.precision: auto → fp32 on CPU (bf16 on the GPUs of the real run)")
    if not cfg.data.train_uri:
        changes.append(f"data: the built-in {base.data.builtin}, cropped and resized to {cfg.data.image_size} px"
                       " (no data configured)")
    return trial, changes, est


def run(cfg: Config, steps: int, embedded=None, timeline: dict | None = None, resume: bool = False) -> dict:
    """The driver's sequence: adapt, train and save (`launch.run` with the "train" half's hooks), restore in fresh
    workers (the "restore" half), report beside the plan and keep the row beside the runs."""
    from vitray.config.recipes import DATASETS
    from vitray.config.checks import validate
    from vitray.data.catalog import read_manifest
    from vitray.data.manifest import DataError
    from vitray.storage import Endpoint

    validate(cfg)
    if resume:
        raise ConfigError("--rehearse: a rehearsal is a fresh run of its own; drop --resume")
    if steps < 1:
        raise ConfigError(f"--rehearse: give a positive number of steps, got {steps}")
    small, changes, planned = adapt(cfg, steps, Attached.here())
    endpoint = Endpoint(url=cfg.storage.endpoint_url or None, region=cfg.storage.region) if cfg.storage.uri else None
    if cfg.data.train_uri:
        try:
            images = read_manifest(cfg.data.train_uri, endpoint, "data.train_uri").num_samples
        except DataError as e:
            raise ConfigError(str(e)) from None
    else:  # the recipe's dataset, known by its label space (JFT-300M's 18,291 classes)
        images = next((d["num_images"] for d in DATASETS.values() if d["num_classes"] == cfg.model.num_classes), None)
    full = cost.estimate(cfg, images, accelerator=cfg.scaling.accelerator or "H100") if images else None
    print("rehearsal: " + ("; ".join(changes) or "the configured settings, unchanged"), flush=True)
    summary = launch.run(small, False, embedded, timeline, hooks=Rehearsal("train"))
    print(f"rehearsal: restoring {summary['checkpoint']} into a fresh worker group, as a restart would", flush=True)
    launch.run(small.replace(storage=dict(run_name=summary["run"].rsplit("/", 1)[1])), True, embedded,
               hooks=Rehearsal("restore"), restore_only=True)
    row = report(cfg, small, changes, planned, summary, full, endpoint)
    write(row, summary["run"], endpoint)
    return {**summary, "rehearsal": row}


def checkpoint_bytes(uri: str, endpoint) -> int:
    fs, path = storage.resolve(uri, endpoint)
    import pyarrow.fs as pafs

    return sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if i.type == pafs.FileType.File)


def report(cfg: Config, rehearsal_cfg: Config, changes: list[str], plan: cost.Estimate, summary: dict,
           full: cost.Estimate | None, endpoint) -> dict:
    """What a user needs before launching the real run, printed and returned (and written by the caller)."""
    from vitray.checkpoints import read_meta

    r, back = read_measured(summary["run"], endpoint, "train"), read_measured(summary["run"], endpoint, "restore")
    saved = read_meta(summary["checkpoint"], endpoint)
    identical = back["step"] == saved["step"] and abs(back["optimizer_digest"] - saved["optimizer_digest"]) <= 1e-9 * max(1.0, abs(saved["optimizer_digest"]))
    if not identical:
        raise TrainingFailed(f"rehearsal: {summary['checkpoint']} restored as step {back['step']} with optimizer digest"
                           f" {back['optimizer_digest']!r}; it was saved at step {saved['step']} with {saved['optimizer_digest']!r}")
    measured = max(r["memory"]["peak"]["saved"], back["memory"]["peak"]["restored"])
    ckpt = checkpoint_bytes(summary["checkpoint"], endpoint) if summary.get("checkpoint") else 0
    row = {
        "model": cfg.model.name, "image_size": cfg.data.image_size, "run": summary["run"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rehearsed": {"workers": rehearsal_cfg.scaling.num_workers, "gpu": rehearsal_cfg.scaling.use_gpu,
                      "zero_stage": rehearsal_cfg.deepspeed.zero_stage, "micro_batch": rehearsal_cfg.optim.micro_batch,
                      "offload_optimizer": rehearsal_cfg.deepspeed.offload_optimizer, "steps": summary["step"]},
        "changes": changes,
        "step_s": r["step_s"], "first_step_s": r["first_step_s"],
        "peak_memory_per_worker_gib": measured / cost.GIB, "planned_gib": plan.memory_total / cost.GIB,
        "plan_error": plan.memory_total / measured - 1,
        "planned": {k: v / cost.GIB for k, v in plan.memory.items()},
        "phases_gib": {k: v / cost.GIB for k, v in r["memory"]["now"].items()},
        "restore_phases_gib": {k: v / cost.GIB for k, v in back["memory"]["now"].items()},
        "train_peak_gib": r["memory"]["peak"]["saved"] / cost.GIB,
        "restore_peak_gib": back["memory"]["peak"]["restored"] / cost.GIB,
        "checkpoint_gb": ckpt / 1e9, "save_s": r["save_s"], "restore_s": back["restore_s"],
        "rebuild_s": back["rebuild_s"], "optimizer_state_identical": identical,
        "full_run": None, "machine": cost.machine(),
    }
    if full is not None:
        row["full_run"] = {"workers": full.world, "accelerator": full.accelerator, "zero_stage": full.zero_stage,
                           "micro_batch": full.micro_batch, "memory_per_device_gib": full.memory_total / cost.GIB,
                           "fits": full.fits, "accelerator_days": full.accelerator_days,
                           "wall_clock_days": full.wall_clock_days, "mfu": full.mfu}
    lines = [f"rehearsal of {cfg.model.name} @ {cfg.data.image_size} px: {row['rehearsed']['steps']} steps on"
             f" {rehearsal_cfg.scaling.num_workers} {'GPU' if rehearsal_cfg.scaling.use_gpu else 'CPU'} workers,"
             f" ZeRO-{rehearsal_cfg.deepspeed.zero_stage}, micro-batch {rehearsal_cfg.optim.micro_batch}"]
    lines += [f"  changed {c}" for c in changes]
    lines += [
        f"  step time {r['step_s']:.1f} s (first step {r['first_step_s']:.1f} s)",
        f"  peak memory per worker {measured / cost.GIB:.2f} GiB measured (training {row['train_peak_gib']:.2f},"
        f" restoring {row['restore_peak_gib']:.2f}), {plan.memory_total / cost.GIB:.2f} GiB planned"
        f" ({row['plan_error']:+.0%}): " + ", ".join(f"{k} {v:.2f}" for k, v in row["planned"].items()),
        "  after each phase (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in row["phases_gib"].items())
        + "; restoring: " + ", ".join(f"{k} {v:.2f}" for k, v in row["restore_phases_gib"].items()),
        f"  checkpoint {ckpt / 1e9:.2f} GB: saved in {r['save_s']:.1f} s; fresh workers built their engine in"
        f" {back['rebuild_s']:.1f} s and restored it in {back['restore_s']:.1f} s, optimizer state identical",
    ]
    if full is not None and full.accelerator_days is not None:
        lines.append(f"  the configured run: {full.world} × {full.accelerator}, ZeRO-{full.zero_stage}, micro-batch"
                     f" {full.micro_batch}: {full.memory_total / cost.GIB:.1f} GiB per device"
                     f"{'' if full.fits else ' — does NOT fit'}; {full.accelerator_days:,.1f} {full.accelerator}-days,"
                     f" {full.wall_clock_days:,.2f} days wall-clock at MFU {full.mfu:.0%}")
    print("\n".join(lines), flush=True)
    return row


def write(row: dict, run_uri: str, endpoint) -> None:
    """`<run>/rehearsal.json` and a row of `<runs>/rehearsals.jsonl` beside the runs. Nothing goes into the source
    tree: `benchmarks/rehearsals.py` is what records rehearsals in benchmarks/results/."""
    from vitray.train.cost_log import append_jsonl

    storage.write_bytes(storage.join(run_uri, "rehearsal.json"), json.dumps(row, indent=1).encode(), endpoint)
    append_jsonl(storage.join(run_uri.rsplit("/", 1)[0], "rehearsals.jsonl"), row, endpoint)
