"""Fine-tune a pretrained ViT the paper's way (Sec. 3.2, App. B.1.1, Table 4): SGD with momentum 0.9, no weight
decay, cosine decay with warmup, gradient clip 1, at a higher resolution than pretraining — position embeddings
interpolated in 2-D, the pretraining head replaced by a zero-initialised linear layer, optional Polyak averaging
of the weights for evaluation. Runs on the same Ray Train + DeepSpeed engine and S3 data path as pretraining.

On a laptop (the smoke chain: pretrain the tiny ViT on digits at 16 px, then fine-tune it at 24 px):
    python jobs/finetune.py --preset smoke
From a checkpoint or a released .npz, on a cluster:
    ray job submit --working-dir . -- python jobs/finetune.py --preset b16_cifar10 \\
        --init-from s3://bucket/vitray/runs/<run>/step_00010000 \\
        --set data.train_uri=s3://bucket/cifar10/train --set data.val_uri=s3://bucket/cifar10/val \\
        --set storage.uri=s3://bucket/vitray
Presets: smoke and <model>_<dataset> for model in b16, l16, h14 and dataset in imagenet, cifar10, cifar100, pets,
flowers, vtab (Table 4's steps; the first LR of its grid — sweep the rest with --set optim.lr=…).
"""
from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitray.config import FINETUNE_PRESETS, ConfigError  # noqa: E402
from vitray.config.jobs import training_job  # noqa: E402

MODELS = "vit_b16, R50+ViT-B/16, bit_r152x2, ... (any registered classification model)"


def run(cfg, args) -> int:
    from vitray.config import smoke

    chain = args.preset == "smoke" and not cfg.transfer.init_from
    if not chain and not cfg.transfer.init_from:
        raise ConfigError("transfer.init_from: fine-tuning needs pretrained weights: --init-from URI")
    from vitray.storage import embedded_unless
    from vitray.train import launch, rehearse

    with embedded_unless(cfg.storage.uri) as embedded:
        if chain:  # the smoke chain: pretrain first, into the same storage
            base = smoke().replace(storage=dict(uri=cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url))
            pre = launch.run(base, embedded=embedded)
            print(json.dumps({"pretrain": pre}), flush=True)
            cfg = cfg.replace(transfer=dict(init_from=pre["checkpoint"]))
        timeline = {"driver_start": STARTED}
        summary = (rehearse.run(cfg, args.rehearse, embedded, timeline, args.resume) if args.rehearse is not None
                   else launch.run(cfg, args.resume, embedded, timeline))
    if chain:
        summary = {"pretrain_val_top1": pre["val_top1"], **summary, "wall_s": time.time() - STARTED}
    print(json.dumps(summary))
    return 0


main = training_job(__doc__, FINETUNE_PRESETS, MODELS, run, init_from=True)

if __name__ == "__main__":
    sys.exit(main())
