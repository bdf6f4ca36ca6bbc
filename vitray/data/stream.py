"""Each training worker's data, partition by partition and epoch by epoch.

Every epoch, a seeded permutation of the shards is dealt round-robin to a fixed number of logical partitions
(`vitray/data/partitions.py`: why the data must not depend on the worker count), and each worker streams its
partitions' shards through Ray Data pipelines (read + decode + augment in CPU tasks, in order: `reading.py`), then
through a local shuffle buffer seeded by (seed, epoch, partition). Augmentation draws from a generator seeded per
sample by (seed, epoch, sample key). So what a partition delivers is a pure function of (seed, epoch, partition): a
restarted, resumed or resized run replays exactly what an uninterrupted one would have seen, which Ray Data's
dynamic `streaming_split` cannot promise (its epochs are reseeded by execution count, which restarts at zero in a
new process).

A partition's epochs become exact-size micro-batches in `batching.py`, which reports where the partition stands
(`Position`: epoch and samples consumed in it), so a checkpoint can record it and a resume can skip exactly that much.

Bad samples (undecodable image, missing or non-integer label, a missing or altered shard) raise a DataError naming
shard and key; with `data.bad_samples = "skip"` they are dropped here instead, counted, and named in the worker's
log.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import numpy as np

from vitray import storage
from vitray.data.catalog import read_manifest, shard_folder
from vitray.data.manifest import MANIFEST, DataError, Manifest
from vitray.data.reading import read_images, shard_table
from vitray.data.spec import ReadSpec
from vitray.storage import Endpoint

logger = logging.getLogger("vitray")


def partition_shards(names: list[str], seed: int, epoch: int, partition: int, partitions: int) -> list[str]:
    """The shards of `partition` in `epoch`: a permutation seeded by (seed, epoch), dealt round-robin. Every shard
    goes to exactly one partition per epoch; a partition's share changes from epoch to epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(len(names))
    return [names[i] for i in order[partition::partitions]]


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a partition's stream stands: the epoch, and how many of that epoch's samples it has consumed."""

    epoch: int = 0
    consumed: int = 0


class TrainStream:
    """The training data, partition by partition and epoch by epoch (see the module docstring). `spec`: how to read
    it (a training spec); `partitions`: how many logical partitions the shards are dealt to; `batch`: about how many
    samples each batch of an epoch holds; `shuffle_buffer`: samples in the local shuffle buffer (0 = none);
    `manifest`: the driver's, when it has read it already."""

    def __init__(self, uri: str, endpoint: Endpoint | None, spec: ReadSpec, partitions: int, batch: int,
                 shuffle_buffer: int = 0, manifest: Manifest | None = None):
        if not spec.train:
            raise ValueError("TrainStream reads training data: its ReadSpec needs train=True")
        self.manifest = manifest or read_manifest(uri, endpoint, columns=spec.columns)
        self.spec = spec
        self.fs, root = storage.resolve(shard_folder(uri, self.manifest), endpoint)
        self.shards = shard_table(self.manifest)
        self.paths = [f"{root}/{name}" for name in self.shards]
        self.partitions, self.batch, self.shuffle_buffer = partitions, batch, shuffle_buffer
        self.skipped = 0  # bad samples dropped under bad_samples="skip"

    def epoch(self, partition: int, epoch: int) -> Iterable[dict[str, np.ndarray]]:
        """Partition `partition`'s samples in `epoch`, in batches of about `batch`."""
        seed = self.spec.seed
        paths = self._present(partition_shards(self.paths, seed, epoch, partition, self.partitions))
        if not paths:
            return []
        batches = read_images(paths, self.fs, self.manifest, self.spec, epoch).iter_batches(
            batch_size=self.batch,
            batch_format="numpy",
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=(seed * 1_000_003 + epoch * 7919 + partition) if self.shuffle_buffer else None,
            prefetch_batches=2,
        )
        return (self._drop_bad(b) for b in batches)

    def _present(self, paths: list[str]) -> list[str]:
        """The shards that exist; a missing one is an error naming it, or under "skip" its samples are counted."""
        import pyarrow.fs as pafs

        parquet = bool(self.manifest.columns)
        files = sorted({p.rpartition("#")[0] if parquet else p for p in paths})  # Parquet: a row group's file
        gone = {i.path for i in self.fs.get_file_info(files) if i.type == pafs.FileType.NotFound}
        missing = [p for p in paths if (p.rpartition("#")[0] if parquet else p) in gone]
        for path in missing:
            message = f"shard {path}: missing (listed in {MANIFEST} but not in storage)"
            if self.spec.bad_samples != "skip":
                raise DataError(message)
            n = self.shards[path.rsplit("/", 1)[-1]][1]
            logger.warning(f"skipped {n} samples: {message}")
            self.skipped += n
        return [p for p in paths if p not in missing]

    def _drop_bad(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch.pop("error")
        bad = errors != ""
        if bad.any():
            messages, counts = np.unique(errors[bad], return_counts=True)
            for message, n in zip(messages, counts):  # a bad shard is one line, not one per sample
                logger.warning(f"skipped {n} sample{'s' if n > 1 else ''}: {message}")
            self.skipped += int(bad.sum())
            batch = {k: v[~bad] for k, v in batch.items()}
        return batch
