"""Decode and augment images on CPU (inside Ray Data tasks), the paper's way.

Training: inception-style random-resized crop (area 5–100 %, aspect 3/4–4/3), resized bilinearly as the paper's
pipeline did (`vitray/data/resize.py`), + horizontal flip. The crop is chosen from the image's header first; a JPEG
then decodes only as much as the crop needs (`vitray/data/jpeg.py`).
Evaluation: resize the short side to size·256/224, centre crop.
Images leave the pipeline as uint8 HWC; the training worker scales them to [-1, 1] (x/127.5 − 1), which keeps
the object store traffic at a quarter of float32.
"""
from __future__ import annotations

import io
import math
import re
import zlib

import numpy as np
from PIL import Image, ImageOps

from vitray.data import device_decode, jpeg
from vitray.data.resize import mirror, resize_crop
from vitray.data.manifest import DataError
from vitray.data.shards import read_checked


def decode_rgb(data: bytes, where: str) -> Image.Image:
    """Any image a folder may hold → upright RGB: JPEG/PNG, grayscale, palette, RGBA, CMYK, EXIF-rotated."""
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)  # camera photos: apply the EXIF orientation tag
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent → white, not black
            img = Image.alpha_composite(background, img)
        if img.mode in ("I;16", "I;16B", "I"):  # 16-bit grayscale PNG: keep the top 8 bits
            img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
        return img.convert("RGB")
    except Exception as e:  # PIL raises many types; the caller only needs to know which sample failed
        raise DataError(f"{where}: cannot decode image ({_reason(e, data)})") from e


def _reason(e: Exception, data: bytes) -> str:
    """Pillow's error without the in-memory buffer's repr it names (`<_io.BytesIO object at 0x…>`)."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        kind = "empty file" if not data else f"{len(data)} bytes starting {data[:8]!r}"
        return f"not an image format Pillow reads: {kind}"
    return f"{type(e).__name__}: {re.sub(r'<_io.BytesIO object at 0x[0-9a-f]+>', 'the image', str(e))}"


def crop_box(w: int, h: int, rng: np.random.Generator, area_min: float = 0.05) -> tuple[int, int, int, int] | None:
    """The inception crop of a w×h image, (x, y, width, height): area_min–100 % of the area, aspect ratio in
    [3/4, 4/3]; None after 10 draws that do not fit (extreme aspect ratios: the caller takes the centre)."""
    for _ in range(10):
        area = w * h * rng.uniform(area_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
    return None


def inception_crop(img: Image.Image, size: int, rng: np.random.Generator, area_min: float = 0.05) -> np.ndarray:
    """Random crop of area_min–100 % of the image with aspect ratio in [3/4, 4/3], resized to size×size×3 uint8."""
    box = crop_box(*img.size, rng, area_min)
    if box is None:
        return np.asarray(center_crop(img, size, resize_ratio=1.0))
    x, y, cw, ch = box
    return resize_crop(np.asarray(img), (x, y, x + cw, y + ch), size)


def center_crop(img: Image.Image, size: int, resize_ratio: float = 256 / 224) -> Image.Image:
    """Resize the short side to size·ratio (up if the image is smaller), then crop the centre size×size. An image
    already size×size passes unchanged: resizing it up and cropping back would only blur it (iGPT's 8 px digits)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size * resize_ratio / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    x, y = (nw - size) // 2, (nh - size) // 2
    return img.crop((x, y, x + size, y + size))


def _sample(data, cls, where: str, train: bool, image_size: int, area_min: float, flip: bool,
            rng: np.random.Generator, ship: bool = False) -> tuple[np.ndarray | dict, int]:
    """One sample's pixels and label. `ship` (data.decode_on=gpu): a JPEG's crop and flip are drawn here, from the
    same generator in the same order, and the file travels encoded (`device_decode.ship`); anything else travels
    as its augmented pixels."""
    if data is None or cls is None:
        raise DataError(f"{where}: missing {'image' if data is None else 'label (.cls)'}")
    try:
        label = int(cls)
    except ValueError as e:
        raise DataError(f"{where}: label {cls!r} is not an integer") from e
    if not train:
        pixels = np.asarray(center_crop(decode_rgb(data, where), image_size))
    elif wh := jpeg.scalable_size(data):  # a JPEG: the crop chosen from its header, decoded at the scale it needs
        box = crop_box(*wh, rng, area_min)
        if box and ship:
            return device_decode.ship(data, box, bool(flip and rng.random() < 0.5)), label
        pixels = (_jpeg_crop(data, wh, box, image_size, where) if box
                  else np.asarray(center_crop(decode_rgb(data, where), image_size, 1.0)))
    else:
        pixels = inception_crop(decode_rgb(data, where), image_size, rng, area_min)
    if train and flip and rng.random() < 0.5:
        pixels = mirror(pixels)
    pixels = np.ascontiguousarray(pixels)
    return (device_decode.ship_pixels(pixels) if ship else pixels), label


def _jpeg_crop(data: bytes, wh: tuple[int, int], box: tuple[int, int, int, int], size: int, where: str) -> np.ndarray:
    try:
        return jpeg.decode_crop(data, wh, box, size)
    except Exception:  # libjpeg-turbo refused what the header promised: Pillow decodes it, or names the sample
        x, y, cw, ch = box
        return resize_crop(np.asarray(decode_rgb(data, where)), (x, y, x + cw, y + ch), size)


def decode_shards(
    batch: dict[str, np.ndarray], shards: dict[str, tuple], train: bool, image_size: int, area_min: float = 0.05,
    seed: tuple[int, int] | None = None, flip: bool = True, on_error: str = "error",
    labels: tuple[str, tuple[str, ...]] | None = None, ship: bool = False,
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` body over whole shards (`read_binary_files` rows: "path", "bytes") → one row per
    sample: {"image": uint8 (B, S, S, 3), "label": int64 (B,), "key": str (B,), "error": str (B,)}. Each shard is first checked against its manifest entry (`shards`: shard name →
    ShardInfo fields), so a truncated or altered shard is named; with `on_error="skip"` every sample of a bad
    shard becomes an error row (the manifest says how many), and so does each bad sample (label −1, blank image),
    for the consumer to drop and count. `seed` = (run seed, epoch) makes augmentation reproducible: each sample
    draws from a generator seeded by (seed, epoch, its key), whichever task or batch it lands in. `labels`: the
    manifest's (label source, class names), `vitray/data/labels.py`; None = vitray's own `.cls` integers. `ship`
    (training with data.decode_on=gpu): JPEGs leave encoded, with their crop and flip, for the worker's device to
    decode (`device_decode`): columns "encoded", "kind", "box", "flip" instead of "image"."""
    source = labels[0] if labels else "cls"
    return decode_samples(read_checked(batch, shards, on_error, source), train, image_size, area_min, seed, flip,
                          on_error, labels, ship)


def decode_samples(groups, train: bool, image_size: int, area_min: float, seed: tuple[int, int] | None, flip: bool,
                   on_error: str, labels: tuple[str, tuple[str, ...]] | None, ship: bool = False) -> dict[str, np.ndarray]:
    """The rows of `decode_shards` from `groups`: (where, samples or None, keys of its error rows, error) per shard
    (tar) or row group (Parquet), each sample (key, image bytes, ext, label text or integer, annotation)."""
    from vitray.data.labels import class_map, label_index

    source, classes = labels if labels else ("cls", ())
    names = class_map(source, classes)
    keys, images, labels_out, errors = [], [], [], []
    rng = np.random.default_rng() if seed is None else None
    for path, samples, bad_keys, message in groups:
        if samples is None:
            keys += bad_keys
            images += [np.zeros((image_size, image_size, 3), np.uint8)] * len(bad_keys)
            labels_out += [-1] * len(bad_keys)
            errors += [message] * len(bad_keys)
            continue
        for key, image, _, label, _ in samples:
            where = f"shard {path} sample {key}"
            try:
                y = None if image is None else label_index(label, source, names, len(classes), where)
                pixels, y = _sample(image, y, where, train, image_size, area_min, flip,
                                    rng or np.random.default_rng([*seed, zlib.crc32(key.encode())]), ship and train)
                error = ""
            except DataError as e:
                if on_error != "skip":
                    raise
                pixels, y, error = np.zeros((image_size, image_size, 3), np.uint8), -1, str(e)
            keys.append(key)
            images.append(pixels)
            labels_out.append(y)
            errors.append(error)
    rows = {"label": np.asarray(labels_out, np.int64), "key": np.asarray(keys, dtype=str), "error": np.asarray(errors, dtype=str)}
    if ship and train:
        shipped = [p if isinstance(p, dict) else device_decode.ship_pixels(p) for p in images]  # bad rows: blank
        return {"encoded": np.array([p["encoded"] for p in shipped] + [b""], dtype=object)[:-1],  # 1-D of bytes
                "kind": np.asarray([p["kind"] for p in shipped], np.int8),
                "box": np.asarray([p["box"] for p in shipped], np.int32).reshape(-1, 4),
                "flip": np.asarray([p["flip"] for p in shipped], bool), **rows}
    empty = np.zeros((0, image_size, image_size, 3), np.uint8)
    return {"image": np.stack(images) if images else empty, **rows}
