"""Run by tests/test_async_save.py in its own processes: vit_tiny_test in DeepSpeed engines on 2 gloo ranks, saved
through `Checkpointer` both ways at the same step (Ray Train's context and report stood in for: they add nothing
here but an upload, which a local folder takes), and prints, as JSON, what each rank saw:

- the synchronous save's and the asynchronous one's files, and whether their contents are equal;
- whether COMMIT existed while rank 1's upload was held back, and after it was let go;
- the digests a fresh engine restored from the asynchronous save has, after the first engine trained on.

DeepSpeed prints to stdout too: the JSON is the last line.

    python tests/async_save_probe.py <port> <folder> <zero stage> [<zero stage> ...]
"""
import json
import os
import sys
import threading
import types

import torch
import torch.multiprocessing as mp

WORLD = 2


class _Context:
    """Ray Train's worker context, as far as the saves use it: the rank, and where checkpoints go."""

    def __init__(self, rank: int, root: str):
        import pyarrow.fs as pafs

        self.rank = rank
        self.storage = types.SimpleNamespace(storage_filesystem=pafs.LocalFileSystem(),
                                             build_checkpoint_path_from_name=lambda name: f"{root}/{name}")

    def get_world_rank(self):
        return self.rank

    def get_storage(self):
        return self.storage


def _fake_ray(rank: int, root: str, release: threading.Event):
    """ray.train.get_context and report: SYNC copies the folder now; ASYNC runs the upload function in a thread, as
    Ray Train's upload pool does, on rank 1 only once `release` is set."""
    import shutil

    import ray.train

    context = _Context(rank, root)

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_mode=None,
               checkpoint_upload_fn=None, **_):
        if checkpoint_upload_mode == ray.train.CheckpointUploadMode.ASYNC:
            def later():
                if rank == 1:
                    release.wait(60)
                checkpoint_upload_fn(checkpoint, checkpoint_dir_name)
                shutil.rmtree(checkpoint.path, ignore_errors=True)
            threading.Thread(target=later, daemon=True).start()
        else:
            shutil.copytree(checkpoint.path, f"{root}/{checkpoint_dir_name}", dirs_exist_ok=True)

    ray.train.get_context = lambda: context
    ray.train.report = report


def _engine(stage: int, steps: int):
    from vitray.config.schema import Config
    from vitray.models.registry import build_model
    from vitray.train.engine import build_engine, building, join_group

    cfg = Config().replace(model=dict(name="vit_tiny_test", num_classes=10), data=dict(image_size=16),
                           deepspeed=dict(zero_stage=stage), scaling=dict(num_workers=WORLD, use_gpu=False),
                           optim=dict(global_batch=WORLD * 2, micro_batch=2, total_steps=20, warmup_steps=1))
    torch.manual_seed(0)
    with building(cfg, WORLD, 20, on_gpu=False):
        model = build_model("vit_tiny_test", num_classes=10, image_size=16)
    engine = build_engine(model, cfg, WORLD, 20, on_gpu=False)
    train(engine, steps)
    return cfg, engine


def train(engine, steps: int) -> None:
    for _ in range(steps):
        x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2,))
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()


def _stage(rank: int, root: str, stage: int, release: threading.Event) -> dict:
    from vitray.data.stream import Position
    from vitray.train.checkpoint import module_digest, optimizer_digest
    from vitray.train.saves import Checkpointer

    cfg, engine = _engine(stage, 2)
    positions = {rank: Position(0, 4)}
    saved = {}
    for background in (False, True):
        run = f"{root}/zero{stage}-{'async' if background else 'sync'}"
        plan = types.SimpleNamespace(cfg=cfg.replace(storage=dict(checkpoint_every=2)), run_uri=run, endpoint=None,
                                     total_steps=20)
        _fake_ray(rank, run, release)
        saves = Checkpointer(engine, None, plan, WORLD, None)
        saves.background = background  # the config otherwise the same: vitray.json holds it
        figures = saves.save(2, positions, {"loss": 1.0})
        saved[background] = (run, saves, figures)
    run, saves, figures = saved[True]
    digests = {"optimizer": optimizer_digest(engine), "module": module_digest(engine.module)}
    train(engine, 2)  # the held copies must not follow the weights and moments changed in place
    trained = {"optimizer": optimizer_digest(engine), "module": module_digest(engine.module)}
    held_back = []
    for _ in range(3):
        saves.poll()
        held_back.append([os.path.exists(f"{run}/step_00000002/COMMIT"), saves.last_good])
    if rank == 1:
        release.set()
    saves.settle()
    committed = [os.path.exists(f"{run}/step_00000002/COMMIT"), saves.last_good]

    from deepspeed.utils import safe_get_full_fp32_param

    from vitray.train.checkpoint import full_weights

    whole = full_weights(engine)  # what each rank keeps of the gather: all on rank 0, one copy; nothing elsewhere
    live = {p.data_ptr() for p in engine.module.parameters()}
    gathered = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}  # collective
    kept = {"names": sorted(whole), "model": sorted(engine.module.state_dict()),
            "own_storage": len({t.untyped_storage().data_ptr() for t in whole.values()}) == len(whole)
            and not live & {t.data_ptr() for t in whole.values()},
            "equal_to_the_fp32_master": rank != 0 or all(torch.equal(whole[n], g) for n, g in gathered.items())}
    del whole, gathered

    _, fresh = _engine(stage, 0)
    fresh.load_checkpoint(f"{run}/step_00000002", tag="state")
    restored = {"optimizer": optimizer_digest(fresh), "module": module_digest(fresh.module)}
    return {"rank": rank, "stage": stage, "figures": figures, "sync_figures": saved[False][2],
            "held_back": held_back, "committed": committed, "digests": digests, "restored": restored,
            "trained": trained, "full_weights": kept,
            "same_files": _same(f"{saved[False][0]}/step_00000002", f"{run}/step_00000002")}


def _same(a: str, b: str) -> dict:
    """Relative file names in each folder, and the files (other than COMMIT) whose contents differ."""
    from safetensors.torch import load_file

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    differ = []
    for name in set(files(a)) & set(files(b)):
        x, y = os.path.join(a, name), os.path.join(b, name)
        if name.endswith(".pt"):
            equal = _equal(torch.load(x, weights_only=False), torch.load(y, weights_only=False))
        elif name.endswith(".safetensors"):
            equal = _equal(load_file(x), load_file(y))
        else:
            equal = name == "COMMIT" or open(x, "rb").read() == open(y, "rb").read()
        if not equal:
            differ.append(name)
    return {"sync": files(a), "async": files(b), "differ": sorted(differ)}


def _equal(x, y) -> bool:
    if torch.is_tensor(x):
        return torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    return type(x) is type(y) and (x == y if isinstance(x, (int, float, str, bool, type(None))) else True)


def _rank(rank: int, port: int, root: str, stages: list[int], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from vitray.train.engine import join_group

    join_group(on_gpu=False)
    for stage in stages:
        queue.put(_stage(rank, root, stage, threading.Event()))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown (see zero_init_probe.py)


if __name__ == "__main__":
    stages = [int(s) for s in sys.argv[3:]]
    q = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(int(sys.argv[1]), sys.argv[2], stages, q), nprocs=WORLD, start_method="spawn")
    print(json.dumps([q.get() for _ in range(WORLD * len(stages))]))
