"""A checkpoint applied to a sharded dataset by Ray Data (a pool of model actors): its top-1 accuracy, or the frozen
features the few-shot and linear-probe evaluations of `vitray.eval.linear` read.

Both are exact: every sample of the dataset is seen once (evaluation preprocessing, no drop-last), whatever the
number of actors.
"""
from __future__ import annotations

import numpy as np

from vitray.storage import Endpoint

FINAL = "final"  # the pre-logit features; an int k names the tokens after block k (see ViT.layer_features)


class CheckpointActor:
    """Ray Data actor: loads the checkpoint (a run's folder or a released .npz) once, then maps image batches to predicted labels or features."""

    def __init__(self, checkpoint_uri: str, endpoint: Endpoint | None, weights: str, layers: list, pool: str,
                 image_size: int):
        import torch

        from vitray.checkpoints import load_model

        torch.set_num_threads(1)
        self.model, _ = load_model(checkpoint_uri, endpoint, weights=weights, image_size=image_size)
        self.model.eval()
        self.layers, self.pool = layers, pool

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from vitray.models.inputs import to_model_input

        with torch.no_grad():
            images = to_model_input(batch["image"])
            out = {"label": batch["label"], "split": batch["split"]}
            if not self.layers:
                out["prediction"] = self.model(images).argmax(-1).numpy()
                return out
            blocks = [k for k in self.layers if k != FINAL]
            per_layer = dict(zip(blocks, self.model.layer_features(images, blocks, self.pool))) if blocks else {}
            for k in self.layers:
                out[f"features_{k}"] = (self.model.forward_features(images) if k == FINAL else per_layer[k]).numpy()
            return out


def _tag(batch: dict[str, np.ndarray], split: int) -> dict[str, np.ndarray]:
    return {**batch, "split": np.full(len(batch["label"]), split, np.int16)}


def _apply(checkpoint_uri: str, data_uris: list[str], endpoint: Endpoint | None, image_size: int, weights: str,
           layers: list, pool: str, actors: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """One Ray Data pass over every dataset of `data_uris` (each sample tagged with its dataset's index), so the
    model actors start once; the outputs come back split per dataset."""
    from vitray.data.reading import build_dataset
    from vitray.data.spec import ReadSpec

    parts = [build_dataset(uri, endpoint, ReadSpec(image_size, train=False), field=uri)
             .map_batches(_tag, fn_kwargs=dict(split=i), batch_format="numpy") for i, uri in enumerate(data_uris)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(CheckpointActor, batch_size=batch_size, concurrency=actors, num_cpus=0.5,
                        fn_constructor_kwargs=dict(checkpoint_uri=checkpoint_uri, endpoint=endpoint, weights=weights,
                                                   layers=layers, pool=pool, image_size=image_size))
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return [{k: v[out["split"] == i] for k, v in out.items() if k != "split"} for i in range(len(data_uris))]


def top1(checkpoint_uri: str, data_uri: str, endpoint: Endpoint | None, image_size: int, weights: str = "auto",
         actors: int = 2, batch_size: int = 64) -> tuple[float, int]:
    """(top-1 accuracy, samples counted) of the checkpoint's own head on every sample of `data_uri`."""
    (out,) = _apply(checkpoint_uri, [data_uri], endpoint, image_size, weights, [], "mean", actors, batch_size)
    return float((out["prediction"] == out["label"]).mean()), len(out["label"])


def extract(checkpoint_uri: str, data_uri: str, endpoint: Endpoint | None, image_size: int,
            layers: tuple = (FINAL,), pool: str = "mean", weights: str = "auto", actors: int = 2,
            batch_size: int = 64) -> tuple[dict, np.ndarray]:
    """({layer: features (N, D)}, labels (N,)) for every sample of `data_uri`, all layers in one pass. A layer is
    FINAL (pre-logits) or a block index k (tokens after block k, pooled by `pool`)."""
    return extract_splits(checkpoint_uri, [data_uri], endpoint, image_size, layers, pool, weights, actors,
                          batch_size)[0]


def extract_splits(checkpoint_uri: str, data_uris: list[str], endpoint: Endpoint | None, image_size: int,
                   layers: tuple = (FINAL,), pool: str = "mean", weights: str = "auto", actors: int = 2,
                   batch_size: int = 64) -> list[tuple[dict, np.ndarray]]:
    """`extract` for several datasets at once (e.g. a probe's train and test splits): one Ray Data pass, one set of
    model actors; a (features, labels) pair per dataset, in order."""
    outs = _apply(checkpoint_uri, list(data_uris), endpoint, image_size, weights, list(layers), pool, actors,
                  batch_size)
    return [({k: out[f"features_{k}"] for k in layers}, out["label"]) for out in outs]
