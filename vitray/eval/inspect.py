"""Looking inside a trained ViT: the paper's Figure 7 (embedding filters, position-embedding similarity, mean
attention distance) and attention maps by rollout (Figure 6, Abnar & Zuidema 2020). Numbers here, pictures in
`vitray.eval.plots`, the job in `jobs/inspect_vit.py`.

    model, meta = load_for_inspection("s3://bucket/vitray/runs/<run>/step_N", endpoint)  # or an official .npz
    report = inspect(model, images, out_uri="./inspect/<run>")   # PNGs + inspection.json

Attention comes from the model itself: training runs fused `scaled_dot_product_attention`, and `ViT.forward(...,
return_attention=True)` makes every block compute its softmax weights explicitly. `attention_weights` checks that
one (B, heads, N, N) map per layer came back and that its rows are distributions, so a fused path can never hand
inspection empty or stale maps.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from vitray import storage
from vitray.models.inputs import to_model_input
from vitray.storage import Endpoint

NUM_FILTERS = 28  # the paper's Figure 7 (left) shows the first 28 principal components


class InspectionError(ValueError):
    """A checkpoint or image source inspection cannot use; the message names it."""


# ---------------------------------------------------------------------------------------------------- loading


def load_for_inspection(uri: str, endpoint: Endpoint | None = None, weights: str = "auto",
                        image_size: int | tuple[int, int] | None = None):
    """(ViT in eval mode, metadata) from a vitray checkpoint folder or an official `.npz` (vit_jax / big_vision
    layout; the architecture is read off the array shapes). A model without attention layers is refused here."""
    from vitray.checkpoints import CheckpointError, describe, load_model

    try:
        about = describe(uri, endpoint)
        if not about["spec"].has_attention_maps:  # before any weights are downloaded
            raise InspectionError(f"--checkpoint: {uri} holds {about['name']} ({about['family']}), a model without"
                                  " attention layers or position embeddings; inspection needs a ViT or a hybrid")
        model, meta = load_model(uri, endpoint, weights=weights, image_size=image_size)
    except CheckpointError as e:
        raise InspectionError(f"--checkpoint: {e}") from e
    meta = {"checkpoint": uri, "model": about["name"], "step": meta.get("step"), "weights": meta["weights"]}
    meta.update(family=about["family"], grid=list(model.grid), patch=model.spec.patch, depth=model.spec.depth,
                heads=model.spec.heads, width=model.spec.width)
    return model.eval(), meta


def load_images(uri: str | None, endpoint: Endpoint | None, n: int, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """Up to `n` images as uint8 (n, H, W, 3) at the model's input size, with their names: the first samples of a
    shard dataset (a folder with manifest.json), the image files of a folder, or one image file. `uri=None`: the
    held-out scikit-learn digits (what the smoke runs train on)."""
    from PIL import Image

    from vitray.data.catalog import read_manifest, shard_paths
    from vitray.data.manifest import DataError
    from vitray.data.shards import tar_samples
    from vitray.data.transforms import center_crop, decode_rgb

    raw: list[tuple[str, bytes | Image.Image]] = []
    if uri is None:
        from vitray.data.datasets import digits_arrays

        pixels, labels = digits_arrays("val")
        raw = [(f"digit{i}_{y}", Image.fromarray(img).convert("RGB")) for i, (img, y) in enumerate(zip(pixels[:n], labels))]
    elif storage.exists(storage.join(uri, "manifest.json"), endpoint):
        try:
            manifest = read_manifest(uri, endpoint, "--images")
            for path in shard_paths(uri, manifest):
                for key, data, _, _, _ in tar_samples(storage.read_bytes(path, endpoint), path):
                    if data is None:
                        raise DataError(f"--images: shard {path} sample {key} has no image")
                    raw.append((key, data))
                if len(raw) >= n:
                    break
        except DataError as e:
            raise InspectionError(str(e)) from e
    elif storage.exists(uri, endpoint):
        from vitray.data.datasets import IMAGE_EXTENSIONS

        files = [uri] if uri.lower().endswith(IMAGE_EXTENSIONS) else sorted(
            f for f in storage.list_files(uri, endpoint) if f.lower().endswith(IMAGE_EXTENSIONS))
        if files != [uri]:  # the listing names files inside the folder
            files = [storage.join(uri, f) for f in files]
        raw = [(f.rsplit("/", 1)[-1], storage.read_bytes(f, endpoint)) for f in files[:n]]
    else:
        raise InspectionError(f"--images: {uri} does not exist")
    if not raw:
        raise InspectionError(f"--images: {uri} holds no images (shards with manifest.json, or .jpg/.png files)")
    h, w = size
    out = []
    for name, item in raw[:n]:
        try:
            img = item if isinstance(item, Image.Image) else decode_rgb(item, f"--images {uri}: {name}")
        except DataError as e:
            raise InspectionError(str(e)) from e
        # Square inputs get the evaluation crop; a non-square grid gets the whole image resized to it.
        img = center_crop(img, h) if h == w else img.resize((w, h), Image.BICUBIC)
        out.append(np.asarray(img))
    return np.stack(out), [name for name, _ in raw[:n]]


# ---------------------------------------------------------------------------------------------------- analyses


@dataclasses.dataclass
class FilterPCA:
    """Principal components of the patch-embedding filters: weights ≈ mean + coefficients @ components."""

    components: np.ndarray  # (k, 3·P·P), unit rows, by decreasing variance
    explained_variance_ratio: np.ndarray  # (k,)
    coefficients: np.ndarray  # (D, k)
    mean: np.ndarray  # (3·P·P,)
    patch: int

    def images(self, n: int = NUM_FILTERS) -> np.ndarray:
        """The first n components as (n, P, P, 3) RGB patches."""
        return self.components[:n].reshape(-1, 3, self.patch, self.patch).transpose(0, 2, 3, 1)

    def reconstruct(self, k: int | None = None) -> np.ndarray:
        """The (D, 3·P·P) filters from the first k components (all: exact)."""
        k = len(self.components) if k is None else k
        return self.mean + self.coefficients[:, :k] @ self.components[:k]


def embedding_filters(model) -> FilterPCA:
    """PCA of the linear patch embedding's D filters, each a 3·P·P vector (paper Figure 7, left). A hybrid's patch
    embedding is a ResNet, whose first layer is not a patch filter: refused."""
    if not model.spec.embeds_patches_linearly:
        raise InspectionError(f"embedding filters: a {model.spec.family} model embeds patches with a ResNet, not one"
                              " linear filter per patch")
    w = model.patch_embed.weight.detach().double().cpu().numpy()  # (D, 3, P, P)
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(0)
    _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    k = min(len(s), flat.shape[1])
    var = s[:k] ** 2
    return FilterPCA(components=vt[:k], explained_variance_ratio=var / max(var.sum(), 1e-300),
                     coefficients=(flat - mean) @ vt[:k].T, mean=mean, patch=w.shape[-1])


def posemb_similarity(model) -> np.ndarray:
    """(gh, gw, gh, gw): cosine similarity of the position embedding of the patch at (row, col) with that of every
    other patch (paper Figure 7, centre); the class token's embedding is left out."""
    gh, gw = model.grid
    pos = model.pos_embed.detach().double().cpu()[0, -gh * gw:]
    pos = torch.nn.functional.normalize(pos, dim=-1)
    return (pos @ pos.T).numpy().reshape(gh, gw, gh, gw)


def patch_distances(grid: tuple[int, int], patch: int = 1) -> np.ndarray:
    """(N, N) Euclidean distances between patch centres, in pixels (patch units with patch=1)."""
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    return patch * np.hypot(rows[:, None] - rows[None], cols[:, None] - cols[None])


def locality(similarity: np.ndarray) -> dict:
    """How much the position embeddings encode 2-D distance: mean similarity per grid distance, the mean for
    direct neighbours (distance 1) and for distant pairs (at least half the largest distance), and their
    difference — the margin (positive for a trained ViT's embeddings, about zero at random initialisation)."""
    gh, gw = similarity.shape[:2]
    sim = similarity.reshape(gh * gw, gh * gw)
    dist = patch_distances((gh, gw))
    off = ~np.eye(gh * gw, dtype=bool)
    neighbours = sim[np.isclose(dist, 1.0)].mean()
    far = sim[(dist >= dist.max() / 2) & off].mean()
    profile = {f"{d:.3f}": float(sim[np.isclose(dist, d)].mean()) for d in np.unique(np.round(dist[off], 6))}
    return {"neighbour_similarity": float(neighbours), "distant_similarity": float(far),
            "margin": float(neighbours - far), "similarity_by_distance": profile}


def attention_weights(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention (B, heads, N, N), computed explicitly (the fused kernel returns none). Raises if a
    layer's map is missing or is not a distribution over keys — inspection never continues with an empty map."""
    with torch.no_grad():
        _, maps = model(images, return_attention=True)
    depth, n = len(model.blocks), images.shape[0]
    if len(maps) != depth or any(m is None for m in maps):
        raise InspectionError(f"attention: got {len(maps)} maps for {depth} layers; the model did not return its weights")
    tokens = model.grid[0] * model.grid[1] + 1
    for i, m in enumerate(maps):
        if m.shape != (n, model.spec.heads, tokens, tokens) or not torch.allclose(m.sum(-1), torch.ones(()), atol=1e-4):
            raise InspectionError(f"attention: layer {i} returned {tuple(m.shape)} weights whose rows are not distributions")
    return maps


def mean_attention_distance(maps: list[torch.Tensor] | torch.Tensor, grid: tuple[int, int], patch: int,
                            prefix: int = 1) -> np.ndarray:
    """(layers, heads): the image-space distance, in pixels, between each query patch and the patches it attends
    to, weighted by attention and averaged over query patches and images (paper Figure 7, right; Sec. 4.5). The
    class token has no position: it is dropped as query and key, and each row is renormalised over the patches."""
    dist = torch.from_numpy(patch_distances(grid, patch))
    per_layer = []
    for m in maps:  # (B, h, N, N) each; a layer at a time keeps the double-precision copy small
        w = m[..., prefix:, prefix:].double()
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        per_layer.append((w * dist).sum(-1).mean(dim=(0, 2)))  # sum over keys, mean over images and queries
    return torch.stack(per_layer).numpy()


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): per layer, average the heads, add the identity for the residual
    connection and renormalise the rows; multiply the layers from the first up. (B, N, N), rows sum to 1; row 0 is
    how much the class token's output draws on each input token."""
    result = None
    for m in maps:
        a = m.double().mean(1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def cls_rollout_maps(maps: list[torch.Tensor], grid: tuple[int, int]) -> np.ndarray:
    """(B, gh, gw): the class token's rollout over the patches, each map scaled to a maximum of 1 for display."""
    r = rollout(maps)[:, 0, -grid[0] * grid[1]:].reshape(-1, *grid)
    return (r / r.amax(dim=(1, 2), keepdim=True)).numpy()


# ---------------------------------------------------------------------------------------------------- the report


def inspect(model, images: np.ndarray, out_uri: str, endpoint: Endpoint | None = None, meta: dict | None = None,
            names: list[str] | None = None, rollout_images: int = 8, chunk: int = 4) -> dict:
    """Every analysis on `model` (a ViT from `load_for_inspection`) and `images` (uint8 (B, H, W, 3) at its input
    size): writes filters.png (plain ViTs), posemb_similarity.png, attention_distance.png, attention_rollout.png and
    inspection.json under `out_uri` (local or s3://), and returns the JSON's contents."""
    from vitray.eval import plots

    meta = dict(meta or {})
    grid, patch = tuple(model.grid), model.spec.patch
    expected = (grid[0] * patch, grid[1] * patch)
    if images.shape[1:3] != expected:
        raise InspectionError(f"images are {images.shape[1]}×{images.shape[2]}, the model takes {expected[0]}×{expected[1]}")
    names = names or [f"image{i}" for i in range(len(images))]
    figures: dict[str, bytes] = {}
    report: dict = {**meta, "images": len(images)}

    if model.spec.embeds_patches_linearly:
        pca = embedding_filters(model)
        figures["filters.png"] = plots.filters(pca.images(NUM_FILTERS))
        report["filters"] = {"components": min(NUM_FILTERS, len(pca.components)),
                             "explained_variance_ratio": pca.explained_variance_ratio[:NUM_FILTERS].tolist()}
    else:
        report["filters"] = {"skipped": f"a {model.spec.family} model embeds patches with a ResNet"}

    sim = posemb_similarity(model)
    figures["posemb_similarity.png"] = plots.posemb_similarity(sim)
    report["posemb"] = {"grid": list(grid), **locality(sim), "similarity": sim.reshape(grid[0] * grid[1], -1).round(4).tolist()}

    # A few images at a time: explicit maps cost layers × heads × N² floats per image (ViT-H/14 at 518 px: 3.8 GB).
    shown, total, cls_maps = min(rollout_images, len(images)), 0.0, []
    for start in range(0, len(images), chunk):
        maps = attention_weights(model, to_model_input(images[start:start + chunk]))
        total = total + mean_attention_distance(maps, grid, patch) * len(maps[0])
        if start < shown:
            cls_maps.append(cls_rollout_maps([m[:shown - start] for m in maps], grid))
        del maps
    distance = total / len(images)
    uniform = float(patch_distances(grid, patch).mean())  # what a head attending to every patch equally scores
    figures["attention_distance.png"] = plots.attention_distance(distance, max(expected), uniform)
    report["attention_distance"] = {"unit": "pixels", "uniform_attention": uniform, "per_layer_head": distance.round(4).tolist(),
                                    "per_layer_mean": distance.mean(1).round(4).tolist()}

    cls_maps = np.concatenate(cls_maps)
    figures["attention_rollout.png"] = plots.rollout_overlay(images[:shown], cls_maps)
    report["rollout"] = {"images": names[:shown], "cls_to_patches": cls_maps.round(4).tolist()}

    for name, png in figures.items():
        storage.write_bytes(storage.join(out_uri, name), png, endpoint)
    report["figures"] = {name: storage.join(out_uri, name) for name in figures}
    storage.write_bytes(storage.join(out_uri, "inspection.json"), json.dumps(report, indent=1).encode(), endpoint)
    return report
