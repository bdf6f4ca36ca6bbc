"""The per-worker training loop. Ray Train runs one copy on each worker; read it top to bottom.

    data stream → model → DeepSpeed engine → restore the latest checkpoint, if any →
    forward / backward / step (DeepSpeed accumulates to the global batch) → log → checkpoint → evaluate → report.

Each concern lives in its own module: where a worker starts (`resume.py`), saving (`saves.py`, `checkpoint.py`), the run's log
(`metrics.py`), held-out evaluation (`evaluating.py`), numbers every rank contributes to (`collectives.py`), and
what a rehearsal measures (`phases.py`, through the hooks the driver passes in).

An elastic run (`scaling.min_workers`) runs this same loop: Ray Train restarts the worker group at another size
from the latest committed checkpoint, and `resume.find` notices that the checkpoint was saved by a different number
of workers (universal checkpoint, data partitions re-dealt: `vitray/data/partitions.py`).
"""
from __future__ import annotations

import logging
import os
import time

import ray.train
import ray.train.torch
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vitray import accounting, cost, faults
from vitray.data import partitions
from vitray.data.batching import start_early
from vitray.data.spec import ReadSpec
from vitray.data.stream import TrainStream
from vitray.models.registry import get_spec
from vitray.tasks import make_task
from vitray.train import collectives, resume
from vitray.train.engine import build_engine, building, precision, return_freed_layers
from vitray.train.evaluating import held_out
from vitray.train.failures import check_finite, group_closed
from vitray.train.metrics import (DATA_BOUND, DataWait, LossMeter, MetricsLog, SampleAudit, data_bound_message,
                                  positions_json, restart_totals)
from vitray.train.phases import RunHooks
from vitray.train.saves import Checkpointer
from vitray.train.waits import WaitWatch

# Not print(): Ray Train tees worker prints to both stdout and its logger, so each line would show twice.
logger = logging.getLogger("vitray")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker: `_train`, except that a worker group Ray Train stops on purpose (a
    resize) ends with one line, not the traceback of the collective its teardown broke (`failures.group_closed`)."""
    try:
        _train(config)
    except Exception as error:
        if not group_closed():
            raise
        logger.warning("rank %d: stopped: Ray Train closed this worker group (%s); the run goes on in the next one",
                       ray.train.get_context().get_world_rank(), type(error).__name__)


def _train(config: dict) -> None:
    plan, hooks = config["plan"], config.get("hooks") or RunHooks()  # a train.plan.Plan, a phases.RunHooks
    timeline = {**config.get("timeline", {}), "worker_start": time.time()}  # start-up phases, logged once
    cfg, d, o = plan.cfg, plan.cfg.data, plan.cfg.optim
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device, dtype = _device(cfg)
    hooks.start(device)  # a rehearsal marks "started" here

    # Data first: Ray Data starts its read and decode tasks while DeepSpeed builds the engine. A restarted, resumed
    # or resized run continues every data partition from its position in the newest complete checkpoint.
    start = resume.find(plan, rank, world, timeline["fit_called"])
    task = make_task(cfg, list(plan.classes), plan.run_uri, plan.endpoint)
    train_data = TrainStream(d.train_uri, plan.endpoint, ReadSpec.from_config(d, cfg.seed, task.decoder()),
                             d.partitions, o.micro_batch, d.shuffle_buffer, manifest=plan.train_manifest)
    accumulation = partitions.micro_steps(o.global_batch, o.micro_batch, d.partitions, world)
    stream = start_early(partitions.step_stream(train_data.epoch, partitions.owned(rank, world, d.partitions),
                                                start.positions, o.global_batch // d.partitions, accumulation), timeline)
    waiting = WaitWatch(d.wait_warn_s, f"training data (rank {rank})")

    engine, ema = _build(cfg, plan, task, start, world, device, hooks, timeline)
    restoring = time.time()
    step = resume.restore(start, engine, ema, rank, world)
    timeline["restored"] = time.time()
    if hooks.restored(plan, start, timeline, restoring):
        return
    log = _metrics_log(cfg, plan, world, device, step, rank)
    if start.found:
        resume.record(start, log, engine, ema, timeline["fit_called"], rank, world, plan.last_step)
        if step >= plan.last_step:  # Ray Train restarted the workers after the final checkpoint: it holds the results
            return

    # Train. Dropout draws differ per rank and continue where the checkpoint left them.
    resume.seed(start, cfg.seed, rank)
    engine.train()
    saves, loss, waits = Checkpointer(engine, ema, plan, world, start.step, log), LossMeter(device), DataWait(waiting, device)
    audit, positions = SampleAudit(d.audit_samples), start.positions
    with log.kept_on_error():  # a restart's steps_redone counts this group's steps past its checkpoint
        while step < plan.last_step:
            faults.hold_point()  # the elastic test only (unset otherwise)
            for _ in range(accumulation):
                with waiting:
                    micro = next(stream)
                timeline.setdefault("first_batch", time.time())
                micro_loss, _ = task.loss(engine, task.to_tensors(micro.batch, device, dtype))
                engine.backward(micro_loss * partitions.loss_weight(micro.samples, o.global_batch, world, accumulation))
                engine.step()  # DeepSpeed updates the weights only at the accumulation boundary
                loss.add(micro_loss, micro.samples)
                audit.add(micro)
            positions, step = micro.positions, step + 1
            audit.flush(step, log)
            if ema is not None:
                ema.update_parameters(engine.module)
            if "first_step" not in timeline and _first_step(step, timeline, waits, hooks, log, plan, start):
                return  # a rehearsal's restart or resize ends at its first step
            saves.poll()  # an asynchronous save in flight is committed once every rank's upload is done
            # Checked at every log and before every save (one host sync each, not one per step): a diverged run stops
            # with the step named, and no checkpoint ever holds non-finite weights.
            if log.due(step) or saves.due(step):
                check_finite(loss.sum, step, saves, device)
            if log.due(step):
                skipped = {"skipped_samples": collectives.sum_over_ranks(train_data.skipped, device)} if d.bad_samples == "skip" else {}
                log.record(step, loss.mean(), engine.get_lr()[0], data_wait_s=waits.window(),
                           epoch=min(pos.epoch for pos in positions.values()), **skipped)
            if saves.due(step) and step < plan.last_step:
                log.flush()  # first: a committed checkpoint always has its metrics history in storage
                saving = time.time()
                log.event(step, "checkpoint", **saves.save(step, positions, {"loss": loss.last}))
                hooks.saved(plan, step, start, timeline, saving, stalled=time.time() - saving, settle=saves.settle)

    # Evaluate on held-out shards, then save the final checkpoint with the results (and the run's cost). A periodic
    # save still uploading is committed first: held-out evaluation can take minutes, and the save is good now.
    timeline["last_step"] = time.time()
    hooks.phase("trained")
    saves.settle()
    results = _results(step, loss.last, log, engine, positions, waits, train_data, timeline, device, cfg, rank)
    if cfg.data.val_uri and step == plan.total_steps and hooks.evaluates:
        results.update(held_out(engine, ema, task, device, dtype, cfg, export=(plan.run_uri, plan.endpoint)))
    log.final(step, results)
    log.flush()
    saves.save(step, positions, results, final=True)


def _device(cfg) -> tuple[torch.device, torch.dtype]:
    """This worker's device (DeepSpeed told which accelerator, CPU threads and allocator set) and the dtype its
    inputs take."""
    device = ray.train.torch.get_device()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")  # before DeepSpeed's import
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    return_freed_layers(cfg, device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(cfg, device.type == "cuda"), torch.float32)
    return device, dtype


def _build(cfg, plan, task, start, world, device, hooks, timeline):
    """The model (fresh, or pretrained weights adapted for fine-tuning) in a DeepSpeed engine, and the optional
    Polyak average of its weights (paper: 0.9999), which is what evaluation uses."""
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    if cfg.transfer.init_from and not start.found:  # a restart restores everything: the weights are fetched once
        model = task.pretrained_model()
    else:
        with building(cfg, world, plan.total_steps, on_gpu):  # ZeRO-3: partitioned layer by layer as it is built
            model = task.build_model()
    hooks.phase("built")
    engine = build_engine(model, cfg, world, plan.total_steps, on_gpu, load_universal=start.resharded,
                          lr_scales=task.lr_scales())
    ema = None
    if cfg.transfer.ema_decay:
        ema = AveragedModel(engine.module, multi_avg_fn=get_ema_multi_avg_fn(cfg.transfer.ema_decay), use_buffers=True)
    timeline["engine_ready"] = time.time()
    timeline["engine_cpu_s"] = time.process_time()  # this worker's CPU seconds so far: imports, model, engine
    hooks.phase("engine")
    assert engine.gradient_accumulation_steps() == partitions.micro_steps(
        cfg.optim.global_batch, cfg.optim.micro_batch, cfg.data.partitions, world)
    return engine, ema


def _metrics_log(cfg, plan, world: int, device, step: int, rank: int) -> MetricsLog:
    flops = accounting.train_flops_per_image(accounting.forward_flops(
        get_spec(cfg.model.name), cfg.data.image_size, cfg.model.num_classes, cfg.model.pre_logits))
    peak, peak_source = accounting.peak_flops(cfg.scaling.accelerator, device.type == "cuda")
    return MetricsLog(plan.run_uri, plan.endpoint, world, plan.total_steps, cfg.optim.global_batch, flops, peak,
                      peak_source, step, rank == 0, log_every=cfg.log_every, last_step=plan.last_step)


def _first_step(step: int, timeline: dict, waits: DataWait, hooks, log: MetricsLog, plan, start) -> bool:
    """The start-up timeline, once: the run's data wait counts from here (the first pull also waited for the
    pipeline to start, which timeline["data_ready"] records). Whether the hooks end the run here."""
    timeline["first_step"] = time.time()
    waits.first_step()
    hooks.phase("first step")
    log.event(step, "startup", **timeline)
    return hooks.stepped(plan, start, timeline)


def _results(step, last_loss, log, engine, positions, waits, train_data, timeline, device, cfg, rank) -> dict:
    """What the run reports with its final checkpoint: loss, throughput and cost, memory, data positions and wait,
    restarts. Collective."""
    data_wait = waits.run_share(timeline["last_step"] - timeline.get("first_step", timeline["last_step"]))
    if data_wait.get("data_wait", 0) >= DATA_BOUND and rank == 0:
        logger.warning(data_bound_message(data_wait["data_wait"], data_wait["data_wait_max"]))
    results = {"step": step, "loss": last_loss, **log.totals(step), "memory_per_device": collectives.peak_memory(device),
               "model_state_bytes": collectives.max_over_ranks(cost.measured_state_bytes(engine), device),
               "data_position": positions_json(collectives.gather_positions(positions)),
               "worker_nodes": collectives.distinct_nodes(), **restart_totals(log.lines), **data_wait}
    if cfg.data.bad_samples == "skip":
        results["skipped_samples"] = collectives.sum_over_ranks(train_data.skipped, device)
    return results
