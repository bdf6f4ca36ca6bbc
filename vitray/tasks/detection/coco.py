"""COCO box AP with pycocotools' own `COCOeval`, and predictions in COCO's results format.

Ground truth and predictions are plain COCO dicts, so the same numbers come out of any COCO tool:
    gt  = {"images": [{"id", "width", "height"}], "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h],
           "area", "iscrowd"}], "categories": [{"id", "name"}]}
    results = [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

METRICS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")  # the first six numbers of COCOeval.stats


def ground_truth(sizes: list[tuple[int, int]], boxes: list[np.ndarray], labels: list[np.ndarray],
                 classes: list[str]) -> dict:
    """COCO ground truth for images 1..n of (height, width) `sizes`, boxes xywh in pixels. Category ids are the
    labels themselves (COCO's own ids for imported COCO; the digit for digit canvases); classes named "" (ids
    COCO leaves unused) are not categories."""
    images, annotations = [], []
    for i, ((h, w), bx, lb) in enumerate(zip(sizes, boxes, labels), start=1):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for b, c in zip(bx, lb):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c),
                                "bbox": [float(v) for v in b], "area": float(b[2] * b[3]), "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k, "name": name} for k, name in enumerate(classes) if name]}


def results(predictions: list[dict], image_ids: list[int] | None = None) -> list[dict]:
    """Per-image {"scores", "labels", "boxes" (xyxy pixels)} → COCO results (bbox as x, y, w, h)."""
    out = []
    for i, p in enumerate(predictions):
        image_id = image_ids[i] if image_ids is not None else i + 1
        for s, c, (x0, y0, x1, y1) in zip(np.asarray(p["scores"]), np.asarray(p["labels"]), np.asarray(p["boxes"])):
            out.append({"image_id": image_id, "category_id": int(c), "score": float(s),
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]})
    return out


def evaluate(gt: dict, detections: list[dict]) -> dict[str, float]:
    """COCOeval bbox over every image of `gt`: AP (IoU .50:.95), AP50, AP75, AP for small/medium/large objects.
    A metric with no objects of that size is −1, as COCOeval reports it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        if not detections:
            return {m: 0.0 for m in METRICS}
        found = coco.loadRes(detections)
        ev = COCOeval(coco, found, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {m: float(v) for m, v in zip(METRICS, ev.stats[:6])}
