"""Autoregressive pixels (iGPT): the colour palette and the next-pixel objective.

The palette (paper Sec. 3.1: 512 colours, "9 bits") is k-means over RGB pixels of a sample of the training set.
Sampling the pixels is a Ray Data job over the shards (every read task keeps a seeded random subset of its
pixels); the clustering is scikit-learn's `KMeans` on the gathered sample. The palette is saved with the run and
copied into the model's `palette` buffer, so every checkpoint carries the palette it was trained with.
"""
from __future__ import annotations

import numpy as np

from vitray.storage import Endpoint


def _keep_pixels(batch: dict[str, np.ndarray], per_image: int, seed: int) -> dict[str, np.ndarray]:
    pixels = batch["image"].reshape(len(batch["image"]), -1, 3)
    rng = np.random.default_rng([seed, len(batch["key"]), int.from_bytes(str(batch["key"][:1]).encode()[-4:], "little")])
    take = rng.integers(0, pixels.shape[1], size=(len(pixels), min(per_image, pixels.shape[1])))
    return {"pixel": np.take_along_axis(pixels, take[..., None], axis=1).reshape(-1, 3)}


def sample_pixels(uri: str, endpoint: Endpoint | None, image_size: int, per_image: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 RGB pixels (M, 3) drawn from every image of the shard dataset at `uri`, at the training resolution."""
    from vitray.data.stream import build_dataset

    ds = build_dataset(uri, endpoint, train=False, image_size=image_size)
    ds = ds.map_batches(_keep_pixels, fn_kwargs=dict(per_image=per_image, seed=seed), batch_format="numpy")
    return np.concatenate([b["pixel"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])


def fit_palette(pixels: np.ndarray, colours: int, seed: int = 0) -> np.ndarray:
    """k-means centres (colours, 3) in the model's [−1, 1] units, ordered by brightness (stable across runs)."""
    from sklearn.cluster import KMeans

    x = pixels.reshape(-1, 3).astype(np.float64) / 127.5 - 1
    distinct = np.unique(x, axis=0)
    if len(distinct) < colours:  # fewer distinct colours than asked: each becomes a palette entry, the rest pad
        centres = np.concatenate([distinct, np.repeat(distinct[-1:], colours - len(distinct), axis=0)])
    else:
        centres = KMeans(n_clusters=colours, n_init=1, random_state=seed).fit(x).cluster_centers_
    return centres[np.argsort(centres.sum(1), kind="stable")].astype(np.float32)
