"""Pretrain an image GPT (Chen et al., ICML 2020) without labels on the vitray engine: palette k-means (Ray Data +
scikit-learn), next-pixel (or BERT masked-pixel) objective, Ray Train + DeepSpeed; held-out NLL in bits per pixel,
then a linear probe on every layer and a samples grid.

    python jobs/pretrain_igpt.py --preset smoke
    python jobs/pretrain_igpt.py --preset smoke_bert
"""
from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitray.config import ConfigError  # noqa: E402
from vitray.config.recipes import IGPT_PRESETS, add_job_arguments, job_config  # noqa: E402

MODELS = "igpt_s, igpt_m, igpt_l, igpt_smoke, each also as *_bert"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, IGPT_PRESETS, MODELS)
    args = parser.parse_args(argv)
    try:
        cfg = job_config(args, IGPT_PRESETS, "igpt", MODELS)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        from vitray.storage import embedded_unless
        from vitray.train import launch

        try:
            with embedded_unless(cfg.storage.uri) as embedded:
                summary = launch.run(cfg, args.resume, embedded, timeline={"driver_start": STARTED})
                if cfg.data.val_uri or cfg.data.builtin:
                    summary.update(report(cfg, summary, embedded))
        except launch.TrainingFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def report(cfg, summary: dict, embedded) -> dict:
    """After training: a linear probe on every layer's mean-pooled features (train split → held-out split, Ray Data
    model actors) and, for the autoregressive objective, the samples grid; written next to the checkpoint."""
    from vitray import storage
    from vitray.eval.features import extract_splits
    from vitray.eval.inspect import load_images
    from vitray.eval.linear import linear_probe
    from vitray.tasks.pixels import probe_png, samples_png
    from vitray.checkpoints import load_model

    endpoint = embedded.endpoint if embedded else storage.Endpoint(url=cfg.storage.endpoint_url or None)
    ckpt = summary["checkpoint"]
    data = storage.join(summary["run"].rsplit("/runs/", 1)[0], "datasets", "digits") if cfg.data.builtin else None
    train_uri = cfg.data.train_uri or storage.join(data, "train")
    val_uri = cfg.data.val_uri or storage.join(data, "val")
    model, _ = load_model(ckpt, endpoint)
    layers = list(range(model.spec.depth + 1))
    size = cfg.data.image_size
    (tx, ty), (vx, vy) = extract_splits(ckpt, [train_uri, val_uri], endpoint, size, layers=layers)
    probes = {k: linear_probe(tx[k], ty, vx[k], vy) for k in layers}
    figures = {"probes.png": probe_png(probes)}
    if not model.spec.bert:  # a BERT model does not sample pixel by pixel
        images, _ = load_images(val_uri, endpoint, 6, (size, size))
        figures["samples.png"] = samples_png(model.eval(), images)
    for name, png in figures.items():
        storage.write_bytes(storage.join(ckpt, name), png, endpoint)
    storage.write_bytes(storage.join(ckpt, "probes.json"), json.dumps(probes).encode(), endpoint)
    best = max(probes, key=probes.get)
    return {"linear_probe": probes, "best_layer": best, "figures": [storage.join(ckpt, n) for n in figures]}


if __name__ == "__main__":
    sys.exit(main())
