"""Pretrain an image GPT (Chen et al., ICML 2020) without labels on the vitray engine: palette k-means (Ray Data +
scikit-learn), next-pixel objective, Ray Train + DeepSpeed; held-out NLL in bits per pixel.

    python jobs/pretrain_igpt.py --preset smoke
"""
from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitray.config.recipes import IGPT_PRESETS  # noqa: E402
from vitray.config import ConfigError, apply_overrides, model_override, preset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smoke", help=f"recipe: {', '.join(IGPT_PRESETS)} (default smoke)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--model", help="= model.name: detr_r50, detr_r101, detr_smoke")
    parser.add_argument("--run-name", help="= storage.run_name")
    parser.add_argument("--resume", action="store_true", help="continue the named run from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true")
    args = parser.parse_args(argv)
    try:
        extra = ([f"storage.run_name={args.run_name}"] if args.run_name else []) + model_override(args.model)
        cfg = apply_overrides(preset(args.preset, IGPT_PRESETS), args.overrides + extra)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        from vitray.config import validate
        from vitray.models.registry import get_spec

        validate(cfg)
        if get_spec(cfg.model.name).family != "igpt":
            raise ConfigError(f"model.name: {cfg.model.name} is not an iGPT model (igpt_s, igpt_m, igpt_l, igpt_smoke)")
        from vitray.storage import embedded_unless
        from vitray.train import launch

        chain = False
        try:
            with embedded_unless(cfg.storage.uri) as embedded:
                if chain:  # pretrain the backbone as a digit classifier first, into the same storage
                    from vitray.config.recipes import detr_backbone_smoke

                    base = detr_backbone_smoke().replace(storage=dict(uri=cfg.storage.uri,
                                                                      endpoint_url=cfg.storage.endpoint_url))
                    backbone = launch.run(base, embedded=embedded)
                    print(json.dumps({"backbone": backbone}), flush=True)
                    cfg = cfg.replace(transfer=dict(init_from=backbone["checkpoint"]))
                summary = launch.run(cfg, args.resume, embedded, timeline={"driver_start": STARTED})
        except launch.TrainingFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
