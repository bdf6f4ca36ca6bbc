"""Train DETR (Carion et al., ECCV 2020) on the vitray engine: detection shards from object storage, Ray Train +
DeepSpeed ZeRO, Hungarian-matched set loss, COCO box AP on the held-out shards (predictions exported in COCO
results format under <run>/coco/).

On a laptop (CPU, embedded S3, 64 px canvases of real scikit-learn digits, 2 workers; a few minutes): first the
backbone is pretrained as a digit classifier (the paper starts from an ImageNet one), then DETR trains from it:
    python jobs/train_detr.py --preset smoke
    python jobs/train_detr.py --preset smoke --set transfer.init_from=<a bit_smoke_s checkpoint>   # skip the first
COCO on a GPU cluster (shards written by jobs/write_shards.py --source coco:ANNOTATIONS.json:IMAGE_DIR):
    ray job submit --working-dir . -- python jobs/train_detr.py --preset r50_coco \\
        --set data.train_uri=s3://bucket/coco/train2017 --set data.val_uri=s3://bucket/coco/val2017 \\
        --set storage.uri=s3://bucket/vitray
Presets: smoke, r50_coco (300 epochs, LR drop after 200), r50_coco_500ep, r101_coco. --set overrides any field
(detection.* for the loss weights, max_boxes, backbone LR scale and crops).
"""
from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitray.config import DETR_PRESETS  # noqa: E402
from vitray.config.jobs import training_job  # noqa: E402

MODELS = "detr_r50, detr_r101, detr_smoke"


def run(cfg, args) -> int:
    from vitray.storage import embedded_unless
    from vitray.train import launch, rehearse

    chain = args.preset == "smoke" and not cfg.transfer.init_from and not args.resume
    with embedded_unless(cfg.storage.uri) as embedded:
        if chain:  # pretrain the backbone as a digit classifier first, into the same storage
            from vitray.config.recipes import detr_backbone_smoke

            base = detr_backbone_smoke().replace(storage=dict(uri=cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url))
            backbone = launch.run(base, embedded=embedded)
            print(json.dumps({"backbone": backbone}), flush=True)
            cfg = cfg.replace(transfer=dict(init_from=backbone["checkpoint"]))
        timeline = {"driver_start": STARTED}
        summary = (rehearse.run(cfg, args.rehearse, embedded, timeline, args.resume) if args.rehearse is not None
                   else launch.run(cfg, args.resume, embedded, timeline))
    print(json.dumps(summary))
    return 0


main = training_job(__doc__, DETR_PRESETS, MODELS, run, kind="detection")

if __name__ == "__main__":
    sys.exit(main())
