"""Engine overhead: steady-state optimizer-step time of vitray's engine (Ray Train TorchTrainer + DeepSpeed ZeRO-1,
2 CPU workers, gloo) against plain torch.distributed DDP (gloo, 2 processes) on the same tiny ViT, batch, optimizer
(AdamW + clip 1.0 + warmup/decay schedule) and steps. Batches are in memory in both, so this isolates the engine
(ingest is benchmarks/ingest.py). Runs are interleaved; reported as a ratio (goal ≤ 1.10×).

    python benchmarks/engine_overhead.py [--steps 60] [--warmup 15] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

from common import write_result


def bench_config(model: str, image_size: int, micro: int, steps: int, zero: int = 1):
    from vitray.config import smoke

    return smoke().replace(
        model=dict(name=model, num_classes=10),
        data=dict(image_size=image_size),
        optim=dict(global_batch=2 * micro, micro_batch=micro, total_steps=steps, warmup_steps=5, schedule="linear"),
        deepspeed=dict(zero_stage=zero, precision="fp32"),
        scaling=dict(num_workers=2, cpus_per_worker=1, use_gpu=False),
    )


def _batch(cfg):
    import torch

    g = torch.Generator().manual_seed(0)
    s = cfg.data.image_size
    return torch.randn(cfg.optim.micro_batch, 3, s, s, generator=g), torch.randint(0, 10, (cfg.optim.micro_batch,), generator=g)


def ray_worker(config: dict) -> None:
    import json

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import torch
    import torch.nn.functional as F

    from vitray.config.schema import Config
    from vitray.tasks.classification import ClassificationTask
    from vitray.train.engine import build_engine

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Config.from_dict(config["cfg"])
    engine = build_engine(ClassificationTask(cfg).build_model(), cfg, 2, cfg.optim.total_steps, on_gpu=False)
    x, y = _batch(cfg)
    times = []
    for _ in range(cfg.optim.total_steps):
        t = time.perf_counter()
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - t)
    if ray.train.get_context().get_world_rank() == 0:  # one machine: the driver reads this file
        with open(config["out"], "w") as f:
            json.dump(times, f)


def run_ray(cfg, storage: str) -> list[float]:
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        ray_worker, train_loop_config={"cfg": cfg.to_dict(), "out": os.path.join(storage, "times.json")}, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"engine-{time.time_ns()}", storage_path=storage),
    )
    trainer.fit()
    with open(os.path.join(storage, "times.json")) as f:
        return json.load(f)


def ddp_worker(rank: int, cfg_dict: dict, port: int, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from vitray.config.schema import Config
    from vitray.tasks.classification import ClassificationTask

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = Config.from_dict(cfg_dict)
    model = torch.nn.parallel.DistributedDataParallel(ClassificationTask(cfg).build_model())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    total, warm = cfg.optim.total_steps, cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm))))
    x, y = _batch(cfg)
    times = []
    for _ in range(total):
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def run_ddp(cfg) -> list[float]:
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mp.spawn(ddp_worker, args=(cfg.to_dict(), port, out.name), nprocs=2, join=True)
        with open(out.name) as f:
            return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_smoke")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=15, help="steps left out of the steady state")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage of the vitray side")
    args = p.parse_args()

    import ray

    cfg = bench_config(args.model, args.image_size, args.micro_batch, args.steps, args.zero)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray_med, ddp_med = [], []
    with tempfile.TemporaryDirectory() as storage:
        for _ in range(args.rounds):  # interleaved
            ray_med.append(statistics.median(run_ray(cfg, storage)[args.warmup:]))
            ddp_med.append(statistics.median(run_ddp(cfg)[args.warmup:]))
    ray.shutdown()
    ratios = [r / d for r, d in zip(ray_med, ddp_med)]
    write_result(f"engine_overhead_zero{args.zero}", {
        "what": f"median steady-state step seconds: Ray Train + DeepSpeed ZeRO-{args.zero} vs torch DDP, 2 CPU workers, gloo",
        "model": args.model, "image_size": args.image_size, "micro_batch_per_worker": args.micro_batch,
        "steps": args.steps, "steady_state_from_step": args.warmup,
        "ray_deepspeed_step_s": ray_med, "ddp_step_s": ddp_med,
        "ratio_per_round": ratios, "ratio_median": statistics.median(ratios), "goal": "<= 1.10",
    })


if __name__ == "__main__":
    main()
