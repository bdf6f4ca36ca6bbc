"""What `schema.validate` checks: one function per config section, each adding one line per field at fault, so
that a config with several faults names them all at once.

Every line reads `<section.field>: <what is wrong>`; a value out of its range reads
`<section.field>: must be <allowed range>, got <value>`. Numbers go through `in_range` (float fields must be finite:
NaN and ±inf are refused) and the string fields that name one of a few options through `choice`. The config itself
stays plain frozen dataclasses with str, int, float and bool fields (JSON round trips and `--set` overrides).

Like the schema, nothing here imports Ray, torch or DeepSpeed: a bad config is refused in milliseconds, before any
cluster resource is requested.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
import typing

from vitray.config.schema import Config, ConfigError

# The largest image side accepted. No recipe comes near it (DETR's 800 px is the largest; ViT-H/14 fine-tunes at
# 518), and past it a run cannot work: a ViT-B/16 at 4096 px has 65,536 tokens, and its attention matrix alone takes
# 8 GiB per head and layer in bf16. A larger value is a typo (a pixel count, an extra digit); refusing it here beats
# an out-of-memory error in every worker minutes later.
MAX_IMAGE_SIDE = 4096
# Seeds feed numpy's generators (which refuse negative seeds) and torch.manual_seed(seed × 1,000,003 + rank + 1),
# which must fit in 64 bits: 32-bit seeds leave ample room for both.
MAX_SEED = 2**32 - 1


def _words(options) -> str:
    """("a", "b", "c") → 'a, b or c'; an empty option shows as ""."""
    shown = [str(o) if o != "" else '""' for o in options]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def choice(errors: list[str], name: str, value, options: tuple) -> bool:
    """Whether `value` is one of `options` (same type too: True is not the zero stage 1); else one line for it."""
    if any(value == o and type(value) is type(o) for o in options):
        return True
    errors.append(f"{name}: must be {_words(options)}, got {value!r}")
    return False


def in_range(errors: list[str], name: str, value, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False,
             integer: bool = False, span: str = "", note: str = "") -> bool:
    """Whether `value` is a number between `lo` and `hi` (either may be None; a bound is included unless its *_open
    says otherwise): an int where `integer`, else a finite float or int. Else one line for it:
    `name: must be <span><note>, got <value>` (`span` defaults to one written from the bounds)."""
    number = _integer(value) if integer else _finite(value)
    ok = number and (lo is None or (value > lo if lo_open else value >= lo)) and (
        hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        span = span or _span(lo, hi, lo_open, hi_open, integer, _integer(value))
        errors.append(f"{name}: must be {span}{note}, got {value!r}")
    return ok


def _span(lo, hi, lo_open: bool, hi_open: bool, integer: bool, is_int: bool) -> str:
    """'1..4096', 'in [0, 1)', '≥ 0', 'finite and > 0', 'an integer ≥ 1' (for a value that is not one)."""
    if lo is not None and hi is not None:
        return f"{lo}..{hi}" if integer else f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    bound = f"{'>' if lo_open else '≥'} {lo}" if lo is not None else f"{'<' if hi_open else '≤'} {hi}"
    return ("" if is_int else "an integer " if integer else "finite and ") + bound


@functools.lru_cache(maxsize=256)
def validate(cfg: Config) -> None:
    """Check everything that can be checked without touching storage or Ray; raise one ConfigError naming every
    field at fault, one line each. Configs are frozen, so a config that passed once is not checked again (the jobs
    check it when they build it, the driver's `prepare` asks again for callers that built theirs in Python)."""
    errors = problems(cfg)
    if errors:
        raise ConfigError("\n".join(errors))


def problems(cfg: Config) -> list[str]:
    """Every fault of `cfg` that can be found without touching storage or Ray, one line each (none: valid)."""
    from vitray.models import registry

    errors = _types(cfg)
    if errors:  # the checks below compare and search these fields: their types come first
        return errors
    spec = None
    try:
        spec = registry.get_spec(cfg.model.name)
    except KeyError as e:
        errors.append(f"model.name: {e.args[0]}")
    for check in (_data, _model, _deepspeed, _scaling, _elastic, _optim, _transfer, _detection, _storage, _run):
        check(cfg, spec, errors)
    return errors


def _types(cfg: Config) -> list[str]:
    """The str and bool fields of every section hold a str and a bool (the numbers' types are checked with their
    ranges). `--set` parses each field as its type; a config built from JSON or in Python may not."""
    errors = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for name, hint in typing.get_type_hints(type(sub)).items():
            value = getattr(sub, name)
            if hint is bool and not isinstance(value, bool):
                errors.append(f"{section.name}.{name}: must be true or false, got {value!r}")
            elif hint is str and not isinstance(value, str):
                errors.append(f"{section.name}.{name}: must be a string, got {value!r}")
    return errors


def _model(cfg: Config, spec, errors: list[str]) -> None:
    in_range(errors, "model.num_classes", cfg.model.num_classes, 1, integer=True)
    in_range(errors, "model.dropout", cfg.model.dropout, 0, 1, hi_open=True)


def _data(cfg: Config, spec, errors: list[str]) -> None:
    d = cfg.data
    if in_range(errors, "data.image_size", d.image_size, 1, MAX_IMAGE_SIDE, integer=True) and spec is not None \
            and d.image_size % spec.size_multiple:
        errors.append(f"data.image_size: {d.image_size} is not divisible by the patch size {spec.size_multiple} of"
                      f" {cfg.model.name}")
    in_range(errors, "data.crop_area_min", d.crop_area_min, 0, 1, lo_open=True)
    in_range(errors, "data.shuffle_buffer", d.shuffle_buffer, 0, integer=True, note=" (0 = no shuffle buffer)")
    in_range(errors, "data.wait_warn_s", d.wait_warn_s, 0, note=" (0 = off)")
    choice(errors, "data.bad_samples", d.bad_samples, ("error", "skip"))
    if choice(errors, "data.decode_on", d.decode_on, ("cpu", "gpu")) and d.decode_on == "gpu":
        if spec is not None and spec.kind != "classification":
            errors.append(f"data.decode_on: gpu decodes classification images; {cfg.model.name} ({spec.family})"
                          " decodes on the CPU (data.decode_on=cpu)")
        elif cfg.scaling.use_gpu and importlib.util.find_spec("torchvision") is None:
            errors.append("data.decode_on: gpu needs torchvision (its decode_jpeg runs nvJPEG): pip install the"
                          " torchvision built for your torch")
    for name, column in (("data.image_column", d.image_column), ("data.label_column", d.label_column)):
        if not column:
            errors.append(f"{name}: must name a Parquet column (default: {name.split('.')[1].split('_')[0]})")
    _partitions(cfg, errors)
    detr = spec is not None and spec.kind == "detection"
    if choice(errors, "data.builtin", d.builtin, ("", "digits", "digit_canvases")):
        if detr and d.builtin == "digits":
            errors.append("data.builtin: digits is a classification dataset; detection trains on digit_canvases")
        elif not detr and d.builtin == "digit_canvases":
            errors.append(f"data.builtin: digit_canvases is a detection dataset; {cfg.model.name} is not a detection"
                          " model")
    if not d.train_uri and not d.builtin:
        errors.append("data.train_uri: no training data given; pass --set data.train_uri=s3://bucket/prefix (shards"
                      " written by jobs/write_shards.py) or use --set data.builtin="
                      + ("digit_canvases" if detr else "digits"))
    for name, uri in (("data.train_uri", d.train_uri), ("data.val_uri", d.val_uri)):
        _uri(errors, name, uri)


def _partitions(cfg: Config, errors: list[str]) -> None:
    p, batch, workers = cfg.data.partitions, cfg.optim.global_batch, cfg.scaling.num_workers
    if not in_range(errors, "data.partitions", p, 0, integer=True, note=" (0 = scaling.num_workers)") or not p:
        return
    if _positive_int(batch) and batch % p:
        errors.append(f"data.partitions: {p} does not divide optim.global_batch={batch} (each step takes the same"
                      " number of samples from every partition)")
    if _positive_int(workers) and p < workers:
        errors.append(f"data.partitions: {p} is fewer than scaling.num_workers={workers} (each worker reads at least"
                      " one partition)")


def _optim(cfg: Config, spec, errors: list[str]) -> None:
    o, workers = cfg.optim, cfg.scaling.num_workers
    choice(errors, "optim.optimizer", o.optimizer, ("adam", "sgd"))
    choice(errors, "optim.schedule", o.schedule, ("linear", "cosine", "step"))
    in_range(errors, "optim.lr", o.lr, 0, lo_open=True)
    betas = o.betas if isinstance(o.betas, (tuple, list)) else ()
    if len(betas) != 2 or not all(_finite(b) and 0 <= b < 1 for b in betas):
        errors.append(f"optim.betas: must be two numbers, each in [0, 1), got {o.betas!r}")
    in_range(errors, "optim.momentum", o.momentum, 0, 1, hi_open=True)
    in_range(errors, "optim.weight_decay", o.weight_decay, 0)
    in_range(errors, "optim.lr_drop", o.lr_drop, 0, 1, lo_open=True)
    in_range(errors, "optim.warmup_steps", o.warmup_steps, 0, integer=True)
    in_range(errors, "optim.grad_clip", o.grad_clip, 0, note=" (0 = no clipping)")
    in_range(errors, "optim.label_smoothing", o.label_smoothing, 0, 1, hi_open=True)
    batch_ok = in_range(errors, "optim.global_batch", o.global_batch, 1, integer=True)
    if in_range(errors, "optim.micro_batch", o.micro_batch, 1, integer=True) and batch_ok and _positive_int(workers) \
            and o.global_batch % (workers * o.micro_batch):
        errors.append(f"optim.global_batch: {o.global_batch} is not divisible by scaling.num_workers ×"
                      f" optim.micro_batch = {workers} × {o.micro_batch}")
    epochs_ok = in_range(errors, "optim.epochs", o.epochs, 0, note=" (0 = optim.total_steps decides)")
    steps_ok = in_range(errors, "optim.total_steps", o.total_steps, 0, integer=True, note=" (0 = from optim.epochs)")
    if epochs_ok and steps_ok and o.epochs == 0 and o.total_steps == 0:
        errors.append("optim.epochs: give a positive number of epochs or optim.total_steps")


def _deepspeed(cfg: Config, spec, errors: list[str]) -> None:
    choice(errors, "deepspeed.zero_stage", cfg.deepspeed.zero_stage, (0, 1, 2, 3))
    choice(errors, "deepspeed.precision", cfg.deepspeed.precision, ("auto", "bf16", "fp16", "fp32"))


def _scaling(cfg: Config, spec, errors: list[str]) -> None:
    s = cfg.scaling
    in_range(errors, "scaling.num_workers", s.num_workers, 1, integer=True)
    in_range(errors, "scaling.cpus_per_worker", s.cpus_per_worker, 0, lo_open=True)
    in_range(errors, "scaling.resize_check_s", s.resize_check_s, 0, lo_open=True)
    in_range(errors, "scaling.group_start_timeout_s", s.group_start_timeout_s, 0, lo_open=True)
    choice(errors, "scaling.placement_strategy", s.placement_strategy,
           ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


def _elastic(cfg: Config, spec, errors: list[str]) -> None:
    """scaling.min_workers > 0: each of an elastic run's needs that the config misses, one line each."""
    s = cfg.scaling
    if type(s.min_workers) is int and s.min_workers == 0:
        return
    hi = s.num_workers if _positive_int(s.num_workers) else None
    in_range(errors, "scaling.min_workers", s.min_workers, 1, hi, integer=True,
             span=f"1..scaling.num_workers={s.num_workers}", note=" (0 = a fixed worker count)")
    if cfg.optim.optimizer != "adam":
        errors.append("scaling.min_workers: an elastic run reshards its optimizer state at each resize through"
                      " DeepSpeed's universal checkpoint, which carries Adam's moments only; use optim.optimizer=adam"
                      " or a fixed worker count")
    if cfg.max_failures == 0:
        errors.append("scaling.min_workers: Ray Train counts each lost node of an elastic run as a failure; give it a"
                      " budget: max_failures=N (or -1, unlimited)")
    if not cfg.storage.checkpoint_every:
        errors.append("scaling.min_workers: an elastic run restarts from its latest checkpoint at every resize; set"
                      " storage.checkpoint_every (steps) so that a resize redoes at most that many")
    if cfg.deepspeed.zero_stage == 0:
        errors.append("scaling.min_workers: an elastic run reshards through DeepSpeed's universal checkpoint, made"
                      " from ZeRO partitions; set deepspeed.zero_stage to 1, 2 or 3")


# A name that becomes a folder (a run, a trial): letters, digits, '.', '_', '-', starting with a letter or digit —
# so no name is a path ('../victim', '/etc', '.') that would put a run, or the move of an earlier one, elsewhere.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 characters"


def plain_name(errors: list[str], name: str, value: str) -> bool:
    if isinstance(value, str) and PLAIN_NAME.fullmatch(value):
        return True
    errors.append(f"{name}: must be a plain name ({NAME_RULE}), got {value!r}: a name, not a path")
    return False


def _storage(cfg: Config, spec, errors: list[str]) -> None:
    st = cfg.storage
    in_range(errors, "storage.keep_checkpoints", st.keep_checkpoints, 1, integer=True)
    in_range(errors, "storage.checkpoint_every", st.checkpoint_every, 0, integer=True, note=" (0 = only at the end)")
    _uri(errors, "storage.uri", st.uri)
    if st.run_name:  # "" = named by the driver (model and time)
        plain_name(errors, "storage.run_name", st.run_name)


def _transfer(cfg: Config, spec, errors: list[str]) -> None:
    t = cfg.transfer
    choice(errors, "transfer.posemb_method", t.posemb_method, ("bilinear", "bicubic"))
    if in_range(errors, "transfer.ema_decay", t.ema_decay, 0, 1, hi_open=True) and t.ema_decay \
            and cfg.deepspeed.zero_stage == 3:
        errors.append("transfer.ema_decay: weight averaging needs whole parameters on each worker; use ZeRO ≤ 2")
    if t.init_from and "://" in t.init_from and not t.init_from.startswith("s3://"):
        errors.append(f"transfer.init_from: {t.init_from!r} is neither s3://… nor a local path")


def _detection(cfg: Config, spec, errors: list[str]) -> None:
    """Checked for every model (a NaN weight is wrong wherever it sits); only DETR's queries bound max_boxes."""
    det = cfg.detection
    if spec is not None and spec.kind == "detection":
        in_range(errors, "detection.max_boxes", det.max_boxes, 1, spec.queries, integer=True,
                 note=f" (the queries of {cfg.model.name})")
    else:
        in_range(errors, "detection.max_boxes", det.max_boxes, 1, integer=True)
    for name in ("cost_class", "cost_l1", "cost_giou", "eos_coef", "backbone_lr_scale"):
        in_range(errors, f"detection.{name}", getattr(det, name), 0)
    in_range(errors, "detection.crop_min", det.crop_min, 0, 1, lo_open=True)


def _run(cfg: Config, spec, errors: list[str]) -> None:
    """The top-level fields."""
    in_range(errors, "seed", cfg.seed, 0, MAX_SEED, integer=True)
    in_range(errors, "log_every", cfg.log_every, 1, integer=True)
    in_range(errors, "max_failures", cfg.max_failures, -1, integer=True, note=" (-1 = unlimited)")
    in_range(errors, "stop_at_step", cfg.stop_at_step, 0, integer=True, note=" (0 = run to the end)")


def _uri(errors: list[str], name: str, uri: str) -> None:
    if "://" in uri and not uri.startswith("s3://"):
        errors.append(f"{name}: {uri!r} is neither s3://bucket/prefix nor a local path")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    """An int or a float other than NaN and ±inf (bools are not numbers here)."""
    return _integer(value) or (isinstance(value, float) and math.isfinite(value))


def _positive_int(value) -> bool:
    return _integer(value) and value >= 1
