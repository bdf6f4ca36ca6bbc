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

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from vitray.config import PRESETS, ConfigError, apply_overrides, model_override, preset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="h14_jft", help=f"recipe: {', '.join(PRESETS)} (default h14_jft)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--model", help="= model.name: vit_b16, R50+ViT-B/16, bit_r152x2, ... (any registered model)")
    parser.add_argument("--run-name", help="name of the run folder under <storage>/runs (= storage.run_name)")
    parser.add_argument("--resume", action="store_true", help="continue the named run from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)

    try:
        extra = ([f"storage.run_name={args.run_name}"] if args.run_name else []) + model_override(args.model)
        cfg = apply_overrides(preset(args.preset), args.overrides + extra)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        return run(cfg, args.resume)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(cfg, resume: bool) -> int:
    from vitray.config import validate
    from vitray.storage import embedded_unless
    from vitray.train import launch

    validate(cfg)  # cheap checks first: no server, no Ray for a bad config
    try:
        with embedded_unless(cfg.storage.uri) as embedded:
            summary = launch.run(cfg, resume, embedded, timeline={"driver_start": STARTED})
    except launch.TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
