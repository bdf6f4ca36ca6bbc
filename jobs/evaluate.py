"""Evaluate a checkpoint the paper's ways, as a Ray job (the images go through Ray Data model actors):

  top1      its own head's top-1 accuracy on --test, exact count (Polyak-averaged weights when the run kept them)
  fewshot   frozen pre-logit features, closed-form ridge regression onto {-1, 1}^K: 1/5/10/25 shots, mean ± std
  probe     logistic regression on the frozen features of --layers (final = pre-logits; k = after block k)

    python jobs/evaluate.py --checkpoint s3://bucket/vitray/runs/<run>/step_N --test s3://bucket/cifar10/val \\
        [--train s3://bucket/cifar10/train] [--layers final,8,16] [--endpoint-url URL] [--image-size 224]
    python jobs/evaluate.py --checkpoint ViT-B_16.npz --train ./cifar10/train --test ./cifar10/val   # released
On a laptop: python jobs/evaluate.py --smoke   (pretrains the smoke model first, evaluates on the digits)
    python jobs/evaluate.py --checkpoint runs/<run>/step_N   (a run trained on the built-in digits: --train and
        --test default to the digits, served again by an embedded S3 server)

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
    p.add_argument("--checkpoint", help="vitray checkpoint folder (<storage>/runs/<run>/step_N) or a released .npz")
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
    from vitray.data.catalog import read_manifest
    from vitray.data.manifest import DataError
    from vitray.eval.features import FINAL, extract_splits, top1
    from vitray.eval.linear import fewshot, linear_probe
    from vitray.train import launch

    if not args.smoke and not args.checkpoint:
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
    from vitray.checkpoints import CheckpointError, describe
    from vitray.tasks import task_class

    try:
        about = describe(args.checkpoint, storage.Endpoint(url=args.endpoint_url)) if args.checkpoint else None
        digits = (about and not args.test and (about["config"] or {}).get("data", {}).get("builtin") == "digits")
        if args.checkpoint and not args.test and not digits:
            raise ConfigError("--test: give the held-out shards (the checkpoint was not trained on the built-in digits)")
        with storage.embedded_unless("" if args.smoke or digits else "given") as embedded:
            endpoint = embedded.endpoint if embedded else storage.Endpoint(url=args.endpoint_url)
            ckpt, train, test = args.checkpoint, args.train, args.test
            if args.smoke:
                summary = launch.run(smoke(), embedded=embedded)
                ckpt = summary["checkpoint"]
                about = describe(ckpt, endpoint)
            if args.smoke or digits:  # the digits again, into this process's embedded server
                from vitray.data.datasets import builtin_uri, write_digits

                base = builtin_uri(f"s3://{embedded.bucket}", "digits")
                write_digits(base, endpoint)
                train, test = train or f"{base}/train", f"{base}/val"

            # Everything checked before Ray starts: the checkpoint, the shards, the protocols, the layers.
            read_manifest(test, endpoint, "--test")
            own = task_class(kind=about["kind"]).evaluate_checkpoint(ckpt, test, endpoint)
            if own is not None:  # the task's own protocol (DETR: COCO box AP), in one process
                print(json.dumps({"checkpoint": ckpt, **own}))
                return 0
            test_classes = len(read_manifest(test, endpoint, "--test").classes)
            if train:
                read_manifest(train, endpoint, "--train")
            head = about["num_classes"]
            if not asked:
                asked = (["top1"] if head == test_classes else []) + (["fewshot", "probe"] if train else [])
            if "top1" in asked and head != test_classes:
                raise ConfigError(f"--eval top1: the checkpoint's head has {head} classes, --test has {test_classes}")
            if {"fewshot", "probe"} & set(asked) and not train:
                raise ConfigError("--eval fewshot/probe: need --train, the shards the read-out is fitted on")
            if not asked:
                raise ConfigError(f"--eval: nothing to do: the checkpoint's head has {head} classes and --test"
                                  f" {test_classes}, so no top1; give --train for fewshot and probe")
            depth = about["depth"]
            bad = [k for k in layers if k != FINAL and not 0 <= k <= depth]
            if bad:
                raise ConfigError(f"--layers: {bad[0]} is not final or a block index 0..{depth}")
            size = args.image_size or about["image_size"]
            if not size:
                raise ConfigError(f"--image-size: {ckpt} has no square grid to read the resolution from; give it")

            import ray

            from vitray.session import init_ray

            if not ray.is_initialized():
                init_ray()
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
    except (ConfigError, DataError, CheckpointError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
