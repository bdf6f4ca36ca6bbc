"""The per-worker training loop. Ray Train runs one copy on each worker; read it top to bottom.

    build model → DeepSpeed engine → restore the latest checkpoint, if any → stream micro-batches →
    forward / backward / step (DeepSpeed accumulates to the global batch) → log → checkpoint → evaluate.

An elastic run (`scaling.min_workers`) runs this same loop: Ray Train restarts the worker group at another size
from the latest committed checkpoint, and the loop notices that the checkpoint was saved by a different number
of workers (universal checkpoint, data partitions re-dealt: `vitray/data/partitions.py`).
"""
from __future__ import annotations

import json
import logging
import os
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from vitray import accounting, cost, storage
from vitray.config.schema import Config
from vitray.data import partitions
from vitray.data.batching import start_early
from vitray.data.spec import ReadSpec
from vitray.data.stream import TrainStream
from vitray.models.registry import get_spec
from vitray.tasks import make_task
from vitray.train import checkpoint, rehearse
from vitray.train.engine import build_engine, building, precision
from vitray.train.metrics import DATA_BOUND, MetricsLog, data_bound_message, restart_totals
from vitray.train.waits import WaitWatch

# Not print(): Ray Train tees worker prints to both stdout and its logger, so each line would show twice.
logger = logging.getLogger("vitray")


def train_loop_per_worker(config: dict) -> None:
    timeline = {**config.get("timeline", {}), "worker_start": time.time()}  # start-up phases, logged once
    cfg, plan = config["cfg"], config["plan"]  # a Config and a launch.Plan
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")  # before DeepSpeed is imported
    if not on_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    endpoint = plan.endpoint
    phases = rehearse.Phases(device)  # memory after each phase, for --rehearse
    phases.mark("started")

    # Data first: Ray Data starts its read and decode tasks while DeepSpeed builds the engine. A restarted, resumed
    # or resized run continues every data partition from its position in the newest complete checkpoint.
    resume_from = checkpoint.latest_complete(plan.run_uri, endpoint)
    saved = checkpoint.read_commit(resume_from) if resume_from is not None else {}
    resharded = resume_from is not None and saved["world_size"] != world  # through DeepSpeed's universal checkpoint
    if resharded and rank == 0:  # made by the driver for a --resume; here for an elastic restart
        checkpoint.make_universal(storage.join(plan.run_uri, checkpoint.step_dir(saved["step"])), endpoint)
    if resharded:
        dist.barrier()
    d, o = cfg.data, cfg.optim
    positions, rng_state = checkpoint.read_positions(resume_from, d.partitions, same_world=not resharded)
    task = make_task(cfg, list(plan.classes), plan.palette_uri, endpoint)
    train_data = TrainStream(plan.train_uri, endpoint, ReadSpec.from_config(d, cfg.seed, task.decoder()),
                             d.partitions, o.micro_batch, d.shuffle_buffer, manifest=plan.train_manifest)
    accumulation = partitions.micro_steps(o.global_batch, o.micro_batch, d.partitions, world)
    stream = start_early(partitions.step_stream(train_data.epoch, partitions.owned(rank, world, d.partitions),
                                                positions, o.global_batch // d.partitions, accumulation), timeline)
    waiting = WaitWatch(d.wait_warn_s, f"training data (rank {rank})")

    # Model (fresh, or pretrained weights adapted for fine-tuning) and engine, restored from the latest checkpoint
    # if there is one. The optional Polyak average of the weights (paper: 0.9999) is what evaluation uses.
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    # A restart restores everything from its own checkpoint, so the pretrained weights are only fetched once.
    fresh_finetune = cfg.transfer.init_from and resume_from is None
    total_steps = plan.total_steps
    if fresh_finetune:
        model = task.pretrained_model()
    else:
        with building(cfg, world, total_steps, on_gpu):  # ZeRO-3: partitioned layer by layer as it is built
            model = task.build_model()
    phases.mark("built")
    engine = build_engine(model, cfg, world, total_steps, on_gpu, load_universal=resharded, lr_scales=task.lr_scales())
    ema = None
    if cfg.transfer.ema_decay:
        ema = AveragedModel(engine.module, multi_avg_fn=get_ema_multi_avg_fn(cfg.transfer.ema_decay), use_buffers=True)
    timeline["engine_ready"] = time.time()
    timeline["engine_cpu_s"] = time.process_time()  # this worker's CPU seconds so far: imports, model, engine
    phases.mark("engine")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(cfg, on_gpu), torch.float32)
    restoring = time.time()
    restored_step = checkpoint.restore(engine, resume_from, ema, resharded)
    step = restored_step or 0
    if restored_step is not None:
        resumed_digest = checkpoint.optimizer_digest(engine)
        if rank == 0:
            epochs = sorted({pos.epoch for pos in positions.values()})
            logger.info(f"resumed at step {step} on {world} workers (saved by {saved['world_size']}), data epoch"
                        f" {'–'.join(map(str, epochs))} of {d.partitions} partitions")
    if plan.rehearse == "restore":  # --rehearse, second half: fresh workers restore what the first half saved
        phases.mark("restored")
        memory = phases.over_ranks()
        if rank == 0:
            rehearse.write_measured(plan.run_uri, endpoint, "restore", {
                "rebuild_s": restoring - timeline["worker_start"], "restore_s": time.time() - restoring,
                "step": step, "optimizer_digest": resumed_digest, "memory": memory})
        return

    assert engine.gradient_accumulation_steps() == accumulation
    spec = get_spec(cfg.model.name)
    flops = accounting.train_flops_per_image(accounting.forward_flops(
        spec, cfg.data.image_size, cfg.model.num_classes, cfg.model.pre_logits))
    peak, peak_source = accounting.peak_flops(cfg.scaling.accelerator, on_gpu)
    log = MetricsLog(
        plan.run_uri, endpoint, world, total_steps, cfg.optim.global_batch, flops, peak, peak_source, step, rank == 0,
    )
    if restored_step is not None:
        log.lines.append(json.dumps({"step": step, "event": "resumed", "optimizer_digest": resumed_digest,
                                     "positions": _positions(positions), "resharded": resharded,
                                     "model_digest": checkpoint.module_digest(engine.module),
                                     **({"ema_digest": checkpoint.module_digest(ema.module)} if ema else {})}))
        if saved["time"] > timeline["fit_called"]:  # saved by this fit(): Ray Train restarted the workers
            lost = time.time() - saved["time"]  # the steps since that checkpoint, and the restart itself
            log.lines.append(json.dumps({
                "step": step, "event": "restart", "from_workers": saved["world_size"], "to_workers": world,
                "steps_redone": log.rewound - step, "lost_s": lost}))
            log.flush()  # now: the next restart may resume from this same checkpoint, before any save of this group
            if rank == 0:
                logger.warning(f"restarted at step {step} on {world} workers (were {saved['world_size']}):"
                               f" {log.rewound - step} steps to redo, {lost:.0f} s lost since that checkpoint")
    if restored_step is not None and step >= min(total_steps, cfg.stop_at_step or total_steps):
        # Ray Train restarted the workers after the final checkpoint (a node lost, or an elastic resize, at the very
        # end): that checkpoint and its report already hold the run's results.
        if rank == 0:
            logger.info(f"step {step}: the run was already complete when Ray Train restarted its workers")
        return
    run_info = {"world_size": world, "config": cfg.to_dict(), "total_steps": total_steps}
    last_step = min(total_steps, cfg.stop_at_step or total_steps)

    # Train. Dropout draws differ per rank and continue where the checkpoint left them.
    if rng_state is not None:
        torch.set_rng_state(rng_state)
    else:
        torch.manual_seed(cfg.seed * 1_000_003 + rank + 1)
    engine.train()
    # The running loss stays on the device: a .item() per micro-step would stall a GPU every step.
    loss_sum, loss_count, last_loss = torch.zeros((), dtype=torch.float64, device=device), 0, float("nan")
    global_batch = o.global_batch
    wait_mark = waited_before = 0.0  # waiting.waited_s at the last metrics line, at the first step
    audit: list = []  # data.audit_samples: (key, epoch) of every sample this worker trained on since the last step
    last_good = restored_step  # the latest checkpoint, which a non-finite loss must not overwrite
    while step < last_step:
        for _ in range(accumulation):
            with waiting:
                micro = next(stream)
            timeline.setdefault("first_batch", time.time())
            loss, _ = task.loss(engine, task.to_tensors(micro.batch, device, dtype))
            engine.backward(loss * partitions.loss_weight(micro.samples, global_batch, world, accumulation))
            engine.step()  # DeepSpeed updates the weights only at the accumulation boundary
            loss_sum += loss.detach().double() * micro.samples
            loss_count += micro.samples
            if d.audit_samples:
                audit += zip(micro.batch["key"][:micro.samples].tolist(), micro.batch["_epoch"][:micro.samples].tolist())
        positions = micro.positions
        step += 1
        if d.audit_samples:  # a rewound step's line is dropped with the rest of its attempt's log (`MetricsLog`)
            everyone: list = [None] * world
            dist.all_gather_object(everyone, audit)
            log.lines.append(json.dumps({"step": step, "event": "samples", "samples": sorted(sum(everyone, []))}))
            audit = []
        if ema is not None:
            ema.update_parameters(engine.module)
        if "first_step" not in timeline:
            timeline["first_step"] = time.time()
            waited_before = waiting.waited_s  # the run's data wait counts from here: the first pull also waited for
            # the pipeline to start, which timeline["data_ready"] records
            phases.mark("first step")
            log.lines.append(json.dumps({"step": step, "event": "startup", **timeline}))
        # Checked at every log and before every save (one host sync each, not one per step): a diverged run stops
        # with the step named, and no checkpoint ever holds non-finite weights.
        saving = bool(cfg.storage.checkpoint_every) and step % cfg.storage.checkpoint_every == 0
        if step % cfg.log_every == 0 or step == last_step or saving:
            _check_finite(loss_sum, step, last_good, device)
        if step % cfg.log_every == 0 or step == last_step:
            last_loss = _sample_mean(loss_sum, loss_count, device)
            waited, wait_mark = _mean_and_max(waiting.waited_s - wait_mark, device), waiting.waited_s
            log.record(step, last_loss, engine.get_lr()[0], data_wait_s=waited,
                       epoch=min(pos.epoch for pos in positions.values()),
                       **({"skipped_samples": _sum_over_ranks(train_data.skipped, device)} if d.bad_samples == "skip" else {}))
            loss_sum.zero_()
            loss_count = 0
        if saving and step < last_step:
            log.flush()  # first: a committed checkpoint always has its metrics history in storage
            saving_at = time.time()
            checkpoint.save(engine, step, positions, {"loss": last_loss}, run_info, plan.run_uri, endpoint, ema)
            log.lines.append(json.dumps({"step": step, "event": "checkpoint", "save_s": time.time() - saving_at}))
            last_good = step

    timeline["last_step"] = time.time()
    phases.mark("trained")
    trained_s = timeline["last_step"] - timeline.get("first_step", timeline["last_step"])
    data_wait = {}
    if trained_s > 0:  # each worker's share of the steps after the first spent waiting for data: mean, slowest
        mean, most = _mean_and_max(waiting.waited_s - waited_before, device)
        data_wait = {"data_wait": mean / trained_s, "data_wait_max": most / trained_s}
        if data_wait["data_wait"] >= DATA_BOUND and rank == 0:
            logger.warning(data_bound_message(data_wait["data_wait"], data_wait["data_wait_max"]))

    # Evaluate on held-out shards, then save the final checkpoint with the results (and the run's cost).
    results = {"step": step, "loss": last_loss, **log.totals(step), "memory_per_device": _peak_memory(device),
               "model_state_bytes": _max_over_ranks(cost.measured_state_bytes(engine), device),
               "data_position": _positions(_gather_positions(positions)),
               "worker_nodes": _distinct_nodes(), **restart_totals(log.lines), **data_wait}
    if d.bad_samples == "skip":
        results["skipped_samples"] = _sum_over_ranks(train_data.skipped, device)
    if plan.val_uri and step == total_steps and not plan.rehearse:  # a rehearsal has no held-out set
        if ema is not None:  # both: the averaged weights (reported as val_*) and the raw ones (val_*_raw)
            raw = evaluate(engine, task, ray.train.get_dataset_shard("val"), device, dtype, cfg)
            results.update({f"{k}_raw": v for k, v in raw.items()})
        results.update(evaluate(ema.module if ema else engine, task, ray.train.get_dataset_shard("val"), device, dtype,
                                cfg, export=(plan.run_uri, endpoint)))
        if rank == 0:
            logger.info(f"held-out {task.metric.removeprefix('val_')}: {results[task.metric]:.4f}")
    log.final(step, results)
    log.flush()
    saving = time.time()
    checkpoint.save(engine, step, positions, results, run_info, plan.run_uri, endpoint, ema)
    if plan.rehearse:  # --rehearse, first half: what training and the save took
        phases.mark("saved")
        first, saved = timeline["first_step"] - timeline["engine_ready"], time.time() - saving
        steps = step - (restored_step or 0)
        memory = phases.over_ranks()
        if rank == 0:
            rehearse.write_measured(plan.run_uri, endpoint, "train", {
                "save_s": saved, "first_step_s": first, "memory": memory,
                "step_s": (timeline["last_step"] - timeline["first_step"]) / (steps - 1) if steps > 1 else first})


@torch.no_grad()
def evaluate(model, task, split, device, dtype, cfg: Config, export: tuple | None = None) -> dict[str, float]:
    """The task's held-out metrics (top-1, or COCO AP) of `model` (the engine, or the averaged weights) over a
    split that may give ranks unequal shares: ranks that run out keep stepping with an empty batch until all are
    done, because with ZeRO-3 every forward pass is a collective."""
    model.eval()
    state = task.eval_start()
    batches = iter(split.iter_batches(batch_size=cfg.optim.micro_batch, batch_format="numpy"))
    while True:
        batch = next(batches, None)
        more = torch.tensor([0.0 if batch is None else 1.0], device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if more.item() == 0:
            break
        if batch is None:  # keep in step with the other ranks; counts nothing
            task.eval_batch(model, task.to_tensors(task.empty_batch(), device, dtype), None)
            continue
        task.eval_batch(model, task.to_tensors(batch, device, dtype), state)
    model.train()
    return task.eval_end(state, device, export)


class NonFiniteLoss(RuntimeError):
    pass


def _check_finite(loss_sum: torch.Tensor, step: int, last_good: int | None, device: torch.device) -> None:
    """Stop every rank together when any rank's running loss is NaN or infinite."""
    bad = torch.tensor([0.0 if torch.isfinite(loss_sum).item() else 1.0], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        kept = f"the latest checkpoint (step {last_good}) is kept as it was" if last_good else "no checkpoint was written"
        raise NonFiniteLoss(f"non-finite training loss by step {step}; stopping without saving: {kept}. Lower "
                            "optim.lr, raise optim.warmup_steps or check the data")


def _peak_memory(device: torch.device) -> float:
    """Peak bytes per device, the largest over ranks: allocated GPU memory, or on CPU the worker's peak RSS."""
    if device.type == "cuda":
        peak = float(torch.cuda.max_memory_allocated(device))
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB
    t = torch.tensor([peak], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _max_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def _positions(positions: dict) -> dict[str, list[int]]:
    """Partition → [epoch, consumed], as logged and compared."""
    return {str(p): [pos.epoch, pos.consumed] for p, pos in sorted(positions.items())}


def _gather_positions(mine: dict) -> dict:
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {p: pos for part in everyone for p, pos in part.items()}


def _distinct_nodes() -> int:
    """How many Ray nodes the workers ran on (the placement strategy's effect)."""
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return len(set(nodes))


def _sum_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def _mean_and_max(value: float, device: torch.device) -> tuple[float, float]:
    """(mean, max) of a number over the workers."""
    t = torch.tensor([float(value), float(value)], dtype=torch.float64, device=device)
    total, most = t[:1].clone(), t[1:].clone()
    dist.all_reduce(total)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return total.item() / dist.get_world_size(), most.item()


def _sample_mean(loss_sum: torch.Tensor, samples: int, device: torch.device) -> float:
    """The mean loss over every sample of every worker since the last log (workers may hold unequal shares)."""
    t = torch.stack([loss_sum.detach().double(), torch.tensor(float(samples), dtype=torch.float64)]).to(device)
    dist.all_reduce(t)
    return (t[0] / t[1]).item()
