"""Evaluate a checkpoint the paper's ways, as a Ray job (the images go through Ray Data model actors):

  top1      its own head's top-1 accuracy on --test, exact count (Polyak-averaged weights when the run kept them)
  fewshot   frozen pre-logit features, closed-form ridge regression onto {-1, 1}^K: 1/5/10/25 shots, mean ± std
  probe     logistic regression on the frozen features of --layers (final = pre-logits; k = after block k)

    python jobs/evaluate.py --checkpoint s3://bucket/vitray/runs/<run>/step_N --test s3://bucket/cifar10/val \\
        [--train s3://bucket/cifar10/train] [--layers final,8,16] [--endpoint-url URL] [--image-size 224]
On a laptop: python jobs/evaluate.py --smoke   (pretrains the smoke model first, evaluates on the digits)

--eval defaults to every protocol the arguments allow: top1 when the checkpoint's head has as many classes as
--test's manifest, fewshot and probe when --train is given. A DETR checkpoint gets COCO box AP on --test instead.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROTOCOLS = ("top1", "fewshot", "probe")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="vitray checkpoint folder")
    p.add_argument("--test", help="held-out shards")
    p.add_argument("--train", help="shards the few-shot examples and the probe are fitted on")
    p.add_argument("--eval", default="", help=f"comma-separated, of {', '.join(PROTOCOLS)} (default: all that apply)")
    p.add_argument("--layers", default="final", help="probe features: final and/or block indices, e.g. final,2,4")
    p.add_argument("--pool", default="mean", choices=("mean", "cls"), help="how block outputs become one vector")
    p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"),
                   help="auto: the Polyak average when the run kept one")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--image-size", type=int, default=0, help="default: the checkpoint's training resolution")
    p.add_argument("--shots", default="1,5,10,25")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--actors", type=int, default=2, help="model replicas Ray Data runs the images through")
    p.add_argument("--smoke", action="store_true", help="pretrain the smoke model (embedded S3, digits), then evaluate")
    args = p.parse_args(argv)

    from vitray import storage
    from vitray.config import ConfigError, smoke
    from vitray.data.shards import DataError, read_manifest
    from vitray.eval.features import FINAL, extract_splits, top1
    from vitray.eval.linear import fewshot, linear_probe
    from vitray.train import launch

    if not args.smoke and not (args.checkpoint and args.test):
        p.error("give --checkpoint and --test (and --train for fewshot and probe), or --smoke")
    try:
        asked = [e for e in args.eval.split(",") if e]
        for e in asked:
            if e not in PROTOCOLS:
                raise ConfigError(f"--eval: {e!r} is not one of {', '.join(PROTOCOLS)}")
        layers = [FINAL if k == FINAL else int(k) for k in args.layers.split(",")]
        shots = tuple(int(k) for k in args.shots.split(","))
    except ValueError as e:
        print(f"error: --layers/--shots: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result: dict = {}
    try:
        with storage.embedded_unless("" if args.smoke else "given") as embedded:
            endpoint = embedded.endpoint if embedded else storage.Endpoint(url=args.endpoint_url)
            ckpt, train, test = args.checkpoint, args.train, args.test
            if args.smoke:
                summary = launch.run(smoke(), embedded=embedded)
                base = f"s3://{embedded.bucket}/datasets/digits"
                ckpt, train, test = summary["checkpoint"], f"{base}/train", f"{base}/val"

            # Everything checked before Ray starts: the checkpoint, the shards, the protocols, the layers.
            meta_uri = storage.join(ckpt, "vitray.json")
            if not storage.exists(meta_uri, endpoint):
                raise ConfigError(f"--checkpoint: {meta_uri} not found")
            saved = json.loads(storage.read_bytes(meta_uri, endpoint))["config"]
            from vitray.models.registry import get_spec

            if get_spec(saved["model"]["name"]).family == "detr":  # detection: COCO AP on --test, in one process
                from vitray.tasks.detection.task import evaluate_checkpoint

                read_manifest(test, endpoint, "--test")
                print(json.dumps({"checkpoint": ckpt, **evaluate_checkpoint(ckpt, test, endpoint)}))
                return 0
            test_classes = len(read_manifest(test, endpoint, "--test").classes)
            if train:
                read_manifest(train, endpoint, "--train")
            head = saved["model"]["num_classes"]
            if not asked:
                asked = (["top1"] if head == test_classes else []) + (["fewshot", "probe"] if train else [])
            if "top1" in asked and head != test_classes:
                raise ConfigError(f"--eval top1: the checkpoint's head has {head} classes, --test has {test_classes}")
            if {"fewshot", "probe"} & set(asked) and not train:
                raise ConfigError("--eval fewshot/probe: need --train, the shards the read-out is fitted on")
            depth = get_spec(saved["model"]["name"]).depth
            bad = [k for k in layers if k != FINAL and not 0 <= k <= depth]
            if bad:
                raise ConfigError(f"--layers: {bad[0]} is not final or a block index 0..{depth}")

            import ray

            from vitray.train.launch import init_ray

            if not ray.is_initialized():
                init_ray()
            size = args.image_size or saved["data"]["image_size"]
            common = dict(endpoint=endpoint, image_size=size, weights=args.weights, actors=args.actors)
            result = {"checkpoint": ckpt, "image_size": size, "weights": args.weights}
            if "top1" in asked:
                accuracy, count = top1(ckpt, test, **common)
                result["top1"] = {"accuracy": accuracy, "samples": count}
            if {"fewshot", "probe"} & set(asked):
                wanted = sorted(set(layers) | ({FINAL} if "fewshot" in asked else set()), key=str)
                (tx, ty), (vx, vy) = extract_splits(ckpt, [train, test], layers=wanted, pool=args.pool, **common)
                result.update(train_samples=len(ty), test_samples=len(vy))
                if "fewshot" in asked:
                    result["fewshot"] = {str(k): {"mean": m, "std": s} for k, (m, s) in fewshot(
                        tx[FINAL], ty, vx[FINAL], vy, shots=shots, seeds=tuple(range(args.seeds))).items()}
                if "probe" in asked:
                    result["linear_probe"] = {str(k): linear_probe(tx[k], ty, vx[k], vy) for k in layers}
    except (ConfigError, DataError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
