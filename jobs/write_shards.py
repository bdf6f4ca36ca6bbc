"""Turn images into vitray shards (WebDataset tar + manifest) on a local path or s3://bucket/prefix.

    python jobs/write_shards.py --source folder:/data/imagenet/train --dest s3://my-bucket/imagenet/train
    python jobs/write_shards.py --source folder:s3://my-bucket/raw/train --dest s3://my-bucket/imagenet/train
    python jobs/write_shards.py --source digits --dest ./data/digits          # writes train/ and val/
    python jobs/write_shards.py --source coco:annotations/instances_val2017.json:val2017 --dest s3://b/coco/val2017
    python jobs/write_shards.py --source digit_canvases --dest ./data/canvases  # DETR's smoke data: train/, val/
    python jobs/write_shards.py --verify s3://my-bucket/imagenet/train       # checksums and counts
    python jobs/write_shards.py --index s3://my-bucket/laion --labels json:label --classes classes.txt
        # existing WebDataset shards (or Parquet files) indexed in place: a manifest.json, nothing copied

A folder source is written by Ray tasks on every CPU of the cluster (RAY_ADDRESS, else a local Ray), with a
progress line every --progress-every seconds; killed and started again with the same arguments, it keeps the
shards already written (vitray/data/writer.py). --single-process writes it in this process instead, without Ray.

S3-compatible endpoints (MinIO, Ceph): --endpoint-url http://host:9000. Credentials come from the standard AWS
chain (environment, ~/.aws, instance role) and are never printed or stored.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitray.data.manifest import DataError  # noqa: E402
from vitray.storage import Endpoint, StorageError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="folder:<path> (one sub-folder per class), coco:<instances.json>:<image dir>"
                   " (detection), digits or digit_canvases")
    p.add_argument("--dest", help="where the dataset goes: s3://bucket/prefix or a local path")
    p.add_argument("--verify", metavar="URI", help="check a written dataset against its manifest and exit")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint; default AWS")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--shard-size-mb", type=int, default=256, help="target shard size (default 256 MB)")
    p.add_argument("--shard-samples", type=int, default=10_000, help="at most this many samples per shard")
    p.add_argument("--max-side", type=int, default=0, metavar="N", help="folder: store images whose longer side"
                   " exceeds N pixels resized to N (aspect kept), so training decodes less; 0 = as they are")
    p.add_argument("--skip-bad", action="store_true", help="folder: leave out files that cannot be read or decoded"
                   " (each listed, path and reason, here and in the manifest's \"skipped\") and entries that cannot be"
                   " used (non-UTF-8 names, symlink loops, dangling links, empty class folders: one warning line)")
    p.add_argument("--single-process", action="store_true", help="folder: write in this process, one file after"
                   " another, without Ray (the reference path)")
    p.add_argument("--progress-every", type=float, default=10.0, metavar="S", help="folder: seconds between"
                   " progress lines (default 10)")
    p.add_argument("--index", metavar="URI", help="write a manifest for existing WebDataset shards (*.tar) or"
                   " Parquet files (*.parquet) under URI, in place (vitray/data/index.py)")
    p.add_argument("--labels", default="cls", help="--index: where a sample's class is: cls (<key>.cls integer),"
                   " txt (<key>.txt class name, needs --classes) or json:FIELD (a field of <key>.json)")
    p.add_argument("--classes", default="", metavar="FILE", help="--index: class names, one per line (local or s3://)")
    p.add_argument("--sha256", action="store_true", help="--index: also checksum every shard (reads every byte);"
                   " without it reads check each shard's size")
    p.add_argument("--image-column", default="image", help="--index of Parquet: the image-bytes column")
    p.add_argument("--label-column", default="label", help="--index of Parquet: the integer label column")
    args = p.parse_args(argv)
    endpoint = Endpoint(url=args.endpoint_url, region=args.region)
    try:
        if args.verify:
            from vitray.data.catalog import verify_shards

            m = verify_shards(args.verify, endpoint)
            print(f"{args.verify}: {len(m.shards)} shards, {m.num_samples} samples, {len(m.classes)} classes: OK")
            return 0
        if args.index:
            import ray

            from vitray.data.index import index
            from vitray.storage import check_writable
            from vitray.session import init_ray

            check_writable(args.index, endpoint)  # the manifest goes next to the shards
            if not ray.is_initialized():  # the shards are read by Ray Data tasks (this machine, or RAY_ADDRESS's cluster)
                init_ray()
            m = index(args.index, endpoint, args.labels, args.classes, args.sha256, args.image_column, args.label_column)
            print(f"{args.index}: indexed {len(m.shards)} {'row groups' if m.format == 'parquet' else 'shards'},"
                  f" {m.num_samples} samples, {len(m.classes)} classes (labels: {m.labels})")
            return 0
        if not args.source or not args.dest:
            p.error("--source and --dest are required (or --verify URI, or --index URI)")
        from vitray.storage import check_writable

        check_writable(args.dest, endpoint)  # before any image is read or Ray is asked for anything
        if args.source == "digits":
            from vitray.data.datasets import write_digits

            for split, m in write_digits(args.dest, endpoint).items():
                print(f"{args.dest}/{split}: {len(m.shards)} shards, {m.num_samples} samples")
            return 0
        if args.source == "digit_canvases":
            from vitray.data.detection import write_digit_canvases

            for split, m in write_digit_canvases(args.dest, endpoint).items():
                print(f"{args.dest}/{split}: {len(m.shards)} shards, {m.num_samples} canvases")
            return 0
        kind, _, path = args.source.partition(":")
        from vitray.data.shards import write_shards

        skipped: list[dict] | None = [] if args.skip_bad else None
        if args.skip_bad and kind != "folder":
            p.error("--skip-bad applies to --source folder:<path>")
        if args.max_side and (kind != "folder" or args.max_side < 1):
            p.error("--max-side applies to --source folder:<path> and takes a positive number of pixels")

        if kind == "coco" and ":" in path:
            from vitray.data.detection import samples_from_coco

            annotations, _, image_dir = path.partition(":")
            classes, samples = samples_from_coco(annotations, image_dir)
        elif kind == "folder" and path and not args.single_process:
            from vitray.data.writer import write_folder

            m = write_folder(path, args.dest, endpoint, max_shard_bytes=args.shard_size_mb << 20,
                             max_shard_samples=args.shard_samples, skip_bad=args.skip_bad, max_side=args.max_side,
                             progress_every_s=args.progress_every)
            return _summary(args.dest, m)
        elif kind == "folder" and path:
            from vitray.data.datasets import samples_from_folder, scan_folder

            classes, files = scan_folder(path, endpoint, args.skip_bad)  # listed and checked before any write
            samples = samples_from_folder(path, classes, skipped, max_side=args.max_side, endpoint=endpoint,
                                          files=files)
        else:
            p.error(f"--source {args.source!r}: expected folder:<path>, coco:<json>:<dir>, digits or digit_canvases")
        m = write_shards(samples, args.dest, classes, endpoint, max_shard_bytes=args.shard_size_mb << 20,
                         max_shard_samples=args.shard_samples, skipped=skipped)
        return _summary(args.dest, m)
    except (DataError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _summary(dest: str, m) -> int:
    for bad in m.skipped:
        print(f"skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    print(f"{dest}: {len(m.shards)} shards, {m.num_samples} samples, {len(m.classes)} classes"
          + (f", {len(m.skipped)} files skipped (listed in its manifest.json)" if m.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
