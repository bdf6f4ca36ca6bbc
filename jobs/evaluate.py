"""Evaluate a checkpoint's frozen features the paper's way: few-shot ridge regression (1/5/10/25 shots, several
seeds, mean ± std) and a linear probe (logistic regression), features computed over the shards by Ray Data.

    python jobs/evaluate.py --checkpoint s3://bucket/vitray/runs/<run>/step_N \\
        --train s3://bucket/cifar10/train --test s3://bucket/cifar10/val [--endpoint-url URL] [--image-size 224]
On a laptop: python jobs/evaluate.py --smoke   (pretrains the smoke model first, evaluates on the digits)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="vitray checkpoint folder")
    p.add_argument("--train", help="shards the few-shot examples and the probe are fitted on")
    p.add_argument("--test", help="held-out shards")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--image-size", type=int, default=0, help="default: the checkpoint's training resolution")
    p.add_argument("--shots", default="1,5,10,25")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="pretrain the smoke model (embedded S3, digits), then evaluate")
    args = p.parse_args(argv)

    from vitray import storage
    from vitray.config import ConfigError, smoke
    from vitray.eval.features import extract
    from vitray.eval.linear import fewshot, linear_probe
    from vitray.train import launch

    if not args.smoke and not (args.checkpoint and args.train and args.test):
        p.error("give --checkpoint, --train and --test (or --smoke)")
    try:
        with storage.embedded_unless("" if args.smoke else "given") as embedded:
            endpoint = embedded.endpoint if embedded else storage.Endpoint(url=args.endpoint_url)
            ckpt, train, test = args.checkpoint, args.train, args.test
            if args.smoke:
                summary = launch.run(smoke(), embedded=embedded)
                base = f"s3://{embedded.bucket}/datasets/digits"
                ckpt, train, test = summary["checkpoint"], f"{base}/train", f"{base}/val"
            for name, uri in (("--checkpoint", storage.join(ckpt, "vitray.json")), ("--train", train), ("--test", test)):
                if not storage.exists(uri, endpoint):
                    raise ConfigError(f"{name}: {uri} not found")
            import ray

            if not ray.is_initialized():
                ray.init(address=os.environ.get("RAY_ADDRESS", "local"), logging_level="WARNING")
            size = args.image_size or json.loads(storage.read_bytes(storage.join(ckpt, "vitray.json"), endpoint))["config"]["data"]["image_size"]
            tx, ty = extract(ckpt, train, endpoint, size)
            vx, vy = extract(ckpt, test, endpoint, size)
    except (ConfigError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shots = tuple(int(k) for k in args.shots.split(","))
    result = {"checkpoint": ckpt, "train_samples": len(ty), "test_samples": len(vy),
              "fewshot": {str(k): {"mean": m, "std": s} for k, (m, s) in
                          fewshot(tx, ty, vx, vy, shots=shots, seeds=tuple(range(args.seeds))).items()},
              "linear_probe": linear_probe(tx, ty, vx, vy)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
