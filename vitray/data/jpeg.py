"""Decode only what a training crop needs, for JPEGs: libjpeg-turbo's DCT-domain scaling (through `simplejpeg`).

A training crop is resized to the model's input (224 px), so a crop much larger than that was decoded at full
resolution only to be shrunk. libjpeg-turbo can decode at 1/2, 1/4 or 1/8 of the size in the DCT domain, for a
fraction of the work: the crop is chosen from the header first (`transforms.crop_box`, the same draws as before),
then the image is decoded at the smallest scale at which the crop still has at least the output's pixels, and the
crop is resized from there. The paper's pipeline did the same kind of thing (TensorFlow's `decode_and_crop_jpeg`).

Within that scale, only the crop's region is decoded when libjpeg-turbo's TurboJPEG 3 library is at hand
(`tj3SetCroppingRegion`: the rows above the crop are entropy-decoded and skipped, the rows below are never read, and
only the iMCU columns the crop spans are transformed). No maintained Python binding exposes that call (PyTurboJPEG
2.6 scales only, simplejpeg neither), so `_TurboJPEG` binds the six calls it needs with ctypes: to the system's
`libturbojpeg` if it is version 3, else to the copy the `turbojpeg` wheel ships. The region's pixels are exactly the
scaled full decode's (tested bit for bit); without the library the scaled full decode runs instead.

Only what the scaled decode reproduces takes this path: YCbCr or grayscale JPEGs without an EXIF rotation.
Everything else (PNG, CMYK, rotated photos, broken files) goes through Pillow as before (`decode_rgb`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import io
import os
import threading

import numpy as np
from PIL import Image


def scalable_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the scaled decode handles; None for anything else."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        import simplejpeg  # noqa: F401
    except ImportError:  # an optional speed-up: Pillow decodes everything without it
        return None
    try:
        img = Image.open(io.BytesIO(data))  # the header only: no pixel is decoded here
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.getexif().get(0x0112, 1) != 1:
            return None
        return img.size
    except Exception:  # unreadable: Pillow's path names the sample and the reason
        return None


def decode_crop(data: bytes, wh: tuple[int, int], box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The crop `box` = (x, y, width, height) of a w×h JPEG (full-resolution pixels), as size×size×3 uint8 RGB:
    decoded at the smallest 1/k (k = 1, 2, 4, 8) at which the crop keeps at least size pixels each way, then
    resized (bilinear)."""
    from vitray.data.resize import resize, resize_crop, snap

    (w, h), (x, y, cw, ch) = wh, box
    k = 1
    while k < 8 and min(cw, ch) >= 2 * k * size:
        k *= 2
    sw, sh = -(-w // k), -(-h // k)  # libjpeg scales a w×h image to ceil(w / k) × ceil(h / k)
    scaled = (x * sw / w, y * sh / h, (x + cw) * sw / w, (y + ch) * sh / h)
    turbo = _turbojpeg()
    if turbo is not None:
        region = turbo.decode_region(data, k, snap(scaled, sw, sh))
        if region is not None:
            return resize(region, size)
    import simplejpeg

    # Ask for at least the scaled size, and libjpeg picks exactly 1/k.
    pixels = simplejpeg.decode_jpeg(data, colorspace="rgb", min_width=sw, min_height=sh)
    return resize_crop(pixels, scaled, size)


_MCU_WIDTH = {0: 8, 1: 16, 2: 16, 3: 8, 4: 8, 5: 32, 6: 8}  # TJSAMP_444, 422, 420, GRAY, 440, 411, 441
_DECOMPRESS, _SUBSAMP, _WIDTH, _RGB = 1, 4, 5, 0  # TJINIT_DECOMPRESS, TJPARAM_*, TJPF_RGB


class _Scaling(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _TurboJPEG:
    """libjpeg-turbo's TurboJPEG 3 API, the calls a region decode needs; one decompressor per thread."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        handle, buf, size, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int
        for name, args, ret in (("tj3Init", [c_int], handle), ("tj3DecompressHeader", [handle, buf, size], c_int),
                                ("tj3Get", [handle, c_int], c_int), ("tj3SetScalingFactor", [handle, _Scaling], c_int),
                                ("tj3SetCroppingRegion", [handle, _Region], c_int),
                                ("tj3Decompress8", [handle, buf, size, ctypes.c_void_p, c_int, c_int], c_int)):
            fn = getattr(lib, name)  # AttributeError: not version 3
            fn.argtypes, fn.restype = args, ret
        self.lib, self.path, self._local = lib, path, threading.local()

    def decode_region(self, data: bytes, k: int, box: tuple[int, int, int, int]) -> np.ndarray | None:
        """Pixels [y0:y1, x0:x1] of the JPEG decoded at 1/k, box = (x0, y0, x1, y1) in those scaled pixels;
        None where the library declines (an unusual subsampling, a corrupt file): the caller decodes it whole."""
        lib, x0, y0, x1, y1 = self.lib, *box
        tj = getattr(self._local, "handle", None)
        if tj is None:
            tj = self._local.handle = lib.tj3Init(_DECOMPRESS)
        if not tj or lib.tj3DecompressHeader(tj, data, len(data)) != 0:
            return None
        mcu = _MCU_WIDTH.get(lib.tj3Get(tj, _SUBSAMP))
        if mcu is None or lib.tj3SetScalingFactor(tj, _Scaling(1, k)) != 0:
            return None
        # A region starts on an iMCU column of the scaled image. One more iMCU column each side: chroma is upsampled
        # from its horizontal neighbours, which a region's edge columns would lack (measured: up to 16 grey levels
        # off in the edge column of 4:2:2 and 4:2:0 images without it, none with it).
        step, scaled_width = max(1, mcu // k), -(-lib.tj3Get(tj, _WIDTH) // k)
        left, right = max(0, x0 - x0 % step - step), min(scaled_width, x1 + step)
        out = np.empty((y1 - y0, right - left, 3), np.uint8)
        if (lib.tj3SetCroppingRegion(tj, _Region(left, y0, right - left, y1 - y0)) != 0
                or lib.tj3Decompress8(tj, data, len(data), out.ctypes.data, 0, _RGB) != 0):
            return None
        return out[:, x0 - left:x1 - left]


@functools.cache
def _turbojpeg() -> _TurboJPEG | None:
    """The TurboJPEG 3 library: the system's, else the `turbojpeg` wheel's copy; None when neither loads."""
    candidates = [ctypes.util.find_library("turbojpeg")]
    try:
        import turbojpeg  # the wheel ships libturbojpeg 3 beside its extension module

        folder = os.path.dirname(turbojpeg.__file__)
        candidates += sorted(glob.glob(os.path.join(folder, "turbojpeg.libs", "libturbojpeg*.so*"))  # Linux
                             + glob.glob(os.path.join(folder, "turbojpeg*dylibs", "libturbojpeg*.dylib")))  # macOS
    except ImportError:
        pass
    for path in filter(None, candidates):
        try:
            return _TurboJPEG(path)
        except (OSError, AttributeError):  # absent, or an older TurboJPEG without the version 3 calls
            continue
    return None
