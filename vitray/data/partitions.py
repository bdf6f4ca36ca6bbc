"""Logical data partitions: the data of every global step, independent of how many workers there are.

An elastic run changes its worker count W mid-run, so nothing about the data may depend on W. The run fixes a
number of logical partitions P (`data.partitions`, by default the configured maximum `scaling.num_workers`) that
never changes, the idea of MosaicML streaming's canonical nodes:

- Each epoch's seeded shard permutation is dealt round-robin to the P partitions (`TrainStream.epoch`).
- Each partition streams its shards epoch after epoch, shuffled by (seed, epoch, partition), and keeps its own
  position (epoch, samples consumed). Augmentation draws are seeded per sample.
- Global step g takes the next B/P samples of every partition (B = `optim.global_batch`). The B samples of a step
  are therefore the same for any W, and every sample is seen once per epoch of its partition.
- Worker w of W reads partitions w, w+W, w+2W, … and cuts its share of the step into `micro_steps` micro-batches.

A resize only re-deals partitions: the new workers continue each partition from its saved position, exactly.

When W divides P (the counts a run is planned for: P = the maximum, W any divisor of it), every worker has B/W
samples per step and the gradient accumulation is B / (micro-batch × W), as in a fixed-size run. Any other W still
trains on the same B samples per step: some workers own one partition more, every worker runs the same number of
micro-steps (enough for the largest share at ≤ micro-batch samples each), and each micro-batch's loss is weighted by
its sample count (`loss_weight`), so the gradient is still the mean over the B samples. Those workers set the pace:
the step takes ceil(P/W) / (P/W) of the time an even split would. The batch is never changed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import numpy as np

from vitray.data.batching import _rows, micro_batches
from vitray.data.stream import Position


def owned(rank: int, world: int, partitions: int) -> list[int]:
    """The partitions worker `rank` of `world` reads."""
    return list(range(rank, partitions, world))


def micro_steps(global_batch: int, micro_batch: int, partitions: int, world: int) -> int:
    """Micro-steps per optimizer step, the same on every worker: the largest share in micro-batches."""
    largest = -(-partitions // world) * (global_batch // partitions)
    return -(-largest // micro_batch)


def loss_weight(samples: int, global_batch: int, world: int, accumulation: int) -> float:
    """What a micro-batch's mean loss is multiplied by before backward. DeepSpeed divides each micro-batch's gradient
    by the accumulation and averages over workers; with this weight the sum is the mean over the global batch
    whatever the split (1.0 when every micro-batch holds B / (W × accumulation) samples)."""
    return samples * world * accumulation / global_batch


@dataclasses.dataclass
class MicroStep:
    batch: dict[str, np.ndarray]
    samples: int  # real samples in `batch`; 0: a stand-in that keeps this worker in step (its loss weight is 0)
    last: bool  # the optimizer step's last micro-step: `positions` is where every partition of this worker stands
    positions: dict[int, Position]


def step_stream(
    epochs: Callable[[int, int], Iterable[dict[str, np.ndarray]]], mine: list[int], start: dict[int, Position],
    per_partition: int, accumulation: int,
) -> Iterator[MicroStep]:
    """Endless micro-steps of one worker: for each optimizer step, `per_partition` samples from each partition in
    `mine` (`epochs(p, e)`: partition p's batches in epoch e), cut into `accumulation` micro-batches."""
    streams = {p: micro_batches(lambda e, p=p: epochs(p, e), per_partition, start.get(p, Position()), p)
               for p in mine}
    positions = {p: start.get(p, Position()) for p in mine}
    while True:
        pieces = []
        for p in mine:
            piece, positions[p] = next(streams[p])
            pieces.append(piece)
        batch = {k: np.concatenate([piece[k] for piece in pieces]) for k in pieces[0]}
        n = _rows(batch)
        sizes = [n // accumulation + (i < n % accumulation) for i in range(accumulation)]
        offset = 0
        for i, size in enumerate(sizes):
            # A worker with fewer samples than micro-steps still runs each one (ZeRO's collectives need every rank):
            # on a copy of one sample, weighted 0.
            part = {k: v[offset:offset + size] if size else v[:1] for k, v in batch.items()}
            offset += size
            yield MicroStep(part, size, i == accumulation - 1, dict(positions))
