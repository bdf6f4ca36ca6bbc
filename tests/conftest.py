"""Shared fixtures: one embedded S3 server and one local Ray cluster for the whole session (both real).

Tiers: `python -m pytest -m quick` runs every test that starts no real Ray / DeepSpeed run (a few minutes, for
iterating); plain `python -m pytest` runs everything (CI). A test is end-to-end when it uses the session's Ray
cluster or trained models (`E2E_FIXTURES`) or is marked `@pytest.mark.e2e` (jobs started as subprocesses)."""
from __future__ import annotations

import os
import sys

import pytest

# Runs in these tests treat the embedded server as a real endpoint, so credentials come from the standard AWS
# chain — here the environment, inherited by the Ray workers. moto checks none of them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Ray Train's controller looks at its workers every 2 s by default, so a fit notices its workers started and its
# training finished up to 2 s late, each time. Every 0.5 s in the tests (jobs started here inherit it): measured
# 22.6 s against 24.9 s per 2-step smoke fit (8 fits each, alternating). Runs keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Every Ray the tests start (the session's, jobs', `ray start`, ray.cluster_utils nodes) inherits these. No idle
# workers prestarted for no job (as `session.init_ray` does for a local Ray; none would be used); and each node's log
# monitor looks for new log files every 0.5 s instead of every pass of its 0.1 s loop. An idle local Ray: 3.5 CPU-s
# a minute against 4.9 measured, on a suite that is CPU-bound with a dozen Rays up at times. Runs keep Ray's
# default log monitor: a new worker's first lines reach the terminal up to 0.5 s later.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


E2E_FIXTURES = {"ray_cluster", "smoke_chain", "attached", "reference_run"}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: starts a real Ray / DeepSpeed run (left out of -m quick)")
    config.addinivalue_line("markers", "quick: no real Ray / DeepSpeed run (set by conftest; -m quick)")
    config.addinivalue_line("markers", "early: a test of minutes that holds no group, started before the rest (below)")


# The session's trained runs, each made once per pytest worker that needs it: the tests that read one share an
# xdist group, so under `-n 2 --dist loadgroup` (the README's command) they run on one worker, in order, and the run
# is made once. Every other test (quick ones; end-to-end ones that need only a Ray cluster, which each worker starts
# for itself, ~10 s of CPU; jobs that start their own) goes to whichever worker is free. Small groups let the two
# lanes end together (one group of everything on the session's cluster left one lane running alone at the end).
GROUPS = {"reference_run": "reference", "smoke_chain": "chain"}  # fixture → group (in this order if a test uses both)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups to name each test's lane
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") is None and E2E_FIXTURES.isdisjoint(item.fixturenames):
            item.add_marker(pytest.mark.quick)
        group = next((g for fixture, g in GROUPS.items() if fixture in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # xdist hands out the groups first (the most tests first), then single tests in this order. The study, last in
    # file order, ran alone for its final 2 minutes after the other lane had finished: `early` moves such a test to
    # the front (the sort is stable: everything else keeps file order).
    items.sort(key=lambda item: item.get_closest_marker("early") is None)


@pytest.fixture(scope="session")
def s3():
    from vitray.storage import EmbeddedS3

    with EmbeddedS3() as server:
        yield server


@pytest.fixture(scope="session")
def digits(s3):
    """scikit-learn's digits written as shards into the session's S3 server: {"train": uri, "val": uri}."""
    from vitray.data.datasets import write_digits

    base = f"s3://{s3.bucket}/datasets/digits"
    write_digits(base, s3.endpoint)
    return {"train": f"{base}/train", "val": f"{base}/val"}


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # 4 logical CPUs on 2 cores: two half-CPU Train workers plus Ray Data tasks and helper actors.
    from vitray.session import init_ray

    init_ray(num_cpus=4, object_store_memory=1 << 30)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference_run(ray_cluster, s3, digits) -> dict:
    """The uninterrupted reference run (`tests/reference.py`), in the session's Ray:
    {"plan", "result", "losses": {step: loss}, "position": its final data position}."""
    from reference import STEPS, losses, overrides

    from vitray.config import smoke
    from vitray.config.schema import apply_overrides
    from vitray.train import launch

    cfg, plan = launch.prepare(apply_overrides(smoke(), overrides(s3, digits, "uninterrupted")))
    result = launch.fit(cfg, plan)
    assert result.error is None
    by_step = losses(plan.run_uri, plan.endpoint)
    assert sorted(by_step) == list(range(1, STEPS + 1))
    return {"plan": plan, "result": result, "losses": by_step, "position": result.metrics["data_position"]}


@pytest.fixture(scope="session")
def attached(ray_cluster) -> dict:
    """The environment for a job started as a subprocess that joins the session's Ray instead of starting its own:
    measured 25 s against 35 s for a 2-step smoke job. For jobs whose test is not about how the job starts Ray."""
    node = ray_cluster._private.worker.global_worker.node
    env = {**os.environ, "RAY_ADDRESS": node.gcs_address}
    env["RAY_API_SERVER_ADDRESS"] = "http://" + node.address_info["webui_url"].removeprefix("http://")
    return env


@pytest.fixture(scope="session")
def smoke_chain(s3, attached):
    """`jobs/finetune.py --preset smoke` (pretrain the smoke ViT at 16 px, fine-tune at 24 px) into the session's S3,
    run once for every test that needs a trained model: {"pretrain": its summary, "finetune": the chain's summary}."""
    import json
    import subprocess

    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "finetune.py"), "--preset", "smoke",
         "--set", f"storage.uri=s3://{s3.bucket}/smoke-chain", "--set", f"storage.endpoint_url={s3.endpoint.url}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=attached)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {"pretrain": next(x["pretrain"] for x in lines if "pretrain" in x),
            "finetune": next(x for x in lines if "pretrain_val_top1" in x)}


def _no_ray(*args, **kwargs):
    raise AssertionError("this job started Ray: it should have stopped before requesting any cluster resource")


def run_job(script: str, *args: str):
    """`python jobs/<script> args` for a run that must stop before Ray, in this process: the same main() and exit
    code without a new interpreter's 2–5 s of imports. Any Ray start fails the test (`ray.init` raises)."""
    import contextlib
    import importlib.util
    import io
    import subprocess

    import ray

    path = os.path.join(ROOT, "jobs", script)
    spec = importlib.util.spec_from_file_location(f"job_{script.removesuffix('.py')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(ray, "init", _no_ray)
        patch.chdir(ROOT)
        try:
            code = module.main(list(args))
        except SystemExit as e:  # argparse's refusals
            code = e.code
    return subprocess.CompletedProcess([path, *args], code, out.getvalue(), err.getvalue())
