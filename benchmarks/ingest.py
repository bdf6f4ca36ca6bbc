"""Ingest throughput: vitray's Ray Data path (tar shards in S3 → decode + inception crop + flip in Ray tasks)
against a plain torch DataLoader doing the same decode and augmentation over the same JPEGs on local disk, with
the same number of CPU workers. Runs are interleaved and the ratio is reported (goal ≥ 1.0×).

The images are real photographs: the two sample photos that ship inside scikit-learn, saved as JPEG in two sets —
"imagenet": crops of 240–427 × 320–640 px (ImageNet's typical size), "large": the photos resized to 1,600–2,560 px
wide (a camera's size), and "large-512": the large photos stored pre-resized to 512 px by the writer
(`--max-side 512`) for vitray's path, while the DataLoader reads the originals. The DataLoader does what a user writes by default: Pillow decodes the whole image, then the
inception crop is resized bicubic (torchvision's `RandomResizedCrop`). vitray's path chooses the crop first
and decodes a JPEG only at the scale the crop needs (`vitray/data/jpeg.py`), then resizes it bilinearly as the paper
did (`vitray/data/resize.py`). Also measured: the physical limit of
one core, decoding alone (libjpeg-turbo at full size through simplejpeg, at the scale the crops need, and only the
crops' regions at that scale, as vitray's path decodes).

`--parquet` also reads the same stored images as Hugging Face Hub-style Parquet (column `image` = {bytes, path},
row groups of ~1/12 of the set, like the shards) from the same S3, interleaved with the others: the row-group path
of `vitray/data/parquet.py` beside the tar path (results in benchmarks/results/ingest_parquet.json).

    python benchmarks/ingest.py [--images 1024] [--size 224] [--workers 2] [--rounds 3] [--photos imagenet large]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import types

import numpy as np
from common import write_result
from PIL import Image


def make_jpegs(folder: str, count: int, photos_kind: str = "imagenet") -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427×640 RGB
    rng = np.random.default_rng(0)
    large = {}
    for i in range(count):
        src = photos[i % 2]
        if photos_kind == "large":  # a few sizes, each made once (resizing 2,560 px photos per image is slow)
            w = int(rng.choice([1600, 2048, 2560]))
            if (i % 2, w) not in large:
                large[(i % 2, w)] = Image.fromarray(src).resize((w, w * 2 // 3), Image.BICUBIC)
            img = large[(i % 2, w)]
        else:
            h, w = rng.integers(240, 427), rng.integers(320, 640)
            y, x = rng.integers(0, 427 - h + 1), rng.integers(0, 640 - w + 1)
            img = Image.fromarray(src[y:y + h, x:x + w])
        cls = f"photo{i % 2}"
        os.makedirs(os.path.join(folder, cls), exist_ok=True)
        img.save(os.path.join(folder, cls, f"{i:05d}.jpg"), quality=90)


def decode_limits(files: list[tuple[str, int]], size: int) -> dict:
    """One core, decoding alone (no crop, no resize): images/s at full size and at the scale vitray's crops take."""
    import simplejpeg

    from vitray.data import jpeg
    from vitray.data.resize import snap
    from vitray.data.transforms import crop_box

    blobs = [open(path, "rb").read() for path, _ in files[:200]]
    for b in blobs[:20]:  # warm-up: the first decodes pay for page faults and caches
        simplejpeg.decode_jpeg(b)
    rng = np.random.default_rng(0)
    t = time.process_time()
    for b in blobs:
        simplejpeg.decode_jpeg(b)
    full = len(blobs) / (time.process_time() - t)
    jobs = []
    for b in blobs:
        w, h = jpeg.scalable_size(b)
        x, y, cw, ch = crop_box(w, h, rng) or (0, 0, w, h)
        k = 1
        while k < 8 and min(cw, ch) >= 2 * k * size:
            k *= 2
        sw, sh = -(-w // k), -(-h // k)
        jobs.append((b, k, sw, sh, snap((x * sw / w, y * sh / h, (x + cw) * sw / w, (y + ch) * sh / h), sw, sh)))
    t = time.process_time()
    for b, k, sw, sh, _ in jobs:
        simplejpeg.decode_jpeg(b, min_width=sw, min_height=sh)
    scaled = len(blobs) / (time.process_time() - t)
    turbo, region = jpeg._turbojpeg(), None
    if turbo is not None:  # what vitray's path decodes: only the crop's region, at that scale
        t = time.process_time()
        for b, k, _, _, box in jobs:
            turbo.decode_region(b, k, box)
        region = len(blobs) / (time.process_time() - t)
    return {"decode_full_per_core": full, "decode_at_crop_scale_per_core": scaled, "decode_region_per_core": region}


class FolderDataset:
    """The DataLoader baseline, as a user writes it by default (torchvision's `RandomResizedCrop` does the same):
    Pillow decodes the whole file, the inception crop (the same draws as vitray's) is resized bicubic, flipped."""

    def __init__(self, files: list[tuple[str, int]], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from vitray.data.transforms import crop_box, decode_rgb

        path, label = self.files[i]
        with open(path, "rb") as f:
            img = decode_rgb(f.read(), path)
        rng = np.random.default_rng()
        x, y, cw, ch = crop_box(*img.size, rng) or (0, 0, *img.size)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(img), label


class Rate:
    """One pass: the time to its first batch, and images/s after it (the rate a training run sees once its
    pipeline has started; start-up is paid once per epoch of a data partition, and reported on its own)."""

    def __init__(self):
        self.start, self.first, self.n_first, self.n = time.perf_counter(), None, 0, 0

    def add(self, count: int) -> None:
        self.n += count
        if self.first is None:
            self.first, self.n_first = time.perf_counter(), self.n

    def done(self) -> dict:
        end = time.perf_counter()
        return {"steady": (self.n - self.n_first) / (end - self.first), "whole": self.n / (end - self.start),
                "first_batch_s": self.first - self.start}


def run_dataloader(files, size: int, workers: int, batch: int) -> dict:
    import torch

    loader = torch.utils.data.DataLoader(FolderDataset(files, size), batch_size=batch, num_workers=workers, shuffle=True)
    rate = Rate()
    for images, _ in loader:
        rate.add(len(images))
    return rate.done()


def run_ray(uri: str, endpoint, size: int, batch: int) -> dict:
    from vitray.data.reading import build_dataset
    from vitray.data.spec import ReadSpec

    rate = Rate()
    ds = build_dataset(uri, endpoint, ReadSpec(size, train=True))
    for b in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=4):
        rate.add(len(b["label"]))
    return rate.done()


@contextlib.contextmanager
def s3_server_process():
    """moto's S3 server in a process of its own. `EmbeddedS3` runs it as a thread of the process that starts it,
    which here is the loop consuming the batches: the two would share one GIL, a handicap no real S3 endpoint puts
    on its readers (`--s3 thread` measures that way; here the ratios came out within the machine's noise of this)."""
    import subprocess
    import sys

    from vitray import storage

    port = storage.free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = storage.Endpoint(url=f"http://127.0.0.1:{port}", embedded=True)
        deadline = time.time() + 60
        while True:
            try:
                storage.s3_filesystem(endpoint).create_dir(storage.EMBEDDED_BUCKET)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        yield types.SimpleNamespace(bucket=storage.EMBEDDED_BUCKET, endpoint=endpoint)
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(kind: str, args, s3) -> dict:
    """One photo set: both paths interleaved, `args.rounds` times."""
    import ray

    from vitray.data import decode_rate
    from vitray.data.datasets import folder_classes, samples_from_folder
    from vitray.data.shards import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(tmp, args.images, "large" if kind == "large-512" else kind)
        classes = folder_classes(tmp)
        files = [(os.path.join(tmp, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(tmp, c)))]
        uri = os.path.join(tmp, "shards") if args.local_shards else f"s3://{s3.bucket}/bench/ingest-{kind}"
        # ~12 shards so both paths can spread work over the workers.
        # large-512: the same photos, stored pre-resized to 512 px (jobs/write_shards.py --max-side 512); the
        # DataLoader still reads the originals, as it would without the writer's option.
        write_shards(samples_from_folder(tmp, classes, max_side=512 if kind == "large-512" else 0), uri, classes,
                     s3.endpoint, max_shard_samples=max(1, args.images // 12))
        parquet_uri = write_parquet(uri, s3, args.images // 12) if args.parquet else None
        limits = decode_limits(files, args.size)
        # What the planner measures on a dataset (vitray/data/decode_rate.py): Ray Data's rate ÷ this one is its
        # RAY_DATA_EFFICIENCY.
        in_process = decode_rate.measure(uri, s3.endpoint, args.size).per_cpu
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        run_ray(uri, s3.endpoint, args.size, args.batch)  # warm-up: worker processes, imports
        run_dataloader(files[: args.batch * args.workers], args.size, args.workers, args.batch)
        ray_runs, loader_runs, parquet_runs = [], [], []
        if parquet_uri:
            run_ray(parquet_uri, s3.endpoint, args.size, args.batch)  # warm-up
        for _ in range(args.rounds):  # interleaved: both see the same machine noise
            ray_runs.append(run_ray(uri, s3.endpoint, args.size, args.batch))
            loader_runs.append(run_dataloader(files, args.size, args.workers, args.batch))
            if parquet_uri:
                parquet_runs.append(run_ray(parquet_uri, s3.endpoint, args.size, args.batch))
        # The object store must not have spilled to disk (Ray reports a "Spilled … MiB" line when it has).
        from ray._private.internal_api import memory_summary

        spilled = [line for line in memory_summary(ray.get_runtime_context().gcs_address, stats_only=True).splitlines() if line.startswith("Spilled")]
        ray.shutdown()
    ray_rates, loader_rates = [r["steady"] for r in ray_runs], [r["steady"] for r in loader_runs]
    ratios = [r / d for r, d in zip(ray_rates, loader_rates)]
    whole = [r["whole"] / d["whole"] for r, d in zip(ray_runs, loader_runs)]
    return {"images": args.images, "ray_data_images_per_s": ray_rates, "dataloader_images_per_s": loader_rates,
            "ray_data_per_core": statistics.median(ray_rates) / args.workers,
            "dataloader_per_core": statistics.median(loader_rates) / args.workers,
            "first_batch_s": [r["first_batch_s"] for r in ray_runs],
            "dataloader_first_batch_s": [r["first_batch_s"] for r in loader_runs],
            "ratio_whole_pass_per_round": whole, **limits, "planner_in_process_per_core": in_process,
            "ray_data_efficiency": statistics.median(ray_rates) / args.workers / in_process, "object_store_spilled": spilled[0] if spilled else "nothing",
            "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
            "goal": ">= 1.5" if kind == "imagenet" else ">= 4" if kind == "large" else "the gain of pre-resizing",
            **({"parquet_images_per_s": [r["steady"] for r in parquet_runs],
                "parquet_vs_tar_median": statistics.median(p["steady"] / r for p, r in zip(parquet_runs, ray_rates))}
               if parquet_runs else {})}


def write_parquet(shards_uri: str, s3, rows_per_group: int) -> str:
    """The stored images of the tar shards again, as a Hub-layout Parquet file beside them: column `image` a
    {bytes, path} struct, `label` int64. Returns its folder."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitray import storage
    from vitray.data.catalog import read_manifest
    from vitray.data.shards import iter_tar

    images, labels = [], []
    for shard in read_manifest(shards_uri, s3.endpoint).shards:
        data = storage.read_bytes(storage.join(shards_uri, shard.name), s3.endpoint)
        for key, image, ext, label in iter_tar(data, shard.name):
            images.append({"bytes": image, "path": f"{key}.{ext}"})
            labels.append(label)
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, pa.int64())}), buf,
                   row_group_size=max(1, rows_per_group))
    folder = shards_uri.rstrip("/") + "-parquet"
    storage.write_bytes(storage.join(folder, "train-00000-of-00001.parquet"), buf.getvalue(), s3.endpoint)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="CPU workers for both paths")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--photos", nargs="+", default=["imagenet", "large", "large-512"],
                   choices=["imagenet", "large", "large-512"])
    p.add_argument("--s3", choices=["process", "thread"], default="process",
                   help="moto's server in its own process, or as a thread of this one (EmbeddedS3, as the tests run it)")
    p.add_argument("--local-shards", action="store_true", help="read the shards from local disk instead of S3 (isolates S3 cost)")
    p.add_argument("--parquet", action="store_true", help="also read the same images as Hub-layout Parquet row groups")
    args = p.parse_args()

    from vitray.storage import EmbeddedS3

    with (s3_server_process() if args.s3 == "process" else EmbeddedS3()) as s3:
        sets = {kind: measure(kind, args, s3) for kind in args.photos}
    first = sets[args.photos[0]]
    write_result("ingest_parquet" if args.parquet else "ingest", {
        "what": "images/s, Ray Data from S3 tar shards (vitray: crop first, JPEGs decoded at the scale the crop needs)"
                " vs a torch DataLoader over local JPEG files (Pillow full decode, bicubic inception crop), same CPU"
                " workers; per photo set; decode alone on one core is the physical limit",
        "shards_on": "local disk" if args.local_shards else f"S3 (moto's server, {'its own process' if args.s3 == 'process' else 'a thread of the consuming process'})",
        "rates": "images/s after each pass's first batch; first_batch_s is the time to it", "image_size": args.size,
        "cpu_workers": args.workers, **sets,
        # the first set's figures at the top level too, as benchmarks/report.py reads them
        "ray_data_images_per_s": first["ray_data_images_per_s"], "dataloader_images_per_s": first["dataloader_images_per_s"],
        "ratio_median": first["ratio_median"], "goal": first["goal"], "images": args.images,
    })


if __name__ == "__main__":
    main()
