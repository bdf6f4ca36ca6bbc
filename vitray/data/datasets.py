"""Image sources for the shard writer: an ImageNet-style folder tree, in-memory arrays, and the built-in digits."""
from __future__ import annotations

import errno
import io
import os
import stat
import sys
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from vitray import storage
from vitray.data.manifest import DataError, Manifest, Sample
from vitray.data.shards import write_shards
from vitray.data.transforms import decode_rgb
from vitray.storage import Endpoint

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# Listing entries that cannot become samples or classes. Each is collected while listing, then the whole lot is
# refused in one error or, with --skip-bad, skipped with one warning: silently dropping them hides a broken copy,
# and crashing on the first one (a non-UTF-8 name used to raise UnicodeDecodeError) hides the rest.
BAD_KINDS = {"non-UTF-8 name": "non-UTF-8 names", "symlink loop": "symlink loops", "dangling link": "dangling links",
             "special file": "special files", "unreadable entry": "unreadable entries",
             "empty class folder": "empty class folders"}
SHOWN = 3  # paths named per kind; the rest are counted
_IMAGE_SUFFIXES = tuple(e.encode() for e in IMAGE_EXTENSIONS)


def shown(path: bytes | str) -> str:
    """A path as text that prints anywhere: undecodable bytes as \\xNN and control characters escaped, where
    `os.fsdecode`'s surrogates would make `print` raise and a newline would split a one-line message."""
    text = (path if isinstance(path, bytes) else os.fsencode(path)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _wanted_class(name: bytes, kind: str | None) -> bool:
    return kind in (None, "dir")  # None: a broken link, which may have been meant as a class folder


def _wanted_image(name: bytes, kind: str | None) -> bool:
    return kind != "dir" and name.lower().endswith(_IMAGE_SUFFIXES)


def _entries(folder: str, endpoint: Endpoint | None, wanted,
             problems: dict[str, list[str]]) -> list[tuple[str, bool, int]] | None:
    """(name, is a folder, size) of the entries directly under `folder` that `wanted(name bytes, "dir" | "file" |
    "other" | None when it cannot be stat'ed)` keeps, sorted by name; wanted ones that cannot be used go to
    `problems`, and so does a folder that cannot be listed (None: not counted as empty as well). Local folders are listed here, as bytes, since a listing through pyarrow raises on a non-UTF-8
    name and leaves out broken links without a word; S3 keys are UTF-8 and have no links."""
    if storage.is_s3(folder):
        return [e for e in storage.list_entries(folder, endpoint)
                if wanted(e[0].encode(), "dir" if e[1] else "file")]
    try:
        with os.scandir(os.fsencode(folder)) as it:
            found = sorted(it, key=lambda e: e.name)
    except OSError as e:
        problems["unreadable entry"].append(f"{shown(folder)} ({e.strerror or e})")
        return None
    out = []
    for e in found:
        try:
            st = os.stat(e.path)  # through links, as the reads will go
        except OSError as err:
            if wanted(e.name, None):
                kind = ("symlink loop" if err.errno == errno.ELOOP else
                        "dangling link" if err.errno == errno.ENOENT and e.is_symlink() else "unreadable entry")
                problems[kind].append(shown(e.path))
            continue
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        if not wanted(e.name, kind):
            continue
        if kind == "other":  # a FIFO or device named *.jpg would block or never end when read
            problems["special file"].append(shown(e.path))
            continue
        try:
            name = e.name.decode("utf-8")
        except UnicodeDecodeError:  # cannot go into a sample key, a JSON manifest or an S3 key
            problems["non-UTF-8 name"].append(shown(e.path))
            continue
        out.append((name, kind == "dir", st.st_size))
    return out


def report_bad_entries(root: str, problems: dict[str, list[str]], skip_bad: bool, log=None) -> None:
    """One DataError naming `root`, the count of each kind and the first few paths; or, with `skip_bad`, one
    warning line saying the same (to `log`, default stderr)."""
    found = {kind: paths for kind, paths in problems.items() if paths}
    if not found:
        return
    details = "; ".join(
        f"{len(paths)} {kind if len(paths) == 1 else BAD_KINDS[kind]}: {', '.join(paths[:SHOWN])}"
        + (f", … ({len(paths) - SHOWN} more)" if len(paths) > SHOWN else "") for kind, paths in found.items())
    if skip_bad:
        (log or (lambda line: print(line, file=sys.stderr, flush=True)))(
            f"warning: {shown(root)}: --skip-bad skipped {details}")
        return
    total = sum(len(paths) for paths in found.values())
    raise DataError(f"{shown(root)}: {total} {'entry' if total == 1 else 'entries'} of this image folder cannot be"
                    f" used — {details}. Rename, repair or remove them, or pass --skip-bad to skip them")


def scan_folder(root: str, endpoint: Endpoint | None = None, skip_bad: bool = False,
                log=None) -> tuple[list[str], list[tuple[str, str, int, int]]]:
    """(classes, files) of `root/<class>/<file>` (a local folder or an s3:// prefix), checked before anything is
    read or written: see `folder_files` for the files. Entries that cannot be used (`BAD_KINDS`), an empty class
    folder among them, are refused together, or skipped with `skip_bad` (`report_bad_entries`). Classes are the
    non-empty class folders, sorted, so a label index never depends on a folder that holds nothing."""
    if not storage.is_s3(root) and not os.path.isdir(root):
        raise DataError(f"{shown(root)}: not a folder")
    problems: dict[str, list[str]] = {kind: [] for kind in BAD_KINDS}
    entries = _entries(root, endpoint, _wanted_class, problems) or []
    if not entries and not any(problems.values()):
        if storage.is_s3(root) and not storage.list_entries(root, endpoint):
            raise DataError(f"{root}: nothing under this prefix")
        raise DataError(f"{shown(root)}: no class folders (expected {shown(root)}/<class_name>/*.jpg)")
    listed = {cls: _entries(storage.join(root, cls), endpoint, _wanted_image, problems) for cls, _, _ in entries}
    classes = [cls for cls in listed if listed[cls]]
    problems["empty class folder"] += [shown(storage.join(root, cls)) for cls in listed if listed[cls] == []]
    report_bad_entries(root, problems, skip_bad, log)
    if not classes:
        raise DataError(f"{shown(root)}: no class folder holds an image file")
    return classes, _keyed(root, classes, listed)


def folder_classes(root: str, endpoint: Endpoint | None = None, skip_bad: bool = False, log=None) -> list[str]:
    """The class folders directly under `root` (a local folder or an s3:// prefix) that hold images, sorted;
    checked as `scan_folder` checks them."""
    return scan_folder(root, endpoint, skip_bad, log)[0]


def folder_files(root: str, classes: list[str], endpoint: Endpoint | None = None, skip_bad: bool = False,
                 log=None) -> list[tuple[str, str, int, int]]:
    """(path, sample key, label, size in bytes) of every image file under `root/<class>/`, in (class, name) order,
    the label being the class's place in `classes`; bad entries and empty classes are reported as `scan_folder`
    reports them. The key is the class and the whole file name (`cat/x.jpg` → `cat_x_jpg`), so the same photo
    saved as `x.jpg` and `x.png` gives two samples; names that still collide once '.' becomes '_' are named
    together."""
    problems: dict[str, list[str]] = {kind: [] for kind in BAD_KINDS}
    listed = {cls: _entries(storage.join(root, cls), endpoint, _wanted_image, problems) for cls in classes}
    problems["empty class folder"] += [shown(storage.join(root, cls)) for cls in classes if listed[cls] == []]
    report_bad_entries(root, problems, skip_bad, log)
    return _keyed(root, classes, listed)


def _keyed(root: str, classes: list[str],
           listed: dict[str, list[tuple[str, bool, int]] | None]) -> list[tuple[str, str, int, int]]:
    files, owner = [], {}
    for label, cls in enumerate(classes):
        for name, _, size in listed[cls] or ():
            path = storage.join(root, cls, name)
            key = f"{cls}_{name}".replace(".", "_").replace("/", "_")
            if key in owner:
                raise DataError(f"{owner[key]} and {path}: both become sample key {key!r} (WebDataset keys hold no"
                                " '.'); rename one of them")
            owner[key] = path
            files.append((path, key, label, size))
    return files


def read_source(path: str, endpoint: Endpoint | None = None) -> bytes:
    """One source file's bytes, local or s3://; a DataError naming the path when it cannot be read."""
    try:
        if storage.is_s3(path):
            return storage.read_bytes(path, endpoint)
        with open(path, "rb") as f:
            return f.read()
    except storage.StorageError as e:
        raise DataError(f"{path}: cannot read ({str(e).removeprefix(f'{path}: ')})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


def prepare_image(path: str, data: bytes, max_side: int = 0) -> tuple[bytes, str]:
    """(bytes to store, "jpg" or "png") for one source file. The file is decoded once here, so an unreadable one is
    reported by its path at write time (DataError). JPEG and PNG keep their bytes; other formats are re-encoded as
    PNG. `max_side`: an image whose longer side is larger is stored resized to it (aspect kept, upright; JPEG at
    quality 95, others as PNG), as FFCV and most large-scale pipelines store their data: every later epoch decodes
    fewer pixels."""
    img = decode_rgb(data, path)  # raises DataError naming the path
    fmt = Image.open(io.BytesIO(data)).format
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC,
                         reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if fmt == "JPEG" else "PNG", **({"quality": 95} if fmt == "JPEG" else {}))
        data, fmt = buf.getvalue(), fmt if fmt == "JPEG" else "PNG"
    if fmt == "JPEG":
        return data, "jpg"
    if fmt == "PNG":
        return data, "png"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), "png"


def samples_from_folder(root: str, classes: list[str], skipped: list[dict] | None = None,
                        max_side: int = 0, endpoint: Endpoint | None = None,
                        files: list[tuple[str, str, int, int]] | None = None) -> Iterator[Sample]:
    """`root/<class>/<file>` → samples, one file after another in this process (the reference path; the Ray writer
    `vitray.data.writer.write_folder` does the same per shard on every core). An unreadable file raises a DataError
    naming its path — or, given a `skipped` list, is recorded there ({"path", "reason"}) and left out; so are bad
    listing entries (`folder_files`). `files`: `scan_folder`'s listing, already checked. See `prepare_image` for
    what is stored and `max_side`."""
    if files is None:
        files = folder_files(root, classes, endpoint, skip_bad=skipped is not None)
    for path, key, label, _ in files:
        try:
            image, ext = prepare_image(path, read_source(path, endpoint), max_side)
        except DataError as e:
            if skipped is None:
                raise
            skipped.append({"path": path, "reason": str(e).removeprefix(f"{path}: ")})
            continue
        yield Sample(key=key, image=image, ext=ext, label=label)


def samples_from_arrays(images: np.ndarray, labels: np.ndarray, prefix: str = "img") -> Iterator[Sample]:
    """uint8 arrays (N, H, W) or (N, H, W, 3) → PNG-encoded samples (lossless)."""
    if images.dtype != np.uint8:
        raise DataError(f"images: expected uint8 pixels, got {images.dtype}")
    for i, (img, label) in enumerate(zip(images, labels)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        yield Sample(key=f"{prefix}{i:07d}", image=buf.getvalue(), ext="png", label=int(label))


def builtin_uri(root: str, name: str, image_size: int | None = None) -> str:
    """Where a built-in dataset is written under a storage root: <root>/datasets/digits, or per size for the
    detection canvases (<root>/datasets/digit_canvases_64); its splits are train/ and val/ below."""
    return storage.join(root, "datasets", name if image_size is None else f"{name}_{image_size}")


# scikit-learn's digits: 1,797 real 8×8 handwritten digits (UCI optdigits) shipped inside the package.
DIGITS_VAL = 297  # fixed held-out split: leaves 1,500 for training, divisible by 2, 3, 4 and 5 workers


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels → 0..255
    order = np.random.default_rng(0).permutation(len(images))  # fixed: the same split on every machine
    idx = order[DIGITS_VAL:] if split == "train" else order[:DIGITS_VAL]
    return images[idx], d.target[idx]


def write_digits(uri: str, endpoint: Endpoint | None = None, samples_per_shard: int = 250,
                 classes: Iterable[int] | None = None) -> dict[str, Manifest]:
    """Write the digits' train and val splits as shards under `uri`/train and `uri`/val (skipping a split that
    is already there). `classes` keeps only those digits, relabelled 0..k−1 in order (class names stay the digits):
    scaling studies pretrain on some digits and transfer to the others. Returns the manifests."""
    from vitray.data.catalog import read_manifest

    keep = list(range(10) if classes is None else classes)
    if keep != sorted(set(keep)) or not set(keep) <= set(range(10)):
        raise DataError(f"classes: give distinct digits 0–9 in increasing order, got {keep}")
    out = {}
    for split in ("train", "val"):
        dest = storage.join(uri, split)
        if storage.exists(storage.join(dest, "manifest.json"), endpoint):
            out[split] = read_manifest(dest, endpoint)
            continue
        images, labels = digits_arrays(split)
        mask = np.isin(labels, keep)
        relabel = np.searchsorted(np.asarray(keep), labels[mask]) if classes is not None else labels[mask]
        out[split] = write_shards(
            samples_from_arrays(images[mask], relabel, prefix=f"digits{split}"), dest, [str(i) for i in keep],
            endpoint, max_shard_samples=samples_per_shard,
        )
    return out
