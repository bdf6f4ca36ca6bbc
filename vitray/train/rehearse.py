"""Rehearse a run before paying for it: the configured model, resolution, precision and optimizer for a few steps on
whatever is attached, and the three things a real run pays besides its steps — a save, a restart and a resize —
each timed and its memory measured, beside the plan and the goodput they imply.

    python jobs/pretrain_vit_h14.py --rehearse          # the default ViT-H/14 recipe, 3 steps, on this machine

Driver side (`run`): `adapt` turns the configured run into one that fits what is attached, saying what it changed
and what the configured setting would need. Then three phases, each a worker group of its own: "train" trains and
saves; "restart" starts a new group on as many workers, restores that checkpoint and takes one step, as Ray Train's
restart after a failure does; "resize" does the same on one worker fewer through the elastic path (rank 0 converts
the checkpoint to DeepSpeed's universal form first). `report` prints what was measured beside the plan and the
goodput of the configured run with these figures (`vitray/goodput.py`); `write` keeps it (`<run>/rehearsal.json`
and a row of `<runs>/rehearsals.jsonl`). Worker side: the hooks of `train/phases.py` (`Rehearsal`).
"""
from __future__ import annotations

import json
import time

from vitray import cost, goodput, storage
from vitray.config.jobs import TrainingFailed, rehearsal_data
from vitray.config.schema import Config, ConfigError
from vitray.train import launch, universal
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
        # The save the "train" phase makes at `steps` (`run`), here too: an asynchronous one holds a host copy.
        storage=dict(checkpoint_every=steps, keep_checkpoints=1, cost_log="none",
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
        held = est.memory.get("snapshot", 0.0)
        hint = (f"; each includes the {held / cost.GIB:.1f} GiB host copy an asynchronous save holds: try --set"
                " storage.async_save=false" if held else "")
        raise ConfigError(f"--rehearse: {cfg.model.name} @ {cfg.data.image_size} px fits none of the settings tried on"
                          f" {workers} {on} workers with {budget / cost.GIB:.1f} GiB each ({'; '.join(tried)}){hint}")

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
    """The driver's sequence: adapt; train and save (the "train" phase); a new worker group on as many workers
    restores it and takes one step ("restart"); then on one worker fewer through the elastic path ("resize");
    report beside the plan and keep the row beside the runs."""
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
    host = Attached.here()
    small, changes, planned = adapt(cfg, steps, host)
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
    # One step beyond the saved one: the restart and the resize each take it from the same checkpoint. The train
    # phase's workers fail on purpose after the save; Ray Train's one allowed restart is the restart phase.
    trained = small.replace(optim=dict(total_steps=steps + 1), storage=dict(checkpoint_every=steps), max_failures=1)
    print(f"rehearsal: after step {steps} is saved the workers fail on purpose; Ray Train restarts them from it",
          flush=True)
    summary = launch.run(trained, False, embedded, timeline, hooks=Rehearsal("train"))
    again = trained.replace(storage=dict(run_name=summary["run"].rsplit("/", 1)[1]), max_failures=0)
    skipped, converted = resize_refused(again, host), None
    if skipped is None:
        # What an elastic run's driver does beside training after each save (`train/universal.py`), timed here
        # alone: the resize then finds the universal form made, as it does when it comes later than this.
        _, converted = universal.convert_newest(summary["run"], endpoint)
        print(f"rehearsal: universal form made in {converted:.1f} s; resizing to {small.scaling.num_workers - 1}"
              " worker(s), as an elastic restart does", flush=True)
        launch.run(again.replace(scaling=dict(num_workers=small.scaling.num_workers - 1)), True, embedded,
                   hooks=Rehearsal("resize"), elastic=True)
    row = report(cfg, small, changes, planned, summary, full, endpoint, skipped, converted)
    write(row, summary["run"], endpoint)
    return {**summary, "rehearsal": row}


def resize_refused(cfg: Config, host: Attached) -> str | None:
    """Why the resize phase cannot run here (None: it can): one worker fewer must exist, fit, and be able to load
    the checkpoint (DeepSpeed's universal form carries Adam's moments only)."""
    workers = cfg.scaling.num_workers - 1
    if workers < 1:
        return "one worker attached: nothing to resize to"
    if cfg.optim.optimizer != "adam":
        return f"optim.optimizer={cfg.optim.optimizer}: DeepSpeed's universal checkpoint carries Adam's moments only"
    one = cost.estimate(cfg.replace(scaling=dict(num_workers=workers)), 1, host=not host.gpus)
    budget = host.budget(workers, cfg.scaling.accelerator)
    if one.memory_total > budget:
        return (f"{workers} worker(s) would need {one.memory_total / cost.GIB:.1f} GiB each, {budget / cost.GIB:.1f}"
                " GiB here")
    return None


def checkpoint_bytes(uri: str, endpoint) -> int:
    fs, path = storage.resolve(uri, endpoint)
    import pyarrow.fs as pafs

    return sum(i.size or 0 for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if i.type == pafs.FileType.File)


def report(cfg: Config, rehearsal_cfg: Config, changes: list[str], plan: cost.Estimate, summary: dict,
           full: cost.Estimate | None, endpoint, resize_skipped: str | None = None,
           converted_s: float | None = None) -> dict:
    """What a user needs before launching the real run, printed and returned (and written by the caller)."""
    from vitray.checkpoints import read_meta

    r = read_measured(summary["run"], endpoint, "train")
    saved = read_meta(summary["checkpoint"], endpoint)
    back = _restarted(read_measured(summary["run"], endpoint, "restart"), saved, summary["checkpoint"], strict=True)
    resize = None if resize_skipped else _restarted(read_measured(summary["run"], endpoint, "resize"), saved,
                                                    summary["checkpoint"], strict=False)
    measured = max(r["memory"]["peak"]["saved"], back["memory"]["peak"]["first step"])
    ckpt = checkpoint_bytes(summary["checkpoint"], endpoint) if summary.get("checkpoint") else 0
    gib = cost.GIB
    row = {
        "model": cfg.model.name, "image_size": cfg.data.image_size, "run": summary["run"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rehearsed": {"workers": rehearsal_cfg.scaling.num_workers, "gpu": rehearsal_cfg.scaling.use_gpu,
                      "zero_stage": rehearsal_cfg.deepspeed.zero_stage, "micro_batch": rehearsal_cfg.optim.micro_batch,
                      "offload_optimizer": rehearsal_cfg.deepspeed.offload_optimizer, "steps": summary["step"]},
        "changes": changes,
        "step_s": r["step_s"], "first_step_s": r["first_step_s"],
        "peak_memory_per_worker_gib": measured / gib, "planned_gib": plan.memory_total / gib,
        "plan_error": plan.memory_total / measured - 1,
        "planned": {k: v / gib for k, v in plan.memory.items()},
        "phases_gib": {k: v / gib for k, v in r["memory"]["now"].items()},
        "restore_phases_gib": {k: v / gib for k, v in back["memory"]["now"].items()},
        "train_peak_gib": r["memory"]["peak"]["saved"] / gib,
        "restore_peak_gib": back["memory"]["peak"]["restored"] / gib,
        "checkpoint_gb": ckpt / 1e9, "save_stall_s": r["save_stall_s"], "save_s": r["save_s"],
        # the restart's parts under the names rows had before the restart phase (benchmarks/rehearsals.py reads them)
        "restore_s": back["restore_s"], "rebuild_s": back["group_start_s"] + back["engine_s"],
        "optimizer_state_identical": back["identical"],
        "restart": _phase_row(back),
        "resize": {**_phase_row(resize), "universal_background_s": converted_s} if resize else {"skipped": resize_skipped},
        "full_run": None, "machine": cost.machine(),
    }
    if full is not None:
        row["full_run"] = {"workers": full.world, "accelerator": full.accelerator, "zero_stage": full.zero_stage,
                           "micro_batch": full.micro_batch, "memory_per_device_gib": full.memory_total / gib,
                           "fits": full.fits, "accelerator_days": full.accelerator_days,
                           "wall_clock_days": full.wall_clock_days, "mfu": full.mfu}
        figures = goodput.measured(row, summary["run"])
        g = goodput.for_run(full.checkpoint_bytes, full.nodes, figures, elastic=bool(cfg.scaling.min_workers))
        run_s = full.wall_clock_days * 86400 if full.wall_clock_days else None
        step_s = run_s / full.steps if run_s and full.steps else None
        row["goodput"] = g.to_dict(step_s, cfg.storage.checkpoint_every, run_s)
        row["goodput_lines"] = g.lines(step_s, cfg.storage.checkpoint_every, run_s)
    print("\n".join(_lines(cfg, rehearsal_cfg, row, plan, full, r)), flush=True)
    row.pop("goodput_lines", None)
    return row


def _restarted(m: dict, saved: dict, where: str, strict: bool) -> dict:
    """A restart or resize phase's record, with whether it restored the saved optimizer state; a restart on the
    same workers that did not is an error (a resize's is reported: resharding is what it checks)."""
    same = m["step"] == saved["step"] and abs(m["optimizer_digest"] - saved["optimizer_digest"]) <= 1e-6 * max(
        1.0, abs(saved["optimizer_digest"]))
    if strict and not same:
        raise TrainingFailed(f"rehearsal: {where} restored as step {m['step']} with optimizer digest"
                             f" {m['optimizer_digest']!r}; it was saved at step {saved['step']} with"
                             f" {saved['optimizer_digest']!r}")
    return {**m, "identical": same}


def _phase_row(m: dict) -> dict:
    gib = cost.GIB
    keep = ("group_start_s", "universal_s", "engine_s", "restore_s", "first_step_s", "to_first_step_s", "resharded")
    return {**{k: m[k] for k in keep}, "optimizer_state_identical": m["identical"],
            "phases_gib": {k: v / gib for k, v in m["memory"]["now"].items()},
            "peak_gib": max(m["memory"]["peak"].values()) / gib}


def _parts(p: dict) -> str:
    universal = f"waiting for the universal form {p['universal_s']:.1f} s, " if p["resharded"] else ""
    return (f"{p['to_first_step_s']:.1f} s to the first step (worker group {p['group_start_s']:.1f} s, {universal}engine"
            f" {p['engine_s']:.1f} s, restore {p['restore_s']:.1f} s, first step {p['first_step_s']:.1f} s), peak"
            f" {p['peak_gib']:.2f} GiB per worker"
            + ("" if p["optimizer_state_identical"] else ", optimizer state NOT identical"))


def _lines(cfg, rehearsal_cfg, row: dict, plan, full, r: dict) -> list[str]:
    gib, workers = cost.GIB, rehearsal_cfg.scaling.num_workers
    lines = [f"rehearsal of {cfg.model.name} @ {cfg.data.image_size} px: {row['rehearsed']['steps']} steps on"
             f" {workers} {'GPU' if rehearsal_cfg.scaling.use_gpu else 'CPU'} workers,"
             f" ZeRO-{rehearsal_cfg.deepspeed.zero_stage}, micro-batch {rehearsal_cfg.optim.micro_batch}"]
    lines += [f"  changed {c}" for c in row["changes"]]
    lines += [
        f"  step time {r['step_s']:.1f} s (first step {r['first_step_s']:.1f} s)",
        f"  peak memory per worker {row['peak_memory_per_worker_gib']:.2f} GiB measured (training"
        f" {row['train_peak_gib']:.2f}, restoring {row['restore_peak_gib']:.2f}), {row['planned_gib']:.2f} GiB planned"
        f" ({row['plan_error']:+.0%}): " + ", ".join(f"{k} {v:.2f}" for k, v in row["planned"].items()),
        "  after each phase (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in row["phases_gib"].items())
        + "; restarted: " + ", ".join(f"{k} {v:.2f}" for k, v in row["restore_phases_gib"].items()),
        f"  checkpoint {row['checkpoint_gb']:.2f} GB: training stalled {row['save_stall_s']:.1f} s by the save, saved"
        f" in {row['save_s']:.1f} s",
        f"  restart on {workers} workers: {_parts(row['restart'])}"
        + (", optimizer state identical" if row["optimizer_state_identical"] else ""),
        f"  resize to {workers - 1}: " + (f"skipped: {row['resize']['skipped']}" if "skipped" in row["resize"] else
                                          _parts(row["resize"]) + f"; its universal form was made in"
                                          f" {row['resize']['universal_background_s']:.1f} s beside training, after the"
                                          " save (a resize sooner than that waits for the rest)"),
    ]
    if full is not None and full.accelerator_days is not None:
        lines.append(f"  the configured run: {full.world} × {full.accelerator}, ZeRO-{full.zero_stage}, micro-batch"
                     f" {full.micro_batch}: {full.memory_total / gib:.1f} GiB per device"
                     f"{'' if full.fits else ' — does NOT fit'}; {full.accelerator_days:,.1f} {full.accelerator}-days,"
                     f" {full.wall_clock_days:,.2f} days wall-clock at MFU {full.mfu:.0%}")
    if "goodput_lines" in row:
        lines += [f"  {k + ':' if k else ' ' * 9} {v}" for k, v in row["goodput_lines"]]
    return lines


def write(row: dict, run_uri: str, endpoint) -> None:
    """`<run>/rehearsal.json` and a row of `<runs>/rehearsals.jsonl` beside the runs. Nothing goes into the source
    tree: `benchmarks/rehearsals.py` is what records rehearsals in benchmarks/results/."""
    from vitray.train.cost_log import append_jsonl

    storage.write_bytes(storage.join(run_uri, "rehearsal.json"), json.dumps(row, indent=1).encode(), endpoint)
    append_jsonl(storage.join(run_uri.rsplit("/", 1)[0], "rehearsals.jsonl"), row, endpoint)
