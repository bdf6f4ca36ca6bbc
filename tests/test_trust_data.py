"""Trust boundaries of the data layer (issue 34): what an image folder, a manifest or an `.npz` may claim, and how a
bad one is refused — in this process, before any Ray resource is asked for."""
import io
import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from vitray import storage
from vitray.data import writer
from vitray.data.datasets import samples_from_arrays
from vitray.data.catalog import read_manifest, verify_shards
from vitray.data.manifest import DataError
from vitray.data.shards import iter_tar, write_shards
from vitray.models.npz import CheckpointError, load_npz, read_npz_shapes, save_npz
from test_newcomer import _job  # a job's main() (jobs/ is not a package)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ image folders

def _non_utf8_file(root: bytes) -> tuple[str, str]:
    with open(os.path.join(root, b"cat", b"bad\xff.png"), "wb") as f:
        f.write(_png(5))
    return "non-UTF-8 name", "cat/bad\\xff.png"


def _non_utf8_class(root: bytes) -> tuple[str, str]:
    os.mkdir(os.path.join(root, b"b\xffird"))
    with open(os.path.join(root, b"b\xffird", b"x.png"), "wb") as f:
        f.write(_png(6))
    return "non-UTF-8 name", "photos/b\\xffird"


def _symlink_loop(root: bytes) -> tuple[str, str]:
    os.symlink(b"loop.jpg", os.path.join(root, b"cat", b"loop.jpg"))
    return "symlink loop", "cat/loop.jpg"


def _dangling_link(root: bytes) -> tuple[str, str]:
    os.symlink(b"gone.jpg", os.path.join(root, b"dog", b"link.jpg"))
    return "dangling link", "dog/link.jpg"


def _empty_class(root: bytes) -> tuple[str, str]:
    os.mkdir(os.path.join(root, b"bird"))  # sorts before cat: kept, it would shift every label
    return "empty class folder", "photos/bird"


@pytest.mark.quick
@pytest.mark.parametrize("make_bad", [_non_utf8_file, _non_utf8_class, _symlink_loop, _dangling_link, _empty_class])
def test_image_folder_bad_entries_are_refused_in_one_error_or_skipped_and_counted(tmp_path, monkeypatch, capsys,
                                                                                  make_bad):
    root = tmp_path / "photos"
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        (root / cls / "a.png").write_bytes(_png(label))
    kind, named = make_bad(os.fsencode(root))

    # The Ray writer refuses while listing, before it asks Ray for anything.
    monkeypatch.setattr(writer, "_run", lambda *a, **k: pytest.fail("asked Ray to write a refused folder"))
    with pytest.raises(DataError) as refused:
        writer.write_folder(str(root), str(tmp_path / "ray"))
    message = str(refused.value)
    assert str(root) in message and named in message and f"1 {kind}" in message and "--skip-bad" in message
    assert "\n" not in message and message.encode("utf-8")  # one line, printable anywhere
    assert not (tmp_path / "ray").exists()

    write = _job("write_shards")
    args = ["--source", f"folder:{root}", "--single-process"]
    assert write([*args, "--dest", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and not (tmp_path / "strict").exists()

    # --skip-bad: written without it, one warning line that counts it; labels only for classes that hold images.
    assert write([*args, "--dest", str(tmp_path / "ds"), "--skip-bad"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"--skip-bad skipped 1 {kind}: " in warnings[0] and named in warnings[0]
    manifest = read_manifest(str(tmp_path / "ds"))
    assert manifest.classes == ["cat", "dog"] and manifest.num_samples == 2
    shard = manifest.shards[0]
    labels = {key: label for key, _, _, label in iter_tar((tmp_path / "ds" / shard.name).read_bytes(), shard.name)}
    assert labels == {"cat_a_png": 0, "dog_a_png": 1}


# ------------------------------------------------------------------------------------------------ manifests

@pytest.mark.quick
@pytest.mark.parametrize("entry, rule", [
    ("../outside.tar", "no '..' or '.' parts"),
    ("a/../../outside.tar", "no '..' or '.' parts"),
    ("/etc/passwd", "not an absolute path"),
    ("s3://other-bucket/x.tar", "no scheme"),
    ("file:///etc/passwd", "no scheme"),
    ("a//b.tar", "no empty path parts"),
    ("sub\\..\\x.tar", "no backslash"),
    ("", "non-empty string"),
    ("sub/shard-00001.tar", "directly in the dataset folder"),
    ("shard-00000.tar", "listed twice"),
])
def test_manifest_shard_entries_must_be_plain_names_inside_the_dataset(tmp_path, entry, rule):
    uri = str(tmp_path / "ds")
    write_shards(samples_from_arrays(np.zeros((4, 8, 8), np.uint8), np.arange(4) % 2), uri, ["a", "b"],
                 max_shard_samples=2)
    assert verify_shards(uri).num_samples == 4  # as written: accepted
    path = storage.join(uri, "manifest.json")
    manifest = json.loads(open(path).read())
    manifest["shards"][1]["name"] = entry
    open(path, "w").write(json.dumps(manifest))
    for read in (read_manifest, verify_shards):
        with pytest.raises(DataError) as refused:
            read(uri)
        message = str(refused.value)
        assert path in message and f"shard entry {entry!r}" in message and rule in message


# ------------------------------------------------------------------------------------------------ .npz files

def _npz(compressed: bool = False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _huge_header() -> bytes:
    """A real small .npz whose "w" header is patched (same length, CRC recomputed) to claim (300000, 400000)
    float32: 480 GB."""
    real = zipfile.ZipFile(io.BytesIO(_npz(w=np.zeros((3, 4), np.float32), b=np.arange(4, dtype=np.float32))))
    old, new = b"'shape': (3, 4), }", b"'shape': (300000, 400000), }"
    npy = real.read("w.npy")
    at, grow = npy.index(old), len(new) - len(old)
    assert npy[at + len(old):at + len(old) + grow] == b" " * grow  # the header's padding absorbs it
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("w.npy", npy[:at] + new + npy[at + len(old) + grow:])
        z.writestr("b.npy", real.read("b.npy"))
    return buf.getvalue()


def _lying_directory() -> bytes:
    """A deflated member whose header and zip-directory size agree on 10 MB, of which 16 bytes exist."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f4", "fortran_order": False, "shape": (2_500_000,)})
    claimed = npy.tell() + 10_000_000
    npy.write(bytes(16))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.npy", npy.getvalue())
    data = bytearray(buf.getvalue())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = data.index(signature)
        data[at + offset:at + offset + 4] = struct.pack("<I", claimed)
    return bytes(data)


@pytest.mark.quick
@pytest.mark.parametrize("make, named, rule", [
    (_huge_header, "'w'", "claims shape (300000, 400000)"),
    (_lying_directory, "'w'", "more than deflate can expand to"),
    (lambda: _npz(w=np.array([1, "x"], dtype=object)), "'w'", "holds Python objects"),
])
def test_crafted_npz_is_refused_before_anything_is_allocated(make, named, rule):
    data = make()
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as shapes:
            read_npz_shapes(io.BytesIO(data))
        from vitray.models.registry import build_model

        model = build_model("vit_tiny_test", num_classes=5, image_size=16)
        tracemalloc.reset_peak()
        with pytest.raises(CheckpointError) as loaded:
            load_npz(model, data, "crafted.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert named in str(shapes.value) and rule in str(shapes.value)
    assert str(loaded.value).startswith("crafted.npz: ") and named in str(loaded.value) and rule in str(loaded.value)
    assert peak < 4 * len(data) + (1 << 20), f"{peak:,} bytes allocated while refusing"

    from vitray.tasks.pixels import load_palette  # the iGPT palette (.npy) goes through the same header check

    if make is not _lying_directory:  # the member's bytes as a .npy of their own (a lying zip has none)
        with pytest.raises(CheckpointError) as palette:
            load_palette(zipfile.ZipFile(io.BytesIO(data)).read("w.npy"), "run/palette.npy", (16, 3))
        assert str(palette.value).startswith("run/palette.npy: ") and rule in str(palette.value)


@pytest.mark.quick
def test_honest_npz_and_palette_still_load():
    import torch

    from vitray.models.registry import build_model
    from vitray.tasks.pixels import load_palette

    torch.manual_seed(0)
    src = build_model("vit_tiny_test", num_classes=5, image_size=16)
    data = save_npz(src)
    arrays = dict(np.load(io.BytesIO(data)))
    for blob in (data, _npz(compressed=True, **arrays)):
        assert read_npz_shapes(io.BytesIO(blob)) == {k: v.shape for k, v in arrays.items()}
        dst = load_npz(build_model("vit_tiny_test", num_classes=5, image_size=16), blob)
        assert torch.equal(dst.pos_embed, src.pos_embed)
    assert read_npz_shapes(io.BytesIO(_npz(compressed=True, z=np.zeros(1_000_000, np.float32)))) == {"z": (1_000_000,)}
    palette = np.random.default_rng(0).random((16, 3)).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, palette)
    assert np.array_equal(load_palette(buf.getvalue(), "palette.npy", (16, 3)), palette)
    with pytest.raises(CheckpointError, match=r"palette.npy: shape \(16, 3\); this model predicts \(512, 3\)"):
        load_palette(buf.getvalue(), "palette.npy", (512, 3))
