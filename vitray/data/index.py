"""Index existing datasets in place: a vitray manifest.json beside WebDataset shards or Parquet files that other
tools wrote (img2dataset, LAION, timm's reader_wds, the Hugging Face Hub), without copying or rewriting them.

    python jobs/write_shards.py --index s3://bucket/laion-subset --labels json:label --classes classes.txt

WebDataset: every `*.tar` directly under the URI is a shard. Its sample count comes from img2dataset's
`<shard>_stats.json` ("successes") when there is one; otherwise — or when the classes must be learnt from the
labels, or `--sha256` is asked for — the shard is read: every sample must then have an image whose header reads and
a label that maps to a class, and each one that does not is reported by shard and key, as the writer reports bad
files. Shards are read in parallel with Ray Data, a few shards per task, so 10,000 shards are 10,000 small reads
spread over the cluster, never one process reading them all. Without `--sha256` the manifest holds each shard's size
only, which the training and evaluation reads check (a truncated shard is still named).

Parquet (a folder of `*.parquet` and no tars): the manifest lists row groups, from the footers (`parquet.scan`).
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from vitray import storage
from vitray.data.labels import check_source, class_map, label_index, needs_names
from vitray.data.manifest import MANIFEST, DataError, Manifest, ShardInfo
from vitray.data.shards import tar_samples
from vitray.storage import Endpoint

STATS = "_stats.json"  # img2dataset writes <shard>_stats.json beside <shard>.tar
SHOWN = 20  # bad samples listed in an error; the rest are counted


def index(uri: str, endpoint: Endpoint | None = None, labels: str = "cls", classes_file: str = "",
          sha256: bool = False, image_column: str = "image", label_column: str = "label") -> Manifest:
    """Write `uri`/manifest.json for the shards (or Parquet files) already there, and return it."""
    if storage.exists(storage.join(uri, MANIFEST), endpoint):
        raise DataError(f"{uri}: already has a {MANIFEST}; it is indexed (delete it to index again)")
    names = storage.list_files(uri, endpoint)
    tars = [n for n in names if n.endswith(".tar")]
    if not tars and any(n.endswith(".parquet") for n in names):
        from vitray.data.parquet import scan

        manifest = scan(uri, endpoint, image_column, label_column, field="--index")
    elif not tars:
        raise DataError(f"--index: {uri} holds no .tar shards and no .parquet files")
    else:
        manifest = _index_tars(uri, endpoint, tars, set(names), check_source(labels), classes_file, sha256)
    storage.write_bytes(storage.join(uri, MANIFEST), manifest.to_json().encode(), endpoint)
    return manifest


def read_classes(path: str, endpoint: Endpoint | None) -> list[str]:
    """One class name per line (blank lines ignored); a name twice is an error naming it."""
    try:
        lines = storage.read_bytes(path, endpoint).decode().splitlines()
    except (storage.StorageError, UnicodeDecodeError) as e:
        raise DataError(f"--classes: {e}") from e
    classes = [line.strip() for line in lines if line.strip()]
    if not classes:
        raise DataError(f"--classes: {path} names no classes")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise DataError(f"--classes: {path} names {twice[0]!r} more than once")
    return classes


def _index_tars(uri: str, endpoint: Endpoint | None, tars: list[str], names: set[str], labels: str,
                classes_file: str, sha256: bool) -> Manifest:
    import ray.data

    classes = read_classes(classes_file, endpoint) if classes_file else None
    if classes is None and needs_names(labels):
        raise DataError(f"--labels {labels}: the labels are class names; give the class list with --classes FILE")
    import pyarrow.fs as pafs

    fs, root = storage.resolve(uri, endpoint)
    # Sizes from one listing (pages of 1,000 on S3), not a request per shard.
    sizes = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(root))}
    # A shard is read when its stats cannot stand in for it: no _stats.json, a checksum asked for, or classes to learn.
    read_all = sha256 or classes is None
    todo = [{"name": n, "size": sizes[n], "read": read_all or f"{n[:-len('.tar')]}{STATS}" not in names} for n in tars]
    ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), 1000))
    ds = ds.map_batches(_index_shards, batch_size=None, batch_format="numpy",
                        fn_kwargs=dict(fs=fs, root=root, labels=labels, classes=classes, sha256=sha256))
    rows = sorted(ds.take_all(), key=lambda r: r["name"])

    problems = [p for r in rows for p in json.loads(r["problems"])]
    if problems:
        more = f"\n… and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise DataError(f"{uri}: {len(problems)} bad sample(s) or shard(s); nothing was written:\n"
                        + "\n".join(problems[:SHOWN]) + more)
    shards = [ShardInfo(str(r["name"]), int(r["samples"]), str(r["sha256"]), int(r["bytes"])) for r in rows]
    if classes is None:  # integer labels: as many classes as the largest one needs
        classes = [str(i) for i in range(max(int(r["top"]) for r in rows) + 1)]
    manifest = Manifest(classes=classes, shards=shards, labels=labels)
    if manifest.num_samples == 0:
        raise DataError(f"--index: {uri} holds no samples")
    return manifest


def _index_shards(batch: dict, fs, root: str, labels: str, classes: list[str] | None, sha256: bool) -> dict:
    """Ray Data `map_batches` body: for each shard ("name", "size" listed, "read" it or not), its count, size, sha256 (or ""), largest label
    and the problems found (JSON list of messages), from its _stats.json or from the shard itself."""
    out: dict[str, list] = {k: [] for k in ("name", "samples", "bytes", "sha256", "top", "problems")}
    for name, size, read in zip(batch["name"], batch["size"], batch["read"]):
        path = f"{root}/{name}"
        problems: list[str] = []
        samples, digest, top = 0, "", -1
        try:
            if read:
                data = storage.with_retries(lambda: _read(fs, path))
                size, digest = len(data), hashlib.sha256(data).hexdigest() if sha256 else ""
                samples, top, problems = _check_samples(data, path, labels, classes)
            else:
                samples = _successes(fs, f"{root}/{name[:-len('.tar')]}{STATS}")
        except (OSError, DataError) as e:
            problems.append(f"shard {path}: {e}" if not isinstance(e, DataError) else str(e))
            size = 0
        for k, v in (("name", name), ("samples", samples), ("bytes", size or 0), ("sha256", digest), ("top", top),
                     ("problems", json.dumps(problems))):
            out[k].append(v)
    return {k: np.asarray(v) for k, v in out.items()}


def _read(fs, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _successes(fs, path: str) -> int:
    """img2dataset's count of the samples it wrote into the shard."""
    try:
        stats = json.loads(_read(fs, path))
        return int(stats["successes"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: no integer \"successes\" ({e})") from e


def _check_samples(data: bytes, path: str, labels: str, classes: list[str] | None) -> tuple[int, int, list[str]]:
    """(samples, largest label, problems) of one shard: each sample needs an image whose header reads and a label
    that maps to a class — what the training read would otherwise stop at."""
    from PIL import Image

    names = class_map(labels, classes) if classes else None
    top, problems = -1, []
    samples = tar_samples(data, path, labels)
    for key, image, _, label, _ in samples:
        where = f"shard {path} sample {key}"
        try:
            if image is None:
                raise DataError(f"{where}: missing image (.jpg, .jpeg, .png or .webp)")
            try:
                Image.open(io.BytesIO(image)).size  # the header only: cheap, and catches what is no image at all
            except Exception as e:  # PIL raises many types; the message names the sample
                raise DataError(f"{where}: cannot decode image ({type(e).__name__})") from e
            top = max(top, label_index(label, labels, names, len(classes or ()), where))
        except DataError as e:
            problems.append(str(e))
    return len(samples), top, problems
