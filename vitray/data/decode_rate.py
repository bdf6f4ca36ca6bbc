"""How many training images one CPU decodes and augments per second, on the configured data: the planner's
data-CPU line (`vitray/cost.py:DataPlan`).

Measured before any Ray resource exists, in this process: the first samples of a few shards, read from storage
(only the leading megabytes of each tar, not whole 256 MB shards), through the same per-sample decode + inception
crop + flip that the Ray Data tasks run (`transforms._sample`), for a few seconds of CPU time on one core. What it
leaves out — tar parsing, checksums and Ray Data's own processes — is measured separately in
`benchmarks/ingest.py` (`RAY_DATA_EFFICIENCY` below).
"""
from __future__ import annotations

import dataclasses
import io
import tarfile
import time
import zlib

import numpy as np

from vitray import storage
from vitray.data.catalog import read_manifest
from vitray.data.manifest import DataError
from vitray.storage import Endpoint

# Ray Data's images/s per CPU ÷ this measurement's, on the same JPEGs (benchmarks/results/ingest.json against this
# module on the same sets, 2 cores): the planner applies it so that the CPUs it asks for are the CPUs a run uses.
RAY_DATA_EFFICIENCY = 0.7  # measured 0.67 (ImageNet-sized), 0.75 (1,600–2,560 px), 0.68 (stored at 512 px)
READ_BYTES = 16 << 20  # per shard: enough for ~100 ImageNet-sized JPEGs or ~6 camera photos


@dataclasses.dataclass(frozen=True)
class DecodeRate:
    per_cpu: float  # images/s on one core, in process (no Ray)
    samples: int  # distinct samples timed
    source: str  # what was measured: the dataset and shards

    @property
    def ray_data_per_cpu(self) -> float:
        return self.per_cpu * RAY_DATA_EFFICIENCY


def leading_samples(data: bytes) -> list[tuple[str, bytes]]:
    """(key, image bytes) of the complete samples at the start of a tar that may be cut anywhere."""
    images: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for m in tar:
                key, _, ext = m.name.rpartition("/")[2].partition(".")
                if ext.lower() in ("jpg", "jpeg", "png", "webp"):
                    images.append((key, tar.extractfile(m).read()))
    except (tarfile.TarError, EOFError, OSError):  # the cut: keep what came before it
        pass
    return images


def measure(uri: str, endpoint: Endpoint | None, image_size: int, seconds: float = 3.0, shards: int = 4,
            area_min: float = 0.05, field: str = "data.train_uri") -> DecodeRate:
    """Images/s per CPU of the training decode on the dataset at `uri` (a DataError naming the field when it cannot
    be read)."""
    from vitray.data.transforms import _sample

    manifest = read_manifest(uri, endpoint, field)
    picked = manifest.shards[:: max(1, len(manifest.shards) // shards)][:shards]
    fs, root = storage.resolve(uri, endpoint)
    images: list[tuple[str, bytes]] = []
    for shard in picked:
        path = f"{root}/{shard.name}"
        try:
            with fs.open_input_stream(path) as f:
                images += leading_samples(f.read(READ_BYTES))
        except OSError as e:
            raise DataError(f"{field}: shard {path}: cannot be read to measure the decode rate ({e})") from e
    if not images:
        raise DataError(f"{field}: no image found in the first {READ_BYTES >> 20} MB of {len(picked)} shards of {uri}")
    done, cpu, passes = 0, 0.0, 0
    while cpu < seconds and passes < 50:  # every sample at least once; a new crop draw each pass
        start = time.process_time()
        for key, data in images:
            rng = np.random.default_rng([passes, zlib.crc32(key.encode())])
            _sample(data, "0", f"{uri} sample {key}", True, image_size, area_min, True, rng)
        cpu += time.process_time() - start
        done += len(images)
        passes += 1
    names = ", ".join(s.name for s in picked[:2]) + (f" and {len(picked) - 2} more" if len(picked) > 2 else "")
    return DecodeRate(per_cpu=done / max(cpu, 1e-9), samples=len(images), source=f"{len(images)} samples of {uri} ({names})")
