"""The README's test command runs two pytest-xdist workers with `--dist loadgroup`. The tests that read one of the
session's trained runs must share that run's group (`tests/conftest.py`: GROUPS), or both workers make it, and the
suite pays for it twice (it did, unseen, under pytest 9, for the smoke chain); a test that needs no trained run must
have no group, or it holds its lane back from the other worker."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tests_on_a_trained_run_share_its_lane_and_the_others_go_where_there_is_room():
    files = ["tests/test_reliability.py", "tests/test_inspect.py", "tests/test_train.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                           "--setup-plan", "-v", *files], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith(tuple(files))]
    group = {n.split("@")[0].split("::", 1)[1]: (n.split("@")[1] if "@" in n else None) for n in listed}
    reliability = {"test_training_matches_the_stored_known_good_loss_curve",  # these use reference_run
                   "test_killed_worker_and_flaky_s3_replay_exactly",
                   "test_saves_torn_by_a_restart_and_by_a_killed_job_are_redone_and_resumed_past"}
    assert all(group[t] == "reference" for t in reliability), group
    assert group["test_sigterm_stops_the_driver_like_ctrl_c"] is None  # quick
    assert group["test_smoke_checkpoint_position_embeddings_learned_2d_locality"] == "chain"
    for zero in (1, 2, 3):  # ZeRO-2 is the reference run; 1 and 3 run its settings beside it
        assert group[f"test_zero_stage_trains_with_falling_loss[{zero}]"] == "reference"
    assert group["test_hybrid_baseline_trains_on_the_same_engine_and_evaluates"] is None  # a cluster, no trained run
    assert set(group.values()) == {"reference", "chain", None}, group


def test_a_long_test_marked_early_is_handed_out_before_the_single_tests_in_file_order():
    files = ["tests/test_cluster.py", "tests/test_study.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *files],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    order = [line for line in proc.stdout.splitlines() if line.startswith(tuple(files))]
    assert order[0] == "tests/test_study.py::test_study_killed_after_its_first_trial_resumes_only_the_rest", order[:3]
    assert order[1].startswith(files[0])  # the rest in file order
