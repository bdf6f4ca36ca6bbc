"""The JPEG training path (`vitray/data/jpeg.py`): the crop chosen from the header, decoded at the scale it needs —
the same crops as before, pixels within a stated tolerance of the full decode on real photos, and everything it
cannot reproduce left to Pillow."""
import io
import os

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from vitray.data import jpeg
from vitray.data.resize import resize_crop
from vitray.data.transforms import _sample, crop_box, decode_rgb, inception_crop

pytestmark = pytest.mark.quick

PHOTOS = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")  # two real 640×427 photos


def _encode(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90, **kw)
    return out.getvalue()


@pytest.fixture(scope="module", params=["china.jpg", "flower.jpg"])
def large_photo(request) -> bytes:
    """A real photo at 2560×1708 (a camera's size): crops of it shrink 2–8× to 224 px."""
    img = Image.open(os.path.join(PHOTOS, request.param))
    return _encode(img.resize((2560, 1708), Image.BICUBIC))


def test_scaled_decode_matches_the_full_decode_of_the_same_crop(large_photo):
    """Decoding at 1/k in the DCT domain ≈ decoding at full size and averaging k×k blocks: the same crop through both,
    then the same bilinear resize."""
    import cv2

    full = np.asarray(decode_rgb(large_photo, "t"))
    rng = np.random.default_rng(0)
    scales = []
    for _ in range(20):
        wh = jpeg.scalable_size(large_photo)
        box = crop_box(*wh, rng)
        x, y, cw, ch = box
        k = 1
        while k < 8 and min(cw, ch) >= 2 * k * 224:
            k *= 2
        fast = jpeg.decode_crop(large_photo, wh, box, 224).astype(float)
        sw, sh = -(-wh[0] // k), -(-wh[1] // k)  # libjpeg's size at 1/k
        averaged = cv2.resize(full, (sw, sh), interpolation=cv2.INTER_AREA) if k > 1 else full
        sx, sy = sw / wh[0], sh / wh[1]
        slow = resize_crop(averaged, (x * sx, y * sy, (x + cw) * sx, (y + ch) * sy), 224).astype(float)
        # Measured: at most 0.44 grey levels (mean abs) on these photos, 0 where k = 1. The DCT-domain scaling is
        # close to block averaging, not equal; a wrong scale, crop or channel order differs by tens of levels.
        assert np.abs(fast - slow).mean() < 2.0
        scales.append(k)
    assert max(scales) >= 2  # some crops did take a reduced scale


@pytest.mark.parametrize("subsampling, progressive, mode", [(0, False, "RGB"), (1, True, "RGB"), (2, False, "RGB"),
                                                           (2, True, "RGB"), (2, False, "L")])
def test_the_region_decode_gives_exactly_the_scaled_decodes_pixels(subsampling, progressive, mode, monkeypatch):
    """libjpeg-turbo decoding only the crop's region (TurboJPEG 3, `jpeg._TurboJPEG`) against the whole image decoded
    at the same scale and then cropped: the same pixels, bit for bit, for crops at every scale, on real photos in
    4:4:4, 4:2:2 and 4:2:0 chroma, baseline and progressive, colour and grey."""
    import simplejpeg

    from vitray.data.resize import snap

    turbo = jpeg._turbojpeg()
    assert turbo is not None, "no TurboJPEG 3 library: the `turbojpeg` wheel is a dependency"
    rng = np.random.default_rng(subsampling)
    for name in ("china.jpg", "flower.jpg"):
        for width in (333, 640, 1283, 2560):  # odd sizes too: the last iMCU column and row are partial
            img = Image.open(os.path.join(PHOTOS, name)).convert(mode).resize((width, width * 2 // 3), Image.BICUBIC)
            data = _encode(img, subsampling=subsampling, progressive=progressive)
            w, h = jpeg.scalable_size(data)
            for size in (224, 48):
                x, y, cw, ch = crop_box(w, h, rng)
                k = 1
                while k < 8 and min(cw, ch) >= 2 * k * size:
                    k *= 2
                sw, sh = -(-w // k), -(-h // k)
                x0, y0, x1, y1 = snap((x * sw / w, y * sh / h, (x + cw) * sw / w, (y + ch) * sh / h), sw, sh)
                region = turbo.decode_region(data, k, (x0, y0, x1, y1))
                whole = simplejpeg.decode_jpeg(data, colorspace="rgb", min_width=sw, min_height=sh)
                assert region is not None and np.array_equal(region, whole[y0:y1, x0:x1]), (name, width, k)
                # decode_crop with and without the library: the same training crop
                with_region = jpeg.decode_crop(data, (w, h), (x, y, cw, ch), size)
                monkeypatch.setattr(jpeg, "_turbojpeg", lambda: None)
                assert np.array_equal(with_region, jpeg.decode_crop(data, (w, h), (x, y, cw, ch), size))
                monkeypatch.undo()


def test_training_crops_are_drawn_as_before():
    """The header-first path draws the same crop as `inception_crop` from the same generator: the augmentation's
    distribution is unchanged, only the decoding."""
    img = Image.open(os.path.join(PHOTOS, "china.jpg")).convert("RGB")
    data = _encode(img)
    a = _sample(data, "3", "t", True, 224, 0.05, False, np.random.default_rng(7))[0]
    b = inception_crop(decode_rgb(data, "t"), 224, np.random.default_rng(7))
    assert np.array_equal(a, b)  # 640×427 to 224: no crop is 2 × 224 px, so both decode at full size, bit for bit


@pytest.mark.parametrize("kind", ["png", "rotated", "cmyk", "gray"])
def test_what_the_scaled_decode_cannot_reproduce_goes_through_pillow(kind):
    img = Image.open(os.path.join(PHOTOS, "flower.jpg")).convert("RGB")
    if kind == "png":
        out = io.BytesIO()
        img.save(out, "PNG")
        data = out.getvalue()
    elif kind == "rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90°: libjpeg-turbo would return it sideways
        data = _encode(img, exif=exif.tobytes())
    elif kind == "cmyk":
        data = _encode(img.convert("CMYK"))
    else:
        data = _encode(img.convert("L"))
    if kind == "gray":  # grayscale JPEGs take the scaled path and come out RGB
        assert jpeg.scalable_size(data) == img.size
        assert jpeg.decode_crop(data, img.size, (0, 0, 400, 400), 32).shape == (32, 32, 3)
    else:
        assert jpeg.scalable_size(data) is None
    pixels, label = _sample(data, "1", "t", True, 32, 0.05, True, np.random.default_rng(0))
    assert pixels.shape == (32, 32, 3) and label == 1
