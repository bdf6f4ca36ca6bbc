"""Scaling studies: the analysis (frontier, fits, compute-optimal, Figure 5), the checks before any trial, and a
real study on Ray Tune — killed after its first finished trial, resumed, and run to the end."""
import io
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from vitray import faults, storage
from vitray.config import ConfigError, smoke
from vitray.storage import Endpoint
from vitray.tune import scaling
from vitray.tune.study import check, max_concurrent, smoke as smoke_study, trial_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_JOB = os.path.join(ROOT, "jobs", "scaling_study.py")


def _row(model, family, exaflops, accuracy, budget=1):
    return {"trial": f"{model}-{budget}", "model": model, "family": family, "pretrain_exaflops": exaflops,
            "transfer_accuracy": accuracy, "status": "finished", "budget": budget, "budget_unit": "epochs",
            "transfer": "10-shot"}


def test_frontier_fits_and_compute_optimal_model():
    # Two ViT sizes on exact power laws: the small one is better at low compute, the large one at high compute.
    small = lambda c: 1 - 0.40 * c**-0.05  # noqa: E731  accuracy; error = a · C^-b
    large = lambda c: 1 - 0.60 * c**-0.20  # noqa: E731
    rows = [_row("vit_s", "vit", c, small(c), b) for b, c in ((1, 1.0), (2, 10.0))]
    rows += [_row("vit_l", "vit", c, large(c), b) for b, c in ((1, 4.0), (2, 40.0))]
    rows += [_row("bit", "bit", 2.0, 0.3), {**_row("bit", "bit", 1.0, None), "status": "stopped"}]

    front = scaling.pareto_frontier(rows)
    assert [r["trial"] for r in front] == ["vit_s-1", "vit_s-2", "vit_l-2"]  # vit_l-1 (4 EF) trails vit_s-1 (1 EF)
    assert all(b["transfer_accuracy"] > a["transfer_accuracy"] for a, b in zip(front, front[1:]))

    fits = scaling.fits(rows)
    assert fits["models"]["vit_s"]["a"] == pytest.approx(0.40) and fits["models"]["vit_s"]["b"] == pytest.approx(0.05)
    assert fits["models"]["vit_l"]["b"] == pytest.approx(0.20)
    assert "bit" not in fits["families"]  # one compute value: no fit, and no made-up one
    assert all(math.isfinite(v) for v in (fits["families"]["vit"]["a"], fits["families"]["vit"]["b"]))
    # The crossover of 0.40 C^-0.05 and 0.60 C^-0.20 is at C = 1.5^(1/0.15) ≈ 14.9 exaFLOPs.
    optimal = scaling.compute_optimal(fits["models"], [2.0, 100.0])
    assert [o["per_family"]["vit"]["model"] for o in optimal] == ["vit_s", "vit_l"]
    assert optimal[1]["predicted_accuracy"] == pytest.approx(large(100.0))

    from PIL import Image

    png = Image.open(io.BytesIO(scaling.figure5(rows, fits)))
    png.verify()
    assert png.format == "PNG" and png.size == (640, 480)
    header, first = scaling.table_csv(rows).splitlines()[:2]
    assert header.split(",")[:3] == ["trial", "family", "model"] and len(scaling.table_csv(rows).splitlines()) == 7


def test_budgets_become_steps_and_bad_grids_fail_before_any_trial():
    endpoint = Endpoint()
    study = smoke_study()
    cfg = trial_config(study, "vit_smoke", 3.0, [], "/tmp/s", endpoint)
    assert cfg.optim.epochs == 3.0 and cfg.storage.run_name == "vit_smoke-3ep" and cfg.model.num_classes == 5
    import dataclasses

    from vitray import accounting
    from vitray.models.registry import get_spec

    flops_study = dataclasses.replace(study, budget_unit="exaflops")
    per_step = 64 * accounting.train_flops_per_image(accounting.forward_flops(get_spec("vit_smoke"), 16, 5, True))
    assert trial_config(flops_study, "vit_smoke", 100.5 * per_step / 1e18, [], "/tmp/s", endpoint).optim.total_steps == 100

    bad = dataclasses.replace(flops_study, points=(("vit_nope", 1e-9), ("vit_smoke", 1e-15), ("bit_smoke", -1)))
    with pytest.raises(ConfigError) as e:
        check(bad, ["data.train_uri=/x"], "/tmp/s", endpoint)
    msg = str(e.value)
    assert "unknown model 'vit_nope'" in msg
    assert "vit_smoke @ 1e-15 exaflops: study budget: 1e-15 exaFLOPs is less than one step of vit_smoke" in msg
    assert "-1 exaflops for bit_smoke must be positive" in msg

    # Trials must fit the cluster: 8 workers × 0.5 CPU + 1 for data is 5 CPUs.
    many = [smoke().replace(scaling=dict(num_workers=8), storage=dict(run_name="big"))]
    with pytest.raises(ConfigError, match=r"trial big needs 5 CPU .* the cluster has 4"):
        max_concurrent(many, {"CPU": 4.0})
    assert max_concurrent([smoke()] * 5, {"CPU": 4.0}) == 2  # 2 workers × 0.5 + 1 = 2 CPUs per trial
    assert max_concurrent([smoke().replace(scaling=dict(autoscale=True, num_workers=8))], {"CPU": 4.0}) == 1

    # --asha: trials checkpoint (and so report their loss) 4 times; ASHA compares them at equal optimizer steps.
    from vitray.tune.run import _scheduler

    assert _scheduler(study, [cfg]) is None
    every = [cfg.replace(storage=dict(checkpoint_every=n)) for n in (5, 20)]
    asha = _scheduler(dataclasses.replace(study, asha=True), every)
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t) == ("step", "loss", "min", 81)


def _study_job(*args, **kw):
    return [sys.executable, STUDY_JOB, "--preset", "smoke", *args]


def test_study_job_refuses_unknown_models_and_clusters_too_small(tmp_path, ray_cluster):
    proc = subprocess.run(_study_job("--study-uri", str(tmp_path / "a"), "--models", "vit_smoke,vit_nope",
                                     "--budgets", "1,2"), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "unknown model 'vit_nope'" in proc.stderr, proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr and not (tmp_path / "a").exists()
    # On the session's Ray cluster (4 CPUs): one trial of 8 workers cannot be placed at all.
    from vitray.tune.run import run_study

    with pytest.raises(ConfigError, match=r"needs 5 CPU \(8 workers × 0.5 CPU \+ 1 for its data\) but the cluster has 4"):
        run_study(smoke_study(), ["scaling.num_workers=8", "optim.micro_batch=8"], str(tmp_path / "b"), Endpoint())
    assert not (tmp_path / "b").exists()  # no trial, nothing written


def _tensorboard_tags(data: bytes) -> set[str]:
    """Scalar tags in a TensorBoard event file (TFRecord framing: length, crc, event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    tags, i = set(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = Event.FromString(data[i + 12:i + 12 + n])
        tags |= {v.tag for v in event.summary.value}
        i += 12 + n + 4
    return tags


@pytest.mark.e2e
@pytest.mark.early  # 4 minutes: it must not be the last test of a lane (tests/conftest.py)
def test_study_killed_after_its_first_trial_resumes_only_the_rest(s3):
    """2 families × 2 budgets on S3, 1 worker per trial, two trials at a time (a local Ray of 4 logical CPUs, as
    the session cluster). The study (driver and its local Ray) is killed once a trial has finished; --resume runs
    the others only, then writes the table, the fits and Figure 5."""
    uri = f"s3://{s3.bucket}/studies/killed"
    args = _study_job("--study-uri", uri, "--endpoint-url", s3.endpoint.url, "--models", "vit_smoke_s,bit_smoke_s",
                      "--budgets", "6,12", "--budget-unit", "steps", "--set", "scaling.num_workers=1",
                      "--local-cpus", "4")
    env = {**os.environ, "PYTHONPATH": ROOT}
    job = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    trials = storage.join(uri, "trials")
    try:
        faults.wait_for(lambda: storage.exists(trials, s3.endpoint) and storage.list_files(trials, s3.endpoint),
                        600, what="the study's first finished trial")
    finally:
        faults.kill_job(job)  # the driver and the Ray processes it started, all gone before the records are read
    finished = {name: storage.read_bytes(storage.join(trials, name), s3.endpoint)
                for name in storage.list_files(trials, s3.endpoint)}
    assert 1 <= len(finished) < 4

    proc = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"4 trials ({len(finished)} finished earlier), up to 2 at a time" in proc.stdout
    for name, record in finished.items():
        assert storage.read_bytes(storage.join(trials, name), s3.endpoint) == record  # not run again
        key = json.loads(record)["trial"]
        metrics = storage.read_bytes(storage.join(uri, "runs", key, "metrics.jsonl"), s3.endpoint).decode()
        assert sum('"event": "startup"' in line for line in metrics.splitlines()) == 1  # trained once, in session 1
    rows = json.loads(storage.read_bytes(storage.join(uri, "results.json"), s3.endpoint))
    assert sorted(r["trial"] for r in rows) == sorted(
        f"{m}-{b}steps" for m in ("vit_smoke_s", "bit_smoke_s") for b in (6, 12))
    for r in rows:
        assert r["status"] == "finished" and r["steps"] == r["budget"] and r["images_seen"] == 64 * r["steps"]
        assert 0.2 < r["transfer_accuracy"] <= 1.0 and r["transfer"] == "10-shot"  # chance on digits 5–9 is 0.2
        assert r["pretrain_exaflops"] > 0 and r["accelerator_days"] > 0 and r["wall_clock_s"] > 0
        assert math.isfinite(r["final_loss"])
    csv = storage.read_bytes(storage.join(uri, "results.csv"), s3.endpoint).decode().splitlines()
    assert len(csv) == 1 + 4

    fits = json.loads(storage.read_bytes(storage.join(uri, "fits.json"), s3.endpoint))
    assert set(fits["families"]) <= {"vit", "bit"} and fits["models"].keys() == {"vit_smoke_s", "bit_smoke_s"}
    assert all(np.isfinite([f["a"], f["b"]]).all() for f in fits["models"].values())
    assert fits["compute_optimal"] and "compute-optimal at" in proc.stdout

    from PIL import Image

    png = Image.open(io.BytesIO(storage.read_bytes(storage.join(uri, "figure5.png"), s3.endpoint)))
    png.verify()
    assert png.format == "PNG" and png.size == (640, 480)

    # Tune's per-trial logs, TensorBoard included, hold the reported metrics.
    tune_dir = storage.join(uri, "tune")
    events = [storage.join(tune_dir, d, f) for d in storage.list_files(tune_dir, s3.endpoint)
              for f in storage.list_files(storage.join(tune_dir, d), s3.endpoint) if "events.out.tfevents" in f]
    assert len(events) >= 4
    tags = set().union(*(_tensorboard_tags(storage.read_bytes(f, s3.endpoint)) for f in events))
    assert {"ray/tune/transfer_accuracy", "ray/tune/pretrain_exaflops"} <= tags, tags
