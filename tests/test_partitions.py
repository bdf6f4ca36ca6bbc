"""Logical data partitions (`vitray/data/partitions.py`): the samples of every global step do not depend on the
worker count, a resize continues every partition exactly, and each sample comes once per epoch of its partition.
Pure Python (the Ray Data side of `TrainStream.epoch` is tested in test_stream.py)."""
import itertools

import numpy as np
import pytest

from vitray.data import partitions
from vitray.data.stream import Position

pytestmark = pytest.mark.quick

P, B, M = 4, 8, 2  # partitions, global batch, micro-batch


def epochs(p: int, e: int):
    """Partition p's epoch e: 5 + p samples (unequal, so partitions drift across epoch boundaries), in a seeded
    order, in batches of 3 — what `TrainStream.epoch` yields, with keys that say where they came from."""
    keys = np.array([f"p{p}/s{i}" for i in range(5 + p)])
    keys = keys[np.random.default_rng([p, e]).permutation(len(keys))]
    for i in range(0, len(keys), 3):
        yield {"key": keys[i:i + 3]}


def run(world: int, steps: int, start: dict | None = None):
    """`steps` optimizer steps on `world` workers: each step's keys (sorted: the set is what must not change),
    the positions after the last step, and the micro-step sizes each worker ran."""
    accumulation = partitions.micro_steps(B, M, P, world)
    streams = [partitions.step_stream(epochs, partitions.owned(r, world, P), start or {}, B // P, accumulation)
               for r in range(world)]
    keys, sizes, positions = [], [], {}
    for _ in range(steps):
        step = []
        for r, stream in enumerate(streams):
            micros = [next(stream) for _ in range(accumulation)]
            assert [m.last for m in micros] == [False] * (accumulation - 1) + [True]
            assert all(len(m.batch["key"]) <= M for m in micros)  # never above the micro-batch that fits
            step += [(str(k), int(e)) for m in micros for k, e in zip(m.batch["key"][:m.samples], m.batch["_epoch"][:m.samples])]
            sizes.append([m.samples for m in micros])
            positions.update(micros[-1].positions)
        keys.append(sorted(step))
    return keys, positions, sizes


def test_every_worker_count_trains_on_the_same_samples_in_every_step():
    reference, _, sizes = run(world=4, steps=12)
    assert all(len(step) == B for step in reference) and all(s == [2] for s in sizes)
    for world in (1, 2, 3):  # 3 divides neither P nor B: one worker owns two partitions and sets the pace
        keys, _, sizes = run(world, steps=12)
        assert keys == reference
        assert {len(s) for s in sizes} == {partitions.micro_steps(B, M, P, world)}


def test_uneven_split_weights_each_micro_batch_so_the_gradient_is_the_global_mean():
    world = 3
    accumulation = partitions.micro_steps(B, M, P, world)
    _, _, sizes = run(world, steps=1)
    # DeepSpeed: Σ over workers and micro-steps of weight × mean-loss-gradient ÷ (accumulation × workers). With
    # per-sample gradients g, that is Σ samples × g ÷ B when weight = samples × W × A ÷ B.
    total = sum(partitions.loss_weight(n, B, world, accumulation) / (accumulation * world) * n for s in sizes for n in s)
    assert sum(map(sum, sizes)) == B and total == pytest.approx(sum(n * n for s in sizes for n in s) / B)
    assert partitions.loss_weight(B // (4 * 1), B, 4, 1) == 1.0  # an even split is left exactly as it was


@pytest.mark.parametrize("before, after", [(2, 1), (1, 4), (4, 3), (3, 2)])
def test_a_resize_continues_every_partition_exactly(before, after):
    straight, _, _ = run(world=4, steps=15)
    first, positions, _ = run(before, steps=6)
    rest, _, _ = run(after, steps=9, start=positions)
    assert first + rest == straight


def test_every_sample_once_per_epoch_of_its_partition():
    keys, positions, _ = run(world=2, steps=20)  # 160 samples: every partition runs through several epochs
    seen = [k for step in keys for k in step]
    assert len(seen) == len(set(seen))  # (key, epoch) pairs: no sample twice in an epoch
    for p in range(P):
        done = positions[p].epoch  # epochs this partition finished
        for e in range(done):
            assert sorted(k for k, ep in seen if ep == e and k.startswith(f"p{p}/")) == sorted(f"p{p}/s{i}" for i in range(5 + p))
        assert sum(1 for k, ep in seen if ep == done and k.startswith(f"p{p}/")) == positions[p].consumed


def test_fewer_samples_than_micro_steps_runs_a_zero_weight_stand_in():
    # micro-batch 1, 3 workers over 4 partitions of 1 sample per step: 2 micro-steps each, one worker has 1 sample.
    accumulation = partitions.micro_steps(4, 1, 4, 3)
    assert accumulation == 2
    stream = partitions.step_stream(epochs, partitions.owned(2, 3, 4), {}, 1, accumulation)
    micros = list(itertools.islice(stream, 2))
    assert [m.samples for m in micros] == [1, 0] and len(micros[1].batch["key"]) == 1
    assert partitions.loss_weight(0, 4, 3, accumulation) == 0.0


def test_positions_start_where_given():
    start = {p: Position(2, 3) for p in range(P)}
    keys, _, _ = run(world=2, steps=1, start=start)
    assert {e for _, e in keys[0]} == {2}
