"""Image sources for the shard writer: an ImageNet-style folder tree, in-memory arrays, and the built-in digits."""
from __future__ import annotations

import io
import os
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from vitray import storage
from vitray.data.shards import DataError, Manifest, Sample, write_shards
from vitray.data.transforms import decode_rgb
from vitray.storage import Endpoint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def folder_classes(root: str, endpoint: Endpoint | None = None) -> list[str]:
    """The class folders directly under `root` (a local folder or an s3:// prefix), sorted."""
    if not storage.is_s3(root) and not os.path.isdir(root):
        raise DataError(f"{root}: not a folder")
    entries = storage.list_entries(root, endpoint)
    if not entries and storage.is_s3(root):
        raise DataError(f"{root}: nothing under this prefix")
    classes = [name for name, is_dir, _ in entries if is_dir]
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class_name>/*.jpg)")
    return classes


def folder_files(root: str, classes: list[str], endpoint: Endpoint | None = None) -> list[tuple[str, str, int, int]]:
    """(path, sample key, label, size in bytes) of every image file under `root/<class>/`, in (class, name) order,
    checked before anything is read or written. The key is the class and the whole file name (`cat/x.jpg` →
    `cat_x_jpg`), so the same photo saved as `x.jpg` and `x.png` gives two samples; names that still collide once
    '.' becomes '_' are named together."""
    files, owner = [], {}
    for label, cls in enumerate(classes):
        for name, is_dir, size in storage.list_entries(storage.join(root, cls), endpoint):
            if is_dir or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = storage.join(root, cls, name)
            key = f"{cls}_{name}".replace(".", "_").replace("/", "_")
            if key in owner:
                raise DataError(f"{owner[key]} and {path}: both become sample key {key!r} (WebDataset keys hold no"
                                " '.'); rename one of them")
            owner[key] = path
            files.append((path, key, label, size))
    return files


def read_source(path: str, endpoint: Endpoint | None = None) -> bytes:
    """One source file's bytes, local or s3://; a DataError naming the path when it cannot be read."""
    try:
        if storage.is_s3(path):
            return storage.read_bytes(path, endpoint)
        with open(path, "rb") as f:
            return f.read()
    except storage.StorageError as e:
        raise DataError(f"{path}: cannot read ({str(e).removeprefix(f'{path}: ')})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def prepare_image(path: str, data: bytes, max_side: int = 0) -> tuple[bytes, str]:
    """(bytes to store, "jpg" or "png") for one source file. The file is decoded once here, so an unreadable one is
    reported by its path at write time (DataError). JPEG and PNG keep their bytes; other formats are re-encoded as
    PNG. `max_side`: an image whose longer side is larger is stored resized to it (aspect kept, upright; JPEG at
    quality 95, others as PNG), as FFCV and most large-scale pipelines store their data: every later epoch decodes
    fewer pixels."""
    img = decode_rgb(data, path)  # raises DataError naming the path
    fmt = Image.open(io.BytesIO(data)).format
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC,
                         reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if fmt == "JPEG" else "PNG", **({"quality": 95} if fmt == "JPEG" else {}))
        data, fmt = buf.getvalue(), fmt if fmt == "JPEG" else "PNG"
    if fmt == "JPEG":
        return data, "jpg"
    if fmt == "PNG":
        return data, "png"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), "png"


def samples_from_folder(root: str, classes: list[str], skipped: list[dict] | None = None,
                        max_side: int = 0, endpoint: Endpoint | None = None) -> Iterator[Sample]:
    """`root/<class>/<file>` → samples, one file after another in this process (the reference path; the Ray writer
    `vitray.data.writer.write_folder` does the same per shard on every core). An unreadable file raises a DataError
    naming its path — or, given a `skipped` list, is recorded there ({"path", "reason"}) and left out. See
    `prepare_image` for what is stored and `max_side`."""
    for path, key, label, _ in folder_files(root, classes, endpoint):
        try:
            image, ext = prepare_image(path, read_source(path, endpoint), max_side)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append({"path": path, "reason": str(e).removeprefix(f"{path}: ")})
            continue
        yield Sample(key=key, image=image, ext=ext, label=label)


def samples_from_arrays(images: np.ndarray, labels: np.ndarray, prefix: str = "img") -> Iterator[Sample]:
    """uint8 arrays (N, H, W) or (N, H, W, 3) → PNG-encoded samples (lossless)."""
    if images.dtype != np.uint8:
        raise DataError(f"images: expected uint8 pixels, got {images.dtype}")
    for i, (img, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        yield Sample(key=f"{prefix}{i:07d}", image=buf.getvalue(), ext="png", label=int(label))


def builtin_uri(root: str, name: str, image_size: int | None = None) -> str:
    """Where a built-in dataset is written under a storage root: <root>/datasets/digits, or per size for the
    detection canvases (<root>/datasets/digit_canvases_64); its splits are train/ and val/ below."""
    return storage.join(root, "datasets", name if image_size is None else f"{name}_{image_size}")


# scikit-learn's digits: 1,797 real 8×8 handwritten digits (UCI optdigits) shipped inside the package.
DIGITS_VAL = 297  # fixed held-out split: leaves 1,500 for training, divisible by 2, 3, 4 and 5 workers


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels → 0..255
    order = np.random.default_rng(0).permutation(len(images))  # fixed: the same split on every machine
    idx = order[DIGITS_VAL:] if split == "train" else order[:DIGITS_VAL]
    return images[idx], d.target[idx]


def write_digits(uri: str, endpoint: Endpoint | None = None, samples_per_shard: int = 250,
                 classes: Iterable[int] | None = None) -> dict[str, Manifest]:
    """Write the digits' train and val splits as shards under `uri`/train and `uri`/val (skipping a split that
    is already there). `classes` keeps only those digits, relabelled 0..k−1 in order (class names stay the digits):
    scaling studies pretrain on some digits and transfer to the others. Returns the manifests."""
    from vitray.data.shards import read_manifest

    keep = list(range(10) if classes is None else classes)
    if keep != sorted(set(keep)) or not set(keep) <= set(range(10)):
        raise DataError(f"classes: give distinct digits 0–9 in increasing order, got {keep}")
    out = {}
    for split in ("train", "val"):
        dest = storage.join(uri, split)
        if storage.exists(storage.join(dest, "manifest.json"), endpoint):
            out[split] = read_manifest(dest, endpoint)
            continue
        images, labels = digits_arrays(split)
        mask = np.isin(labels, keep)
        relabel = np.searchsorted(np.asarray(keep), labels[mask]) if classes is not None else labels[mask]
        out[split] = write_shards(
            samples_from_arrays(images[mask], relabel, prefix=f"digits{split}"), dest, [str(i) for i in keep],
            endpoint, max_shard_samples=samples_per_shard,
        )
    return out
