"""What a new user does first — real photo folders, released `.npz` weights, a run that failed, a run to look at
afterwards — each as a regression test for what once broke (issue: newcomer paths)."""
import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_job
import torch
from PIL import Image

from vitray import storage
from vitray.config import ConfigError, smoke
from vitray.models.npz import CheckpointError, load_npz, save_npz
from vitray.models.registry import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job(name: str):
    """A job's main() (jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", os.path.join(ROOT, "jobs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _photo(path, fmt: str, seed: int = 0, size=(40, 30)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def _manifest(uri) -> dict:
    return json.loads(open(os.path.join(uri, "manifest.json")).read())


# ------------------------------------------------------------------------------------------------ photo folders


def test_same_photo_as_jpg_and_png_gives_two_samples_and_real_collisions_name_both_files(tmp_path, capsys):
    write = _job("write_shards")
    for cls in ("cat", "dog"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
    _photo(tmp_path / "photos" / "cat" / "x.jpg", "JPEG")
    _photo(tmp_path / "photos" / "cat" / "x.png", "PNG")
    _photo(tmp_path / "photos" / "dog" / "x.jpg", "JPEG", seed=1)
    # --single-process: the same listing and per-file checks as the Ray writer (tests/test_writer.py), no Ray.
    assert write(["--source", f"folder:{tmp_path / 'photos'}", "--dest", str(tmp_path / "ds"), "--single-process"]) == 0
    assert _manifest(tmp_path / "ds")["num_samples"] == 3
    # Two names that still map to one key are refused before anything is written, both files named.
    _photo(tmp_path / "photos" / "dog" / "a.b.jpg", "JPEG")
    _photo(tmp_path / "photos" / "dog" / "a_b.jpg", "JPEG")
    assert write(["--source", f"folder:{tmp_path / 'photos'}", "--dest", str(tmp_path / "ds2")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "photos" / "dog" / "a.b.jpg") in err and str(tmp_path / "photos" / "dog" / "a_b.jpg") in err
    assert not (tmp_path / "ds2").exists()


def test_skip_bad_writes_the_good_files_and_lists_the_bad_ones(tmp_path, capsys):
    write = _job("write_shards")
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    for i in range(3):
        _photo(tmp_path / "photos" / "cat" / f"ok{i}.jpg", "JPEG", seed=i)
    bad = tmp_path / "photos" / "cat" / "broken.jpg"
    bad.write_bytes(b"GIF89a-not-really")
    empty = tmp_path / "photos" / "cat" / "empty.png"
    empty.write_bytes(b"")
    # Without the policy: one clear error naming the file and what it is (no in-memory buffer's repr).
    assert write(["--source", f"folder:{tmp_path / 'photos'}", "--dest", str(tmp_path / "strict"), "--single-process"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "BytesIO" not in err and "not an image format Pillow reads" in err
    assert not (tmp_path / "strict" / "manifest.json").exists()

    assert write(["--source", f"folder:{tmp_path / 'photos'}", "--dest", str(tmp_path / "ds"), "--skip-bad",
                  "--single-process"]) == 0
    out = capsys.readouterr()
    manifest = _manifest(tmp_path / "ds")
    assert manifest["num_samples"] == 3 and "2 files skipped" in out.out
    assert {s["path"] for s in manifest["skipped"]} == {str(bad), str(empty)}
    assert all(s["reason"] and "BytesIO" not in s["reason"] for s in manifest["skipped"])
    assert f"skipped {bad}: cannot decode image" in out.err and f"skipped {empty}:" in out.err


def test_inspect_job_reads_an_image_folder_by_relative_and_absolute_path(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    (tmp_path / "vit.npz").write_bytes(save_npz(build_model("vit_tiny_test", num_classes=10, image_size=16)))
    (tmp_path / "photos").mkdir()
    _photo(tmp_path / "photos" / "one.jpg", "JPEG", size=(64, 48))
    _photo(tmp_path / "photos" / "two.png", "PNG", seed=2, size=(20, 20))
    monkeypatch.chdir(tmp_path)
    inspect_job = _job("inspect_vit")
    for images in ("photos", str(tmp_path / "photos")):
        assert inspect_job(["--checkpoint", "vit.npz", "--images", images, "--out", f"out-{len(images)}"]) == 0, \
            capsys.readouterr().err
        report = json.loads((tmp_path / f"out-{len(images)}" / "inspection.json").read_text())
        assert report["images"] == 2 and report["rollout"]["images"] == ["one.jpg", "two.png"]


# ---------------------------------------------------------------------------------------------- released weights


def test_npz_with_keys_the_model_has_no_place_for_is_refused():
    deep = build_model("vit_tiny_test", num_classes=5, image_size=16)
    data = save_npz(deep)
    with np.load(io.BytesIO(data)) as f:  # drop the second block from the target: a 1-block model
        params = {k: f[k] for k in f.files}
    from vitray.models.specs import ViTSpec
    from vitray.models.vit import ViT

    shallow = ViT(ViTSpec(width=deep.spec.width, depth=1, mlp_dim=deep.spec.mlp_dim, heads=deep.spec.heads,
                          patch=deep.spec.patch), num_classes=5, image_size=16)
    with pytest.raises(CheckpointError, match=r"keys the model has no place for .*encoderblock_1"):
        load_npz(shallow, data, "deep.npz")
    buf = io.BytesIO()
    np.savez(buf, **params, **{"extra/kernel": np.zeros(3)})
    with pytest.raises(CheckpointError, match=r"1 keys the model has no place for .*'extra/kernel'"):
        load_npz(build_model("vit_tiny_test", num_classes=5, image_size=16), buf.getvalue())


def test_finetune_checks_a_bad_npz_before_ray_starts(tmp_path):
    """The missing key is named by the driver, in seconds, with no Ray traceback (it used to surface ~30 s later
    inside the workers)."""
    model = build_model("vit_smoke", num_classes=10, image_size=16)  # what the smoke pretraining makes
    with np.load(io.BytesIO(save_npz(model))) as f:
        params = {k: f[k] for k in f.files if "encoderblock_1/MlpBlock_3/Dense_0" not in k}
    np.savez(tmp_path / "bad.npz", **params)
    proc = run_job("finetune.py", "--preset", "smoke", "--init-from", str(tmp_path / "bad.npz"),
                   "--set", f"storage.uri={tmp_path / 'store'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "transfer.init_from" in proc.stderr and "missing keys" in proc.stderr
    assert "encoderblock_1/MlpBlock_3/Dense_0/kernel" in proc.stderr
    assert "Traceback" not in proc.stderr and "RayTrainWorker" not in proc.stdout + proc.stderr
    assert not (tmp_path / "store" / "runs").exists()  # no run folder for a run that never started


def test_evaluate_job_reads_a_released_npz_for_fewshot_and_probe(ray_cluster, s3, digits, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", num_classes=1000, image_size=16, representation_size=32)
    (tmp_path / "released.npz").write_bytes(save_npz(model))
    main = _job("evaluate")
    args = ["--checkpoint", str(tmp_path / "released.npz"), "--train", digits["train"], "--test", digits["val"],
            "--endpoint-url", s3.endpoint.url, "--shots", "1,5", "--seeds", "2", "--layers", "final,1"]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "top1" not in result  # 1000 classes: its head does not read the digits
    assert result["image_size"] == 16 and result["train_samples"] == 1500 and result["test_samples"] == 297
    assert set(result["fewshot"]) == {"1", "5"} and set(result["linear_probe"]) == {"final", "1"}
    # Random features of real digits still carry signal: well above the 0.1 of chance.
    assert result["linear_probe"]["1"] > 0.3


# ------------------------------------------------------------------------------------------------- run folders


def _run_folder(root, name, state=None, committed=False):
    run = root / "runs" / name
    (run / "step_00000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    if state:
        (run / "run.json").write_text(json.dumps({"state": state, "updated": 0, "error": "boom"}))
    if committed:
        (run / "step_00000002" / "COMMIT").write_text("{}")
    return run


def test_a_name_is_reused_only_when_its_run_has_no_checkpoint_and_is_not_running(tmp_path, digits, s3, capsys):
    from vitray.train import launch

    def prepare(name):
        return launch.prepare(smoke().replace(
            data=dict(builtin="", train_uri=digits["train"], val_uri=digits["val"]),
            storage=dict(uri=str(tmp_path), run_name=name, endpoint_url=s3.endpoint.url)))

    failed = _run_folder(tmp_path, "failed", "failed")
    _, plan = prepare("failed")
    moved = tmp_path / "runs" / "failed.failed-1"
    assert plan.run_uri == str(failed) and not failed.exists()
    assert json.loads((moved / "run.json").read_text())["error"] == "boom" and (moved / "metrics.jsonl").exists()
    assert f"kept at {moved}" in capsys.readouterr().out
    _run_folder(tmp_path, "failed", "failed")  # fails again: kept beside the first
    prepare("failed")
    assert (tmp_path / "runs" / "failed.failed-2" / "run.json").exists()

    _run_folder(tmp_path, "busy", "running")
    with pytest.raises(ConfigError, match=r"says it is running .* delete .*busy first"):
        prepare("busy")
    _run_folder(tmp_path, "done", "failed", committed=True)
    with pytest.raises(ConfigError, match=r"with a checkpoint \(step 2\); pass --resume"):
        prepare("done")
    assert (tmp_path / "runs" / "busy").exists() and (tmp_path / "runs" / "done").exists()


def _events(data: bytes):
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out, i = [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        event = Event.FromString(data[i + 12:i + 12 + length])
        i += 12 + length + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_runs_listing_plot_and_tensorboard_events_of_the_smoke_chain(smoke_chain, s3, tmp_path, capsys):
    """The smoke chain's two runs (pretrain, fine-tune) listed from their storage, plotted, and in TensorBoard."""
    base = f"s3://{s3.bucket}/smoke-chain"
    main = _job("runs")
    assert main([base, "--endpoint-url", s3.endpoint.url, "--json"]) == 0
    listing = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    pre, ft = smoke_chain["pretrain"], smoke_chain["finetune"]
    for summary in (pre, ft):
        row = listing[summary["run"].rsplit("/", 1)[-1]]
        assert row["state"] == "finished" and row["step"] == row["total_steps"] == summary["step"]
        assert row["checkpoint"] == summary["checkpoint"] and row["best"] == pytest.approx(summary["val_top1"])
        assert row["model"] == "vit_smoke" and row["accelerator_days"] > 0
    assert listing[ft["run"].rsplit("/", 1)[-1]]["image_size"] == 24

    assert main([base, "--endpoint-url", s3.endpoint.url]) == 0
    table = capsys.readouterr().out
    assert "finished" in table and f"top1 {ft['val_top1']:.4g}" in table

    names = [s["run"].rsplit("/", 1)[-1] for s in (pre, ft)]
    assert main([base, "--endpoint-url", s3.endpoint.url, "--plot", *names, "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == (1100, 420)

    # TensorBoard: the same loss curve as metrics.jsonl and the held-out top-1 at the last step.
    run = ft["run"]
    event_files = [n for n in storage.list_files(run, s3.endpoint) if n.startswith("events.out.tfevents")]
    assert len(event_files) == 1
    scalars = _events(storage.read_bytes(storage.join(run, event_files[0]), s3.endpoint))
    metrics = [json.loads(line) for line in storage.read_bytes(storage.join(run, "metrics.jsonl"), s3.endpoint).decode().splitlines()]
    logged = [(r["step"], r["loss"]) for r in metrics if "loss" in r and not r.get("final")]
    assert [(s, pytest.approx(v, rel=1e-6)) for t, s, v in scalars if t == "train/loss"] == logged
    assert {t for t, _, _ in scalars} >= {"train/lr", "throughput/images_per_s", "throughput/mfu", "cost/accelerator_hours"}
    (val,) = [(s, v) for t, s, v in scalars if t == "val/top1"]
    assert val == (ft["step"], pytest.approx(ft["val_top1"], rel=1e-6))


def test_failed_run_records_why_and_its_name_can_be_used_again(ray_cluster, s3, digits):
    """A run that diverges before its first checkpoint says so in run.json and the listing; a rerun under the same
    name moves it aside (kept whole) instead of refusing the name."""
    from vitray import runs
    from vitray.train import launch

    cfg = smoke().replace(
        model=dict(num_classes=10), data=dict(builtin="", train_uri=digits["train"], val_uri=""),
        optim=dict(global_batch=32, micro_batch=16, lr=1e37, warmup_steps=1, total_steps=6),
        storage=dict(uri=f"s3://{s3.bucket}/newcomer", endpoint_url=s3.endpoint.url, run_name="diverges",
                     checkpoint_every=5), log_every=1)
    with pytest.raises(launch.TrainingFailed, match="non-finite training loss"):
        launch.run(cfg)
    run_uri = f"s3://{s3.bucket}/newcomer/runs/diverges"
    record = runs.read_state(run_uri, s3.endpoint)
    assert record["state"] == "diverged" and "no checkpoint was written" in record["error"]
    listed = runs.list_runs(f"s3://{s3.bucket}/newcomer/runs", s3.endpoint)
    assert [(r["name"], r["state"], r["checkpoint"]) for r in listed] == [("diverges", "diverged", None)]

    _, plan = launch.prepare(cfg.replace(optim=dict(lr=1e-3)))
    assert plan.run_uri == run_uri and not storage.exists(run_uri, s3.endpoint)
    assert runs.read_state(f"{run_uri}.failed-1", s3.endpoint)["state"] == "diverged"


@pytest.mark.e2e
def test_laptop_run_interrupted_then_resumed_as_printed_is_kept_in_local_runs(tmp_path):
    """The README's first command with a short schedule, from a fresh folder: data from the embedded S3 server, the
    run in ./runs (it outlives the server). Ctrl-C (SIGINT to the job's process group: the driver and the local Ray
    it started) after the first checkpoint: exit 130, run.json says `interrupted` with the step to resume from and
    one line says how; the same command again is refused, pointing at --resume; the printed resume finishes the run
    with a terminal free of Ray Data's execution plans and Ray Train's internal PreemptionWatcher error; then the
    tools work on the printed checkpoint at once."""
    from vitray import faults, runs
    from vitray.checkpoints import scan

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, os.path.join(ROOT, "jobs", "pretrain_vit_h14.py"), "--preset", "smoke",
               "--set", "optim.total_steps=60", "--set", "storage.checkpoint_every=10", "--run-name", "laptop"]
    job = lambda *a: subprocess.run([*a], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)  # noqa: E731
    tool = lambda name, *a: job(sys.executable, os.path.join(ROOT, "jobs", name), *a)  # noqa: E731
    run = tmp_path / "runs" / "laptop"
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        faults.wait_for(lambda: list(run.glob("step_*/COMMIT")), 300, what="the first checkpoint")
        os.killpg(first.pid, signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, out[-3000:]
    record = runs.read_state(str(run), None)
    assert record["state"] == "interrupted" and record["committed_step"] in scan(str(run), None)[0]
    assert (f"stopped: run 'laptop' interrupted (Ctrl-C); its last committed checkpoint is step"
            f" {record['committed_step']}: resume it with the same command plus --resume --run-name laptop") in out

    again = job(*command)
    assert again.returncode == 2 and "run 'laptop' was interrupted" in again.stdout + again.stderr, again.stderr[-3000:]
    assert "pass --resume" in again.stdout + again.stderr
    proc = job(*command, "--resume")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"run"')))
    assert summary["run"] == str(run) and summary["checkpoint"] == str(run / "step_00000060")
    assert (run / "step_00000060" / "COMMIT").exists() and (tmp_path / "runs" / "accelerator_days.jsonl").exists()
    for noise in ("Execution plan of Dataset", "Starting execution of Dataset", "PreemptionWatcher",
                  "Progress bars disabled", "all_gather_into_tensor"):
        assert noise not in out, noise
    assert "step 60/60 loss" in out and "held-out top1" in out

    evaluated = tool("evaluate.py", "--checkpoint", summary["checkpoint"], "--eval", "top1")
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
    top1 = json.loads(next(x for x in evaluated.stdout.splitlines() if x.startswith('{"checkpoint"')))["top1"]
    assert top1["samples"] == 297 and abs(top1["accuracy"] - summary["val_top1"]) <= 1 / 297

    listed = tool("runs.py", "--json")
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["name"] == "laptop" and row["state"] == "finished" and row["best"] == pytest.approx(summary["val_top1"])
