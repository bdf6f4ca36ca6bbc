"""Every config value is checked before Ray starts: each value a tester saw fail inside the workers (or train
nonsense) is refused by `validate` with one line that names the field and the value, all faults at once."""
import os
import subprocess
import sys
import time

import pytest

from vitray.config import ConfigError, apply_overrides, smoke, validate
from vitray.config import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(cfg) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value).splitlines()


@pytest.mark.parametrize("override, shown", [
    ("optim.global_batch=0", "0"),
    ("optim.global_batch=-64", "-64"),
    ("optim.total_steps=-5", "-5"),
    ("log_every=0", "0"),
    ("optim.lr=nan", "nan"),
    ("optim.epochs=inf", "inf"),
    ("optim.epochs=nan", "nan"),
    ("data.image_size=100000", "100000"),
    ("storage.checkpoint_every=-1", "-1"),
    ("optim.warmup_steps=-10", "-10"),
    ("optim.weight_decay=-1", "-1"),
    ("optim.label_smoothing=5", "5"),
    ("scaling.cpus_per_worker=0", "0"),
    ("scaling.cpus_per_worker=nan", "nan"),
    ("optim.betas=[2, 3]", "(2.0, 3.0)"),
])
def test_each_bad_value_is_refused_naming_field_and_value(override, shown):
    field = override.partition("=")[0]
    lines = _lines(apply_overrides(smoke(), [override]))
    assert any(line.startswith(f"{field}: must be ") and f"got {shown}" in line for line in lines), lines


def test_every_faulty_field_is_reported_together():
    cfg = apply_overrides(smoke(), [
        "optim.lr=nan", "optim.global_batch=-64", "data.image_size=100000", "log_every=0",
        "scaling.min_workers=3", "optim.optimizer=sgd", "max_failures=3", "storage.checkpoint_every=5",
        "detection.cost_l1=inf", "optim.schedule=exp",
    ])
    lines = _lines(cfg)
    for start in ("optim.lr: must be", "optim.global_batch: must be", "data.image_size: must be", "log_every: must be",
                  "detection.cost_l1: must be", "optim.schedule: must be linear, cosine or step, got 'exp'",
                  "scaling.min_workers: must be 1..scaling.num_workers=2",
                  "scaling.min_workers: an elastic run reshards its optimizer state"):
        assert sum(line.startswith(start) for line in lines) == 1, (start, lines)
    assert len(lines) == 8, lines  # one line per fault, nothing else


def _job_configs():
    """Every recipe a job can start from: the jobs' preset tables, the chained smoke runs and the studies' trials."""
    from vitray.tune.study import STUDIES

    for table in ("PRESETS", "FINETUNE_PRESETS", "DETR_PRESETS", "IGPT_PRESETS"):
        for name, make in getattr(recipes, table).items():
            yield f"{table}[{name}]", make()
    yield "detr_backbone_smoke", recipes.detr_backbone_smoke()
    for name, make in STUDIES.items():
        study = make()
        for model, _ in study.points:
            yield f"study {name}: {model}", study.recipe(model)
            if study.finetune_recipe:
                yield f"study {name}: {model} fine-tuned", study.finetune_recipe(model)


def test_every_job_recipe_still_validates():
    bad = {}
    for name, cfg in _job_configs():
        try:
            validate(apply_overrides(cfg, ["data.train_uri=s3://b/p"]))
        except ConfigError as e:
            bad[name] = str(e)
    assert not bad, bad


def test_a_job_refuses_a_bad_value_in_one_line_without_ray():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "pretrain_vit_h14.py"), "--preset", "smoke",
                           "--set", "optim.global_batch=-64"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == ["error: optim.global_batch: must be ≥ 1, got -64"], proc.stderr
    assert "Ray" not in proc.stdout and elapsed < 5, (elapsed, proc.stdout)
