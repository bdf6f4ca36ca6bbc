"""Pretrain a Vision Transformer: by default the paper's ViT-H/14 recipe (Table 3: JFT-300M, 14 epochs, Adam,
batch 4096, LR 3e-4, warmup 10k, linear decay, weight decay 0.1), on Ray Train + DeepSpeed ZeRO.

On a laptop (CPU, embedded S3, scikit-learn digits, 2 workers, ZeRO-2; a few minutes):
    python jobs/pretrain_vit_h14.py --preset smoke
On a Ray cluster:
    ray job submit --working-dir . -- python jobs/pretrain_vit_h14.py \\
        --set data.train_uri=s3://my-bucket/jft/train --set storage.uri=s3://my-bucket/vitray
Override any config field with --set section.field=value; --print-config shows the resolved config.
"""
from __future__ import annotations

import time

STARTED = time.time()  # logged with the run's start-up timeline (benchmarks/submit_latency.py)

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from vitray.config import PRESETS  # noqa: E402
from vitray.config.jobs import training_job  # noqa: E402

MODELS = "vit_b16, R50+ViT-B/16, bit_r152x2, ... (any registered classification model)"


def run(cfg, args) -> int:
    from vitray.storage import embedded_unless
    from vitray.train import launch, rehearse

    with embedded_unless(cfg.storage.uri) as embedded:  # the config was checked first: no server for a bad one
        timeline = {"driver_start": STARTED}
        summary = (rehearse.run(cfg, args.rehearse, embedded, timeline, args.resume) if args.rehearse is not None
                   else launch.run(cfg, args.resume, embedded, timeline))
    print(json.dumps(summary))
    return 0


main = training_job(__doc__, PRESETS, MODELS, run, default="h14_jft")

if __name__ == "__main__":
    sys.exit(main())
