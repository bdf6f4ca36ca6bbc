"""Frozen features of a checkpoint over a sharded dataset, computed by Ray Data (a pool of model actors), for the
few-shot and linear-probe evaluations in `vitray.eval.linear`."""
from __future__ import annotations

import numpy as np

from vitray.storage import Endpoint


class Featurizer:
    """Ray Data actor: loads the checkpoint once, then maps image batches to pre-logit features."""

    def __init__(self, checkpoint_uri: str, endpoint: Endpoint | None):
        import torch

        from vitray.train.checkpoint import load_model

        torch.set_num_threads(1)
        self.model, _ = load_model(checkpoint_uri, endpoint)
        self.model.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            images = torch.from_numpy(np.require(batch["image"], requirements="W")).permute(0, 3, 1, 2).float() / 127.5 - 1
            return {"features": self.model.forward_features(images).numpy(), "label": batch["label"]}


def extract(checkpoint_uri: str, data_uri: str, endpoint: Endpoint | None, image_size: int,
            actors: int = 2, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D), labels (N,)) of every sample of `data_uri`, evaluation preprocessing, exact count."""
    from vitray.data.stream import build_dataset

    ds = build_dataset(data_uri, endpoint, train=False, image_size=image_size, field=data_uri)
    ds = ds.map_batches(Featurizer, fn_constructor_kwargs=dict(checkpoint_uri=checkpoint_uri, endpoint=endpoint),
                        batch_size=batch_size, concurrency=actors, num_cpus=0.5)
    parts = [(b["features"], b["label"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
