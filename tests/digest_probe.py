"""Run by tests/test_train.py in its own processes: vit_tiny_test built on 3 gloo ranks under ZeRO-3's zero.Init
(the last rank's slices padded) and plainly, with the same seed; prints, as JSON, the digest `module_digest` takes
of the partitioned model on every rank and the plain model's sum of |w|.

    python tests/digest_probe.py <port>
"""
import json
import os
import sys

import torch
import torch.multiprocessing as mp

WORLD = 3  # 2 ranks split these layers evenly; 3 leave padding in the last slice


def _rank(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from vitray.config.schema import Config
    from vitray.models.registry import build_model
    from vitray.train.checkpoint import module_digest
    from vitray.train.engine import building, join_group

    join_group(on_gpu=False)
    cfg = Config().replace(model=dict(name="vit_tiny_test", num_classes=10), deepspeed=dict(zero_stage=3),
                           scaling=dict(num_workers=WORLD, use_gpu=False), optim=dict(global_batch=WORLD, micro_batch=1))
    torch.manual_seed(0)
    plain = build_model("vit_tiny_test", num_classes=10, image_size=16)
    torch.manual_seed(0)
    with building(cfg, WORLD, 10, on_gpu=False):
        parted = build_model("vit_tiny_test", num_classes=10, image_size=16)
    padded = 0
    for p in parted.parameters():  # the padding holds whatever torch.empty left there: make it loud
        size = p.ds_tensor.numel()
        mine = max(0, min(size, p.ds_numel - rank * size))
        p.ds_tensor[mine:] = 1e30
        padded += size - mine
    digest = module_digest(parted)
    queue.put({"rank": rank, "digest": digest, "plain": sum(p.double().abs().sum().item() for p in plain.parameters()),
               "padded": padded})
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown (see zero_init_probe.py)


if __name__ == "__main__":
    q = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(int(sys.argv[1]), q), nprocs=WORLD, start_method="spawn")
    print(json.dumps([q.get() for _ in range(WORLD)]))
