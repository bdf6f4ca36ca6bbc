"""Scaling study on Ray Tune (paper Sec. 4.4, Figure 5): pretrain model families and sizes at several compute
budgets, score each on a transfer task, and fit how transfer error falls with pretraining compute.

On a laptop (~10 minutes on 2 cores: ViT and BiT, 2 sizes each, 4 and 16 epochs of the digits 0–4; transfer =
10-shot classification of the digits 5–9; everything in ./studies/smoke):
    python jobs/scaling_study.py --preset smoke
On a Ray cluster, the paper's Table 6 grid (18 JFT pretraining runs, each fine-tuned on ImageNet):
    ray job submit --working-dir . -- python jobs/scaling_study.py --preset table6 \\
        --study-uri s3://my-bucket/studies/table6 --set data.train_uri=s3://my-bucket/jft/train \\
        --transfer-train s3://my-bucket/imagenet/train --transfer-test s3://my-bucket/imagenet/val
Your own grid: --models vit_s16,vit_b16,bit_r50x1 --budgets 1e3,1e4 --budget-unit exaflops (or epochs, steps).
An interrupted study continues with --resume (finished trials are not run again). Results land in the study
folder: results.csv / results.json (one row per trial), fits.json, figure5.png, and Tune's TensorBoard logs
under tune/ (tensorboard --logdir <study>/tune).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitray.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from vitray.tune.study import BUDGET_UNITS, STUDIES, grid

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", help=f"study: {', '.join(STUDIES)} (default smoke)")
    p.add_argument("--study-uri", help="study folder, local or s3:// (default ./studies/<preset>)")
    p.add_argument("--endpoint-url", default="", help="S3-compatible endpoint (MinIO, Ceph); default AWS")
    p.add_argument("--models", help="comma-separated models: replaces the preset's grid (with --budgets)")
    p.add_argument("--budgets", help="comma-separated budgets in --budget-unit")
    p.add_argument("--budget-unit", choices=BUDGET_UNITS, help="epochs | steps | exaflops (pretraining compute)")
    p.add_argument("--transfer", choices=("fewshot", "finetune"), help="transfer metric (default: the preset's)")
    p.add_argument("--transfer-train", help="shards the transfer read-out is fitted on")
    p.add_argument("--transfer-test", help="shards transfer accuracy is measured on")
    p.add_argument("--shots", type=int, help="examples per class for fewshot (default 10)")
    p.add_argument("--asha", action="store_true", help="stop trials whose training loss trails early (ASHA)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a field of every trial's config (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the study in --study-uri")
    p.add_argument("--local-cpus", type=float, default=0,
                   help="logical CPUs of the local Ray this job starts when it joins no cluster (default: the"
                        " machine's cores). More than the cores lets trials overlap their start-up waits")
    args = p.parse_args(argv)

    from vitray.storage import Endpoint
    from vitray.tune.run import run_study

    try:
        if args.preset not in STUDIES:
            raise ConfigError(f"--preset: unknown study {args.preset!r} (known: {', '.join(STUDIES)})")
        study = STUDIES[args.preset]()
        changes: dict = {"asha": args.asha or study.asha}
        if args.models or args.budgets:
            if not (args.models and args.budgets):
                raise ConfigError("--models/--budgets: give both to replace the preset's grid")
            try:
                budgets = [float(b) for b in args.budgets.split(",")]
            except ValueError:
                raise ConfigError(f"--budgets: {args.budgets!r} is not a comma-separated list of numbers") from None
            changes["points"] = grid([m.strip() for m in args.models.split(",")], budgets)
        for flag in ("budget_unit", "transfer", "transfer_train", "transfer_test", "shots"):
            if getattr(args, flag) is not None:
                changes[flag] = getattr(args, flag)
        if args.transfer_train or args.transfer_test:
            changes["builtin"] = ""
        study = dataclasses.replace(study, **changes)
        endpoint = Endpoint(url=args.endpoint_url or None)
        out = run_study(study, args.overrides, args.study_uri or os.path.join("studies", args.preset), endpoint,
                        args.resume, local_cpus=args.local_cpus)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"files": out["files"], "compute_optimal": out["compute_optimal"]}))
    failed = [r["trial"] for r in out["rows"] if r["status"] == "error"]
    if failed:
        print(f"error: trials failed: {', '.join(failed)} (see {out['files'][0].rsplit('/', 1)[0]}/tune)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
