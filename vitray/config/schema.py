"""Typed run configuration: frozen dataclasses and dotted overrides. What makes a config valid is checked by
`vitray.config.checks.validate`, before Ray starts.

Nothing here imports Ray, torch or DeepSpeed: a bad config is rejected in milliseconds with every offending field
named, and no cluster resource is requested for it.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """Bad configuration or input. Each line of the message starts with the field (or path) at fault."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vit_h14"  # registry name; "ViT-H/14" works too
    num_classes: int = 18291  # JFT-300M's label space
    dropout: float = 0.0
    pre_logits: bool = True  # pretraining head = tanh hidden layer of width D + linear (paper Sec. 3.1)


@dataclass(frozen=True)
class DataConfig:
    train_uri: str = ""  # folder with manifest.json + tar shards, or of Parquet files: s3://bucket/prefix or a local path
    val_uri: str = ""  # held-out shards for top-1 accuracy; "" = none
    builtin: str = ""  # "digits" | "digit_canvases" (detection): write them as shards into storage first
    image_size: int = 224
    crop_area_min: float = 0.05  # inception crop keeps 5%–100% of the image area (big_vision's default)
    flip: bool = True  # random horizontal flips (off for mirror-sensitive data such as digits)
    shuffle_buffer: int = 10_000  # per-worker local shuffle buffer, in samples
    bad_samples: str = "error"  # error = stop naming shard and key | skip = drop, count and log each one
    wait_warn_s: float = 120.0  # a worker waiting this long for a micro-batch says what Ray cannot schedule; 0 = off
    partitions: int = 0  # logical data partitions, fixed for the run (data/partitions.py); 0 = scaling.num_workers
    decode_on: str = "cpu"  # cpu = in Ray Data tasks | gpu = JPEGs decoded on the worker's device (nvJPEG; data/device_decode.py)
    audit_samples: bool = False  # log every step's sample keys (and their epoch) in metrics.jsonl: exactly-once checks
    image_column: str = "image"  # Parquet data without a manifest: the image-bytes column (Hub: a {bytes, path} struct)
    label_column: str = "label"  # ... and the integer label column


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"  # adam (decoupled weight decay) | sgd (momentum)
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.1
    schedule: str = "linear"  # linear | cosine decay after warmup | step: ×0.1 at lr_drop (DETR)
    lr_drop: float = 2 / 3  # step schedule: fraction of the run after which the LR drops tenfold (DETR: 200 of 300)
    warmup_steps: int = 10_000
    grad_clip: float = 1.0  # global norm
    global_batch: int = 4096
    micro_batch: int = 32  # per worker per forward pass; accumulation fills the rest of the global batch
    epochs: float = 14.0
    total_steps: int = 0  # 0 = epochs × dataset size / global batch
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 1
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU | bf16 | fp16 | fp32
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU memory


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 64  # Ray Train workers = data-parallel ranks (the most, in an elastic run)
    min_workers: int = 0  # > 0: elastic — continue on as few as this when nodes are lost, grow back when they return
    resize_check_s: float = 60.0  # elastic: how often Ray Train checks whether more workers could run
    # How long Ray Train waits for a worker group's placement before it gives up and decides the size again. After a
    # lost node its view of free resources may still count that node for a while: that first attempt waits this long.
    group_start_timeout_s: float = 60.0
    use_gpu: bool = True
    cpus_per_worker: float = 8.0
    accelerator: str = ""  # e.g. A100, H100: Ray accelerator_type and the peak FLOP/s used for MFU
    autoscale: bool = False  # the cluster adds GPU nodes on demand: don't fail when none are up yet
    placement_strategy: str = "PACK"  # Ray placement group: PACK fills nodes first | SPREAD across nodes | STRICT_*


@dataclass(frozen=True)
class StorageConfig:
    uri: str = ""  # where runs and written datasets go; "" = data on the embedded S3 server, runs in runs_dir
    runs_dir: str = "runs"  # with no storage.uri: the local folder runs go to, so they outlive the embedded server
    endpoint_url: str = ""  # S3-compatible endpoint (MinIO, Ceph); "" = AWS. Credentials: standard AWS chain only
    region: str = "us-east-1"
    run_name: str = ""  # "" = <model>-<UTC time>; reuse it with --resume
    keep_checkpoints: int = 3
    checkpoint_every: int = 1000  # optimizer steps; 0 = only at the end
    async_save: bool = True  # periodic saves held in host memory and uploaded beside training (docs/elastic.md)
    cost_log: str = ""  # accelerator-days rows are appended here; "" = <uri>/accelerator_days.jsonl, "none" = off


@dataclass(frozen=True)
class TransferConfig:
    init_from: str = ""  # a vitray checkpoint (…/runs/<name>/step_N) or an official .npz; "" = train from scratch
    posemb_method: str = "bilinear"  # bilinear = official scipy zoom | bicubic = timm's
    ema_decay: float = 0.0  # Polyak averaging of the weights used for evaluation (paper: 0.9999); 0 = off


@dataclass(frozen=True)
class DetectionConfig:
    """DETR's set-prediction loss and data (models of the detr family only)."""

    max_boxes: int = 100  # objects per image the pipeline carries (padded); at most the model's queries
    cost_class: float = 1.0  # matching cost and loss weights (paper: 1, 5, 2)
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    eos_coef: float = 0.1  # weight of the "no object" class in the cross-entropy
    backbone_lr_scale: float = 0.1  # backbone LR = optim.lr × this (paper: 1e-5 vs 1e-4)
    crop_min: float = 0.6  # random crops keep 60–100 % of each side; boxes clipped, mostly-cut ones dropped


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    seed: int = 0
    log_every: int = 50  # optimizer steps between metric lines
    max_failures: int = 0  # Ray Train restarts from the latest checkpoint this many times
    stop_at_step: int = 0  # checkpoint and stop here (0 = run to the end): split a long run across allocations

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        sections = {f.name: f.type for f in dataclasses.fields(Config)}
        hints = typing.get_type_hints(Config)
        kwargs = {}
        for name, value in d.items():
            if name not in sections:
                raise ConfigError(f"{name}: unknown config field")
            kwargs[name] = hints[name](**{k: _coerce(v, typing.get_type_hints(hints[name])[k]) for k, v in value.items()}) if isinstance(value, dict) else value
        return Config(**kwargs)

    def replace(self, **sections) -> "Config":
        """`cfg.replace(optim=dict(lr=1e-3))` → a copy with those section fields changed."""
        out = self
        for name, changes in sections.items():
            current = getattr(out, name)
            out = dataclasses.replace(out, **{name: dataclasses.replace(current, **changes) if isinstance(changes, dict) else changes})
        return out


def _coerce(value, hint):
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _parse(text: str, hint, where: str):
    """Turn the text of `--set where=text` into the field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if hint in (int, float, str):
            return hint(text)
        if origin is tuple:
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            if len(parts) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(a(p) for a, p in zip(args, parts))
    except ValueError as e:
        raise ConfigError(f"{where}: cannot read {text!r} as {getattr(hint, '__name__', hint)} ({e})") from None
    raise ConfigError(f"{where}: fields of type {hint} cannot be overridden from the command line")


def model_override(name: str | None) -> list[str]:
    """The jobs' `--model NAME` as an override, the name resolved (`R50+ViT-B/16` → `r50_vit_b16`)."""
    from vitray.models.registry import canonical

    if not name:
        return []
    try:
        return [f"model.name={canonical(name)}"]
    except KeyError as e:
        raise ConfigError(f"--model: {e.args[0]}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings (`--set optim.lr=1e-3`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{item}: overrides look like section.field=value")
        section, _, name = key.partition(".")
        top = {f.name: f for f in dataclasses.fields(Config)}
        if section not in top:
            raise ConfigError(f"{key}: unknown config field (sections: {', '.join(top)})")
        if not name:  # a top-level scalar such as seed=1
            hint = typing.get_type_hints(Config)[section]
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"{key}: name a field inside the section, e.g. {section}.<field>=value")
            cfg = dataclasses.replace(cfg, **{section: _parse(text, hint, key)})
            continue
        sub = getattr(cfg, section)
        hints = typing.get_type_hints(type(sub))
        if name not in hints:
            raise ConfigError(f"{key}: unknown config field (fields of {section}: {', '.join(hints)})")
        cfg = cfg.replace(**{section: {name: _parse(text, hints[name], key)}})
    return cfg
