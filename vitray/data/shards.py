"""Image shards: WebDataset-compatible tar files plus a manifest, on a local path or `s3://bucket/prefix`.

Layout of a dataset folder:
    manifest.json          written last: a dataset without it does not exist yet
    shard-00000.tar        members `<key>.jpg|png` (the original encoded bytes) and `<key>.cls` (label, ASCII int),
                           or for detection `<key>.json` (boxes and categories, see `vitray.data.detection`)
    shard-00001.tar ...

Why tar: any WebDataset tool reads these shards, `tar tf` inspects them, images keep their original bytes
(JPEG stays JPEG, EXIF included), and one sequential GET streams a whole shard — the access pattern object
stores are best at. Ray Data reads each one whole (`read_binary_files`) and vitray parses it after checking it
against the manifest.

Shards other tools wrote (img2dataset, timm) get a manifest in place from `jobs/write_shards.py --index`
(`vitray/data/index.py`): their own names (`00000.tar`), labels where they keep them (the manifest's "labels",
`vitray/data/labels.py`), and no sha256 unless asked for (the size is checked instead). Parquet folders are read
as row groups (`vitray/data/parquet.py`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
from typing import Iterable, Iterator

from vitray import storage
from vitray.storage import Endpoint

MANIFEST = "manifest.json"


class DataError(RuntimeError):
    """Bad input data; the message names the file, shard or sample key."""


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str  # unique within the dataset; no dots (WebDataset splits member names at the first dot)
    image: bytes  # encoded JPEG or PNG
    ext: str  # "jpg" or "png"
    label: int | None  # classification: the class index; detection: None (the annotation holds the categories)
    annotation: bytes | None = None  # detection: JSON {"boxes": [[x, y, w, h], ...], "labels": [...]}


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    bytes: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    classes: list[str]
    shards: list[ShardInfo]
    format: str = "webdataset"
    version: int = 1
    task: str = "classification"  # or "detection": samples carry a .json annotation instead of a .cls label
    skipped: list[dict] = dataclasses.field(default_factory=list)  # writer's --skip-bad: {"path", "reason"} each
    # Where each sample's class comes from (`vitray/data/labels.py`): "cls" (vitray's writer), "txt" or
    # "json:FIELD" (existing WebDataset shards indexed by `jobs/write_shards.py --index`), "column" (Parquet).
    labels: str = "cls"
    columns: dict = dataclasses.field(default_factory=dict)  # Parquet: {"image": column, "label": column}
    prefix: str = ""  # Parquet named by a file-name prefix (the Hub's data/train-*): the files are beside the URI

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["num_samples"] = self.num_samples
        return json.dumps(d, indent=1)

    @staticmethod
    def from_json(text: str) -> "Manifest":
        d = json.loads(text)
        return Manifest(classes=d["classes"], shards=[ShardInfo(**s) for s in d["shards"]], format=d["format"],
                        version=d["version"], task=d.get("task", "classification"), skipped=d.get("skipped", []),
                        labels=d.get("labels", "cls"), columns=d.get("columns", {}), prefix=d.get("prefix", ""))


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


def read_manifest(uri: str, endpoint: Endpoint | None = None, field: str = "data.train_uri",
                  columns: tuple[str, str] = ("image", "label")) -> Manifest:
    """The manifest of the dataset at `uri`, or a DataError naming the config field and the path. A folder of
    Parquet files without a manifest gets one made from their footers (`columns`: the image and label columns)."""
    try:
        if not storage.exists(uri, endpoint):
            # The Hub keeps its splits side by side (data/train-00000-of-00002.parquet, data/test-…): a URI
            # ending in a file-name prefix (…/data/train-) names the Parquet files that start with it.
            folder, _, prefix = uri.rstrip("/").rpartition("/")
            if prefix and folder and storage.exists(folder, endpoint) and any(
                    n.startswith(prefix) and n.endswith(".parquet") for n in storage.list_files(folder, endpoint)):
                from vitray.data.parquet import scan

                return scan(folder, endpoint, *columns, field=field, prefix=prefix)
            raise DataError(f"{field}: {uri} does not exist")
        if not storage.exists(storage.join(uri, MANIFEST), endpoint):
            names = storage.list_files(uri, endpoint)
            if any(n.endswith(".parquet") for n in names) and not any(n.endswith(".tar") for n in names):
                from vitray.data.parquet import scan

                return scan(uri, endpoint, *columns, field=field)
            hint = ("index them in place with jobs/write_shards.py --index" if any(n.endswith(".tar") for n in names)
                    else "write them with jobs/write_shards.py")
            raise DataError(f"{field}: {uri} holds no shards (no {MANIFEST}; {hint})")
        text = storage.read_bytes(storage.join(uri, MANIFEST), endpoint).decode()
    except storage.StorageError as e:
        raise DataError(f"{field}: {e}") from e
    try:
        manifest = Manifest.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{field}: {storage.join(uri, MANIFEST)} is not a valid manifest ({e})") from e
    check_entries(manifest, storage.join(uri, MANIFEST), field)
    if manifest.num_samples == 0:
        raise DataError(f"{field}: {uri} holds no samples")
    return manifest


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # s3:, file:, http:, and a Windows drive letter (C:)


def entry_problem(name) -> str | None:
    """Why a manifest's shard name is not a plain file name inside the dataset folder, or None. Readers join it
    onto the dataset's URI and `--verify` reads what that gives, so `../x.tar` or `s3://other/x.tar` would reach
    data the dataset does not hold; readers also look shards up by their last path part, so a name with a folder
    in it would not be found either."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if "\\" in name:
        return "must hold no backslash"
    if any(not c.isprintable() for c in name):
        return "must hold no control characters"
    if _SCHEME.match(name):
        return "must be relative, with no scheme (s3:, file:, …)"
    if name.startswith("/"):
        return "must be relative, not an absolute path"
    parts = name.split("/")
    if "" in parts:
        return "must have no empty path parts (//, or a trailing /)"
    if ".." in parts or "." in parts:
        return "must have no '..' or '.' parts (it would resolve outside the dataset folder)"
    if len(parts) > 1:
        return "must be a file directly in the dataset folder (no '/')"
    return None


def check_entries(manifest: Manifest, where: str, field: str) -> None:
    """Every shard entry of `manifest` (read from `where`) is a plain file name inside the dataset, and each is
    listed once (twice would double-count its samples); else one DataError naming the manifest, the entry and the
    rule. The Parquet file-name prefix, which also becomes part of a path, is held to the same rule."""
    seen: set[str] = set()
    for shard in manifest.shards:
        problem = entry_problem(shard.name)
        if problem is None and manifest.format == "parquet" and not shard.name.rpartition("#")[2].isdigit():
            problem = "must be <file>#<row group number>"
        if problem is None and shard.name in seen:
            problem = "is listed twice"
        if problem:
            raise DataError(f"{field}: {where}: shard entry {shard.name!r} {problem}; a manifest may only name files"
                            " inside its dataset folder")
        seen.add(shard.name)
    if manifest.prefix and entry_problem(manifest.prefix):
        raise DataError(f"{field}: {where}: prefix {manifest.prefix!r} {entry_problem(manifest.prefix)}")


def shard_folder(uri: str, manifest: Manifest) -> str:
    """The folder that holds the shards: `uri`, or for Parquet named by a file-name prefix, the folder it is in."""
    return uri.rstrip("/")[:-len(manifest.prefix)].rstrip("/") if manifest.prefix else uri


def shard_paths(uri: str, manifest: Manifest) -> list[str]:
    return [storage.join(shard_folder(uri, manifest), s.name) for s in manifest.shards]


def verify_shards(uri: str, endpoint: Endpoint | None = None) -> Manifest:
    """Check every shard against the manifest's sha256 (or size, where it has none) and count; raise naming the
    first bad shard."""
    manifest = read_manifest(uri, endpoint, field=uri)
    if manifest.format != "webdataset":
        raise DataError(f"{uri}: --verify checks tar shards; this is a {manifest.format} dataset")
    for shard in manifest.shards:
        path = storage.join(uri, shard.name)
        try:
            data = storage.read_bytes(path, endpoint)
        except storage.StorageError as e:
            raise DataError(f"shard {path}: missing ({e})") from e
        check_shard(data, shard, path)
        if len(tar_samples(data, path, manifest.labels)) != shard.num_samples:
            raise DataError(f"shard {path}: sample count differs from {MANIFEST}")
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
