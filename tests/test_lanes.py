"""The README's test command runs two pytest-xdist workers with `--dist loadgroup`; every test that uses the
session's cluster or trained models must go to one of them (`tests/conftest.py`), or both make the session's
fixtures, the smoke chain included, and the suite pays for them twice (it did, unseen, under pytest 9)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tests_on_the_session_fixtures_share_one_lane_and_the_others_do_not():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                           "--setup-plan", "-v", "tests/test_reliability.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("tests/test_reliability.py::")]
    grouped = {n.split("::")[1].removesuffix("@session") for n in listed if n.endswith("@session")}
    assert grouped == {"test_training_matches_the_stored_known_good_loss_curve",  # these use reference_run
                       "test_killed_worker_and_flaky_s3_replay_exactly",
                       "test_saves_torn_by_a_restart_and_by_a_killed_job_are_redone_and_resumed_past"}, listed
    assert any(n.endswith("test_sigterm_stops_the_driver_like_ctrl_c") for n in listed)  # quick: no group
