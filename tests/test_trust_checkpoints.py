"""Loading a checkpoint someone else wrote never runs code from it (issue 34): in process, no Ray.

Each crafted folder carries a pickle whose unpickling would create a marker file; every loader must refuse the
folder (one line, naming the file) or read around the payload, and the marker must never appear."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from vitray.checkpoints import (COMMIT, EMA_WEIGHTS, META, WEIGHTS, CheckpointError, check_init_from, describe,
                                load_model)
from vitray.config import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Unpickling this calls `Path.touch(marker)`: the stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _smoke_model():
    from vitray.models.registry import build_model

    cfg = smoke()
    torch.manual_seed(0)  # the same weights every call: the reference the loaded ones are compared with
    return build_model(cfg.model.name, num_classes=cfg.model.num_classes, image_size=cfg.data.image_size,
                       pre_logits=cfg.model.pre_logits)


def _folder(tmp_path, zero_stage: int = 2, weights: bool = False, ema_pt: bool = False, commit: bool = True):
    """A checkpoint folder as vitray lays it out, with DeepSpeed's state/ files replaced by pickle payloads."""
    from safetensors.torch import save_file

    folder, marker = tmp_path / "step_00000040", str(tmp_path / "EXECUTED")
    (folder / "state").mkdir(parents=True)
    config = smoke().replace(deepspeed=dict(zero_stage=zero_stage)).to_dict()
    (folder / META).write_text(json.dumps({"step": 40, "world_size": 2, "config": config}))
    names = (["mp_rank_00_model_states.pt"] if zero_stage < 3 else
             ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"])
    names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)] if zero_stage else []
    for name in names:
        torch.save({"module": Payload(marker)}, folder / "state" / name)
    if weights:
        save_file({k: v.contiguous() for k, v in _smoke_model().state_dict().items()}, folder / WEIGHTS)
    if ema_pt:  # the layout before ema.safetensors
        torch.save({"module.pos_embed": Payload(marker)}, folder / "ema.pt")
    if commit:
        (folder / COMMIT).write_text("{}")
    return str(folder), marker


LOADERS = {
    "load_model": lambda uri: load_model(uri),
    "describe": lambda uri: describe(uri, None),
    "init_from": lambda uri: check_init_from(uri, "vit_smoke", 10, 8, None),
    "inspect": lambda uri: __import__("vitray.eval.inspect", fromlist=["x"]).load_for_inspection(uri),
}


@pytest.mark.parametrize("zero_stage", [0, 2, 3], ids=["zero0", "zero2", "zero3"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_folder_of_pickles_is_refused_and_never_unpickled(tmp_path, zero_stage, loader):
    uri, marker = _folder(tmp_path, zero_stage)
    with pytest.raises(Exception) as e:
        LOADERS[loader](uri)
    assert WEIGHTS in str(e.value) and "never unpickles" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(marker)


def test_an_ema_pickle_beside_safe_weights_is_never_read(tmp_path):
    uri, marker = _folder(tmp_path, weights=True, ema_pt=True)
    model, meta = load_model(uri)  # "auto" takes the average only from ema.safetensors
    assert meta["weights"] == "raw" and not os.path.exists(marker)
    reference = _smoke_model().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_resuming_an_old_ema_pt_reads_plain_tensors_only(tmp_path):
    from vitray.train.checkpoint import _read_ema

    uri, marker = _folder(tmp_path, weights=True, ema_pt=True)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        _read_ema(uri, uri)
    assert not os.path.exists(marker)


def test_a_pickle_named_model_safetensors_is_refused(tmp_path):
    uri, marker = _folder(tmp_path)
    torch.save({"pos_embed": Payload(marker)}, os.path.join(uri, WEIGHTS))
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}: not a readable safetensors file"):
        load_model(uri)
    assert not os.path.exists(marker)


def test_an_interrupted_save_is_refused_before_any_weights_are_read(tmp_path):
    uri, _ = _folder(tmp_path, weights=True, commit=False)
    for loader in LOADERS.values():
        with pytest.raises(Exception, match=f"incomplete checkpoint \\(no {COMMIT} marker"):
            loader(uri)


def test_safe_weights_round_trip_with_their_average(tmp_path):
    from safetensors.torch import save_file

    uri, _ = _folder(tmp_path, weights=True)
    averaged = {f"module.{k}": v + 1 for k, v in _smoke_model().state_dict().items()}
    save_file({**averaged, "n_averaged": torch.tensor(3)}, os.path.join(uri, EMA_WEIGHTS))
    model, meta = load_model(uri)
    assert meta["weights"] == "ema" and torch.equal(model.pos_embed, averaged["module.pos_embed"])
    raw, meta = load_model(uri, weights="raw")
    assert meta["weights"] == "raw" and torch.equal(raw.pos_embed, _smoke_model().pos_embed)


def test_a_pickled_npz_is_refused(tmp_path):
    from vitray.checkpoints import npz_model

    path, marker = str(tmp_path / "vit.npz"), str(tmp_path / "EXECUTED")
    np.savez(path, **{"embedding/kernel": np.array([Payload(marker)], dtype=object)})
    with pytest.raises(CheckpointError):
        npz_model(path, None)
    assert not os.path.exists(marker)


JOBS = {
    "evaluate": ["jobs/evaluate.py", "--checkpoint", "{uri}", "--test", "{uri}"],
    "inspect": ["jobs/inspect_vit.py", "--checkpoint", "{uri}"],
    "finetune": ["jobs/finetune.py", "--preset", "smoke", "--init-from", "{uri}"],
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_jobs_refuse_a_pickled_checkpoint_in_one_line_before_ray(tmp_path, job):
    uri, marker = _folder(tmp_path, zero_stage=3)
    script, *args = JOBS[job]
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *(a.format(uri=uri) for a in args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and WEIGHTS in lines[0], done.stderr[-3000:]
    assert not os.path.exists(marker)


@pytest.mark.parametrize("job", ["train", "write_shards"])
def test_an_unwritable_destination_is_refused_before_ray(tmp_path, job):
    """A runs root or shard destination under a file (what root's `chmod` cannot fake here): one line, exit 2."""
    (tmp_path / "file").write_text("")
    args = {"train": ["pretrain_vit_h14.py", "--preset", "smoke", "--set", f"storage.runs_dir={tmp_path}/file/runs"],
            "write_shards": ["write_shards.py", "--source", "digits", "--dest", f"{tmp_path}/file/digits"]}[job]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", args[0]), *args[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert f"{tmp_path}/file" in lines[0] and "cannot write" in lines[0]


def test_a_run_is_classified_by_the_type_of_its_failure():
    """`diverged` comes from the workers' NonFiniteLoss as Ray Train hands it over, never from message text."""
    from ray.train import WorkerGroupError

    from vitray.train.failures import NonFiniteLoss, classify

    assert classify(WorkerGroupError("rank 1 failed", {1: NonFiniteLoss("loss is nan")})) == "diverged"
    assert classify(WorkerGroupError("non-finite training loss", {0: RuntimeError("non-finite training loss")})) == "failed"
    assert classify(RuntimeError("wrapped")) == "failed"


@pytest.mark.parametrize("name", ["../victim", ".", "..", "/etc", "a/b", "-rf"])
def test_a_run_name_that_is_a_path_is_refused_before_anything_moves(tmp_path, name):
    """`--run-name ../victim` once renamed a sibling folder to victim.failed-1: now one line, exit 2, nothing moved."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    runs = tmp_path / "runs"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "pretrain_vit_h14.py"), "--preset", "smoke",
                           "--set", f"storage.runs_dir={runs}", "--set", f"storage.run_name={name}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "storage.run_name: must be a plain name" in lines[0], done.stderr
    assert (victim / "keep.txt").read_text() == "mine" and not (tmp_path / "victim.failed-1").exists()
    assert not runs.exists()
