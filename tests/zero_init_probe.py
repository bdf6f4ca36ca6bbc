"""Run by tests/test_every_model.py in its own processes: builds each named model on 2 gloo ranks under DeepSpeed's
`zero.Init` (ZeRO-3, partitioned layer by layer) and plainly, with the same seed, and prints, as JSON, per model,
the parameters whose gathered values differ and the largest model state one rank held while building.

    python tests/zero_init_probe.py <port> <model> [<model> ...]
"""
import json
import os
import sys

import torch
import torch.multiprocessing as mp


def _rank(rank: int, port: int, names: list[str], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from vitray.config.schema import Config
    from vitray.models.registry import build_model, get_spec
    from vitray.train.engine import building, join_group

    join_group(on_gpu=False)
    out = {}
    for name in names:
        cfg = Config().replace(model=dict(name=name, num_classes=10), deepspeed=dict(zero_stage=3),
                               scaling=dict(num_workers=2, use_gpu=False), optim=dict(global_batch=2, micro_batch=1))
        size = get_spec(name).size_multiple * 2
        torch.manual_seed(0)
        plain = build_model(name, num_classes=10, image_size=size)
        torch.manual_seed(0)
        with building(cfg, 2, 10, on_gpu=False):
            parted = build_model(name, num_classes=10, image_size=size)
        held = sum(p.ds_tensor.numel() for p in parted.parameters())
        differ = []
        for (key, a), b in zip(plain.named_parameters(), parted.parameters()):
            with deepspeed.zero.GatheredParameters([b]):
                if not torch.equal(a, b):
                    differ.append(key)
        out[name] = {"differ": differ, "params": sum(p.numel() for p in plain.parameters()), "held": held}
    if rank == 0:
        queue.put(out)
    # Leave together and close gloo first: a rank that exits with gloo's threads still running aborts ("terminate
    # called without an active exception"), once in a while, which fails the whole probe.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # ... and skip the interpreter's teardown: the abort was still seen under load (3 of 5 full quick runs on a
    # busy 2-core machine), from a C++ thread destroyed at exit. What this rank had to say is in the queue already.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(int(sys.argv[1]), sys.argv[2:], q), nprocs=2, start_method="spawn")
    print(json.dumps(q.get()))
