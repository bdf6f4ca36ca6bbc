"""The one place that speaks object storage: URIs, pyarrow filesystems, atomic writes, the embedded S3 server.

Everything else in vitray names data by URI (`s3://bucket/prefix` or a local path) plus an `Endpoint`, and asks
this module for a `pyarrow.fs.FileSystem`. Ray Data and Ray Train take the same filesystem object, so one
endpoint setting reaches the readers, the checkpoint uploader and the metrics writer alike.

Credentials never pass through here: a real endpoint uses the standard AWS chain (environment, config files,
instance roles) on every node, so nothing secret ends up in configs, logs or checkpoints. Only the embedded
server, which checks no credentials, gets fixed placeholder keys.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
import uuid
from typing import Iterator

import pyarrow.fs as pafs

EMBEDDED_BUCKET = "vitray"
# moto accepts any key pair; these are placeholders, not secrets.
_EMBEDDED_KEYS = ("vitray-embedded", "vitray-embedded")


class StorageError(RuntimeError):
    """A URI that cannot be read or written; the message names it."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where `s3://` URIs live. `url=None` means AWS itself; MinIO, Ceph or moto are given by URL."""

    url: str | None = None
    region: str = "us-east-1"
    embedded: bool = False


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def s3_filesystem(endpoint: Endpoint) -> pafs.S3FileSystem:
    kwargs: dict = {"region": endpoint.region}
    if endpoint.url:
        scheme, _, netloc = endpoint.url.partition("://")
        kwargs.update(endpoint_override=netloc or scheme, scheme=scheme if netloc else "https")
    if endpoint.embedded:
        kwargs.update(access_key=_EMBEDDED_KEYS[0], secret_key=_EMBEDDED_KEYS[1], allow_bucket_creation=True)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint: Endpoint | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI. Local paths are made absolute so Ray workers agree on them."""
    if is_s3(uri):
        return s3_filesystem(endpoint or Endpoint()), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (use s3://bucket/prefix or a local path)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str, endpoint: Endpoint | None = None) -> bool:
    fs, path = resolve(uri, endpoint)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:  # unreachable endpoint, missing bucket, denied: say which URI
        raise _storage_error(uri, "cannot reach storage", e) from e


def read_bytes(uri: str, endpoint: Endpoint | None = None) -> bytes:
    fs, path = resolve(uri, endpoint)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return with_retries(read)
    except FileNotFoundError as e:
        raise StorageError(f"{uri}: not found") from e
    except OSError as e:
        raise _storage_error(uri, "cannot read", e) from e


def _permanent(e: OSError) -> bool:
    text = str(e)
    return isinstance(e, FileNotFoundError) or any(
        t in text for t in ("ACCESS_DENIED", "AccessDenied", "NoSuchBucket", "NO_SUCH_BUCKET", "NoSuchKey", "404"))


def with_retries(fn, attempts: int = 5, backoff_s: float = 0.5):
    """`fn()`, retried with exponential backoff on transient storage errors. The S3 client retries requests
    itself, but a response body cut off mid-stream surfaces as one error after the request succeeded
    (`INTERNAL_FAILURE ... Failed to flush response stream`); whole-object reads and checkpoint downloads are
    safe to repeat. Permission and not-found errors are raised at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as e:
            if _permanent(e) or attempt == attempts - 1:
                raise
            time.sleep(backoff_s * 2**attempt)


def _storage_error(uri: str, doing: str, e: OSError) -> StorageError:
    """One clear message per failure. Transient faults (throttling, 5xx, dropped connections) never get here: the
    S3 client retries them with backoff (pyarrow's AwsStandardS3RetryStrategy, in every process). Permission and
    missing-bucket errors are not retried, so a wrong bucket or role fails at once instead of in a retry storm."""
    text = str(e)
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text:
        return StorageError(f"{uri}: access denied — check the credentials (the standard AWS chain: environment,"
                            f" config files, instance role) and the bucket policy ({text})")
    if "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        return StorageError(f"{uri}: the bucket does not exist ({text})")
    return StorageError(f"{uri}: {doing} ({text})")


def write_bytes(uri: str, data: bytes, endpoint: Endpoint | None = None) -> None:
    """Write all of `data` or nothing: readers never see a partial object.

    An S3 PUT is atomic by itself; on a local filesystem we write a temporary sibling and rename it.
    """
    fs, path = resolve(uri, endpoint)
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        def write() -> None:
            with fs.open_output_stream(path) as f:
                f.write(data)

        try:
            with_retries(write)  # a PUT is idempotent: repeating a broken one is safe
        except OSError as e:
            raise _storage_error(uri, "cannot write", e) from e


def check_writable(uri: str, endpoint: Endpoint | None = None) -> None:
    """Find a folder or bucket that refuses writes before any cluster resource is asked for, not at the first
    checkpoint. Creates nothing that stays: on local disk the nearest existing folder must be writable; on S3 a
    probe object is written and deleted (S3 has no permission to ask about without trying)."""
    fs, path = resolve(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        existing = path
        while not os.path.exists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{uri}: cannot write ({existing} is not a writable folder)")
        return
    probe = f"{path}/.vitray-write-probe-{uuid.uuid4().hex}"
    try:
        with_retries(lambda: fs.open_output_stream(probe).close())
        fs.delete_file(probe)
    except OSError as e:  # access denied, no such bucket
        raise _storage_error(uri, "cannot write", e) from None


def list_files(uri: str, endpoint: Endpoint | None = None) -> list[str]:
    """Names (not paths) of the files directly under `uri`; empty when it does not exist."""
    fs, path = resolve(uri, endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _storage_error(uri, "cannot list", e) from e
    return sorted(i.base_name for i in infos)


def list_entries(uri: str, endpoint: Endpoint | None = None) -> list[tuple[str, bool, int]]:
    """(name, is a folder, size in bytes) of everything directly under `uri`, sorted by name; empty when it does not
    exist. On S3 a "folder" is a common key prefix."""
    fs, path = resolve(uri, endpoint)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _storage_error(uri, "cannot list", e) from e
    return sorted((i.base_name, i.type == pafs.FileType.Directory, i.size or 0) for i in infos)


def size(uri: str, endpoint: Endpoint | None = None) -> int | None:
    """The object's size in bytes, or None when it does not exist (one HEAD request on S3)."""
    fs, path = resolve(uri, endpoint)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise _storage_error(uri, "cannot reach storage", e) from e
    return info.size if info.type == pafs.FileType.File else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedS3:
    """An S3-compatible server on 127.0.0.1 (moto's server mode) for laptops, tests and CI.

    It lives as long as the process that started it: jobs that must outlive it (resuming a run in a later
    process) point `storage.uri` at a real bucket or a local path instead.

        with EmbeddedS3() as s3:
            uri = f"s3://{s3.bucket}/datasets/digits"; endpoint = s3.endpoint
    """

    def __init__(self, bucket: str = EMBEDDED_BUCKET, port: int | None = None):
        self.bucket = bucket
        self.port = port or free_port()
        self.endpoint = Endpoint(url=f"http://127.0.0.1:{self.port}", embedded=True)
        self._server = None

    def start(self) -> "EmbeddedS3":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        s3_filesystem(self.endpoint).create_dir(self.bucket)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_unless(uri: str) -> Iterator[EmbeddedS3 | None]:
    """A running EmbeddedS3 for the duration when no storage URI is given (the laptop default), else None."""
    if uri:
        yield None
        return
    with EmbeddedS3() as server:
        yield server
