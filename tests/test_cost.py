"""Compute accounting: analytic FLOPs against PyTorch's own counter, the paper's Tables 2 and 6, ZeRO memory, the
planner. No Ray: models are built on the meta device, so even H/14 and R152x4 cost no memory."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitray import accounting, cost, paper_cost
from vitray.config import ConfigError, preset
from vitray.models.registry import MODELS, build_model, get_spec


def _sizes(name: str, spec) -> tuple[int, int]:
    if "test" in name or "smoke" in name:
        return 32, 64
    m = spec.size_multiple
    return 224 - 224 % m, 384 - 384 % m  # 224 and 384 (378 for /14, as H/14 fine-tunes outside ImageNet)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_analytic_flops_match_flop_counter(name):
    spec = MODELS[name]
    for size in _sizes(name, spec):
        with torch.device("meta"):
            model = build_model(name, num_classes=1000, image_size=size)
            counter = FlopCounterMode(display=False)
            with counter:
                model(torch.empty(1, 3, size, size))
        analytic = accounting.forward_flops(spec, size, 1000)
        assert analytic == pytest.approx(counter.get_total_flops(), rel=0.01), (name, size)


@pytest.mark.parametrize("name, published_millions", [
    # 1000-class heads, as timm publishes them for the released BiT and hybrid weights.
    ("bit_r50x1", 25.55), ("bit_r101x1", 44.54), ("bit_r152x2", 236.34), ("bit_r152x4", 936.53),
])
def test_resnet_parameter_counts(name, published_millions):
    with torch.device("meta"):
        model = build_model(name, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(published_millions, rel=0.001)


def test_hybrid_parameter_count_and_tokens():
    with torch.device("meta"):
        model = build_model("R50+ViT-B/16", num_classes=1000, image_size=384)
        tokens, _ = model.encode(torch.empty(1, 3, 384, 384))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(98.95, rel=0.001)  # timm's R50+B/16 @384
    assert tokens.shape == (1, 24 * 24 + 1, 768)  # output stride 16: one token per 16×16 pixels, as ViT-B/16


@pytest.mark.parametrize("key", list(paper_cost.TABLE6_EXAFLOPS))
def test_table6_exaflops(key):
    """Within 1 % of the paper, except BiT-R50x1's "50", printed to two figures, which we count as 50.7."""
    assert paper_cost.paper_exaflops(*key) == pytest.approx(paper_cost.TABLE6_EXAFLOPS[key], rel=0.015 if key[0] == "bit_r50x1" else 0.01)


def test_paper_convention_differs_by_padding_taps_and_the_last_blocks_tokens():
    """vitray's count (FlopCounterMode's) charges 3×3 taps on zero padding, which XLA's cost analysis does not —
    3.5–5 % of BiT's FLOPs; ViT's last block computes only the class token, which the paper's model did not."""
    bit, vit = get_spec("bit_r152x2"), get_spec("vit_b16")
    ratio = accounting.forward_flops(bit, 224, 1000) / accounting.forward_flops(bit, 224, 1000, paper=True)
    assert 1.03 < ratio < 1.06
    saved = 1 - accounting.forward_flops(vit, 224, 1000) / accounting.forward_flops(vit, 224, 1000, paper=True)
    assert 0.05 < saved < 1 / 12  # most of one block of twelve
    # one 3×3 convolution on a 7×7 map: 19 of 21 taps per axis fall inside it
    assert accounting._conv(8, 8, 3, (7, 7), skip_padding=True)[0] == pytest.approx(2 * 64 * 19 * 19)


def test_tpu_utilisation_of_vit_h14_is_32_percent():
    assert paper_cost.utilisation(paper_cost.TABLE6_EXAFLOPS[("vit_h14", 14)], 2500) == pytest.approx(0.32, abs=0.005)
    assert accounting.PEAK_FLOPS["TPUv3-core"] == 61.5e12 and accounting.PEAK_FLOPS["H100"] == 989e12


@pytest.mark.parametrize("stage, expected", [(0, 16.0), (1, 4 + 12 / 8), (2, 2 + 14 / 8), (3, 16 / 8)])
def test_zero_model_state_formulas(stage, expected):
    psi = 1_000_000
    assert sum(cost.model_state_bytes(psi, 8, stage, mixed_precision=True).values()) == pytest.approx(expected * psi)


def test_planner_refuses_what_cannot_fit_and_names_the_fix():
    cfg = preset("h14_jft").replace(scaling=dict(num_workers=8, accelerator="A100"), deepspeed=dict(zero_stage=0),
                                    optim=dict(micro_batch=256))
    est = cost.estimate(cfg, 303e6)
    assert not est.fits and est.memory["parameters"] == pytest.approx(est.params * 2)
    with pytest.raises(ConfigError, match=r"needs \d+\.\d GiB per A100 .* has 80 GiB; try a smaller optim.micro_batch") as e:
        cost.check_fits(est)
    assert "zero_stage" not in str(e.value).split("try")[1]  # activations dominate: no stage would fit
    # States that do not fit a 16 GiB TPUv3 core without ZeRO: the lowest stage that fits is named, with its figure.
    small = cost.estimate(cfg.replace(scaling=dict(accelerator="TPUv3-core"), optim=dict(micro_batch=4)), 303e6)
    with pytest.raises(ConfigError, match=r"has 16 GiB; try deepspeed.zero_stage=1 \(\d+\.\d GiB\)"):
        cost.check_fits(small)
    ok = cost.estimate(cfg.replace(deepspeed=dict(zero_stage=3), optim=dict(micro_batch=8)), 303e6)
    assert ok.fits, ok.summary()
    # 14 epochs of JFT in A100-days at 40 % MFU: compute / (peak × MFU), the paper's 4262 EF less the ~2 % that
    # vitray's class-token-only last block does not compute (1 block of 32, most of it)
    computed = paper_cost.paper_exaflops("vit_h14", 14, paper=False)
    assert 0.97 * 4262 < computed < 0.99 * 4262
    assert ok.accelerator_days == pytest.approx(computed * 1e18 / (312e12 * 0.4) / 86400, rel=0.001)


def test_activation_estimate_grows_with_batch_and_resolution():
    cfg = preset("b16_imagenet")
    base = cost.activation_bytes(cfg, micro_batch=2)
    assert cost.activation_bytes(cfg, micro_batch=4) == pytest.approx(2 * base, rel=0.01)
    big = cost.activation_bytes(cfg.replace(data=dict(image_size=384)), micro_batch=2)
    assert big > 2.5 * base  # 577 vs 197 tokens


def test_gpu_mfu_script_runs_its_code_path_on_cpu():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_mfu.py"), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=300, cwd=os.path.join(root, "benchmarks"))
    assert proc.returncode == 0 and "vit_tiny_test @ 32, batch 4:" in proc.stdout, proc.stderr[-2000:]


def test_long_runs_get_a_restart_budget_and_a_young_daly_checkpoint_interval():
    """Paper presets restart after failures (max_failures > 0), and the plan suggests checkpoint_every from the
    modelled save time and the stated node failure rate: sqrt(2 × save × MTBF / nodes). Doubling the workers halves
    each node's share of the checkpoint and the job's MTBF, so the interval in seconds halves — and so does the step
    time, leaving the interval in steps unchanged."""
    import math

    from vitray.config import PRESETS, preset
    from vitray.config.recipes import DATASETS

    assert all(PRESETS[name]().max_failures > 0 for name in PRESETS if name != "smoke")
    plans = [cost.estimate(preset("h14_jft").replace(scaling=dict(num_workers=n, accelerator="H100")),
                           DATASETS["jft"]["num_images"]) for n in (64, 128)]
    for e in plans:
        assert e.checkpoint_interval_s == pytest.approx(math.sqrt(2 * e.save_s * cost.NODE_MTBF_HOURS * 3600 / e.nodes))
        assert e.expected_failures == pytest.approx(e.wall_clock_days * 24 * e.nodes / cost.NODE_MTBF_HOURS)
        assert f"storage.checkpoint_every ≈ {e.suggested_checkpoint_every} steps (Young–Daly" in e.summary()
    assert plans[1].nodes == 2 * plans[0].nodes == 16
    assert plans[1].checkpoint_interval_s == pytest.approx(plans[0].checkpoint_interval_s / 2)
    assert plans[1].suggested_checkpoint_every == plans[0].suggested_checkpoint_every
    cpu = cost.estimate(preset("smoke"), 1500)  # no accelerator peak: no wall-clock, no suggestion
    assert cpu.suggested_checkpoint_every is None and "Young–Daly" not in cpu.summary()


def test_optimizer_offload_takes_the_optimizer_off_the_device_but_not_off_a_cpu_worker():
    cfg = preset("h14_jft").replace(deepspeed=dict(zero_stage=3), scaling=dict(accelerator="A100"))
    on_device = cost.estimate(cfg, 303e6)
    offloaded = cost.estimate(cfg.replace(deepspeed=dict(offload_optimizer=True)), 303e6)
    assert on_device.memory["optimizer"] > 0 and offloaded.memory["optimizer"] == 0
    assert offloaded.memory_total == pytest.approx(on_device.memory_total - on_device.memory["optimizer"])
    cpu = cfg.replace(scaling=dict(use_gpu=False, num_workers=2), deepspeed=dict(offload_optimizer=True))
    assert cost.estimate(cpu, 1, host=True).memory["optimizer"] > 0  # the host is the device there


def test_data_plan_counts_the_cpus_the_accelerators_need_and_names_the_remedy():
    """The data line: consumption = workers × peak × MFU ÷ FLOPs per image; CPUs = consumption ÷ Ray Data's rate per
    CPU; the cluster's CPUs are what the training workers leave on their nodes plus data nodes."""
    from vitray.data.decode_rate import RAY_DATA_EFFICIENCY

    cfg = preset("b16_i21k").replace(scaling=dict(num_workers=64, accelerator="H100", cpus_per_worker=8))
    est = cost.estimate(cfg, 14.2e6)
    plan = cost.data_plan(cfg, est, decode_per_cpu=800, decode_source="given")
    per_gpu = accounting.PEAK_FLOPS["H100"] * 0.4 / est.train_flops_per_image
    assert plan.images_per_s == pytest.approx(64 * per_gpu)
    assert 3_000 < per_gpu < 5_000  # ViT-B/16 on an H100 at 40 % MFU: ~4,000 img/s
    assert plan.cpus_needed == pytest.approx(64 * per_gpu / (800 * RAY_DATA_EFFICIENCY))
    assert plan.cpus_free == 8 * (192 - 8 * 8)  # 8 p5 nodes of 192 vCPUs, 8 workers × 8 CPUs each reserved
    assert plan.enough and plan.summary().endswith("— enough")

    slow = cost.data_plan(cfg, est, decode_per_cpu=100, decode_source="measured")
    assert not slow.enough
    short = slow.cpus_needed - slow.cpus_free
    text = slow.summary()
    assert f"short by {short:,.0f} CPUs" in text and "--max-side" in text and "data.decode_on=gpu" in text
    assert f"Add {math.ceil(short / cost.DATA_NODE_CPUS)} CPU-only data nodes" in text
    helped = cost.data_plan(cfg, est, decode_per_cpu=100, decode_source="measured", data_cpus=short + 1)
    assert helped.enough
    assert cost.data_plan(preset("smoke"), cost.estimate(preset("smoke"), 1500), 800, "given") is None  # CPU: no peak


def test_planner_measures_the_decode_rate_on_the_configured_shards(tmp_path, capsys):
    """`jobs/plan.py --set data.train_uri=…` decodes the first samples of a few shards (a few seconds, no Ray) and
    plans with that rate; a dataset that is not there is one error naming the field."""
    import io
    import tarfile

    from vitray.data import decode_rate
    from vitray.data.datasets import write_digits

    write_digits(str(tmp_path / "digits"))
    measured = decode_rate.measure(str(tmp_path / "digits" / "train"), None, 32, seconds=0.5)
    assert measured.per_cpu > 0 and measured.samples >= 100 and "shard-00000.tar" in measured.source

    with open(tmp_path / "digits" / "train" / "shard-00000.tar", "rb") as f:
        data = f.read()
    cut = decode_rate.leading_samples(data[: len(data) // 2])  # a range read ends mid-member: complete ones only
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        whole = [m.name for m in tar if m.name.endswith(".png")]
    assert 0 < len(cut) < len(whole) and [k for k, _ in cut] == [n[:-4] for n in whole[: len(cut)]]

    plan = _job("plan")
    uri = str(tmp_path / "digits" / "train")
    assert plan.main(["--preset", "b16_i21k", "--accelerator", "H100", "--set", f"data.train_uri={uri}"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("data CPUs") and f"measured on {measured.samples} samples of {uri}" in line
    assert plan.main(["--preset", "b16_i21k", "--set", f"data.train_uri={tmp_path / 'nowhere'}"]) == 2
    assert f"data.train_uri: {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def _job(name: str):
    import importlib
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
    return importlib.import_module(name)


def _every_preset():
    from vitray.config.recipes import JOB_PRESETS

    return [f"{job}:{name}" for job, table in JOB_PRESETS.items() for name in table]


@pytest.mark.parametrize("name", _every_preset())
def test_the_planner_answers_for_every_jobs_preset_on_a_named_accelerator(name, capsys):
    """Every job's preset plans (fine-tuning, DETR and iGPT ones too); a GPU recipe, which names no accelerator,
    is planned on H100s and says so, with accelerator-days; the smoke presets name no dataset and take --images."""
    plan = _job("plan")
    args = ["--preset", name] + (["--images", "1500"] if name.endswith(("smoke", "smoke_bert")) else [])
    assert plan.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    rows = dict(line.split("  ", 1) for line in out.splitlines())
    assert {"run", "memory / device", "compute", "accelerator-days"} <= {k.strip() for k in rows}
    if "× CPU" not in out:
        assert "H100 (assumed: --accelerator to change)" in out and "H100-days at MFU 40%" in out


def test_the_planner_names_what_helps_activations(capsys):
    """H/14 at 518 px with micro-batch 32 (176 GiB, nearly all activations): a smaller micro-batch helps, more
    workers do not (they divide only ZeRO's states); a run short of memory for its states is told about ZeRO."""
    plan = _job("plan")
    assert plan.main(["--preset", "h14_imagenet", "--set", "optim.micro_batch=32", "--set",
                      "scaling.num_workers=16"]) == 2
    err = capsys.readouterr().err
    assert "176.4 GiB per H100" in err and "a smaller optim.micro_batch" in err and "num_workers" not in err
    assert plan.main(["--preset", "l_imagenet32", "--set", "deepspeed.zero_stage=0", "--set", "optim.micro_batch=1",
                      "--set", "scaling.num_workers=4", "--set", "optim.global_batch=4", "--accelerator", "TPUv3-core"]) == 2
    err = capsys.readouterr().err
    assert "deepspeed.zero_stage=2" in err and "ZeRO to partition across workers" in err and "H100" not in err


def test_goodput_is_whole_without_failures_or_save_cost_and_its_best_interval_balances_the_two():
    """Young's first-order model: saves cost δ/(τ+δ), failures (τ+δ)/2M of redone work, restarts R/M. The best
    interval sqrt(2δM) grows with the MTBF and the save stall, and no other interval does better."""
    import math

    from vitray.goodput import Figure, Goodput

    free = Goodput(Figure(0.0, "x"), Figure(0.0, "x"), math.inf, "never")
    assert all(free.goodput(t) == 1.0 for t in (0.0, 60.0, 1e6)) and free.goodput() == 1.0
    base = Goodput(Figure(20.0, "x"), Figure(90.0, "x"), 30 * 3600.0, "x")
    lost = base.lost(600.0)
    assert lost["saves"] == pytest.approx(20 / 620) and lost["restarts"] == pytest.approx(90 / (30 * 3600))
    assert lost["failures"] == pytest.approx(620 / (2 * 30 * 3600))
    assert base.goodput(600.0) == pytest.approx(1 - sum(lost.values()))
    best = base.best_interval_s
    assert all(base.goodput(best) >= base.goodput(best * f) for f in (0.25, 0.5, 0.9, 1.1, 2, 4))
    rarer = Goodput(base.save, base.restart, 4 * base.mtbf_s, "x")
    slower = Goodput(Figure(80.0, "x"), base.restart, base.mtbf_s, "x")
    assert rarer.best_interval_s == pytest.approx(2 * best) and slower.best_interval_s == pytest.approx(2 * best)
    assert rarer.goodput() > base.goodput() > slower.goodput()
    costlier = Goodput(base.save, Figure(900.0, "x"), base.mtbf_s, "x")  # a restart moves goodput, not the interval
    assert costlier.best_interval_s == best and costlier.goodput() < base.goodput()
    with pytest.raises(ValueError):
        Figure(float("nan"), "x")


def test_measured_figures_replace_modelled_ones_and_say_where_they_come_from():
    from vitray import goodput

    est = cost.estimate(preset("h14_jft").replace(scaling=dict(accelerator="H100")), 303e6)
    modelled = goodput.for_run(est.checkpoint_bytes, est.nodes)
    assert modelled.save.seconds == pytest.approx(est.save_s) and modelled.save.source.startswith("modelled")
    assert modelled.mtbf_s == pytest.approx(cost.NODE_MTBF_HOURS * 3600 / est.nodes)
    assert modelled.best_interval_s == pytest.approx(est.checkpoint_interval_s)  # the planner's Young–Daly, as before
    row = {"model": "vit_h14", "image_size": 224, "time": "2026-12-06T00:00:00Z", "machine": {"cpu": "EPYC"},
           "rehearsed": {"workers": 2, "gpu": False}, "save_stall_s": 2.5, "save_s": 30.0,
           "restart": {"to_first_step_s": 70.0}, "resize": {"to_first_step_s": 95.0}}
    figures = goodput.measured(row, "r.json")
    fixed = goodput.for_run(est.checkpoint_bytes, est.nodes, figures)
    assert (fixed.save.seconds, fixed.restart.seconds) == (2.5, 70.0)  # the stall, not the whole save
    assert fixed.save.source.startswith("measured: rehearsal of vit_h14 @ 224 px") and "r.json" in fixed.save.source
    elastic = goodput.for_run(est.checkpoint_bytes, est.nodes, figures, elastic=True)
    assert elastic.restart.seconds == 2 * 95.0 and "two resizes" in elastic.restart.source
    old = {k: v for k, v in row.items() if k not in ("save_stall_s", "restart", "resize")}  # synchronous saves
    assert set(goodput.measured(old)) == {"save"} and goodput.measured(old)["save"].seconds == 30.0
    assert goodput.matching([row, {**row, "time": "later", "save_stall_s": 1.0}, {**row, "model": "vit_l16"}],
                            "vit_h14", 224)["save_stall_s"] == 1.0  # the newest of the model's rows


def test_the_plan_prints_goodput_with_the_rehearsal_it_was_given(tmp_path, capsys):
    import json

    plan = _job("plan")
    row = {"model": "vit_h14", "image_size": 224, "time": "2026-12-06T00:00:00Z", "machine": {"cpu": "EPYC"},
           "rehearsed": {"workers": 2, "gpu": False}, "save_stall_s": 3.0, "save_s": 29.0,
           "restart": {"to_first_step_s": 120.0}, "resize": {"skipped": "one worker"}}
    (tmp_path / "rehearsal.json").write_text(json.dumps(row))
    assert plan.main(["--rehearsal", str(tmp_path / "rehearsal.json")]) == 0
    rows = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert rows["save stall"].strip().startswith("3.0 s per save — measured: rehearsal of vit_h14")
    assert rows["restart"].strip().startswith("120.0 s to the first step — measured")
    assert "Llama 3" in rows["failures"] and "% at best, saving every" in rows["goodput"]
    assert plan.main(["--rehearsal", str(tmp_path / "rehearsal.json"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)["goodput"]
    assert plan.main(["--rehearsal", "none", "--json"]) == 0
    modelled = json.loads(capsys.readouterr().out)["goodput"]
    assert measured["save_stall_s"] == 3.0 and measured["restart_s"] == 120.0
    assert modelled["save_stall_source"].startswith("modelled") and modelled["restart_source"].startswith("modelled")
    # a longer stall than modelled saves less often; a costlier restart loses more
    assert measured["best_interval_s"] > modelled["best_interval_s"] and measured["goodput"] < modelled["goodput"]
    assert plan.main(["--rehearsal", str(tmp_path / "rehearsal.json"), "--model", "vit_l16"]) == 2
    assert "holds no rehearsal of vit_l16 @ 224 px" in capsys.readouterr().err
