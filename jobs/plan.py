"""The cost planner: what a configuration needs before it runs — memory per device (ZeRO's formulas for parameters,
gradients and Adam states, plus measured activations), FLOPs, accelerator-days and wall-clock at a given MFU.
Refuses (exit 2) a configuration that cannot fit on its accelerator. Starts no Ray and no accelerator.

    python jobs/plan.py --preset h14_jft --set scaling.num_workers=1024 --set optim.micro_batch=4 --accelerator H100
    python jobs/plan.py --preset l16_i21k --set deepspeed.zero_stage=3 --accelerator A100 --mfu 0.45 --json
    python jobs/plan.py --preset b16_jft --set model.name=bit_r152x2     # any registered model (--model = this)

The dataset size comes from the preset's dataset (jft 303M, i21k 14.2M, imagenet 1.28M images) unless --images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="h14_jft")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--model", help="= model.name (ViT, BiT ResNet or hybrid)")
    p.add_argument("--accelerator", help="= scaling.accelerator, e.g. H100, A100, TPUv3-core")
    p.add_argument("--images", type=float, help="images per epoch (default: the preset's dataset)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to plan with (default 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)

    from vitray import cost
    from vitray.config import ConfigError, apply_overrides, preset, validate
    from vitray.config.recipes import DATASETS

    extra = [f"model.name={args.model}"] if args.model else []
    extra += [f"scaling.accelerator={args.accelerator}"] if args.accelerator else []
    try:
        cfg = apply_overrides(preset(args.preset), args.overrides + extra)
        validate(cfg if cfg.data.train_uri or cfg.data.builtin else cfg.replace(data=dict(train_uri="planned")))
        dataset = args.preset.rsplit("_", 1)[-1]
        images = args.images or (DATASETS[dataset]["num_images"] if dataset in DATASETS else None)
        if images is None:
            raise ConfigError(f"--images: preset {args.preset!r} names no paper dataset; give the images per epoch")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu: {args.mfu} is not in (0, 1]")
        estimate = cost.estimate(cfg, images, args.mfu, host=not cfg.scaling.use_gpu)
        print(json.dumps(estimate.to_dict()) if args.json else estimate.summary())
        cost.check_fits(estimate)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
