"""Pretrain an image GPT (Chen et al., ICML 2020) without labels on the vitray engine: palette k-means (Ray Data +
scikit-learn), next-pixel (or BERT masked-pixel) objective, Ray Train + DeepSpeed; held-out NLL in bits per pixel,
then a linear probe on every layer and a samples grid.

    python jobs/pretrain_igpt.py --preset smoke
    python jobs/pretrain_igpt.py --preset smoke_bert
"""
from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitray.config.jobs import training_job  # noqa: E402
from vitray.config.recipes import IGPT_PRESETS  # noqa: E402

MODELS = "igpt_s, igpt_m, igpt_l, igpt_smoke, each also as *_bert"


def run(cfg, args) -> int:
    from vitray.storage import embedded_unless
    from vitray.train import launch, rehearse

    with embedded_unless(cfg.storage.uri) as embedded:
        timeline = {"driver_start": STARTED}
        summary = (rehearse.run(cfg, args.rehearse, embedded, timeline, args.resume) if args.rehearse is not None
                   else launch.run(cfg, args.resume, embedded, timeline))
        if summary["data"]["val_uri"]:
            summary.update(report(cfg, summary, embedded))
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
    train_uri, val_uri = summary["data"]["train_uri"], summary["data"]["val_uri"]
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


main = training_job(__doc__, IGPT_PRESETS, MODELS, run, kind="pixels")

if __name__ == "__main__":
    sys.exit(main())
