"""--rehearse: the configured model on what is attached. How the rehearsal adapts a recipe to a host (no Ray: the
plan is built on the meta device), and one real rehearsal of a small model through the job, end to end."""
import json
import os
import subprocess
import sys

import pytest
from conftest import run_job

from vitray import cost
from vitray.config import ConfigError, preset
from vitray.train.attached import Attached
from vitray.train.rehearse import adapt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = cost.GIB


def _tried(cfg, stage: int, host: Attached) -> float:
    trial = cfg.replace(deepspeed=dict(zero_stage=stage), optim=dict(micro_batch=1, global_batch=2),
                        scaling=dict(num_workers=2, use_gpu=False))
    return cost.estimate(trial, 1, host=True).memory_total


def test_the_default_h14_recipe_on_this_kind_of_machine_takes_the_lowest_zero_stage_that_fits():
    cfg = preset("h14_jft").replace(data=dict(builtin="digits"), storage=dict(async_save=False))
    host = Attached(gpus=0, cpus=2, memory=23.4 * GIB)
    small, changes, plan = adapt(cfg, 3, host)
    budget = host.budget(2, "")
    s = small.deepspeed.zero_stage
    assert plan.memory_total <= budget
    assert all(_tried(cfg, lower, host) > budget for lower in range(cfg.deepspeed.zero_stage, s))
    assert (small.scaling.num_workers, small.optim.micro_batch, small.optim.global_batch) == (2, 1, 2)
    assert small.model == cfg.model and small.data.image_size == 224 and small.optim.optimizer == "adam"
    assert small.optim.total_steps == 3 and small.data.val_uri == ""
    text = "\n".join(changes)
    assert "optim.micro_batch: 32 → 1" in text and "scaling.num_workers: 64 → 2" in text and "fp32 on CPU" in text
    if s != cfg.deepspeed.zero_stage:  # the line says what the configured stage would need here
        assert f"deepspeed.zero_stage: 1 → {s} (ZeRO-1, micro-batch 1: " in text and " GiB here)" in text


def test_an_asynchronous_saves_host_copy_is_planned_and_the_refusal_says_how_to_turn_it_off():
    """On CPU workers the host copy an asynchronous save holds until its upload is done is the workers' own memory:
    H/14's (7.3 GiB at ZeRO-3 on 2 workers) leaves no setting that fits this kind of machine."""
    cfg = preset("h14_jft").replace(data=dict(builtin="digits"))
    with pytest.raises(ConfigError) as e:
        adapt(cfg, 3, Attached(gpus=0, cpus=2, memory=23.4 * GIB))
    assert "host copy an asynchronous save holds: try --set storage.async_save=false" in str(e.value)
    trial = cfg.replace(deepspeed=dict(zero_stage=3), optim=dict(micro_batch=1, global_batch=2),
                        scaling=dict(num_workers=2, use_gpu=False))
    assert 7 * GIB < cost.estimate(trial, 1, host=True).memory["snapshot"] < 7.5 * GIB  # the 7.87 GB it saves
    assert "snapshot" not in cost.estimate(trial.replace(storage=dict(async_save=False)), 1, host=True).memory
    assert "snapshot" not in cost.estimate(trial.replace(scaling=dict(use_gpu=True)), 1).memory  # host, not device


def test_a_synchronous_saves_gathered_weights_are_planned_beyond_the_activations_they_replace():
    """At a synchronous save rank 0 gathers the whole fp32 weights for `model.safetensors` (2.4 GiB at H/14) while
    training is paused: on CPU workers the plan counts what that adds beyond the freed activations."""
    cfg = preset("h14_jft").replace(data=dict(builtin="digits"), storage=dict(async_save=False))
    trial = cfg.replace(deepspeed=dict(zero_stage=3), optim=dict(micro_batch=1, global_batch=2),
                        scaling=dict(num_workers=2, use_gpu=False))
    plan = cost.estimate(trial, 1, host=True)
    assert plan.memory["weights at a save"] == pytest.approx(plan.params * 4 - plan.memory["activations"])
    assert "weights at a save" not in cost.estimate(trial.replace(scaling=dict(use_gpu=True)), 1).memory
    big_batch = cost.estimate(trial.replace(optim=dict(micro_batch=64, global_batch=128)), 1, host=True)
    assert "weights at a save" not in big_batch.memory  # its activations take more than the copy
    small, _, _ = adapt(cfg, 3, Attached(gpus=0, cpus=2, memory=23.4 * GIB))  # still fits this kind of machine
    assert small.deepspeed.zero_stage == 3


def test_a_host_too_small_for_any_setting_is_refused_with_the_figures():
    cfg = preset("h14_jft").replace(data=dict(builtin="digits"))
    with pytest.raises(ConfigError) as e:
        adapt(cfg, 3, Attached(gpus=0, cpus=2, memory=6 * GIB))
    msg = str(e.value)
    assert msg.startswith("--rehearse: vit_h14 @ 224 px fits none") and "ZeRO-3 + optimizer offload" in msg


def test_a_gpu_host_keeps_the_micro_batch_that_fits():
    cfg = preset("h14_jft").replace(data=dict(builtin="digits"))
    small, _, plan = adapt(cfg, 3, Attached(gpus=8, cpus=96, memory=1e12, gpu_memory=80 * GIB))
    assert small.scaling.num_workers == 8 and small.scaling.use_gpu
    assert plan.memory_total <= 80 * GIB and small.optim.micro_batch >= 1


@pytest.mark.e2e
def test_rehearsal_of_a_small_model_reports_and_restores(tmp_path):
    """The whole path a user takes: the job, adapted to 2 CPU workers, trained and saved; restarted on 2 new workers
    with the same optimizer state, and resized to 1 through the universal conversion, each to its first step; reported
    beside its plan and the goodput it implies in rehearsal.json and on the terminal. Run from the checkout, as a
    user would: the source tree is left as it was (the row goes beside the runs only)."""
    job = os.path.join(ROOT, "jobs", "pretrain_vit_h14.py")
    status = ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=all"]
    before = subprocess.run(status, capture_output=True, text=True).stdout
    proc = subprocess.run([sys.executable, job, "--model", "vit_ti16", "--rehearse", "2", "--set", "data.image_size=64",
                           "--set", f"storage.runs_dir={tmp_path}/runs"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert subprocess.run(status, capture_output=True, text=True).stdout == before  # nothing written into the checkout
    assert (tmp_path / "runs" / "rehearsals.jsonl").exists()
    assert "rehearsal of vit_ti16 @ 64 px: 2 steps on 2 CPU workers" in proc.stdout
    assert "optimizer state identical" in proc.stdout
    (run,) = [d for d in os.listdir(tmp_path / "runs") if d.startswith("rehearse-vit_ti16")]
    row = json.loads((tmp_path / "runs" / run / "rehearsal.json").read_text())
    assert row["rehearsed"] == {"workers": 2, "gpu": False, "zero_stage": 1, "micro_batch": 1,
                                "offload_optimizer": False, "steps": 2}
    assert row["optimizer_state_identical"] and row["checkpoint_gb"] > 0 and row["save_s"] > 0
    assert 0 < row["save_stall_s"] <= row["save_s"]
    restart, resize = row["restart"], row["resize"]
    assert not restart["resharded"] and restart["universal_s"] == 0 and resize["resharded"]
    # made after the save, beside training: the resize only checks that it is there
    assert resize["universal_background_s"] > 0 and resize["universal_s"] < resize["universal_background_s"]
    for p in (restart, resize):  # the parts add up to the whole, each one measured
        parts = ("group_start_s", "universal_s", "engine_s", "restore_s", "first_step_s")
        assert all(p[k] > 0 for k in parts if k != "universal_s" or p["resharded"])
        assert sum(p[k] for k in parts) == pytest.approx(p["to_first_step_s"], rel=0.02)
        assert p["phases_gib"]["first step"] > p["phases_gib"]["started"] > 0
    assert resize["optimizer_state_identical"]
    assert resize["phases_gib"]["engine"] > restart["phases_gib"]["engine"]  # one worker holds what two shared
    assert "restart on 2 workers: " in proc.stdout and "resize to 1: " in proc.stdout and "universal form was made in" in proc.stdout
    g = row["goodput"]
    assert g["save_stall_s"] == row["save_stall_s"] and g["save_stall_source"].startswith("measured: rehearsal of vit_ti16")
    assert g["restart_s"] == restart["to_first_step_s"] and 0 < g["goodput"] < 1
    assert f"goodput: {g['goodput']:.1%} at best" in proc.stdout and "save stall: " in proc.stdout
    assert row["peak_memory_per_worker_gib"] > row["phases_gib"]["started"] > 0
    assert set(row["planned"]) >= {"parameters", "gradients", "optimizer", "activations", "process"}
    assert row["full_run"]["accelerator"] == "H100" and row["full_run"]["accelerator_days"] > 0


def test_a_cpu_run_that_would_exhaust_this_machine_is_refused_before_ray(tmp_path):
    """The issue's OOM-killed run: H/14 at ZeRO-1 on 2 CPU workers. Refused by the plan against each worker's share
    of this machine, naming the lowest ZeRO stage that fits, before any Ray resource."""
    cfg = preset("h14_jft").replace(data=dict(builtin="digits"))
    host = Attached.here()
    if _tried(cfg, 1, host) <= host.budget(2, ""):
        pytest.skip("this machine has room for H/14 at ZeRO-1 on 2 CPU workers")
    proc = run_job("pretrain_vit_h14.py", "--set", "data.builtin=digits", "--set", "scaling.use_gpu=false",
                   "--set", "scaling.num_workers=2", "--set", "scaling.cpus_per_worker=0.5",
                   "--set", "optim.global_batch=2", "--set", "optim.micro_batch=1", "--set", f"storage.runs_dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "GiB per CPU worker" in proc.stderr and "try deepspeed.zero_stage=" in proc.stderr, proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_an_elastic_drivers_background_conversion_is_waited_for_only_by_its_own_fit(tmp_path, monkeypatch):
    """The driver makes the newest committed checkpoint's universal form once, beside training; a resized group's
    rank 0 waits while that fit's conversion runs, and not on a marker a gone driver left."""
    import threading
    import time

    from vitray import storage
    from vitray.train import universal

    run = tmp_path / "run"
    for step, committed in ((2, True), (4, True), (6, False)):  # step 6: a save still under way
        (run / f"step_{step:08d}").mkdir(parents=True)
        if committed:
            (run / f"step_{step:08d}" / "COMMIT").write_text("{}")
    release, calls = threading.Event(), []

    def fake_make_universal(uri, endpoint):
        calls.append(uri)
        release.wait(10)
        storage.write_bytes(storage.join(uri, universal.UNIVERSAL, "COMMIT"), b"{}", endpoint)

    monkeypatch.setattr(universal, "make_universal", fake_make_universal)
    newest = str(run / "step_00000004")
    with universal.InBackground(str(run), None, fit=1.0, poll_s=0.05) as background:
        deadline = time.time() + 10
        while not calls and time.time() < deadline:
            time.sleep(0.01)
        assert calls == [newest]
        started = time.time()
        universal.wait_for_background(newest, None, fit=2.0)  # another fit's driver: no wait
        assert time.time() - started < 0.5
        threading.Timer(0.5, release.set).start()
        universal.wait_for_background(newest, None, fit=1.0, poll_s=0.05)  # this fit's: until it is made
        assert time.time() - started >= 0.45 and (run / "step_00000004" / "universal" / "COMMIT").exists()
        time.sleep(0.3)
    assert calls == [newest] and set(background.made) == {4}  # once, and never the uncommitted step 6
