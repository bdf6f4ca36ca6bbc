"""Real Ray Train + DeepSpeed runs on 2 CPU workers: ZeRO stages, checkpoints in S3, resume, fine-tuning, evaluation."""
import json
import os

import pytest

from vitray import storage
from vitray.config import smoke
from vitray import session
from vitray.config.schema import apply_overrides
from vitray.train import launch

from reference import metrics, overrides


def _config(s3, digits, run_name, **changes):
    cfg = smoke().replace(
        model=dict(name="vit_smoke", num_classes=10),
        data=dict(builtin="", train_uri=digits["train"], val_uri="", image_size=16, shuffle_buffer=128, crop_area_min=1.0),
        optim=dict(global_batch=32, micro_batch=8, warmup_steps=3, lr=3e-3, schedule="linear", total_steps=40),
        storage=dict(uri=f"s3://{s3.bucket}/test-runs", endpoint_url=s3.endpoint.url, run_name=run_name),
        log_every=1,
    )
    return cfg.replace(**changes)


def _metrics(plan):
    return metrics(plan.run_uri, plan.endpoint)


def _zero_run(s3, digits, zero, *more, resume=False):
    """The reference run (tests/reference.py) at another ZeRO stage: saves at steps 10, 20 and 30 made in the
    background (storage.async_save, the default), the final one at 40."""
    cfg, plan = launch.prepare(apply_overrides(smoke(), [*overrides(s3, digits, f"zero{zero}"),
                                                         f"deepspeed.zero_stage={zero}", *more]), resume=resume)
    result = launch.fit(cfg, plan)
    assert result.error is None
    return plan, result


@pytest.fixture(scope="module")
def zero2_run(reference_run):
    """ZeRO-2 (the smoke recipe's stage) is the session's reference run: its final checkpoint is where the
    evaluation and fine-tuning tests below start (one run where two would cost another half minute of Ray Train)."""
    return reference_run["plan"], reference_run["result"]


@pytest.fixture(scope="module")
def pretrained(zero2_run):
    """A short ZeRO-2 pretraining run at 16 px (40 steps); its final checkpoint's URI."""
    return storage.join(zero2_run[0].run_uri, "step_00000040")


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_stage_trains_with_falling_loss(ray_cluster, s3, digits, zero, zero2_run):
    plan, result = zero2_run if zero == 2 else _zero_run(s3, digits, zero)
    rows = [r for r in _metrics(plan) if "loss" in r and "final" not in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.1, (first, last)
    assert all(r["images_per_s"] > 0 and r["accelerator_hours"] > 0 and 0 < r["mfu"] < 1 for r in rows)
    # The share of step time spent waiting for data, on every line and for the run (mean and slowest worker).
    assert all(0 <= r["data_wait"] <= r["data_wait_max"] <= 1 for r in rows)
    assert 0 <= result.metrics["data_wait"] <= result.metrics["data_wait_max"] <= 1
    assert result.checkpoint.path.endswith("step_00000040")
    if zero == 1:  # this process started the session's Ray: its fits start no placement-group cleaner
        # (`train/trainer.py`); this run passes Ray Train no dataset, so it started no dataset manager either.
        from ray.util.state import list_actors

        node = ray_cluster._private.worker.global_worker.node  # this cluster's dashboard: the other lane has its own
        ours = list_actors(address="http://" + node.address_info["webui_url"].removeprefix("http://"), limit=10_000,
                           filters=[("job_id", "=", ray_cluster.get_runtime_context().get_job_id())])
        assert {"PlacementGroupCleaner", "DatasetManager"}.isdisjoint(a.class_name for a in ours)
        assert any(a.class_name == "TrainController" for a in ours)  # the listing does see this job's fits
        # No Python worker prestarted for no job (`session.LOCAL_RAYLET`): a worker's log name carries its job id.
        import glob

        assert glob.glob(os.path.join(node.get_logs_dir_path(), "worker-*-01000000-*.out"))  # the pattern matches ours
        assert not glob.glob(os.path.join(node.get_logs_dir_path(), "worker-*-ffffffff-*.out"))

    # ZeRO's memory formulas against the tensors each rank really holds (fp32 on CPU, 2 ranks).
    from vitray import cost

    params = 143_114  # vit_smoke with its pre-logits layer and a 10-class head
    formula = cost.model_state_bytes(params, world=2, zero_stage=zero, mixed_precision=False)
    measured = result.metrics["model_state_bytes"]
    assert measured["parameters"] == pytest.approx(formula["parameters"], rel=0.10)
    assert measured["optimizer"] == pytest.approx(formula["optimizer"], rel=0.10)

    # The weights others load (model.safetensors, gathered at save time) are exactly the fp32 weights DeepSpeed's own
    # zero_to_fp32 rebuilds from the saved partitions (unpickling is fine here: this test wrote them).
    import tempfile

    import pyarrow.fs as pafs
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vitray.checkpoints import load_model

    for step in (20, 40):  # written from host copies in the background, and synchronously at the end
        final = storage.join(plan.run_uri, f"step_{step:08d}")
        with tempfile.TemporaryDirectory() as local:
            fs, path = storage.resolve(final, plan.endpoint)
            pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            rebuilt = get_fp32_state_dict_from_zero_checkpoint(local, tag="state")
        model, meta = load_model(final, plan.endpoint)
        assert meta["weights"] == "raw" and sorted(model.state_dict()) == sorted(rebuilt)
        assert all(torch.equal(v, rebuilt[k]) for k, v in model.state_dict().items())
    # The background save: training stood still only for the gather and the host copy; the marker came after
    # every rank's upload.
    events = _metrics(plan)
    saves = [r for r in events if r.get("event") == "checkpoint"]
    commits = [r for r in events if r.get("event") == "committed"]
    assert [r["step"] for r in saves] == [r["step"] for r in commits] == [10, 20, 30]
    for saved, committed in zip(saves, commits):
        assert saved["snapshot_bytes"] > 0 and committed["upload_s"] > 0
        assert saved["gather_s"] + saved["state_s"] <= saved["save_stall_s"] < committed["save_s"]

    if zero == 3:  # saved by 2 workers, resumed on 1: DeepSpeed's universal checkpoint reshards ZeRO-3 too
        saved = json.loads(storage.read_bytes(storage.join(plan.run_uri, "step_00000040", "vitray.json"), plan.endpoint))
        more_plan, _ = _zero_run(s3, digits, 3, "scaling.num_workers=1", "optim.total_steps=42", resume=True)
        (resumed,) = [r for r in _metrics(more_plan) if r.get("event") == "resumed"]
        assert resumed["resharded"] and resumed["step"] == 40
        assert resumed["model_digest"] == pytest.approx(saved["model_digest"], rel=1e-12)
        assert resumed["optimizer_digest"] == pytest.approx(saved["optimizer_digest"], rel=1e-9)
        assert resumed["positions"] == result.metrics["data_position"]  # both data partitions go on where they stood


def _ft_config(s3, digits, pretrained):
    from vitray.config import preset
    from vitray.config.recipes import FINETUNE_PRESETS

    return preset("smoke", FINETUNE_PRESETS).replace(
        data=dict(builtin="", train_uri=digits["train"], val_uri="", image_size=24, shuffle_buffer=128),
        # A linear schedule: the resume test below recomputes its LR with DeepSpeed's own WarmupDecayLR.
        optim=dict(total_steps=8, warmup_steps=2, global_batch=32, micro_batch=8, schedule="linear"),
        transfer=dict(init_from=pretrained, ema_decay=0.9),
        storage=dict(uri=f"s3://{s3.bucket}/test-runs", endpoint_url=s3.endpoint.url, run_name="ft-ema",
                     checkpoint_every=3, keep_checkpoints=2),
        log_every=1,
    )


@pytest.fixture(scope="module")
def finetuned(ray_cluster, s3, digits, pretrained):
    """One fine-tuning run of 8 steps, stopped at step 4 (`stop_at_step`, which checkpoints there) and resumed to
    the end: the fine-tuning, the resume and the divergence tests below all read it (each pair of fits costs about
    a minute of Ray Train start-up). {"stopped": step 4's vitray.json, "stopped_ema" / "stopped_raw": its averaged
    and raw weights, "cfg" / "plan": the resumed run's, "rows": its metrics.jsonl}."""
    cfg, plan = launch.prepare(_ft_config(s3, digits, pretrained).replace(stop_at_step=4))
    assert launch.fit(cfg, plan).error is None
    kept = [name for name in storage.list_files(plan.run_uri, plan.endpoint) if name.startswith("step_")]
    assert kept == ["step_00000003", "step_00000004"]  # the periodic save at 3, the stop's at 4 between two (keep 2)
    stopped = json.loads(storage.read_bytes(storage.join(plan.run_uri, "step_00000004", "vitray.json"), plan.endpoint))
    ema = _safetensors(storage.join(plan.run_uri, "step_00000004", "ema.safetensors"), plan.endpoint)
    raw = _safetensors(storage.join(plan.run_uri, "step_00000004", "model.safetensors"), plan.endpoint)

    cfg, plan = launch.prepare(_ft_config(s3, digits, pretrained), resume=True)
    result = launch.fit(cfg, plan)
    assert result.error is None and result.metrics["step"] == 8
    return {"stopped": stopped, "stopped_ema": ema, "stopped_raw": raw, "cfg": cfg, "plan": plan,
            "rows": _metrics(plan)}


def _safetensors(uri, endpoint):
    import safetensors.torch

    return safetensors.torch.load(storage.read_bytes(uri, endpoint))


def test_checkpoint_then_resume_continues_exactly(finetuned):
    import deepspeed.runtime.lr_schedules as schedules
    import torch

    saved, rows, cfg = finetuned["stopped"], finetuned["rows"], finetuned["cfg"]
    assert saved["step"] == 4
    resumed = [r for r in rows if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 4
    assert resumed[0]["optimizer_digest"] == saved["optimizer_digest"] and saved["optimizer_digest"] > 0
    assert resumed[0]["positions"] == {"0": [0, 4 * 16], "1": [0, 4 * 16]}  # each data partition: 4 steps × 16 samples
    steps = [r["step"] for r in rows if "loss" in r and "final" not in r]
    assert steps == list(range(1, 9))  # history kept, no step repeated or skipped

    # The LR schedule continued: step 5's LR is what DeepSpeed's schedule gives after 5 steps, not after 1.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    schedule = schedules.WarmupDecayLR(opt, total_num_steps=8, warmup_min_lr=0.0, warmup_max_lr=cfg.optim.lr,
                                       warmup_num_steps=2, warmup_type="linear")
    for _ in range(5):
        schedule.step()
    lr5 = next(r["lr"] for r in rows if r.get("step") == 5 and "lr" in r)
    assert lr5 == pytest.approx(schedule.get_lr()[0], rel=1e-9)


def test_finetune_from_checkpoint_with_ema_that_survives_resume(finetuned):
    import math

    import torch

    rows, plan, saved = finetuned["rows"], finetuned["plan"], finetuned["stopped"]
    # The new head is zero-initialised: the first loss is exactly that of uniform logits over 10 classes.
    assert next(r["loss"] for r in rows if r.get("step") == 1 and "loss" in r) == pytest.approx(math.log(10), abs=1e-5)
    ema, raw = finetuned["stopped_ema"], finetuned["stopped_raw"]
    assert ema["module.pos_embed"].shape == raw["pos_embed"].shape == (1, 37, 64)  # 6×6 patches + class token
    assert not torch.allclose(ema["module.pos_embed"], raw["pos_embed"])  # averaged weights lag the raw ones
    resumed = next(r for r in rows if r.get("event") == "resumed")
    assert resumed["ema_digest"] == pytest.approx(saved["ema_digest"], rel=1e-12) and resumed["step"] == 4

    # Evaluation loads the averaged weights by default; the raw ones on request.
    from vitray.train import checkpoint
    from vitray.checkpoints import load_model

    final = storage.join(plan.run_uri, "step_00000008")
    averaged, meta = load_model(final, plan.endpoint)
    raw, _ = load_model(final, plan.endpoint, weights="raw")
    assert meta["weights"] == "ema" and meta["step"] == 8
    assert checkpoint.module_digest(averaged) == pytest.approx(
        json.loads(storage.read_bytes(storage.join(final, "vitray.json"), plan.endpoint))["ema_digest"], rel=1e-12)
    assert not torch.allclose(averaged.pos_embed, raw.pos_embed)


def test_frozen_features_over_ray_data_for_fewshot(ray_cluster, s3, digits, pretrained):
    from vitray.eval.features import FINAL, extract_splits
    from vitray.eval.linear import fewshot, linear_probe

    (train, ty), (val, vy) = extract_splits(pretrained, [digits["train"], digits["val"]], s3.endpoint, image_size=16,
                                            layers=(FINAL, 1))
    # Every sample exactly once; pre-logit width 64, and the width-64 tokens after block 1, in one pass.
    assert train[FINAL].shape == train[1].shape == (1500, 64) and val[FINAL].shape == (297, 64)
    assert sorted(set(ty.tolist())) == list(range(10))
    res = fewshot(train[FINAL], ty, val[FINAL], vy, shots=(10,), seeds=(0, 1))
    assert res[10][0] > 0.2  # twice chance after 40 pretraining steps
    assert linear_probe(train[1], ty, val[1], vy) > 0.5  # an intermediate layer, iGPT-style


def test_top1_over_ray_data_counts_every_sample_exactly(ray_cluster, s3, digits, pretrained):
    import numpy as np
    import torch
    from PIL import Image

    from vitray.data.datasets import digits_arrays
    from vitray.data.transforms import center_crop
    from vitray.eval.features import top1
    from vitray.checkpoints import load_model

    accuracy, count = top1(pretrained, digits["val"], s3.endpoint, image_size=16, actors=2, batch_size=50)
    # The same checkpoint applied here, in one process, to the same 297 images.
    images, labels = digits_arrays("val")
    x = np.stack([np.asarray(center_crop(Image.fromarray(a).convert("RGB"), 16)) for a in images])
    model, meta = load_model(pretrained, s3.endpoint)
    with torch.no_grad():
        pred = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1).argmax(-1).numpy()
    assert count == 297 and meta["weights"] == "raw" and meta["step"] == 40
    assert accuracy == pytest.approx(float((pred == labels).mean()), abs=1e-12)


def _evaluate_job():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "evaluate.py")
    spec = importlib.util.spec_from_file_location("evaluate_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_evaluate_job_runs_every_protocol_and_checks_layers_first(ray_cluster, s3, digits, pretrained, capsys):
    main = _evaluate_job()
    common = ["--checkpoint", pretrained, "--test", digits["val"], "--endpoint-url", s3.endpoint.url]
    assert main([*common, "--layers", "final,9"]) == 2
    assert "--layers: 9 is not final or a block index 0..4" in capsys.readouterr().err
    assert main([*common, "--eval", "probe"]) == 2
    assert "need --train" in capsys.readouterr().err

    assert main([*common, "--train", digits["train"], "--layers", "final,2", "--shots", "1,5", "--seeds", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"]["samples"] == 297 and result["test_samples"] == 297 and result["train_samples"] == 1500
    assert set(result["fewshot"]) == {"1", "5"} and set(result["linear_probe"]) == {"final", "2"}
    assert result["fewshot"]["5"]["mean"] > result["fewshot"]["1"]["mean"] - 0.05 and result["fewshot"]["5"]["std"] >= 0


def test_hybrid_baseline_trains_on_the_same_engine_and_evaluates(ray_cluster, s3, digits):
    """The R50+ViT hybrid (a tiny version) through the same job path, its checkpoint readable by the evaluation and
    inspection tools, and the run's accelerator-days row appended. (The BiT ResNet baseline: the DETR chain's
    backbone run, `test_detection.py`.)"""
    import numpy as np

    from vitray.eval.features import FINAL, extract
    from vitray.eval.inspect import inspect, load_for_inspection, load_images

    model = "hybrid_tiny_test"
    cfg, plan = launch.prepare(_config(s3, digits, f"cnn-{model}", model=dict(name=model), data=dict(image_size=32),
                                       optim=dict(total_steps=6), log_every=2))
    summary = launch.run(cfg)
    assert summary["step"] == 6 and summary["checkpoint"].endswith("step_00000006")
    rows = [r for r in _metrics(plan) if "loss" in r and "final" not in r]
    assert rows and all(r["mfu"] > 0 for r in rows)
    features, labels = extract(summary["checkpoint"], digits["val"], s3.endpoint, image_size=32, layers=(FINAL, 1))
    assert len(labels) == 297 and features[FINAL].shape[0] == features[1].shape[0] == 297
    # Inspection (jobs/inspect_vit.py) reads hybrids: attention and position embeddings, no linear patch filters.
    vit, _ = load_for_inspection(summary["checkpoint"], s3.endpoint)
    images, _ = load_images(digits["val"], s3.endpoint, 2, (32, 32))
    report = inspect(vit, images, storage.join(plan.run_uri, "inspect"), s3.endpoint)
    assert "skipped" in report["filters"] and "filters.png" not in report["figures"]
    assert np.array(report["attention_distance"]["per_layer_head"]).shape == (2, 2)

    log = storage.read_bytes(storage.join(plan.run_uri.rsplit("/", 1)[0], "accelerator_days.jsonl"), s3.endpoint).decode()
    row = next(json.loads(line) for line in log.splitlines() if json.loads(line)["run"] == plan.run_name)
    assert row["model"] == model and row["workers"] == 2 and row["zero_stage"] == 2 and row["steps"] == 6
    assert row["images_per_s_per_accelerator"] > 0 and 0 < row["mfu"] < 1 and row["memory_per_device_gib"] > 0
    assert row["projected_accelerator_days"]["jft_14ep"] == pytest.approx(2 * row["projected_accelerator_days"]["jft_7ep"])


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(s3, digits, pretrained, finetuned):
    """The fine-tuning run above, resumed once more with an absurd learning rate: the weights overflow within a few
    steps, the run stops with one line saying so, and nothing is saved after its last good checkpoint (every save is
    checked first). The last test to use `finetuned`: it leaves that run diverged."""
    import re

    cfg, plan = launch.prepare(_ft_config(s3, digits, pretrained).replace(
        optim=dict(total_steps=12, lr=1e37, warmup_steps=1), storage=dict(checkpoint_every=2)), resume=True)
    assert plan.run_uri == finetuned["plan"].run_uri
    with pytest.raises(Exception) as failure:  # Ray Train V2 raises the workers' error from fit()
        result = launch.fit(cfg, plan)
        raise RuntimeError(str(result.error))
    found = re.search(r"non-finite training loss by step (\d+); stopping without saving: the latest checkpoint "
                      r"\(step (\d+)\) is kept as it was", str(failure.value))
    assert found, str(failure.value)[-2000:]
    diverged, kept = int(found.group(1)), int(found.group(2))
    assert 8 <= kept < diverged
    saved = [name for name in storage.list_files(plan.run_uri, plan.endpoint) if name.startswith("step_")]
    assert max(saved) == f"step_{kept:08d}", saved  # nothing saved after the divergence


def test_workers_that_would_starve_ray_data_or_overfill_the_cluster_are_refused(ray_cluster):
    """2 workers × 1 CPU on a 2-CPU machine once hung silently: the workers held every CPU and Ray Data's read tasks
    could never run. Now the driver refuses it before Ray Train asks for anything (the session cluster has 4 CPUs)."""
    from vitray.config import ConfigError

    cfg = smoke()
    session.check_cluster(cfg)  # 2 × 0.5 CPUs: room for Ray Data
    with pytest.raises(ConfigError, match=r"2 workers × 2 CPUs take all 4 CPUs .* none for Ray Data.* at most 1\.5"):
        session.check_cluster(cfg.replace(scaling=dict(cpus_per_worker=2)))
    with pytest.raises(ConfigError, match=r"2 workers × 3 CPUs = 6 CPUs, but the Ray cluster has 4"):
        session.check_cluster(cfg.replace(scaling=dict(cpus_per_worker=3)))
    with pytest.raises(ConfigError, match=r"needs 2 GPU workers but the Ray cluster has no GPUs"):
        session.check_cluster(cfg.replace(scaling=dict(use_gpu=True)))
    session.check_cluster(cfg.replace(scaling=dict(cpus_per_worker=3, autoscale=True)))  # nodes come on demand



def test_the_weights_digest_ignores_zero3_padding_at_three_workers():
    """On 3 ranks ZeRO-3's last slices are padded with memory nobody wrote; the digest a restore is checked against
    must be the plain model's sum of |w| on every rank, whatever that memory holds (in process: no Ray)."""
    import subprocess
    import sys

    from vitray.storage import free_port

    probe = os.path.join(os.path.dirname(__file__), "digest_probe.py")
    done = subprocess.run([sys.executable, probe, str(free_port())], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum(r["padded"] for r in ranks) > 0  # the case the fix is for
    assert all(r["digest"] == pytest.approx(r["plain"], rel=1e-9) for r in ranks), ranks

