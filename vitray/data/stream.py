"""The Ray Data pipeline: shards in storage → decoded, augmented uint8 images → each Train worker.

Training (`TrainStream`, worker side): every epoch, a seeded permutation of the shards is dealt round-robin to a
fixed number of logical partitions (`vitray/data/partitions.py`: why the data must not depend on the worker count),
and each worker streams its partitions' shards through Ray Data pipelines (read + decode + augment in CPU tasks, in
order), then through a local shuffle buffer seeded by (seed, epoch, partition). Augmentation draws from a generator
seeded per sample by (seed, epoch, sample key). So what a partition delivers is a pure function of (seed, epoch,
partition): a restarted, resumed or resized run replays exactly what an uninterrupted one would have seen, which
Ray Data's dynamic `streaming_split` cannot promise (its epochs are reseeded by execution count, which restarts at
zero in a new process).

`micro_batches` turns a partition's epochs into an endless stream of exact-size batches that runs across epoch
boundaries (no sample dropped at the end of an epoch) and reports where it is (`Position`: epoch and samples
consumed in it), so a checkpoint can record it and a resume can skip exactly that much.

Evaluation (`build_dataset` + `stream_splits_config`, driver side): Ray Train splits the held-out set with
`streaming_split(equal=False)`, so every held-out sample is counted exactly once.

Bad samples (undecodable image, missing or non-integer label) raise a DataError naming shard and key; with
`data.bad_samples = "skip"` they are dropped instead, counted, and named in the worker's log.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import numpy as np

from vitray import storage
from vitray.data.catalog import read_manifest, shard_folder
from vitray.data.manifest import MANIFEST, DataError
from vitray.data.transforms import decode_shards
from vitray.storage import Endpoint

if TYPE_CHECKING:
    import pyarrow.fs as pafs
    import ray.data

logger = logging.getLogger("vitray")

# A CPU-only node for decoding carries this Ray node label (cluster/aws-gpu.yaml's data_cpu, the KubeRay files):
# while the cluster has one, every read + decode task runs on such nodes and leaves the accelerator nodes' CPUs to
# the training workers.
DATA_NODE_LABEL = ("vitray.io/node-role", "data")


def decode_placement() -> dict:
    """Ray remote args for read + decode tasks: on the data nodes when any is alive, else wherever Ray likes."""
    import ray

    key, value = DATA_NODE_LABEL
    if any(n["Alive"] and n.get("Labels", {}).get(key) == value for n in ray.nodes()):
        return {"label_selector": {key: value}}
    return {}


def read_images(
    paths: list[str],
    fs: "pafs.FileSystem",
    shards: dict[str, tuple],
    train: bool,
    image_size: int,
    area_min: float = 0.05,
    flip: bool = True,
    aug_seed: tuple[int, int] | None = None,
    file_shuffle_seed: int | None = None,
    ordered: bool = False,
    bad_samples: str = "error",
    detection: dict | None = None,
    ship: bool = False,
    labels: tuple[str, tuple[str, ...]] | None = None,
    columns: dict | None = None,
) -> "ray.data.Dataset":
    """Tar shards → {"image", "label", "key", "error"} batches, checked against the manifest (`shards`: shard name
    → ShardInfo fields), decoded and augmented in Ray Data tasks. `detection` (max_boxes, num_classes, crop_min):
    detection shards instead, decoded by `vitray.data.detection.decode_detection_shards` into boxes and labels.
    `labels`: the manifest's (label source, class names). `columns` ({"image", "label"}): the shards are Parquet
    row groups instead (`vitray/data/parquet.py`), `paths` naming them `<file>#<row group>`."""
    import ray.data
    from ray.data import FileShuffleConfig

    if columns:
        return _read_row_groups(paths, fs, shards, columns, train, image_size, area_min, flip, aug_seed,
                                file_shuffle_seed, ordered, bad_samples, labels, ship)
    placement = decode_placement()  # the same for the read and the decode, or Ray Data cannot fuse them
    # Whole shards as bytes, one read block each: vitray parses the tar itself, so a truncated, altered or corrupt
    # shard is named (checksum against the manifest) instead of failing somewhere inside a reader.
    ds = ray.data.read_binary_files(
        paths,
        filesystem=fs,
        include_paths=True,
        shuffle=FileShuffleConfig(seed=file_shuffle_seed) if file_shuffle_seed is not None else None,
        override_num_blocks=len(paths),
        ray_remote_args=placement,
    )
    # batch_size=None: decode whole read blocks, which lets Ray Data fuse read + decode into one task (a fixed
    # batch_size blocks that fusion and costs an extra hop through the object store per block).
    kwargs = dict(shards=shards, train=train, image_size=image_size, flip=flip, seed=aug_seed, on_error=bad_samples)
    if detection is None:
        decode, kwargs = decode_shards, {**kwargs, "area_min": area_min, "ship": ship, "labels": labels}
    else:
        from vitray.data.detection import decode_detection_shards

        decode, kwargs = decode_detection_shards, {**kwargs, **detection}
    ds = ds.map_batches(
        decode,
        fn_kwargs=kwargs,
        batch_size=None,
        batch_format="numpy",
        **placement,
    )
    # The pipeline is one fused operator, so Ray Data's per-operator resource reservation only holds CPUs back
    # from it (measured on 2 cores: 77 % → 92 % busy, +23 % images/s). Object-store backpressure still applies.
    ds.context.op_resource_reservation_enabled = False
    if ordered:
        ds.context.execution_options.preserve_order = True
    return ds


def _read_row_groups(paths, fs, units, columns, train, image_size, area_min, flip, aug_seed, file_shuffle_seed,
                     ordered, bad_samples, labels, ship=False) -> "ray.data.Dataset":
    """Parquet row groups → the same batches as tar shards: one block (one decode task) per row group, which the
    task reads itself with pyarrow (Ray Data's Parquet reader cannot be told which row groups to read)."""
    import ray.data

    from vitray.data.parquet import decode_row_groups

    if file_shuffle_seed is not None:
        paths = [paths[i] for i in np.random.default_rng(file_shuffle_seed).permutation(len(paths))]
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(decode_row_groups, batch_size=None, batch_format="numpy", fn_kwargs=dict(
        fs=fs, units=units, columns=columns, train=train, image_size=image_size, area_min=area_min, seed=aug_seed,
        flip=flip, on_error=bad_samples, labels=labels, ship=ship), **decode_placement())
    ds.context.op_resource_reservation_enabled = False
    if ordered:
        ds.context.execution_options.preserve_order = True
    return ds


def shard_table(manifest) -> dict[str, tuple]:
    """shard name → its manifest entry (name, samples, sha256, bytes), as `decode_shards` checks it."""
    return {s.name: (s.name, s.num_samples, s.sha256, s.bytes) for s in manifest.shards}


def build_dataset(
    uri: str,
    endpoint: Endpoint | None,
    train: bool,
    image_size: int,
    seed: int = 0,
    area_min: float = 0.05,
    flip: bool = True,
    field: str = "data.train_uri",
    bad_samples: str = "error",
    detection: dict | None = None,
    columns: tuple[str, str] = ("image", "label"),
) -> "ray.data.Dataset":
    """A whole split as one dataset (evaluation, feature extraction, benchmarks). For training, shard order is
    reshuffled per execution; training runs use `TrainStream`, which is reproducible. `columns`: a Parquet
    folder's image and label columns, when it has no manifest that names them."""
    manifest = read_manifest(uri, endpoint, field, columns)
    fs, root = storage.resolve(shard_folder(uri, manifest), endpoint)
    shards = shard_table(manifest)
    return read_images([f"{root}/{name}" for name in shards], fs, shards, train, image_size, area_min, flip,
                       file_shuffle_seed=seed if train else None, bad_samples=bad_samples, detection=detection,
                       labels=(manifest.labels, tuple(manifest.classes)), columns=manifest.columns or None)


def stream_splits_config():
    """A Ray Train `DataConfig` that splits every dataset it is given exactly across workers (`equal=False`):
    evaluation must count every held-out sample once."""
    from ray.train import DataConfig

    class StreamSplits(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output: list[dict] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                splits = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
                for i, split in enumerate(splits):
                    output[i][name] = split
            return output

    return StreamSplits()


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
    """The training data, partition by partition and epoch by epoch (see the module docstring)."""

    def __init__(self, uri: str, endpoint: Endpoint | None, partitions: int, image_size: int, seed: int,
                 batch: int, shuffle_buffer: int = 0, area_min: float = 0.05, flip: bool = True,
                 bad_samples: str = "error", detection: dict | None = None,
                 columns: tuple[str, str] = ("image", "label"), manifest=None, decode_on: str = "cpu"):
        manifest = manifest or read_manifest(uri, endpoint, columns=columns)  # `manifest`: the driver's, when it has it
        self.ship = decode_on == "gpu"  # JPEGs leave encoded, for the worker's device (data/device_decode.py)
        self.detection = detection
        # How labels are read (`vitray/data/labels.py`), and a Parquet dataset's columns (its "shards" are row groups).
        self.labels, self.columns = (manifest.labels, tuple(manifest.classes)), manifest.columns or None
        self.fs, root = storage.resolve(shard_folder(uri, manifest), endpoint)
        self.shards = shard_table(manifest)
        self.paths = [f"{root}/{name}" for name in self.shards]
        self.partitions, self.seed = partitions, seed
        self.image_size, self.batch, self.shuffle_buffer = image_size, batch, shuffle_buffer
        self.area_min, self.flip, self.bad_samples = area_min, flip, bad_samples
        self.skipped = 0  # bad samples dropped under bad_samples="skip"

    def epoch(self, partition: int, epoch: int) -> Iterable[dict[str, np.ndarray]]:
        """Partition `partition`'s samples in `epoch`, in batches of about `batch`."""
        paths = self._present(partition_shards(self.paths, self.seed, epoch, partition, self.partitions))
        if not paths:
            return []
        mine = {name: self.shards[name] for name in (p.rsplit("/", 1)[-1] for p in paths)}  # small task arguments
        ds = read_images(paths, self.fs, mine, True, self.image_size, self.area_min,
                         self.flip, aug_seed=(self.seed, epoch), ordered=True, bad_samples=self.bad_samples,
                         detection=self.detection, labels=self.labels, columns=self.columns, ship=self.ship)
        batches = ds.iter_batches(
            batch_size=self.batch,
            batch_format="numpy",
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch * 7919 + partition) if self.shuffle_buffer else None,
            prefetch_batches=2,
        )
        return (self._drop_bad(b) for b in batches)

    def _present(self, paths: list[str]) -> list[str]:
        """The shards that exist; a missing one is an error naming it, or under "skip" its samples are counted."""
        import pyarrow.fs as pafs

        files = sorted({p.rpartition("#")[0] if self.columns else p for p in paths})  # Parquet: a row group's file
        gone = {i.path for i in self.fs.get_file_info(files) if i.type == pafs.FileType.NotFound}
        missing = [p for p in paths if (p.rpartition("#")[0] if self.columns else p) in gone]
        for path in missing:
            message = f"shard {path}: missing (listed in {MANIFEST} but not in storage)"
            if self.bad_samples != "skip":
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


def micro_batches(
    epochs: Callable[[int], Iterable[dict[str, np.ndarray]]], micro_batch: int, start: Position = Position(),
    partition: int = 0,
) -> Iterator[tuple[dict[str, np.ndarray], Position]]:
    """Endless exact-size batches of one partition from `epochs(e)` (the batches of epoch e, in a reproducible order), with
    the position after each one. Resuming from `start` skips the samples that epoch already delivered."""
    epoch, skip = start.epoch, start.consumed
    queue: list[dict[str, np.ndarray]] = []  # pieces not yet emitted, oldest first
    queued = 0
    emitted_in = {epoch: start.consumed}  # epoch → samples emitted so far
    last_epoch = epoch
    empty_epochs = 0
    while True:
        got_any = False
        for b in epochs(epoch):
            if skip:
                drop = min(skip, _rows(b))
                b = {k: v[drop:] for k, v in b.items()}
                skip -= drop
            if not _rows(b):
                continue
            got_any = True
            b["_epoch"] = np.full(_rows(b), epoch)
            queue.append(b)
            queued += _rows(b)
            while queued >= micro_batch:
                out, queue = _take(queue, micro_batch)
                queued -= micro_batch
                for e, n in zip(*np.unique(out["_epoch"], return_counts=True)):  # "_epoch" stays: the sample audit
                    emitted_in[int(e)] = emitted_in.get(int(e), 0) + int(n)
                    last_epoch = int(e)
                yield out, Position(last_epoch, emitted_in[last_epoch])
        empty_epochs = 0 if got_any else empty_epochs + 1
        if empty_epochs >= 3 and not skip:  # every shard was missing or bad, three epochs running
            raise RuntimeError(f"data partition {partition}: the training data delivered no samples in epochs {epoch - 2}–{epoch}")
        skip = 0
        epoch += 1
        emitted_in.setdefault(epoch, 0)


T = TypeVar("T")


def start_early(items: Iterator[T], timeline: dict | None = None) -> Iterator[T]:
    """Pull the first item on a background thread right away, so Ray Data starts its tasks while the caller does
    other set-up (building the DeepSpeed engine); later items come straight from `items`. `timeline["data_ready"]`:
    when the first item arrived (the data's own start-up, whatever the caller was doing meanwhile)."""
    import time

    box: dict = {}

    def pull() -> None:
        try:
            box["item"] = next(items)
            if timeline is not None:
                timeline["data_ready"] = time.time()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=pull, name="vitray-first-batch", daemon=True)
    thread.start()

    def chained() -> Iterator[T]:
        thread.join()
        if "error" in box:
            raise box["error"]
        yield box["item"]
        yield from items

    return chained()


def _take(queue: list[dict[str, np.ndarray]], n: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The first n samples of a queue of batches, and what remains."""
    parts, rest, need = [], list(queue), n
    while need:
        head = rest.pop(0)
        k = _rows(head)
        if k <= need:
            parts.append(head)
            need -= k
        else:
            parts.append({key: v[:need] for key, v in head.items()})
            rest.insert(0, {key: v[need:] for key, v in head.items()})
            need = 0
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, rest


def _rows(batch: dict[str, np.ndarray]) -> int:
    return len(next(iter(batch.values())))
