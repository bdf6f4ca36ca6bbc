"""What a fit starts before it trains, kept small (`docs/tests.md`, "Where a fit's time goes"): the Ray Train helper
actors a fit has no use for, and the DeepSpeed imports a Train worker has no use for."""
import os

from vitray import session


def test_the_trainer_starts_only_the_helpers_a_fit_uses(monkeypatch):
    """A fit without datasets starts no dataset manager (the driver's Ray Data settings still reach the workers);
    a fit in a Ray this process started gets no placement-group cleaner; anywhere else both are as Ray makes them."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from vitray.train import trainer

    assert trainer.MISSING == "", trainer.MISSING

    def callbacks(started_here: bool, datasets: dict) -> dict[type, object]:
        monkeypatch.setattr(session, "started_here", lambda: started_here)
        made = trainer.LeanTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=2), datasets=datasets)
        return {type(cb): cb for cb in made._create_default_callbacks()}

    here = callbacks(True, {})
    assert PlacementGroupCleanerCallback not in here and trainer.NoDatasets in here and DatasetsCallback not in here
    assert here[trainer.NoDatasets].before_init_train_context([]) == {}  # no manager actor for the workers
    joined = callbacks(False, {"val": lambda: None})
    assert {PlacementGroupCleanerCallback, DatasetsCallback} <= joined.keys() and trainer.NoDatasets not in joined


MUON = """
import os, sys
import torch
from vitray.config import smoke
from vitray.storage import free_port
from vitray.tasks import make_task
from vitray.train.engine import build_engine

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
cfg = smoke().replace(model=dict(name="vit_smoke", num_classes=10))
engine = build_engine(make_task(cfg).build_model(), cfg, world_size=1, total_steps=4, on_gpu=False)
from deepspeed.runtime.zero.muon import original_muon
print("MUON", "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules, "torch._inductor.compile_fx" in sys.modules,
      original_muon.zeropower_via_newtonschulz5.compiled is None)
calls = []
torch.compile = lambda fn, **kw: calls.append(fn) or fn  # what the deferred decorator applies at the first call
original_muon.zeropower_via_newtonschulz5(torch.eye(2), steps=1)
print("CALLED", calls == [original_muon.zeropower_via_newtonschulz5.__wrapped__])
"""


def test_a_zero_engine_leaves_deepspeeds_muon_kernels_uncompiled_until_called():
    """DeepSpeed's ZeRO optimizer imports its Muon module (an isinstance check) and that module decorates three
    functions with torch.compile, importing the inductor: 0.9 s of CPU per worker. Deferred (`engine.join_group`):
    the engine imports the module but not the inductor, and a Muon function still gets torch.compile at its first call."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", MUON], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": root, "DS_ACCELERATOR": "cpu"})
    out = proc.stdout + proc.stderr
    assert "MUON True False True" in proc.stdout, out[-3000:]
    assert "CALLED True" in proc.stdout, out[-3000:]


def test_a_local_ray_is_started_without_workers_prestarted_for_no_job(monkeypatch):
    """`init_ray` starts a local Ray with Ray's first-driver prestart off (`session.LOCAL_RAYLET`), and leaves the
    environment alone when it joins a cluster. (That the pinned Ray honours it: `test_zero_stage_trains_with_falling_loss`
    finds no such worker in the session's Ray.)"""
    import ray

    seen = []
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(os.environ.get("RAY_prestart_worker_first_driver")))
    monkeypatch.delenv("RAY_prestart_worker_first_driver", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    session.init_ray()
    monkeypatch.delenv("RAY_ADDRESS")
    session.init_ray(num_cpus=1)
    assert seen == [None, "0"]
