"""What a dataset URI holds, whatever its format: finding and checking its manifest, where its shards are, and
checking them all (`--verify`).

A URI names a folder of tar shards with a `manifest.json` (vitray's writer, or `--index` beside existing
WebDataset shards), a folder of Parquet files (with or without a manifest), or a file-name prefix of Parquet files
(the Hub's `data/train-`). Readers, the planner and the tools ask this module and get a `Manifest` back, so this sits
above both formats: it uses the tar code (`shards.py`) and the Parquet code (`parquet.py`), and neither uses it.
"""
from __future__ import annotations

import re

from vitray import storage
from vitray.data.manifest import MANIFEST, DataError, Manifest
from vitray.data.parquet import scan
from vitray.data.shards import check_shard, tar_samples
from vitray.storage import Endpoint


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
                return scan(folder, endpoint, *columns, field=field, prefix=prefix)
            raise DataError(f"{field}: {uri} does not exist")
        if not storage.exists(storage.join(uri, MANIFEST), endpoint):
            names = storage.list_files(uri, endpoint)
            if any(n.endswith(".parquet") for n in names) and not any(n.endswith(".tar") for n in names):
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
