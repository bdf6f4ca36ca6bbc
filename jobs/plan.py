"""The cost planner: what a configuration needs before it runs — memory per device (ZeRO's formulas for parameters,
gradients and Adam states, plus measured activations), FLOPs, accelerator-days and wall-clock at a given MFU.
Refuses (exit 2) a configuration that cannot fit on its accelerator. Starts no Ray and no accelerator.

    python jobs/plan.py --preset h14_jft --set scaling.num_workers=1024 --set optim.micro_batch=4 --accelerator H100
    python jobs/plan.py --preset l16_i21k --set deepspeed.zero_stage=3 --accelerator A100 --mfu 0.45 --json
    python jobs/plan.py --preset b16_jft --set model.name=bit_r152x2     # any registered model (--model = this)

The dataset size comes from the preset's dataset (jft 303M, i21k 14.2M, imagenet 1.28M images) unless --images.

The data line: the images/s the accelerators consume at that MFU, the CPUs needed to decode them and whether the
cluster has them. The decode rate is measured for a few seconds on the first samples of a few shards of
data.train_uri when it is set (the same decode + crop + flip as training, one core, before anything starts):

    python jobs/plan.py --preset b16_i21k --accelerator H100 --set scaling.num_workers=64 \
        --set data.train_uri=s3://bucket/i21k/train [--node-cpus 192] [--data-cpus 256]
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
    p.add_argument("--decode-rate", type=float, help="images/s one CPU decodes (default: measured on data.train_uri"
                   " when set, else ImageNet-sized JPEGs' rate)")
    p.add_argument("--node-cpus", type=float, help="CPUs per accelerator node (default: the cloud instance that"
                   " carries 8 of --accelerator, e.g. 192 for H100)")
    p.add_argument("--data-cpus", type=float, default=0.0, help="CPUs on CPU-only data nodes (default 0)")
    args = p.parse_args(argv)

    from vitray import cost
    from vitray.config import ConfigError, apply_overrides, preset, validate
    from vitray.config.recipes import DATASETS
    from vitray.data.manifest import DataError

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
        rate, source = decode_rate(cfg, args.decode_rate)
        data = cost.data_plan(cfg, estimate, rate, source, args.node_cpus, args.data_cpus)
        if args.json:
            print(json.dumps({**estimate.to_dict(), "data": data.to_dict() if data else None}))
        else:
            print(estimate.summary())
            print(data.summary() if data else "data: no accelerator peak known, so no consumption rate to plan for")
        cost.check_fits(estimate)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def decode_rate(cfg, given: float | None) -> tuple[float, str]:
    """Images/s per CPU of the training decode: given, measured on the configured shards, or the reference."""
    from vitray import cost
    from vitray.data import decode_rate as rate
    from vitray.storage import Endpoint

    if given:
        return given, "given"
    if not cfg.data.train_uri:
        return cost.REFERENCE_DECODE_PER_CPU, "assumed: ImageNet-sized JPEGs; set data.train_uri to measure yours"
    endpoint = Endpoint(url=cfg.storage.endpoint_url or None, region=cfg.storage.region)
    measured = rate.measure(cfg.data.train_uri, endpoint, cfg.data.image_size, area_min=cfg.data.crop_area_min)
    return measured.per_cpu, f"measured on {measured.source}"


if __name__ == "__main__":
    sys.exit(main())
