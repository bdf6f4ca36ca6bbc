"""Tar shards, WebDataset-compatible: writing them (`write_shards`), parsing one (`tar_samples`), and checking one
against its manifest entry before it is parsed (`check_shard`, `read_checked`).

Why tar: any WebDataset tool reads these shards, `tar tf` inspects them, images keep their original bytes
(JPEG stays JPEG, EXIF included), and one sequential GET streams a whole shard — the access pattern object
stores are best at. Ray Data reads each one whole (`read_binary_files`) and vitray parses it after checking it
against the manifest.

The manifest and its types are in `manifest.py`; finding a dataset's manifest, whatever its format, and `--verify`
are in `catalog.py`, which uses this module.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import Iterable, Iterator

from vitray import storage
from vitray.data.manifest import MANIFEST, DataError, Manifest, Sample, ShardInfo
from vitray.storage import Endpoint


def _tar_bytes(samples: list[Sample]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            second = (f"{s.key}.json", s.annotation) if s.annotation is not None else (f"{s.key}.cls", str(s.label).encode())
            for member, payload in ((f"{s.key}.{s.ext}", s.image), second):
                info = tarfile.TarInfo(member)
                info.size, info.mode, info.mtime = len(payload), 0o644, 0  # mtime 0: identical data → identical shard
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_shards(
    samples: Iterable[Sample],
    dest: str,
    classes: list[str],
    endpoint: Endpoint | None = None,
    max_shard_bytes: int = 256 << 20,
    max_shard_samples: int = 10_000,
    skipped: list[dict] | None = None,
) -> Manifest:
    """Write `samples` as tar shards under `dest`, then the manifest.

    Each shard is one atomic object (or an atomic rename on local disk) and the manifest comes last, so a reader
    never sees a half-written dataset. Refuses to overwrite an existing dataset. `skipped`: the files the source
    left out ({"path", "reason"}), filled while `samples` is consumed; the manifest lists them.
    """
    if storage.exists(storage.join(dest, MANIFEST), endpoint):
        raise DataError(f"{dest}: already holds a dataset ({MANIFEST} exists); choose another destination")
    shards: list[ShardInfo] = []
    seen: set[str] = set()
    pending: list[Sample] = []
    pending_bytes = 0
    tasks: set[str] = set()

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        data = _tar_bytes(pending)
        name = f"shard-{len(shards):05d}.tar"
        storage.write_bytes(storage.join(dest, name), data, endpoint)
        shards.append(ShardInfo(name, len(pending), hashlib.sha256(data).hexdigest(), len(data)))
        pending, pending_bytes = [], 0

    for s in samples:
        if "." in s.key or "/" in s.key or s.key in seen:
            raise DataError(f"sample key {s.key!r}: keys must be unique and contain no '.' or '/'")
        if s.annotation is not None:
            _check_annotation(s, len(classes))
        elif s.label is None or not 0 <= s.label < len(classes):
            raise DataError(f"sample {s.key}: label {s.label} outside the {len(classes)} classes")
        tasks.add("classification" if s.annotation is None else "detection")
        if len(tasks) > 1:
            raise DataError(f"sample {s.key}: a dataset holds either labels or detection annotations, not both")
        seen.add(s.key)
        pending.append(s)
        pending_bytes += len(s.image) + 1024  # + tar headers
        if pending_bytes >= max_shard_bytes or len(pending) >= max_shard_samples:
            flush()
    flush()
    if not shards:
        raise DataError(f"{dest}: no samples to write")
    manifest = Manifest(classes=list(classes), shards=shards, task=tasks.pop(), skipped=list(skipped or []))
    storage.write_bytes(storage.join(dest, MANIFEST), manifest.to_json().encode(), endpoint)
    return manifest


def tar_samples(data: bytes, where: str, labels: str = "cls") -> list[tuple[str, bytes | None, str, str | None, bytes | None]]:
    """(key, image bytes or None, image extension, label text or None, annotation JSON or None) for each sample of
    one shard, in order. `labels`: the manifest's label source (`vitray/data/labels.py`), which says which member
    holds the label (.cls, .txt or .json). A sample missing its image or label comes back with None there (the
    caller names it); a corrupt archive raises a DataError.

    Keys follow WebDataset: a member's key is its path up to the first dot of its file name (`a/b.c.jpg` → `a/b`,
    extension `c.jpg`), so shards written by other tools (img2dataset, timm) group the same way."""
    parts: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():  # directory entries and links carry no sample data
                    continue
                folder, _, base = m.name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                parts.setdefault(key.removeprefix("./"), {})[ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"shard {where}: corrupt tar ({e})") from e
    member = labels.split(":", 1)[0]
    out = []
    for key, p in parts.items():
        ext = next((e for e in IMAGE_EXTS if e in p), "")
        label = p[member].decode(errors="replace").strip() if member in p else None
        out.append((key, p.get(ext), ext, label, p.get("json")))
    return out


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def check_shard(data: bytes, info: ShardInfo, where: str) -> None:
    """The shard's bytes against its manifest entry: a truncated or altered shard is named before it is parsed.
    An indexed dataset may have no sha256 (`--index` without `--sha256`): then the byte size alone is checked."""
    if len(data) != info.bytes or (info.sha256 and hashlib.sha256(data).hexdigest() != info.sha256):
        raise DataError(f"shard {where}: {'checksum' if info.sha256 else 'size'} mismatch against {MANIFEST}"
                        f" ({len(data)} bytes, the manifest says {info.bytes}): truncated or changed since it was"
                        " written")


def read_checked(batch: dict, shards: dict[str, tuple], on_error: str, labels: str = "cls") -> Iterator[tuple[str, list | None, list[str], str]]:
    """For each whole shard of a Ray Data read batch ("path", "bytes"): (path, its samples, [], "") once it matches
    its manifest entry (`shards`: shard name → ShardInfo fields), or under `on_error="skip"` (path, None, the keys
    its error rows get — as many as the manifest says —, the error). Decoders of every task share this."""
    for path, data in zip(batch["path"], batch["bytes"]):
        info = ShardInfo(*shards[path.rsplit("/", 1)[-1]])
        try:
            check_shard(data, info, path)
            yield path, tar_samples(data, path, labels), [], ""
        except DataError as e:
            if on_error != "skip":
                raise
            yield path, None, [f"{path}#{i}" for i in range(info.num_samples)], str(e)


def iter_tar(data: bytes, where: str) -> Iterator[tuple[str, bytes, str, int]]:
    """(key, image bytes, ext, label) for each sample of one classification shard, without Ray (tools, tests)."""
    for key, image, ext, label, _ in tar_samples(data, where):
        if image is None or label is None:
            raise DataError(f"shard {where} sample {key}: missing {'image' if image is None else 'label (.cls)'}")
        yield key, image, ext, int(label)


def _check_annotation(s: Sample, num_classes: int) -> None:
    from PIL import Image

    where = f"sample {s.key}"
    try:
        ann = json.loads(s.annotation)
        width, height = Image.open(io.BytesIO(s.image)).size  # reads the header only
    except (ValueError, OSError) as e:
        raise DataError(f"{where}: unreadable image or annotation ({e})") from e
    check_annotation(ann, width, height, num_classes, where)


def check_annotation(ann: dict, width: int, height: int, num_classes: int, where: str) -> None:
    """One clear error naming the sample for a box outside the image, a non-positive size or an unknown category."""
    boxes, labels = ann.get("boxes"), ann.get("labels")
    if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
        raise DataError(f"{where}: annotation needs lists 'boxes' and 'labels' of equal length")
    for i, (box, label) in enumerate(zip(boxes, labels)):
        if len(box) != 4:
            raise DataError(f"{where}: box {i} has {len(box)} numbers, not [x, y, w, h]")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise DataError(f"{where}: box {i} {box} has a non-positive size")
        if x < 0 or y < 0 or x + w > width + 1e-6 or y + h > height + 1e-6:
            raise DataError(f"{where}: box {i} {box} lies outside the {width}×{height} image")
        if not isinstance(label, int) or not 0 <= label < num_classes:
            raise DataError(f"{where}: box {i} has unknown category {label!r} (known: 0..{num_classes - 1})")
