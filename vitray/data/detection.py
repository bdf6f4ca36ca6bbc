"""Detection data: annotations (COCO-style boxes and categories), their validation, box-aware augmentation, the
digit-canvas dataset and the COCO importer.

A detection sample in a shard is `<key>.png|jpg` plus `<key>.json`:
    {"boxes": [[x, y, w, h], ...] (pixels, COCO's top-left corner + size), "labels": [category index, ...]}
Category indices are 0..K−1 into the manifest's class names. The Ray Data pipeline turns them into fixed-size
batches: images resized to S×S, boxes normalised (cx, cy, w, h) padded to `max_boxes` with a count per image.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image

from vitray.data.manifest import DataError, Sample
from vitray.data.shards import check_annotation  # noqa: F401  (re-exported)

# ------------------------------------------------------------------------------------------------ annotations


def annotation_bytes(boxes: np.ndarray, labels: np.ndarray) -> bytes:
    return json.dumps({"boxes": [[round(float(v), 2) for v in b] for b in boxes],
                       "labels": [int(v) for v in labels]}).encode()


# ------------------------------------------------------------------------------------------------ augmentation


def augment(img: Image.Image, boxes: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator | None,
            flip: bool = True, crop_min: float = 0.6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training (`rng` given): random horizontal flip, random crop of crop_min–100 % of each side (boxes clipped to
    it; a box left with under half its area is dropped), resize to size×size. Evaluation (`rng=None`): resize only.
    `boxes` (n, 4) xywh pixels → (pixels uint8 (S, S, 3), boxes (m, 4) normalised cxcywh, labels (m,))."""
    w, h = img.size
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1).astype(np.float64).reshape(-1, 4)
    if rng is not None:
        if flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            xyxy = np.stack([w - xyxy[:, 2], xyxy[:, 1], w - xyxy[:, 0], xyxy[:, 3]], axis=1)
        cw, ch = int(round(w * rng.uniform(crop_min, 1))), int(round(h * rng.uniform(crop_min, 1)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
        before = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        xyxy = np.clip(xyxy - [x0, y0, x0, y0], 0, [cw, ch, cw, ch])
        after = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
        keep = after >= 0.5 * before
        xyxy, labels = xyxy[keep], labels[keep]
        w, h = cw, ch
    img = img.resize((size, size), Image.BILINEAR)
    scale = np.array([w, h, w, h], dtype=np.float64)
    n = xyxy / scale
    cxcywh = np.stack([(n[:, 0] + n[:, 2]) / 2, (n[:, 1] + n[:, 3]) / 2, n[:, 2] - n[:, 0], n[:, 3] - n[:, 1]], axis=1)
    return np.asarray(img), cxcywh.astype(np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


# ------------------------------------------------------------------------------------------------ digit canvases


def digit_canvases(split: str, n: int, size: int = 64, max_digits: int = 3, scales: tuple[int, ...] = (2, 3),
                   seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Real scikit-learn digits (the split's own digits: held-out canvases use held-out digits) pasted at random
    positions and scales on a black size×size canvas, 1..max_digits each, overlapping at most slightly. Yields
    (uint8 image (S, S), boxes (k, 4) xywh pixels tight around the ink, labels (k,) the digit classes)."""
    from vitray.data.datasets import digits_arrays

    digits, classes = digits_arrays(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for _ in range(n):
        canvas = np.zeros((size, size), np.uint8)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            i, s = int(rng.integers(len(digits))), int(rng.choice(scales))
            glyph = np.kron(digits[i], np.ones((s, s), np.uint8))  # nearest-neighbour upscaling keeps the strokes
            ys, xs = np.nonzero(glyph > 32)
            glyph = glyph[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            gh, gw = glyph.shape
            for _ in range(20):  # a free spot: overlap with placed digits ≤ 10 % of either box
                x, y = int(rng.integers(0, size - gw + 1)), int(rng.integers(0, size - gh + 1))
                if all(_overlap((x, y, gw, gh), b) <= 0.1 for b in boxes):
                    canvas[y:y + gh, x:x + gw] = np.maximum(canvas[y:y + gh, x:x + gw], glyph)
                    boxes.append((x, y, gw, gh))
                    labels.append(int(classes[i]))
                    break
        yield canvas, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def _overlap(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def samples_from_canvases(canvases, prefix: str) -> Iterator[Sample]:
    """Canvases → detection samples (PNG + JSON annotation) for the shard writer."""
    for i, (img, boxes, labels) in enumerate(canvases):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        yield Sample(key=f"{prefix}{i:07d}", image=buf.getvalue(), ext="png", label=None,
                     annotation=annotation_bytes(boxes, labels))


# ------------------------------------------------------------------------------------------------ COCO importer


def samples_from_coco(annotations: str, image_dir: str) -> tuple[list[str], Iterator[Sample]]:
    """COCO instances JSON + its image folder → (class names indexed by category id, "" for unused ids; samples).
    Labels are COCO's own category ids, as DETR uses them (91 classes for COCO's ids 1..90). Crowd regions are
    left out (DETR does not train on them); boxes poking out of the image by under a pixel are clipped to it, and
    anything worse — a box outside the image, a non-positive size, an unknown category — is an error naming the
    image."""
    with open(annotations) as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{annotations}: not a COCO instances file (no {key!r})")
    names = {c["id"]: c["name"] for c in data["categories"]}
    classes = [names.get(i, "") for i in range(max(names) + 1)]
    per_image: dict[int, list] = {}
    for a in data["annotations"]:
        per_image.setdefault(a["image_id"], []).append(a)

    def samples() -> Iterator[Sample]:
        for img in data["images"]:
            where = f"{annotations}: image {img['id']} ({img['file_name']})"
            w, h = img["width"], img["height"]
            boxes, labels = [], []
            for a in per_image.get(img["id"], []):
                if a.get("iscrowd", 0):
                    continue
                if a["category_id"] not in names:
                    raise DataError(f"{where}: annotation {a['id']} has unknown category {a['category_id']}")
                x, y, bw, bh = a["bbox"]
                if bw <= 0 or bh <= 0:
                    raise DataError(f"{where}: annotation {a['id']} box {a['bbox']} has a non-positive size")
                x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
                if x0 - x > 1 or y0 - y > 1 or x + bw - x1 > 1 or y + bh - y1 > 1:
                    raise DataError(f"{where}: annotation {a['id']} box {a['bbox']} lies outside the {w}×{h} image")
                if x1 > x0 and y1 > y0:
                    boxes.append([x0, y0, x1 - x0, y1 - y0])
                    labels.append(a["category_id"])
            path = os.path.join(image_dir, img["file_name"])
            try:
                with open(path, "rb") as f:
                    data_bytes = f.read()
            except OSError as e:
                raise DataError(f"{where}: cannot read {path} ({e})") from e
            ext = "png" if img["file_name"].lower().endswith(".png") else "jpg"
            key = os.path.splitext(img["file_name"])[0].replace(".", "_").replace("/", "_")
            yield Sample(key=key, image=data_bytes, ext=ext, label=None,
                         annotation=annotation_bytes(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels)))

    return classes, samples()


CANVAS_SPLITS = {"train": 2000, "val": 300}


def write_digit_canvases(uri: str, endpoint=None, size: int = 64, samples_per_shard: int = 250,
                         counts: dict[str, int] | None = None) -> dict:
    """Write digit-canvas train and val splits as detection shards under `uri`/train and `uri`/val (skipping a
    split already there). Categories are the digits "0".."9"; canvases are the same on every machine."""
    from vitray import storage
    from vitray.data.catalog import read_manifest
    from vitray.data.shards import write_shards

    out = {}
    for split, n in (counts or CANVAS_SPLITS).items():
        dest = storage.join(uri, split)
        if storage.exists(storage.join(dest, "manifest.json"), endpoint):
            out[split] = read_manifest(dest, endpoint)
            continue
        out[split] = write_shards(samples_from_canvases(digit_canvases(split, n, size=size), f"canvas{split}"), dest,
                                  [str(i) for i in range(10)], endpoint, max_shard_samples=samples_per_shard)
    return out


# ------------------------------------------------------------------------------------------------ Ray Data decoding


def decode_detection_shards(
    batch: dict[str, np.ndarray], shards: dict[str, tuple], train: bool, image_size: int, max_boxes: int,
    num_classes: int, crop_min: float = 0.6, flip: bool = True, seed: tuple[int, int] | None = None,
    on_error: str = "error",
) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` body over whole detection shards (the detection twin of `decode_shards`): one row per
    sample with fixed shapes, so batches stack — {"image" uint8 (B, S, S, 3), "boxes" float32 (B, max_boxes, 4)
    normalised cxcywh, zero-padded, "labels" int64 (B, max_boxes), −1-padded, "num_boxes" (B,), "orig_size"
    (B, 2) height and width before resizing, "key", "error"}. Annotations are checked (box inside the image,
    positive size, known category) and a bad one is named by shard and key."""
    import zlib

    from vitray.data.shards import read_checked
    from vitray.data.transforms import decode_rgb

    rows: dict[str, list] = {k: [] for k in ("image", "boxes", "labels", "num_boxes", "orig_size", "key", "error")}

    def add(key: str, image, boxes, labels, size, error: str = "") -> None:
        padded_boxes = np.zeros((max_boxes, 4), np.float32)
        padded_labels = np.full(max_boxes, -1, np.int64)
        padded_boxes[:len(boxes)], padded_labels[:len(labels)] = boxes, labels
        for k, v in (("image", image), ("boxes", padded_boxes), ("labels", padded_labels), ("num_boxes", len(labels)),
                     ("orig_size", size), ("key", key), ("error", error)):
            rows[k].append(v)

    blank = np.zeros((image_size, image_size, 3), np.uint8)
    for path, samples, bad_keys, message in read_checked(batch, shards, on_error):
        if samples is None:
            for key in bad_keys:
                add(key, blank, np.zeros((0, 4)), np.zeros(0), (0, 0), message)
            continue
        for key, image, _, _, annotation in samples:
            where = f"shard {path} sample {key}"
            try:
                if image is None or annotation is None:
                    raise DataError(f"{where}: missing {'image' if image is None else 'annotation (.json)'}")
                img = decode_rgb(image, where)
                try:
                    ann = json.loads(annotation)
                except ValueError as e:
                    raise DataError(f"{where}: annotation is not JSON ({e})") from e
                check_annotation(ann, img.width, img.height, num_classes, where)
                rng = np.random.default_rng([*seed, zlib.crc32(key.encode())]) if train and seed else (
                    np.random.default_rng() if train else None)
                pixels, boxes, labels = augment(img, np.asarray(ann["boxes"], np.float64).reshape(-1, 4),
                                                np.asarray(ann["labels"], np.int64), image_size, rng, flip, crop_min)
                if len(labels) > max_boxes:
                    raise DataError(f"{where}: {len(labels)} boxes, more than detection.max_boxes = {max_boxes}")
                add(key, pixels, boxes, labels, (img.height, img.width))
            except DataError as e:
                if on_error != "skip":
                    raise
                add(key, blank, np.zeros((0, 4)), np.zeros(0), (0, 0), str(e))
    out = {k: np.stack(v) if k in ("image", "boxes", "labels") and v else np.asarray(v) for k, v in rows.items()}
    if not rows["key"]:
        out.update(image=np.zeros((0, image_size, image_size, 3), np.uint8), boxes=np.zeros((0, max_boxes, 4), np.float32),
                   labels=np.zeros((0, max_boxes), np.int64), num_boxes=np.zeros(0, np.int64),
                   orig_size=np.zeros((0, 2), np.int64))
    out["key"], out["error"] = np.asarray(rows["key"], dtype=str), np.asarray(rows["error"], dtype=str)
    return out
