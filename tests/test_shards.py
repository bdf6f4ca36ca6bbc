import io
import os

import boto3
import numpy as np
import pytest
from PIL import Image

from vitray import storage
from vitray.data.datasets import digits_arrays, folder_classes, samples_from_arrays, samples_from_folder
from vitray.data.catalog import read_manifest, verify_shards
from vitray.data.manifest import DataError
from vitray.data.shards import iter_tar, write_shards
from vitray.data.transforms import center_crop, decode_rgb, decode_shards, inception_crop


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _read_all(uri, endpoint=None):
    manifest = read_manifest(uri, endpoint)
    out = []
    for shard in manifest.shards:
        out += list(iter_tar(storage.read_bytes(storage.join(uri, shard.name), endpoint), shard.name))
    return manifest, out


def test_round_trip_local(tmp_path):
    images, labels = digits_arrays("val")
    manifest = write_shards(samples_from_arrays(images, labels), str(tmp_path / "ds"), [str(i) for i in range(10)],
                            max_shard_samples=100)
    assert [s.num_samples for s in manifest.shards] == [100, 100, 97]
    manifest, rows = _read_all(str(tmp_path / "ds"))
    assert manifest.num_samples == len(images) == len(rows)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(r[1]))) for r in rows])
    assert np.array_equal(decoded, images) and [r[3] for r in rows] == list(labels)
    assert not [p for p in os.listdir(tmp_path / "ds") if p.endswith(".tmp")]  # no temporaries left behind


def test_round_trip_through_s3(s3):
    images, labels = digits_arrays("val")
    uri = f"s3://{s3.bucket}/roundtrip"
    write_shards(samples_from_arrays(images[:50], labels[:50]), uri, [str(i) for i in range(10)], s3.endpoint,
                 max_shard_samples=20)
    client = boto3.client("s3", endpoint_url=s3.endpoint.url, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket, Prefix="roundtrip/")["Contents"])
    assert keys == ["roundtrip/manifest.json", "roundtrip/shard-00000.tar", "roundtrip/shard-00001.tar",
                    "roundtrip/shard-00002.tar"]
    _, rows = _read_all(uri, s3.endpoint)
    assert [r[3] for r in rows] == list(labels[:50])
    assert verify_shards(uri, s3.endpoint).num_samples == 50


def test_checksum_and_overwrite_guard(tmp_path):
    images, labels = digits_arrays("val")
    dest = str(tmp_path / "ds")
    write_shards(samples_from_arrays(images[:10], labels[:10]), dest, [str(i) for i in range(10)])
    with pytest.raises(DataError, match="already holds a dataset"):
        write_shards(samples_from_arrays(images[:10], labels[:10]), dest, [str(i) for i in range(10)])
    with open(tmp_path / "ds" / "shard-00000.tar", "r+b") as f:
        f.seek(600)
        f.write(b"\xff\xff")
    with pytest.raises(DataError, match="shard-00000.tar: checksum mismatch"):
        verify_shards(dest)


def test_missing_or_empty_dataset_named(tmp_path):
    with pytest.raises(DataError, match=f"data.train_uri: {tmp_path}/nope does not exist"):
        read_manifest(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no shards"):
        read_manifest(str(tmp_path / "empty"))


@pytest.fixture
def image_folder(tmp_path):
    """A class-per-folder tree holding what real folders hold."""
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    (root / "cat" / "rgb.jpg").write_bytes(_encode(rgb, "JPEG"))
    (root / "cat" / "gray.png").write_bytes(_encode(rgb.convert("L"), "PNG"))
    (root / "cat" / "palette.png").write_bytes(_encode(rgb.convert("P"), "PNG"))
    (root / "dog" / "rgba.png").write_bytes(_encode(rgb.convert("RGBA"), "PNG"))
    (root / "dog" / "cmyk.jpg").write_bytes(_encode(rgb.convert("CMYK"), "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    (root / "dog" / "rotated.jpg").write_bytes(_encode(rgb, "JPEG", exif=exif))
    (root / "dog" / "tiny.bmp").write_bytes(_encode(rgb.resize((3, 2)), "BMP"))
    return root


def test_folder_source_accepts_real_world_images(image_folder, tmp_path):
    classes = folder_classes(str(image_folder))
    assert classes == ["cat", "dog"]
    write_shards(samples_from_folder(str(image_folder), classes), str(tmp_path / "out"), classes)
    _, rows = _read_all(str(tmp_path / "out"))
    assert len(rows) == 7
    for key, data, ext, label in rows:
        img = decode_rgb(data, key)
        assert img.mode == "RGB"
        if key == "dog_rotated":
            assert img.size == (40, 60)  # EXIF orientation applied: 60×40 stored, 40×60 shown
        if key == "dog_tiny":
            assert ext == "png" and center_crop(img, 16).size == (16, 16)  # smaller than the crop: upscaled


def test_unreadable_file_reported_by_path(image_folder, tmp_path):
    bad = image_folder / "cat" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=str(bad)):
        list(samples_from_folder(str(image_folder), ["cat", "dog"]))


def _shard(samples):
    """One shard's bytes and its manifest entry, as decode_shards receives them."""
    import hashlib

    from vitray.data.shards import _tar_bytes

    data = _tar_bytes(samples)
    return data, ("shard-00007.tar", len(samples), hashlib.sha256(data).hexdigest(), len(data))


def test_decode_shards_checks_names_and_scales():
    from vitray.data.manifest import Sample

    png = _encode(Image.new("L", (8, 8), 255), "PNG")
    data, info = _shard([Sample("a", png, "png", 3), Sample("b", png, "png", 4)])
    batch = {"path": np.array(["s/shard-00007.tar"]), "bytes": np.array([data], dtype=object)}
    out = decode_shards(batch, {info[0]: info}, train=True, image_size=16, seed=(0, 0))
    assert out["image"].shape == (2, 16, 16, 3) and out["image"].dtype == np.uint8 and list(out["label"]) == [3, 4]
    assert list(out["key"]) == ["a", "b"] and list(out["error"]) == ["", ""]
    bad, info = _shard([Sample("a", png, "png", 3), Sample("b", b"garbage", "png", 4)])
    batch["bytes"] = np.array([bad], dtype=object)
    with pytest.raises(DataError, match="shard s/shard-00007.tar sample b: cannot decode"):
        decode_shards(batch, {info[0]: info}, train=False, image_size=16)
    with pytest.raises(DataError, match="shard s/shard-00007.tar: checksum mismatch"):
        decode_shards({**batch, "bytes": np.array([bad[:-512]], dtype=object)}, {info[0]: info}, train=False, image_size=16)


def test_inception_crop_covers_requested_area():
    img = Image.new("RGB", (100, 80))
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert inception_crop(img, 24, rng, area_min=0.05).shape == (24, 24, 3)


def test_writer_stores_large_images_resized_when_asked(tmp_path):
    """`jobs/write_shards.py --max-side 512`: a 2,560 px photo is stored at 512 px on its longer side, aspect kept,
    still a JPEG; an image already small enough keeps its exact bytes."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs"))
    import write_shards as job
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((2560, 1708), Image.BICUBIC)
    for cls in ("a", "b"):
        os.makedirs(tmp_path / "src" / cls)
    photo.save(tmp_path / "src" / "a" / "big.jpg", quality=90)
    small = io.BytesIO()
    photo.resize((300, 200)).save(small, "PNG")
    (tmp_path / "src" / "b" / "small.png").write_bytes(small.getvalue())

    assert job.main(["--source", f"folder:{tmp_path / 'src'}", "--dest", str(tmp_path / "ds"), "--max-side", "512",
                     "--single-process"]) == 0  # the Ray writer's --max-side: tests/test_writer.py
    manifest = read_manifest(str(tmp_path / "ds"), None)
    stored = {}
    for shard in manifest.shards:
        with open(tmp_path / "ds" / shard.name, "rb") as f:
            for key, image, ext, _ in iter_tar(f.read(), shard.name):
                stored[key] = (image, ext)
    (big, ext), = [v for k, v in stored.items() if k.startswith("a_")]
    img = Image.open(io.BytesIO(big))
    assert ext == "jpg" and img.format == "JPEG" and img.size == (512, 342)  # 2560×1708 scaled by 0.2
    (kept, ext), = [v for k, v in stored.items() if k.startswith("b_")]
    assert ext == "png" and kept == small.getvalue()
