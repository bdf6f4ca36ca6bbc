"""Ingest throughput: vitray's Ray Data path (tar shards in S3 → decode + inception crop + flip in Ray tasks)
against a plain torch DataLoader doing the same decode and augmentation over the same JPEGs on local disk, with
the same number of CPU workers. Runs are interleaved and the ratio is reported (goal ≥ 1.0×).

The images are real photographs: crops of the two sample photos that ship inside scikit-learn, saved as JPEG.

    python benchmarks/ingest.py [--images 768] [--size 224] [--workers 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from common import write_result
from PIL import Image


def make_jpegs(folder: str, count: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427×640 RGB
    rng = np.random.default_rng(0)
    for i in range(count):
        src = photos[i % 2]
        h, w = rng.integers(240, 427), rng.integers(320, 640)
        y, x = rng.integers(0, 427 - h + 1), rng.integers(0, 640 - w + 1)
        cls = f"photo{i % 2}"
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        Image.fromarray(src[y:y + h, x:x + w]).save(os.path.join(folder, cls, f"{i:05d}.jpg"), quality=90)


class FolderDataset:
    """The DataLoader baseline: one JPEG per item, same decode + augmentation functions as the Ray path."""

    def __init__(self, files: list[tuple[str, int]], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from vitray.data.transforms import decode_rgb, inception_crop

        path, label = self.files[i]
        with open(path, "rb") as f:
            img = decode_rgb(f.read(), path)
        rng = np.random.default_rng()
        img = inception_crop(img, self.size, rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(img), label


def run_dataloader(files, size: int, workers: int, batch: int) -> float:
    import torch

    loader = torch.utils.data.DataLoader(FolderDataset(files, size), batch_size=batch, num_workers=workers, shuffle=True)
    t, n = time.perf_counter(), 0
    for images, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - t)


def run_ray(uri: str, endpoint, size: int, batch: int) -> float:
    from vitray.data.stream import build_dataset

    ds = build_dataset(uri, endpoint, train=True, image_size=size)
    t, n = time.perf_counter(), 0
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=4):
        n += len(b["label"])
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3072)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="CPU workers for both paths")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-shards", action="store_true", help="read the shards from local disk instead of S3 (isolates S3 cost)")
    args = p.parse_args()

    import ray

    from vitray.data.datasets import folder_classes, samples_from_folder
    from vitray.data.shards import write_shards
    from vitray.storage import EmbeddedS3

    with tempfile.TemporaryDirectory() as tmp, EmbeddedS3() as s3:
        make_jpegs(tmp, args.images)
        classes = folder_classes(tmp)
        files = [(os.path.join(tmp, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(tmp, c)))]
        uri = os.path.join(tmp, "shards") if args.local_shards else f"s3://{s3.bucket}/bench/ingest"
        # ~12 shards so both paths can spread work over the workers.
        write_shards(samples_from_folder(tmp, classes), uri, classes, s3.endpoint, max_shard_samples=max(1, args.images // 12))
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        run_ray(uri, s3.endpoint, args.size, args.batch)  # warm-up: worker processes, imports
        run_dataloader(files[: args.batch * args.workers], args.size, args.workers, args.batch)
        ray_rates, loader_rates = [], []
        for _ in range(args.rounds):  # interleaved: both see the same machine noise
            ray_rates.append(run_ray(uri, s3.endpoint, args.size, args.batch))
            loader_rates.append(run_dataloader(files, args.size, args.workers, args.batch))
        # The object store must not have spilled to disk (Ray reports a "Spilled … MiB" line when it has).
        from ray._private.internal_api import memory_summary

        spilled = [line for line in memory_summary(ray.get_runtime_context().gcs_address, stats_only=True).splitlines() if line.startswith("Spilled")]
        ray.shutdown()
    ratios = [r / d for r, d in zip(ray_rates, loader_rates)]
    write_result("ingest", {
        "what": "images/s, Ray Data from S3 tar shards vs torch DataLoader over local JPEG files; same decode+augment",
        "shards_on": "local disk" if args.local_shards else "S3 (embedded moto server)", "images": args.images, "image_size": args.size, "cpu_workers": args.workers,
        "ray_data_images_per_s": ray_rates, "dataloader_images_per_s": loader_rates,
        "object_store_spilled": spilled[0] if spilled else "nothing",
        "ratio_per_round": ratios, "ratio_median": statistics.median(ratios), "goal": ">= 1.0",
    })


if __name__ == "__main__":
    main()
