"""From a partition's epochs to what a training step takes: exact-size micro-batches, and the first one early.

`micro_batches` turns a partition's epochs (`stream.TrainStream.epoch`) into an endless stream of exact-size batches
that runs across epoch boundaries (no sample dropped at the end of an epoch) and reports where it is (`Position`:
epoch and samples consumed in it), so a checkpoint can record it and a resume can skip exactly that much.
`partitions.step_stream` builds each optimizer step from these.

`start_early` pulls the first batch on a background thread, so Ray Data starts its tasks while the worker builds its
engine.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from vitray.data.stream import Position


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
