"""Asynchronous saves (`storage.async_save`) in process, on 2 gloo ranks under ZeRO-1 and ZeRO-3
(tests/async_save_probe.py): no Ray, whose part — running the upload function in its thread — the probe stands in
for. The end-to-end runs (tests/test_train.py, tests/test_reliability.py) save in the background through Ray."""
import json
import os
import subprocess
import sys

import pytest

from vitray.config import Config, ConfigError
from vitray.config.checks import validate

STAGES = (1, 3)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    from vitray.storage import free_port

    probe = os.path.join(os.path.dirname(__file__), "async_save_probe.py")
    done = subprocess.run([sys.executable, probe, str(free_port()), str(tmp_path_factory.mktemp("saves")),
                           *map(str, STAGES)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {(r["stage"], r["rank"]): r for r in rows}


@pytest.mark.parametrize("stage", STAGES)
def test_the_snapshot_writes_the_files_a_synchronous_save_writes_and_they_restore_the_same_state(probed, stage):
    for rank in range(2):
        row = probed[(stage, rank)]
        files = row["same_files"]
        assert files["async"] == files["sync"] and files["differ"] == []  # every file, byte for byte or tensor for tensor
        assert any(f.startswith("state/") and f.endswith("model_states.pt") for f in files["async"])
        assert "model.safetensors" in files["async"] and "state/zero_pp_rank_1_mp_rank_00_optim_states.pt" in files["async"]
        # A fresh engine restores what the weights and Adam's moments were at the save, though the engine that
        # saved had trained on (in place) before the files were written.
        assert row["restored"] == row["digests"] and row["trained"]["module"] != row["digests"]["module"]
        assert row["trained"]["optimizer"] != row["digests"]["optimizer"]


@pytest.mark.parametrize("stage", STAGES)
def test_only_rank_0_keeps_the_gathered_weights_each_once(probed, stage):
    """`full_weights`: rank 0 gets every key of the model's state dict, each in storage of its own (not the live
    parameter's, not another key's), equal to DeepSpeed's fp32 master weights gathered parameter by parameter (under
    ZeRO-1 rank 0 copies its own module's instead); rank 1 keeps nothing of what it helped gather."""
    zero, one = probed[(stage, 0)]["full_weights"], probed[(stage, 1)]["full_weights"]
    assert zero["names"] == zero["model"] and zero["own_storage"] and zero["equal_to_the_fp32_master"]
    assert one["names"] == []


@pytest.mark.parametrize("stage", STAGES)
def test_commit_waits_for_every_ranks_upload(probed, stage):
    for rank in range(2):
        row = probed[(stage, rank)]
        assert row["held_back"] == [[False, None]] * 3  # rank 1's upload held back: no marker, last_good unchanged
        assert row["committed"][1] == 2 and (row["committed"][0] or rank == 1)  # rank 0 writes the marker


@pytest.mark.parametrize("stage", STAGES)
def test_the_save_event_says_what_training_waited_for(probed, stage):
    row = probed[(stage, 0)]
    figures = row["figures"]
    assert set(figures) == {"save_stall_s", "save_wait_s", "gather_s", "state_s", "snapshot_bytes"}
    assert figures["gather_s"] + figures["state_s"] <= figures["save_stall_s"]
    assert figures["snapshot_bytes"] > probed[(stage, 1)]["figures"]["snapshot_bytes"] > 0  # rank 0 holds the weights
    assert set(row["sync_figures"]) == {"save_s", "save_stall_s", "save_wait_s"}  # the synchronous path's, as before


def test_the_snapshot_engine_has_every_method_of_deepspeeds_checkpoint_engine():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    from vitray.train.snapshot import SnapshotEngine

    wanted = {name for name in vars(CheckpointEngine) if not name.startswith("_")}
    assert wanted <= set(vars(SnapshotEngine)), wanted - set(vars(SnapshotEngine))


def test_async_save_is_a_bool_and_on_by_default():
    assert Config().storage.async_save is True
    with pytest.raises(ConfigError, match="storage.async_save"):
        validate(Config().replace(storage=dict(async_save="no")))


def test_resume_counts_a_committed_checkpoint_ray_has_not_registered(tmp_path):
    """An asynchronous save is committed once every rank's upload is done, which can be before Ray Train's controller
    registers it (its checkpoint_manager_snapshot.json): a run killed in between can still be resumed."""
    from vitray.train import runfolder

    run = tmp_path / "run"
    (run / "step_00000004").mkdir(parents=True)  # an upload cut off: no marker
    assert not runfolder.has_checkpoint(str(run), None)
    (run / "step_00000002").mkdir()
    (run / "step_00000002" / "COMMIT").write_text("{}")
    assert runfolder.has_checkpoint(str(run), None)
    (run / "step_00000002" / "COMMIT").unlink()
    (run / runfolder.RAY_SNAPSHOT).write_text("{}")  # registered by Ray: as before
    assert runfolder.has_checkpoint(str(run), None)
