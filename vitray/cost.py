"""What a configuration costs, before it runs (the planner) and as the paper reported it (Tables 2 and 6).

Memory per device = model states (ZeRO's formulas, Rajbhandari et al. 2020, Ψ parameters over N ranks) +
activations (measured: one forward pass on PyTorch's meta device, summing the tensors autograd keeps for
backward — exact for eager PyTorch, no arithmetic to keep in sync with the model code).

Compute = analytic FLOPs (`vitray.accounting`) × images × epochs; accelerator-days = compute ÷ (peak × MFU).
"""
from __future__ import annotations

import dataclasses
import math

from vitray import accounting
from vitray.goodput import CHECKPOINT_WRITE_GB_S, NODE_MTBF_HOURS  # noqa: F401  (the planner's stated rates)
from vitray.config.schema import Config, ConfigError

GIB = 2**30

GPUS_PER_NODE = 8

# DeepSpeed's buffers, as vitray sizes them (`vitray.train.engine` passes these). DeepSpeed's own defaults (5e8
# elements per bucket, 1e9 live parameters) are 2–4 GB each in fp32: more than ViT-B's whole model state.
BUCKET = 2**22  # elements per gradient-reduction / all-gather / ZeRO-3 prefetch bucket (16 MB fp32, ~DDP's 25 MB)
SUB_GROUP = 2**25  # ZeRO-3: optimizer-partition elements stepped at once (bounds Adam's temporaries)
LIVE_PARAMETERS = 2**25  # ZeRO-3: gathered parameters kept whole at once (ViT-H/14: 2**24.2 per block)
# A CPU worker's resident memory before its model is built: Python, torch, DeepSpeed, Ray and pyarrow (measured
# by the rehearsals, "started" phase). On a GPU the process is host memory and not counted.
CPU_PROCESS_BYTES = 0.4 * GIB

# Device memory per accelerator (GiB; vendor datasheets, the largest common SKU).
ACCELERATOR_MEMORY_GIB = {
    "TPUv3-core": 16, "V100": 32, "A10G": 24, "L4": 24, "A100": 80, "H100": 80, "H200": 141, "B200": 192,
}

# Host CPUs per accelerator on the instance that carries eight of them (AWS: p5.48xlarge and p6-b200.48xlarge 192
# vCPUs, p4d.24xlarge 96, p3.16xlarge 64, g6e.48xlarge 192; a TPU v3-8 host 96). Modelled: --node-cpus overrides.
HOST_CPUS_PER_ACCELERATOR = {
    "TPUv3-core": 12, "V100": 8, "A10G": 24, "L4": 24, "A100": 12, "H100": 24, "H200": 24, "B200": 24,
}
DATA_NODE_CPUS = 64  # cluster/aws-gpu.yaml's CPU-only data node (c7i.16xlarge)
# Decode + crop + flip per CPU when the planner has no data to measure on: the in-process rate on ImageNet-sized
# photos (benchmarks/results/ingest.json's set, 2-core EPYC), as `vitray/data/decode_rate.py` measures it.
REFERENCE_DECODE_PER_CPU = 1130.0



def model_state_bytes(params: int, world: int, zero_stage: int, mixed_precision: bool) -> dict[str, float]:
    """Bytes per device of parameters, gradients and Adam states. Mixed precision: 2 + 2 + 12 (fp32 master, m, v)
    bytes per parameter — ZeRO's 16Ψ. fp32: 4 + 4, and 8 (m, v) without ZeRO or 12 with it, because DeepSpeed's
    ZeRO optimizers keep their own fp32 copy of the partition even when the model is fp32. Stage 1 partitions the
    optimizer states, 2 also the gradients, 3 also the parameters."""
    p, g, o = (2, 2, 12) if mixed_precision else (4, 4, 12 if zero_stage else 8)
    n = max(world, 1)
    return {
        "parameters": params * p / (n if zero_stage >= 3 else 1),
        "gradients": params * g / (n if zero_stage >= 2 else 1),
        "optimizer": params * o / (n if zero_stage >= 1 else 1),
    }


def snapshot_bytes(params: int, world: int, zero_stage: int, mixed_precision: bool) -> float:
    """Host memory that rank 0 (which holds the most) keeps for an asynchronous save (`storage.async_save`) until its
    upload is done: DeepSpeed's module state (whole, or a slice under ZeRO-3), its optimizer partition (fp32 master,
    m, v) and the gathered fp32 weights of `model.safetensors`. On CPU workers that is the device's own memory."""
    n = max(world, 1)
    module = params * (2 if mixed_precision else 4) / (n if zero_stage >= 3 else 1)
    return module + params * 12 / (n if zero_stage >= 1 else 1) + params * 4


def full_weights_bytes(params: int) -> float:
    """What rank 0 holds while a synchronous save (the final one always) writes `model.safetensors`: the whole fp32
    weights, gathered from the partitions into host memory. Training is paused then, so its activations are freed:
    the plan counts only what the copy adds beyond them (on CPU workers host memory is the device's own)."""
    return params * 4


def deepspeed_buffer_bytes(params: int, world: int, zero_stage: int, mixed_precision: bool) -> float:
    """What DeepSpeed allocates beside the model states: gradient-reduction buckets (two: one fills while the
    other is reduced), the all-gather bucket; under ZeRO-3 the gathered parameters it keeps alive and prefetches,
    and Adam's temporaries for one sub-group of the partition; under ZeRO ≤ 2, two fp32 buffers the size of the
    rank's partition at the optimizer step: its averaged gradient and Adam's temporary (`exp_avg_sq.sqrt()`)."""
    b = 2 if mixed_precision else 4
    if zero_stage >= 3:
        return (min(LIVE_PARAMETERS, params) + 3 * BUCKET) * b + 2 * 4 * min(SUB_GROUP, params / max(world, 1))
    partition = params / (max(world, 1) if zero_stage >= 1 else 1)
    return 3 * BUCKET * b + 2 * 4 * partition


def measured_state_bytes(engine) -> dict[str, float]:
    """This rank's persistent model-state bytes in a DeepSpeed engine: parameters it holds (ZeRO-3: its partition)
    and optimizer state (ZeRO's fp32 partition + Adam moments). Gradients are not counted: DeepSpeed frees them
    after each step, so between steps there is nothing to measure."""
    params = 0
    for p in engine.module.parameters():
        held = getattr(p, "ds_tensor", None)  # ZeRO-3 parameters are placeholders; the rank holds ds_tensor
        params += (held if held is not None else p).numel() * p.element_size()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                    if hasattr(t, "numel") and t.dim() > 0)
    if engine.zero_optimization_stage() > 0:  # the flat fp32 partitions the inner optimizer updates
        zero = engine.optimizer  # stage 1/2 and stage 3 name them differently; stage 3 swaps them out of param_groups
        flat = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat", [])
        optimizer += sum(t.numel() * t.element_size() for t in flat)
    return {"parameters": float(params), "optimizer": float(optimizer)}


def activation_bytes(cfg: Config, micro_batch: int | None = None, bf16: bool = True) -> float:
    """Bytes autograd saves for backward in one micro-batch's forward pass, measured on the meta device."""
    import torch

    from vitray.tasks import make_task

    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage._cdata] = storage.nbytes()  # one entry per storage: views of one tensor count once
        return t

    b = micro_batch or cfg.optim.micro_batch
    with torch.device("meta"):
        model = make_task(cfg).build_model()
        if bf16:
            model = model.to(torch.bfloat16)
        weights = {p.untyped_storage()._cdata for p in model.parameters()}
        images = torch.empty(b, 3, cfg.data.image_size, cfg.data.image_size, dtype=next(model.parameters()).dtype)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(images)
    return float(sum(n for key, n in saved.items() if key not in weights))


@dataclasses.dataclass
class Estimate:
    model: str
    image_size: int
    params: int
    train_flops_per_image: float
    world: int
    accelerator: str
    zero_stage: int
    micro_batch: int
    memory: dict[str, float]  # bytes per device
    device_memory: float | None  # bytes, None when unknown (CPU)
    images: float  # images seen over the run
    total_flops: float
    mfu: float
    accelerator_days: float | None
    wall_clock_days: float | None
    steps: int = 0
    max_failures: int = 0
    checkpoint_bytes: float = 0.0  # model + optimizer state of one checkpoint, all ranks together
    mixed_precision: bool = True

    @property
    def nodes(self) -> int:
        return max(1, -(-self.world // GPUS_PER_NODE)) if self.accelerator not in ("CPU",) else self.world

    @property
    def save_s(self) -> float:
        """Modelled seconds to write one checkpoint: every node writes its share in parallel."""
        return self.checkpoint_bytes / self.nodes / (CHECKPOINT_WRITE_GB_S * 1e9)

    @property
    def checkpoint_interval_s(self) -> float:
        """Young–Daly: the interval that minimises expected lost work plus save time, sqrt(2 × save × job MTBF),
        where the job fails when any of its nodes does (MTBF / nodes)."""
        return math.sqrt(2 * self.save_s * NODE_MTBF_HOURS * 3600 / self.nodes)

    @property
    def suggested_checkpoint_every(self) -> int | None:
        if not self.wall_clock_days or not self.steps:
            return None
        return max(1, round(self.checkpoint_interval_s / (self.wall_clock_days * 86400 / self.steps)))

    @property
    def expected_failures(self) -> float | None:
        return self.wall_clock_days * 24 * self.nodes / NODE_MTBF_HOURS if self.wall_clock_days else None

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.device_memory is None or self.memory_total <= self.device_memory

    def summary(self) -> str:
        mem = ", ".join(f"{k} {v / GIB:.3g}" for k, v in self.memory.items())
        cap = f" of {self.device_memory / GIB:.0f} GiB" if self.device_memory else ""
        days = (f"{self.accelerator_days:,.1f} {self.accelerator}-days, {self.wall_clock_days:,.2f} days wall-clock"
                f" at MFU {self.mfu:.0%}" if self.accelerator_days is not None else "accelerator peak unknown")
        return (f"plan: {self.model} @ {self.image_size} px, {self.params / 1e6:.4g}M params, "
                f"{self.train_flops_per_image / 1e9:.4g} GFLOPs/img train; {self.world} × {self.accelerator}, "
                f"ZeRO-{self.zero_stage}, micro-batch {self.micro_batch}; memory/device {self.memory_total / GIB:.3g} GiB"
                f"{cap} ({mem}); {self.total_flops / 1e18:.4g} EFLOPs; {days}{self._long_run()}")

    def _long_run(self) -> str:
        every = self.suggested_checkpoint_every
        if every is None:
            return ""
        line = (f"; checkpoints {self.checkpoint_bytes / 1e9:.3g} GB, ~{self.save_s:.0f} s to save at"
                f" {CHECKPOINT_WRITE_GB_S:g} GB/s per node (modelled): storage.checkpoint_every ≈ {every} steps"
                f" (Young–Daly, a node failure per {NODE_MTBF_HOURS:,.0f} h → {self.expected_failures:.1f} expected"
                f" on {self.nodes} nodes; max_failures={self.max_failures})")
        if self.expected_failures > self.max_failures:
            line += f" — raise max_failures above {self.expected_failures:.0f}"
        return line

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "memory_total": self.memory_total, "fits": self.fits}


@dataclasses.dataclass
class DataPlan:
    """Whether the cluster's CPUs can decode as fast as its accelerators consume (Ray Data's decode tasks use the
    CPUs the training workers leave free on their nodes, and CPU-only data nodes when the cluster has them)."""

    images_per_s: float  # what the accelerators consume at the planned MFU
    decode_per_cpu: float  # images/s one CPU delivers through Ray Data
    decode_source: str  # where that rate comes from (measured on which shards, or assumed)
    cpus_free: float  # on the accelerator nodes, after the training workers' scaling.cpus_per_worker, + data nodes
    cpus_free_how: str

    @property
    def cpus_needed(self) -> float:
        return self.images_per_s / self.decode_per_cpu

    @property
    def enough(self) -> bool:
        return self.cpus_free >= self.cpus_needed

    def summary(self) -> str:
        line = (f"data: the accelerators consume {self.images_per_s:,.0f} img/s; decoding at {self.decode_per_cpu:,.0f}"
                f" img/s per CPU ({self.decode_source}) needs {self.cpus_needed:,.0f} CPUs; the cluster has"
                f" {self.cpus_free:,.0f} free for it ({self.cpus_free_how})")
        if self.enough:
            return line + " — enough"
        short = self.cpus_needed - self.cpus_free
        return (line + f" — short by {short:,.0f} CPUs: the run would be data-bound at"
                f" {self.cpus_free / self.cpus_needed:.0%} of the planned speed. Add {math.ceil(short / DATA_NODE_CPUS)}"
                f" CPU-only data nodes ({DATA_NODE_CPUS} CPUs each: cluster/aws-gpu.yaml's data_cpu, or --data-cpus),"
                " store the shards pre-resized (jobs/write_shards.py --max-side 512), lower scaling.cpus_per_worker,"
                " or decode on the accelerators (data.decode_on=gpu)")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "cpus_needed": self.cpus_needed, "enough": self.enough}


def data_plan(cfg: Config, est: Estimate, decode_per_cpu: float, decode_source: str, node_cpus: float | None = None,
              data_cpus: float = 0.0) -> DataPlan | None:
    """The data-CPU line of a plan; None without an accelerator peak (nothing to say how fast it consumes).
    `decode_per_cpu`: in-process images/s per CPU (`decode_rate.measure`), turned into Ray Data's rate here."""
    from vitray.data.decode_rate import RAY_DATA_EFFICIENCY

    _, peak = _lookup(accounting.PEAK_FLOPS, est.accelerator)
    if not peak:
        return None
    if node_cpus is None:
        _, per_accelerator = _lookup(HOST_CPUS_PER_ACCELERATOR, est.accelerator)
        node_cpus = (per_accelerator or 12) * GPUS_PER_NODE
    per_node = min(est.world, GPUS_PER_NODE)
    free_per_node = max(0.0, node_cpus - per_node * cfg.scaling.cpus_per_worker)
    how = (f"{est.nodes} nodes × ({node_cpus:g} − {per_node} workers × {cfg.scaling.cpus_per_worker:g}"
           f" scaling.cpus_per_worker)" + (f" + {data_cpus:g} on data nodes" if data_cpus else ""))
    return DataPlan(images_per_s=est.world * peak * est.mfu / est.train_flops_per_image,
                    decode_per_cpu=decode_per_cpu * RAY_DATA_EFFICIENCY, decode_source=decode_source,
                    cpus_free=est.nodes * free_per_node + data_cpus, cpus_free_how=how)


def _lookup(table: dict, accelerator: str):
    for name, value in table.items():
        if accelerator and name.lower() in accelerator.lower():
            return name, value
    return None, None


def estimate(cfg: Config, num_images: float, mfu: float = 0.4, accelerator: str | None = None,
             host: bool = False) -> Estimate:
    """The plan for `cfg` over a dataset of `num_images` (its `optim.epochs`, or `optim.total_steps` × batch).
    `host`: the workers run on CPUs, so their memory is the process's: add its baseline (`CPU_PROCESS_BYTES`)."""
    import torch

    from vitray.models.registry import build_model, get_spec

    accel = accelerator if accelerator is not None else cfg.scaling.accelerator
    spec = get_spec(cfg.model.name)
    with torch.device("meta"):
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.data.image_size,
                            pre_logits=cfg.model.pre_logits)
    params = sum(p.numel() for p in model.parameters())
    mixed = cfg.deepspeed.precision in ("bf16", "fp16") or (cfg.deepspeed.precision == "auto" and cfg.scaling.use_gpu)
    world = cfg.scaling.num_workers
    memory = model_state_bytes(params, world, cfg.deepspeed.zero_stage, mixed)
    memory["activations"] = activation_bytes(cfg, bf16=mixed)
    memory["deepspeed buffers"] = deepspeed_buffer_bytes(params, world, cfg.deepspeed.zero_stage, mixed)
    if cfg.deepspeed.offload_optimizer and not host:  # ZeRO-Offload: the fp32 partition and Adam live in host memory
        memory["optimizer"] = 0.0
    if host:
        memory["process"] = CPU_PROCESS_BYTES
        if cfg.storage.async_save and cfg.storage.checkpoint_every:  # periodic saves (the final one is synchronous)
            memory["snapshot"] = snapshot_bytes(params, world, cfg.deepspeed.zero_stage, mixed)
        elif full_weights_bytes(params) > memory["activations"]:
            memory["weights at a save"] = full_weights_bytes(params) - memory["activations"]
    flops = accounting.train_flops_per_image(accounting.forward_flops(
        spec, cfg.data.image_size, cfg.model.num_classes, cfg.model.pre_logits))
    images = cfg.optim.total_steps * cfg.optim.global_batch if cfg.optim.total_steps else cfg.optim.epochs * num_images
    name, peak = _lookup(accounting.PEAK_FLOPS, accel)
    _, gib = _lookup(ACCELERATOR_MEMORY_GIB, accel)
    days = images * flops / (peak * mfu) / 86400 if peak else None
    state_bytes = params * (14 if mixed else 12)  # weights (bf16 or fp32) + fp32 master and Adam's m, v
    return Estimate(
        model=cfg.model.name, image_size=cfg.data.image_size, params=params, train_flops_per_image=flops,
        world=world, accelerator=name or accel or ("GPU" if cfg.scaling.use_gpu else "CPU"),
        zero_stage=cfg.deepspeed.zero_stage, micro_batch=cfg.optim.micro_batch, memory=memory,
        device_memory=gib * GIB if gib else None, images=images, total_flops=images * flops, mfu=mfu,
        accelerator_days=days, wall_clock_days=days / world if days is not None else None,
        steps=int(images // cfg.optim.global_batch), max_failures=cfg.max_failures, checkpoint_bytes=state_bytes,
        mixed_precision=mixed,
    )


def check_fits(est: Estimate) -> None:
    """One clear error, naming what to change, for a configuration whose model states and activations exceed a
    device's memory."""
    if est.fits:
        return
    m = {k: v / GIB for k, v in est.memory.items()}
    hints = []
    snapshot = est.memory.get("snapshot", 0.0)
    for stage in range(est.zero_stage + 1, 4):  # the lowest stage that fits, by the same figures
        memory = {**est.memory, **model_state_bytes(est.params, est.world, stage, est.mixed_precision),
                  "deepspeed buffers": deepspeed_buffer_bytes(est.params, est.world, stage, est.mixed_precision)}
        if snapshot:
            memory["snapshot"] = snapshot_bytes(est.params, est.world, stage, est.mixed_precision)
        if sum(memory.values()) <= est.device_memory:
            hints.append(f"deepspeed.zero_stage={stage} ({sum(memory.values()) / GIB:.1f} GiB)")
            break
        if snapshot and sum(memory.values()) - memory["snapshot"] <= est.device_memory:
            hints.append(f"deepspeed.zero_stage={stage} with --set storage.async_save=false"
                         f" ({(sum(memory.values()) - memory['snapshot']) / GIB:.1f} GiB)")
            break
    if est.micro_batch > 1:
        hints.append(f"a smaller optim.micro_batch (activations are {m['activations']:.1f} GiB at {est.micro_batch};"
                     " DeepSpeed accumulates gradients up to the same optim.global_batch)")
    # More workers divide only what ZeRO partitions (parameters, gradients, optimizer states): say so only when the
    # rest would fit, never for a run whose activations alone overflow the device.
    states = sum(v for k, v in est.memory.items() if k in ("parameters", "gradients", "optimizer"))
    if est.memory_total - states < est.device_memory:
        hints.append("more scaling.num_workers" if est.zero_stage >= 1 else "ZeRO to partition across workers")
    if snapshot and not any("storage.async_save" in h for h in hints):
        hints.append(f"--set storage.async_save=false (the host copy of an asynchronous save is {snapshot / GIB:.1f} GiB)")
    where = ("CPU worker" if est.accelerator == "CPU" else est.accelerator)
    has = (f"{est.device_memory / GIB:.1f} GiB (its share of this machine below Ray's OOM threshold)"
           if est.accelerator == "CPU" else f"{est.device_memory / GIB:.0f} GiB")
    raise ConfigError(
        f"optim.micro_batch / deepspeed.zero_stage: {est.model} @ {est.image_size} px needs "
        f"{est.memory_total / GIB:.1f} GiB per {where} ({', '.join(f'{k} {v:.1f}' for k, v in m.items())}) "
        f"but has {has}; try {', or '.join(hints)}"
    )


def machine() -> dict:
    """The machine and versions a measurement is written with."""
    import os
    import platform
    from importlib.metadata import version

    import ray
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
        # DeepSpeed's version without importing it (0.5 s of a driver's CPU that nothing else in a driver needs)
        "deepspeed": version("deepspeed"), "platform": platform.platform(),
    }
