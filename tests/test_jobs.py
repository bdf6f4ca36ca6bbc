"""The entry scripts as users run them: bad input stops before Ray with one clear error; `ray job submit` works."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "pretrain_vit_h14.py")


def _job(*args):
    """The training job, stopping before Ray (in this process: `conftest.run_job`)."""
    return run_job("pretrain_vit_h14.py", *args)


def _assert_clean_error(proc, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Started a local Ray instance" not in out and "ray.init" not in out  # no cluster resource requested


def test_default_recipe_without_data_says_what_to_pass():
    _assert_clean_error(_job(), "data.train_uri", "--set data.train_uri=s3://")


@pytest.mark.parametrize("override, field", [
    ("model.name=vit_x99", "model.name: unknown model 'vit_x99'"),
    ("data.image_size=18", "data.image_size: 18 is not divisible by the patch size 4"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
    ("optim.global_batch=48", "optim.global_batch: 48 is not divisible by scaling.num_workers × optim.micro_batch"),
])
def test_bad_config_fields(override, field):
    _assert_clean_error(_job("--preset", "smoke", "--set", override), field)


def test_missing_and_empty_data_uris(tmp_path):
    missing = tmp_path / "missing"
    _assert_clean_error(_job("--preset", "smoke", "--set", "data.builtin=", "--set", f"data.train_uri={missing}"),
                        f"data.train_uri: {missing} does not exist")
    (tmp_path / "empty").mkdir()
    _assert_clean_error(_job("--preset", "smoke", "--set", "data.builtin=", "--set", f"data.train_uri={tmp_path / 'empty'}"),
                        "holds no shards")


def test_missing_s3_prefix(s3):
    proc = _job("--preset", "smoke", "--set", "data.builtin=", "--set", f"data.train_uri=s3://{s3.bucket}/no/such/prefix",
                "--set", f"storage.uri=s3://{s3.bucket}/runs-x", "--set", f"storage.endpoint_url={s3.endpoint.url}")
    _assert_clean_error(proc, f"data.train_uri: s3://{s3.bucket}/no/such/prefix does not exist")


def test_resume_without_checkpoint_is_an_error(tmp_path):
    proc = _job("--preset", "smoke", "--set", f"storage.uri={tmp_path}", "--run-name", "never-ran", "--resume")
    _assert_clean_error(proc, "--resume found no checkpoint of run 'never-ran'")
    # Laptop runs (no storage.uri) live in ./runs, so --resume looks there.
    _assert_clean_error(_job("--preset", "smoke", "--resume", "--run-name", "never-ran"),
                        f"--resume found no checkpoint of run 'never-ran' under {os.path.join(ROOT, 'runs', 'never-ran')}")


def test_unknown_preset_and_override_syntax():
    _assert_clean_error(_job("--preset", "nope"), "--preset: unknown preset 'nope'")
    _assert_clean_error(_job("--preset", "smoke", "--set", "optim.lr"), "optim.lr: overrides look like")


def test_help_lists_presets():
    proc = subprocess.run([sys.executable, JOB, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "smoke" in proc.stdout and "ray job submit" in proc.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.e2e
def test_ray_job_submit_smoke_against_a_started_head_leaks_no_credential(s3):
    """`ray start --head`, then `ray job submit -- python jobs/pretrain_vit_h14.py --preset smoke`, as the README says,
    with checkpoints into S3. The head has recognisable fake AWS credentials (moto accepts any) and a recognisable
    Ray token: neither the job's output, nor any object it wrote (checkpoints, configs, metrics, accelerator-days
    rows), nor the head's Ray session logs contain them. (One run for both: each costs a minute of Ray Train.)"""
    import glob

    key, secret = "AKIAVITRAYFAKE0000042", "vitrayFakeSecret/DoNotLog+0123456789abcdef"
    token = "vitrayfakeraytoken" + "0123456789abcdef" * 2
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    env.pop("RAY_ADDRESS", None)
    ray_tmp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")  # the head's own session logs, read below (a short path:
    port, dash = _free_port(), _free_port()  # Ray's sockets live there)
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=4", "--object-store-memory=1000000000", "--block",
         f"--temp-dir={ray_tmp}",
         # its own agent port: another Ray on this machine (the tests' session cluster) may hold the default one
         f"--dashboard-agent-listen-port={_free_port()}",
         # The agents' other ports named too: given none, the raylet waits for the agent to write its port to a
         # file, and on a saturated machine it gave up after 16 s and died (node_manager.cc:3576), failing this
         # test once. Named, the raylet was up 1.4 s after starting its agents, against 7.5 s.
         f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out = _submit(f"http://127.0.0.1:{dash}", head, env, "--preset", "smoke", "--set", "optim.epochs=4",
                      "--set", f"storage.uri=s3://{s3.bucket}/runs-secrets", "--set",
                      f"storage.endpoint_url={s3.endpoint.url}")
        summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"run"')))
        assert summary["val_top1"] > 0.35, summary  # measured 0.52 after these 4 epochs; chance is 0.1
        assert summary["checkpoint"].endswith("step_00000093")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=90)
    written = _objects(s3, "runs-secrets/")
    assert any(k.endswith("vitray.json") for k in written) and any(k.endswith("accelerator_days.jsonl") for k in written)
    logs = [p for p in glob.glob(os.path.join(ray_tmp, "**", "session_*", "logs", "**", "*"), recursive=True)
            if os.path.isfile(p)]
    assert any("job-driver" in p for p in logs), f"no job driver log under {ray_tmp}"
    for path in logs:
        with open(path, "rb") as f:
            written[path] = f.read()
    written["ray job submit's output"] = out.encode()
    for needle in (key, secret, token):
        leaks = [name for name, data in written.items() if needle.encode() in data]
        assert not leaks, f"{needle[:8]}… found in {leaks}"
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _submit(address: str, head, env: dict, *job_args: str) -> str:
    """`ray job submit` of the training job once the head's job agent answers; its output."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    deadline = time.time() + 120
    while subprocess.run([ray, "job", "list", "--address", address], env=env, capture_output=True).returncode != 0:
        assert time.time() < deadline and head.poll() is None, "the Ray head did not come up"
        time.sleep(2)
    for _ in range(30):  # the job agent can come up a little after the dashboard answers
        proc = subprocess.run([ray, "job", "submit", "--address", address, "--working-dir", ROOT, "--", "python",
                               "jobs/pretrain_vit_h14.py", *job_args], env=env, capture_output=True, text=True,
                              timeout=600)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _objects(s3, prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint.url, region_name="us-east-1")
    return {obj["Key"]: client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])}


def test_gpu_recipe_on_a_cluster_without_gpus(tmp_path):
    """Data given, no GPUs: the ViT-H/14 recipe stops with what to do instead of waiting for GPUs forever."""
    from vitray.data.datasets import write_digits

    write_digits(str(tmp_path / "digits"))
    sets = [f"data.train_uri={tmp_path / 'digits' / 'train'}", f"storage.uri={tmp_path / 'runs'}", "model.num_classes=10",
            "scaling.num_workers=2", "optim.global_batch=64"]
    # A process of its own: it starts a local Ray to look at the cluster (this test process has the session's).
    proc = subprocess.run([sys.executable, JOB, *sum((["--set", s] for s in sets), [])], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "scaling.use_gpu: this recipe needs 2 GPU workers but the Ray cluster has no GPUs" in proc.stderr
    assert "--preset smoke" in proc.stderr


def test_finetune_job_needs_weights_and_checks_them(tmp_path):
    run = lambda *a: run_job("finetune.py", *a)  # noqa: E731
    _assert_clean_error(run("--preset", "b16_cifar10", "--set", "data.train_uri=s3://b/p"), "transfer.init_from: fine-tuning needs")
    _assert_clean_error(run("--preset", "smoke", "--init-from", str(tmp_path / "nope"), "--set", f"storage.uri={tmp_path}"),
                        f"transfer.init_from: {tmp_path / 'nope'} not found")
    torn = tmp_path / "runs" / "x" / "step_00000020"  # a save that never got its commit marker
    torn.mkdir(parents=True)
    (torn / "vitray.json").write_text("{}")
    _assert_clean_error(run("--preset", "smoke", "--init-from", str(torn), "--set", f"storage.uri={tmp_path}"),
                        f"transfer.init_from: {torn} is an incomplete checkpoint (no COMMIT marker")
    _assert_clean_error(run("--preset", "smoke", "--set", "transfer.ema_decay=0.9", "--set", "deepspeed.zero_stage=3"),
                        "transfer.ema_decay: weight averaging needs whole parameters")


def test_smoke_chain_pretrain_then_finetune_at_higher_resolution(smoke_chain):
    """jobs/finetune.py --preset smoke: pretrain at 16 px, fine-tune at 24 px (interpolated position embeddings,
    zero head, SGD, EMA), evaluate on the 297 held-out digits: the issue's ≥ 97 % learning check. (The run is the
    session's `smoke_chain`, shared with the inspection tests.)"""
    summary = smoke_chain["finetune"]
    # Measured 0.98 → 0.99 in two runs with 70–100 % crops (benchmarks/results/smoke_chain.json); 0.96 → 0.98
    # with the earlier 90–100 %. Chance is 0.10.
    assert summary["pretrain_val_top1"] > 0.93
    assert summary["val_top1"] >= 0.97, summary
    assert summary["checkpoint"].endswith("step_00000468")


def test_planner_job_and_training_job_refuse_what_cannot_fit(s3, digits):
    run = lambda *a: run_job("plan.py", *a)  # noqa: E731
    ok = run("--preset", "h14_jft", "--set", "scaling.num_workers=1024", "--set", "optim.micro_batch=4", "--accelerator", "H100")
    assert ok.returncode == 0 and "1024 × H100, ZeRO-1" in ok.stdout and "H100-days" in ok.stdout, ok.stderr
    too_big = ["--set", "scaling.num_workers=2", "--set", "deepspeed.zero_stage=0", "--set", "optim.micro_batch=256",
               "--set", "scaling.accelerator=A100"]
    _assert_clean_error(run("--preset", "h14_jft", *too_big), "vit_h14 @ 224 px needs", "but has 80 GiB; try a smaller optim.micro_batch")
    # The training job runs the same check after reading its data, still before any Ray resource.
    proc = _job("--preset", "h14_jft", *too_big, "--set", f"data.train_uri={digits['train']}",
                "--set", f"storage.uri=s3://{s3.bucket}/runs-fit", "--set", f"storage.endpoint_url={s3.endpoint.url}")
    _assert_clean_error(proc, "needs", "but has 80 GiB")


