"""Scaling studies on Ray Tune (paper Sec. 4.4): many pretraining runs — model families and sizes × compute
budgets — each followed by a transfer evaluation, then the table, Figure 5, and power-law fits (`scaling`).

Each trial is a Tune *function* trial that builds and runs its own `TorchTrainer` (Ray Train V2's Tune pattern):
the trial itself holds no resources; its Train workers request theirs, and `max_concurrent_trials` = what the
cluster has ÷ what one trial's workers (plus its data tasks) need, so trials never deadlock waiting on each other.

A study folder (local or s3://):
    study.json             the grid and settings (no credentials)
    datasets/              built-in data, when the preset writes its own
    runs/<trial>/          each trial's vitray run: checkpoints, metrics.jsonl, accelerator_days.jsonl
    trials/<trial>.json    each finished trial's record (written last, atomically)
    tune/                  Ray Tune's experiment: per-trial TensorBoard / CSV / JSON logs, state for `--resume`
    results.csv, results.json, fits.json, figure5.png
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from vitray import storage
from vitray.config.checks import validate
from vitray.config.schema import Config, ConfigError, apply_overrides
from vitray.storage import Endpoint

BUDGET_UNITS = ("epochs", "steps", "exaflops")
DATA_CPUS_PER_TRIAL = 1.0  # headroom for a trial's Ray Data read/decode tasks and evaluation actors


@dataclasses.dataclass(frozen=True)
class Study:
    """A grid of (model, budget) points and how each is trained and scored."""

    name: str
    points: tuple[tuple[str, float], ...]  # (model, budget)
    budget_unit: str  # epochs | steps | exaflops (pretraining compute, converted to steps per model)
    recipe: Callable[[str], Config]  # model → its pretraining config (the budget is applied on top)
    transfer: str = "fewshot"  # fewshot: k-shot ridge on frozen features | finetune: the Table 4 recipe
    transfer_train: str = ""  # shards the few-shot read-out is fitted on / fine-tuning trains on
    transfer_test: str = ""  # shards transfer accuracy is measured on
    shots: int = 10
    finetune_recipe: Callable[[str], Config] | None = None
    builtin: str = ""  # "digits-transfer": write the digits split by class into <study>/datasets first
    asha: bool = False  # stop hopeless trials early (by training loss), off for the paper's grid

    def describe(self) -> dict:
        """What study.json records: enough to refuse resuming a different grid; no callables, no credentials."""
        return {"name": self.name, "points": [list(p) for p in self.points], "budget_unit": self.budget_unit,
                "transfer": self.transfer, "transfer_train": self.transfer_train, "transfer_test": self.transfer_test,
                "shots": self.shots, "builtin": self.builtin, "asha": self.asha}


def grid(models: list[str], budgets: list[float]) -> tuple[tuple[str, float], ...]:
    return tuple((m, b) for m in models for b in budgets)


def trial_key(model: str, budget: float, unit: str) -> str:
    return f"{model}-{budget:g}{ {'epochs': 'ep', 'steps': 'steps', 'exaflops': 'EF'}[unit]}"


# --- presets: the paper's grid and a laptop-sized one ---------------------------------------------------------

# Table 6: every model the paper pretrained on JFT-300M, at the epochs it ran (7, and 14 for the largest).
TABLE6_POINTS = (
    ("vit_b32", 7), ("vit_b16", 7), ("vit_l32", 7), ("vit_l16", 7), ("vit_l16", 14), ("vit_h14", 14),
    ("bit_r50x1", 7), ("bit_r50x2", 7), ("bit_r101x1", 7), ("bit_r152x1", 7), ("bit_r152x2", 7), ("bit_r152x2", 14),
    ("bit_r200x3", 14),
    ("r50_vit_b32", 7), ("r50_vit_b16", 7), ("r50_vit_l32", 7), ("r50_vit_l16", 7), ("r50_vit_l16", 14),
)


def table6() -> Study:
    """Figure 5's study: Table 6's 18 pretraining runs on JFT-300M (Table 3 recipes), each fine-tuned on ImageNet with
    the Table 4 recipe. Name the data with --set data.train_uri=… and --transfer-train/--transfer-test."""
    from vitray.config.recipes import finetune, pretrain

    return Study(name="table6", points=TABLE6_POINTS, budget_unit="epochs", recipe=lambda m: pretrain(m, "jft"),
                 transfer="finetune", finetune_recipe=lambda m: finetune(m, "imagenet"))


def smoke() -> Study:
    """2 families × 2 sizes × 2 budgets on a 2-core laptop (~10 minutes): tiny ViTs and BiT ResNets pretrained on the
    digits 0–4, transfer = 10-shot ridge classification of the digits 5–9 they never saw."""
    from vitray.config.recipes import smoke as smoke_recipe

    def recipe(model: str) -> Config:
        return smoke_recipe().replace(
            model=dict(name=model, num_classes=5), data=dict(builtin=""),
            storage=dict(keep_checkpoints=1), log_every=10)

    return Study(name="smoke", points=grid(["vit_smoke_s", "vit_smoke", "bit_smoke_s", "bit_smoke"], [4, 16]),
                 budget_unit="epochs", recipe=recipe, builtin="digits-transfer")


STUDIES = {"table6": table6, "smoke": smoke}


# --- the trial configuration and everything checked before Ray ------------------------------------------------


def trial_config(study: Study, model: str, budget: float, overrides: list[str], study_uri: str,
                 endpoint: Endpoint) -> Config:
    """The pretraining config of one trial: the study's recipe for the model, the user's overrides, the budget as
    epochs or steps, and the study folder as storage."""
    from vitray.models.registry import canonical

    try:
        name = canonical(model)
    except KeyError as e:
        raise ConfigError(f"study model: {e.args[0]}") from None
    cfg = apply_overrides(study.recipe(name), overrides)
    cfg = cfg.replace(model=dict(name=name), storage=dict(
        uri=study_uri, endpoint_url=endpoint.url or "", region=endpoint.region,
        run_name=trial_key(name, budget, study.budget_unit), cost_log=""))
    if study.budget_unit == "epochs":
        cfg = cfg.replace(optim=dict(epochs=float(budget), total_steps=0))
    elif study.budget_unit == "steps":
        cfg = cfg.replace(optim=dict(total_steps=int(budget)))
    else:  # exaFLOPs of pretraining compute → whole optimizer steps of this model
        per_step = cfg.optim.global_batch * train_flops_per_image(cfg)
        steps = math.floor(budget * 1e18 / per_step)
        if steps < 1:
            raise ConfigError(f"study budget: {budget:g} exaFLOPs is less than one step of {name} ({per_step / 1e18:.3g}"
                              f" EF at global batch {cfg.optim.global_batch}); raise the budget")
        cfg = cfg.replace(optim=dict(total_steps=steps))
    return cfg


def train_flops_per_image(cfg: Config) -> float:
    """Analytic training FLOPs per image of the config's model at its resolution (3 × forward)."""
    from vitray import accounting
    from vitray.models.registry import get_spec

    return accounting.train_flops_per_image(accounting.forward_flops(
        get_spec(cfg.model.name), cfg.data.image_size, cfg.model.num_classes, cfg.model.pre_logits))


def check(study: Study, overrides: list[str], study_uri: str, endpoint: Endpoint) -> list[Config]:
    """Every trial's config, validated, and its memory plan checked — before any server, Ray or trial starts.
    One ConfigError lists every bad point."""
    from vitray import cost

    errors, configs = [], []
    if study.budget_unit not in BUDGET_UNITS:
        errors.append(f"study budget unit: {study.budget_unit!r} is not one of {', '.join(BUDGET_UNITS)}")
    if study.transfer not in ("fewshot", "finetune"):
        errors.append(f"study transfer: {study.transfer!r} is not fewshot or finetune")
    if not study.builtin and not (study.transfer_train and study.transfer_test):
        errors.append("--transfer-train/--transfer-test: the transfer evaluation needs both sets of shards")
    if not study.points:
        errors.append("study grid: no (model, budget) points")
    for model, budget in study.points if not errors else ():
        if budget <= 0:
            errors.append(f"study budget: {budget:g} {study.budget_unit} for {model} must be positive")
            continue
        try:
            cfg = trial_config(study, model, budget, overrides, study_uri, endpoint)
            validate(cfg)
            # The budget as the planner sees it; the dataset size is not known yet (epochs), so one image per epoch
            # stands in: only memory per device is checked here.
            cost.check_fits(cost.estimate(cfg, 1))
            configs.append(cfg)
        except ConfigError as e:
            errors.extend(f"{model} @ {budget:g} {study.budget_unit}: {line}" for line in str(e).splitlines())
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    return configs


def per_trial_resources(cfg: Config) -> dict[str, float]:
    s = cfg.scaling
    out = {"CPU": s.num_workers * s.cpus_per_worker + DATA_CPUS_PER_TRIAL}
    if s.use_gpu:
        out["GPU"] = float(s.num_workers)
    return out


def max_concurrent(configs: list[Config], cluster: dict[str, float]) -> int:
    """How many trials fit on the cluster at once; a ConfigError naming the trial when one does not fit at all
    (unless the cluster autoscales: then Ray adds nodes)."""
    worst = {}
    for cfg in configs:
        need = per_trial_resources(cfg)
        for k, v in need.items():
            worst[k] = max(worst.get(k, 0.0), v)
        short = {k: v for k, v in need.items() if v > cluster.get(k, 0.0)}
        if short and not cfg.scaling.autoscale:
            k, v = next(iter(short.items()))
            raise ConfigError(
                f"scaling.num_workers: trial {cfg.storage.run_name} needs {v:g} {k} ({cfg.scaling.num_workers} workers"
                f" × {'1 GPU' if k == 'GPU' else f'{cfg.scaling.cpus_per_worker:g} CPU'}"
                f"{f' + {DATA_CPUS_PER_TRIAL:g} for its data' if k == 'CPU' else ''}) but the cluster has"
                f" {cluster.get(k, 0.0):g}; use fewer workers per trial (--set scaling.num_workers=…) or a larger"
                " cluster (or scaling.autoscale=true if it adds nodes on demand)")
    fits = [math.floor(cluster.get(k, 0.0) / v) for k, v in worst.items() if v > 0]
    return max(1, min([len(configs), *fits]))


def prepare_data(study: Study, study_uri: str, endpoint: Endpoint) -> Study:
    """Write the preset's built-in data into the study folder (skipped when already there) and point the study at
    it. "digits-transfer": digits 0–4 to pretrain on, digits 5–9 (never seen in pretraining) to transfer to."""
    if study.builtin != "digits-transfer":
        return study
    from vitray.data.datasets import write_digits

    base = storage.join(study_uri, "datasets")
    write_digits(storage.join(base, "upstream"), endpoint, classes=range(0, 5))
    write_digits(storage.join(base, "transfer"), endpoint, classes=range(5, 10))
    return dataclasses.replace(study, transfer_train=storage.join(base, "transfer", "train"),
                               transfer_test=storage.join(base, "transfer", "val"))


def data_overrides(study: Study, study_uri: str) -> list[str]:
    if study.builtin != "digits-transfer":
        return []
    base = storage.join(study_uri, "datasets", "upstream")
    return [f"data.train_uri={storage.join(base, 'train')}", f"data.val_uri={storage.join(base, 'val')}"]
