"""Autoregressive pixels (iGPT): the colour palette and the next-pixel objective.

The palette (paper Sec. 3.1: 512 colours, "9 bits") is k-means over RGB pixels of a sample of the training set.
Sampling the pixels is a Ray Data job over the shards (every read task keeps a seeded random subset of its
pixels); the clustering is scikit-learn's `KMeans` on the gathered sample. The palette is saved with the run and
copied into the model's `palette` buffer, so every checkpoint carries the palette it was trained with.
"""
from __future__ import annotations

import numpy as np

from vitray.models.registry import get_spec
from vitray.storage import Endpoint
from vitray.tasks import Task


def _keep_pixels(batch: dict[str, np.ndarray], per_image: int, seed: int) -> dict[str, np.ndarray]:
    pixels = batch["image"].reshape(len(batch["image"]), -1, 3)
    rng = np.random.default_rng([seed, len(batch["key"]), int.from_bytes(str(batch["key"][:1]).encode()[-4:], "little")])
    take = rng.integers(0, pixels.shape[1], size=(len(pixels), min(per_image, pixels.shape[1])))
    return {"pixel": np.take_along_axis(pixels, take[..., None], axis=1).reshape(-1, 3)}


def sample_pixels(uri: str, endpoint: Endpoint | None, image_size: int, per_image: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 RGB pixels (M, 3) drawn from every image of the shard dataset at `uri`, at the training resolution."""
    from vitray.data.reading import build_dataset
    from vitray.data.spec import ReadSpec

    ds = build_dataset(uri, endpoint, ReadSpec(image_size, train=False))
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


PALETTE_FILE = "palette.npy"


def load_palette(data: bytes, where: str, shape: tuple[int, ...]) -> np.ndarray:
    """A saved palette (`palette.npy`'s bytes) of the `shape` the model predicts. Its header is checked first
    (`array_header`: the size it claims against the bytes there, no object dtype) and against `shape`, since
    `np.load` allocates what a header claims before reading; then it is read without unpickling."""
    import io

    from vitray.models.npz import CheckpointError, array_header

    try:
        claimed, _ = array_header(io.BytesIO(data), len(data), PALETTE_FILE)
        if claimed != tuple(shape):
            raise CheckpointError(f"shape {claimed}; this model predicts {tuple(shape)}")
        return np.load(io.BytesIO(data), allow_pickle=False)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    except ValueError as e:  # a bad magic string or header: numpy raises ValueError
        raise CheckpointError(f"{where}: not a readable .npy ({e})") from e


class PixelTask(Task):
    """iGPT's objective for the training loop: the images are their own targets (labels unused). Evaluation
    reports the held-out negative log-likelihood of the predicted tokens (all of them, or BERT's masked ones) in
    nats and in bits per pixel token."""

    metric = "val_bits_per_pixel"
    better = "min"

    def before_fit(self, plan) -> None:
        """k-means the colour palette from a sample of the training pixels (a Ray Data job), once per run, saved as
        <run>/palette.npy; a resumed run keeps its own. The workers' tasks load it from there."""
        import io

        from vitray import storage

        uri = storage.join(plan.run_uri, PALETTE_FILE)
        if not storage.exists(uri, plan.endpoint):
            vocab = get_spec(self.cfg.model.name).vocab
            palette = fit_palette(sample_pixels(plan.cfg.data.train_uri, plan.endpoint, self.cfg.data.image_size,
                                                seed=self.cfg.seed), vocab, self.cfg.seed)
            buf = io.BytesIO()
            np.save(buf, palette)
            storage.write_bytes(uri, buf.getvalue(), plan.endpoint)
            print(f"palette: {vocab} colours by k-means → {uri}", flush=True)

    def build_model(self):
        import torch

        from vitray import storage
        from vitray.models.registry import build_model

        model = build_model(self.cfg.model.name, image_size=self.cfg.data.image_size, dropout=self.cfg.model.dropout)
        if self.run_uri:  # in the workers: the palette the driver fitted (`before_fit`)
            uri = storage.join(self.run_uri, PALETTE_FILE)
            model.set_palette(torch.from_numpy(load_palette(storage.read_bytes(uri, self.endpoint), uri,
                                                            tuple(model.palette.shape))))
        return model

    def to_tensors(self, batch: dict[str, np.ndarray], device, dtype) -> dict:
        from vitray.models.inputs import to_model_input

        return {"image": to_model_input(batch["image"], device, dtype)}

    def loss(self, model, batch: dict):
        """Cross-entropy of the image's own palette indices: every next pixel, or (BERT) the masked pixels. The
        forward pass goes through `model` (the DeepSpeed engine: ZeRO-3 gathers parameters there)."""
        import torch.nn.functional as F

        module = model.module if hasattr(model, "module") else model
        targets = module.tokens(batch["image"])
        mask = module.draw_mask(targets)
        logits = model(batch["image"], mask)
        if mask is not None:
            logits, targets = logits[mask], targets[mask]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.flatten()), {}

    def empty_batch(self) -> dict[str, np.ndarray]:
        s = self.cfg.data.image_size
        return {"image": np.zeros((1, s, s, 3), np.uint8), "label": np.zeros(1, np.int64)}

    def eval_start(self):
        import torch

        self._masks = torch.Generator().manual_seed(0)  # BERT: the same held-out masks at every evaluation
        return torch.zeros(2, dtype=torch.float64)  # [summed NLL in nats, tokens predicted]

    def eval_batch(self, model, batch: dict, state) -> None:
        import torch

        with torch.no_grad():
            module = model.module if hasattr(model, "module") else model
            nats, count = module.nll(batch["image"], self._masks)
        if state is not None:
            state += torch.tensor([nats.item(), count], dtype=torch.float64)

    def eval_end(self, state, device, export=None) -> dict[str, float]:
        import math

        import torch.distributed as dist

        totals = state.to(device)
        dist.all_reduce(totals)
        nats = (totals[0] / totals[1]).item()
        return {"val_nll": nats, "val_bits_per_pixel": nats / math.log(2)}


def samples_png(model, images: np.ndarray, completions: int = 3, unconditional: int = 8, seed: int = 0,
                cell: int = 48) -> bytes:
    """A PNG grid: per held-out image (uint8 (n, S, S, 3)) its quantised original, its top half, and `completions`
    continuations of that half sampled from the model; then a row of unconditional samples. Everything is drawn
    through the palette, so the pictures show exactly what the model sees and predicts."""
    import io

    import torch
    from PIL import Image

    from vitray.models.igpt import dequantize
    from vitray.models.inputs import to_model_input, to_pixels

    g = torch.Generator().manual_seed(seed)
    h, w = model.size
    x = to_model_input(images)
    tokens = model.tokens(x)
    half = tokens[:, : (h // 2) * w]
    rows = []
    for i in range(len(images)):
        top = torch.cat([half[i:i + 1], torch.zeros(1, h * w - half.shape[1], dtype=torch.long)], dim=1)
        done = model.sample(completions, prefix=half[i:i + 1].expand(completions, -1), generator=g)
        row = torch.cat([tokens[i:i + 1], top, done])
        rows.append(dequantize(row, model.palette, (h, w)))
    free = dequantize(model.sample(unconditional, generator=g), model.palette, (h, w))
    cols = max(completions + 2, unconditional)
    canvas = Image.new("RGB", (cols * cell, (len(rows) + 1) * cell), "white")
    for r, batch in enumerate([*rows, free]):
        for c, img in enumerate(batch):
            pixels = to_pixels(img)
            canvas.paste(Image.fromarray(pixels).resize((cell - 4, cell - 4), Image.NEAREST), (c * cell + 2, r * cell + 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def probe_png(accuracy: dict[int, float], title: str = "Linear probe accuracy by layer") -> bytes:
    """Accuracy of the linear probe on each layer's mean-pooled features against depth (iGPT Figure 3)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(accuracy)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    ax.plot(layers, [100 * accuracy[k] for k in layers], "o-")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_title(title)
    ax.set_xticks(layers)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
