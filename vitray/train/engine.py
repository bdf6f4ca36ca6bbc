"""Our config → a DeepSpeed engine: ZeRO stage, precision, accumulation, clipping, LR schedule, optimizer.

DeepSpeed owns gradient accumulation, clipping, ZeRO partitioning, mixed precision and the warmup + decay
schedule (its `WarmupDecayLR` / `WarmupCosineLR`); vitray only translates the paper's recipe into its config.
"""
from __future__ import annotations

import sys

import torch

from vitray.config.schema import Config
from vitray.cost import BUCKET, LIVE_PARAMETERS, SUB_GROUP
from vitray.data.partitions import micro_steps


def precision(cfg: Config, on_gpu: bool) -> str:
    return cfg.deepspeed.precision if cfg.deepspeed.precision != "auto" else ("bf16" if on_gpu else "fp32")


def deepspeed_config(cfg: Config, world_size: int, total_steps: int, on_gpu: bool) -> dict:
    o, z = cfg.optim, cfg.deepspeed
    accumulation = micro_steps(o.global_batch, o.micro_batch, cfg.data.partitions or world_size, world_size)
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    if o.schedule == "step":
        scheduler = None  # a torch MultiStepLR, passed to the engine (`build_engine`): DeepSpeed has no step drop
    elif o.schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max(total_steps, warmup + 1), "warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
            "warmup_num_steps": warmup, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, warmup + 1), "warmup_min_ratio": 0.0, "warmup_num_steps": warmup,
            "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    # Overlap gradient reduction with the backward pass, as DDP's buckets do; buckets and ZeRO-3's live parameters
    # sized by the planner (`vitray.cost.BUCKET` …), which counts them.
    zero: dict = {"stage": z.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
    if z.zero_stage == 3:
        # DeepSpeed keeps a gathered parameter whose reuse comes within max_reuse_distance elements (default 1e9):
        # forward's weights would stay whole until backward, up to max_live_parameters of them.
        zero.update(stage3_prefetch_bucket_size=BUCKET, stage3_max_live_parameters=LIVE_PARAMETERS,
                    stage3_max_reuse_distance=BUCKET, sub_group_size=SUB_GROUP)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    mode = precision(cfg, on_gpu)
    return {
        # DeepSpeed's own figure, for its bookkeeping: under an uneven split (`vitray/data/partitions.py`) the step
        # still trains on optim.global_batch samples.
        "train_batch_size": o.micro_batch * accumulation * world_size,
        "train_micro_batch_size_per_gpu": o.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": mode == "bf16"},
        "fp16": {"enabled": mode == "fp16"},
        **({"scheduler": scheduler} if scheduler else {}),
        # Our optimizer is a plain torch one (works on CPU and GPU alike); ZeRO partitions its state.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # vitray logs its own metrics
    }


def return_freed_layers(cfg: Config, on_gpu: bool) -> bool:
    """Under ZeRO-3 on CPU, have glibc return every freed block over 1 MiB to the system; True if set here.

    ZeRO-3 gathers each layer's parameters and frees them again, every step. glibc serves a freed block's size from
    its heap afterwards (its mmap threshold rises to it) and rarely returns that heap, so the gathered layers pile
    up: measured on ViT-L/16, ZeRO-3, 2 CPU workers, 6.2 GiB resident per worker between steps instead of 3.7. A
    fixed threshold returns them. It is set nowhere else because it costs every other run CPU: each large tensor
    becomes a fresh mapping, zeroed by the kernel. Measured on one thread (`benchmarks/results/malloc_threshold.json`):
    DETR's smoke step 1.55× the CPU time, the smoke ViT's unchanged."""
    if on_gpu or cfg.deepspeed.zero_stage != 3:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS): its allocator has no such threshold
        return False
    M_MMAP_THRESHOLD = -3  # malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 2**20))  # also stops glibc from raising it


def join_group(on_gpu: bool) -> None:
    """Joins torch's process group through DeepSpeed (gloo on CPU, NCCL on GPU).

    On CPU, DeepSpeed would first JIT-compile its shared-memory all-reduce op (35–60 s with a C++ compiler on every
    fresh machine, cached afterwards). That op serves only `inference_all_reduce` (DeepSpeed inference), which
    training never calls, so it is marked unavailable and DeepSpeed's comm falls back to torch's all-reduce."""
    import deepspeed

    if not on_gpu:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the module keeps this dict: the edit holds
    _compile_muon_when_called()
    deepspeed.init_distributed("nccl" if on_gpu else "gloo", verbose=False)


def _compile_muon_when_called() -> None:
    """DeepSpeed's ZeRO optimizers import its Muon module only to ask `isinstance(optimizer, MuonWithAuxAdam)`, and
    that module applies `torch.compile` (`deepspeed.runtime.compiler.compile()`, used by nothing else) to three
    functions as it is imported. Building torch.compile's wrapper imports the inductor: 0.9 s of CPU in every Train
    worker, for kernels that vitray's optimizers (AdamW, SGD) never call. The decorator is deferred to a function's
    first call, when torch.compile would compile it anyway; the kernels are compiled as before if they are used."""
    import functools

    from deepspeed.runtime import compiler

    eager = compiler.compile
    if getattr(eager, "deferred", False) or "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return

    def compile_when_called():
        def decorate(fn):
            @functools.wraps(fn)
            def call(*args, **kwargs):
                if call.compiled is None:
                    call.compiled = eager()(fn)
                return call.compiled(*args, **kwargs)

            call.compiled = None
            return call

        return decorate

    compile_when_called.deferred = True
    compiler.compile = compile_when_called


def building(cfg: Config, world_size: int, total_steps: int, on_gpu: bool):
    """The context a worker builds its model in: under ZeRO-3, DeepSpeed's `zero.Init`, which partitions each layer
    across the ranks as it is constructed, so no rank holds the whole model (`vitray/models/partitioned.py`)."""
    import contextlib

    if cfg.deepspeed.zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    join_group(on_gpu)  # zero.Init partitions across the group: it needs the world size
    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size, total_steps, on_gpu))


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on weight matrices and kernels only — not on biases, norms, the class token or position
    embeddings (as big_vision decays only `*/kernel`). `lr_scales`: parameter-name prefix → LR multiplier (DETR
    trains its backbone at a tenth of the transformer's LR)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("cls_token", "pos_embed"))
        scale = next((v for k, v in (lr_scales or {}).items() if name.startswith(k)), 1.0)
        groups.setdefault((not skip, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


def build_optimizer(model: torch.nn.Module, cfg: Config, lr_scales: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """`lr_scales`: parameter-name prefix → LR multiplier, from the task (`Task.lr_scales`)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.lr, lr_scales)
    if o.optimizer == "adam":
        # Decoupled decay (AdamW): the paper's "Adam, weight decay 0.1" as in the official JAX code.
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_engine(model: torch.nn.Module, cfg: Config, world_size: int, total_steps: int, on_gpu: bool,
                 load_universal: bool = False, lr_scales: dict[str, float] | None = None):
    """`load_universal`: the engine will restore a universal checkpoint (resuming on another number of workers)."""
    import deepspeed

    config = deepspeed_config(cfg, world_size, total_steps, on_gpu)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    join_group(on_gpu)
    optimizer = build_optimizer(model, cfg, lr_scales)
    scheduler = None
    if cfg.optim.schedule == "step":
        drop = max(1, round(cfg.optim.lr_drop * total_steps))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[drop], gamma=0.1)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine
