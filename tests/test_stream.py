"""The Ray Data path: shards in S3 → decode/augment tasks → one split per worker, every sample once per epoch."""
import numpy as np
import pytest

from vitray.data.stream import Position, _take, build_dataset, micro_batches, stream_splits_config


def test_two_workers_disjoint_union_once_per_epoch(ray_cluster, s3, digits):
    import ray

    def _consume(split, epochs, micro_batch, rank):
        """What a Train worker does: exact micro-batches across epochs; returns the keys in order and positions."""
        stream = micro_batches(split, micro_batch, seed=0, rank=rank, shuffle_buffer=64)
        keys, positions = [], []
        while len(keys) < epochs * 750:
            batch, pos = next(stream)
            assert batch["image"].shape[1:] == (16, 16, 3) and len(batch["key"]) == micro_batch
            keys += batch["key"].tolist()
            positions.append(pos)
        return keys, positions

    ds = build_dataset(digits["train"], s3.endpoint, train=True, image_size=16, seed=0)
    splits = stream_splits_config().configure({"train": ds}, world_size=2, worker_handles=None, worker_node_ids=None)
    consume = ray.remote(num_cpus=0.5)(_consume)
    # 1,500 training digits, 2 workers, micro-batch 30: each epoch is exactly 25 micro-batches per worker.
    a, b = ray.get([consume.remote(splits[i]["train"], 2, 30, i) for i in range(2)])
    keys_a, pos_a = a
    keys_b, pos_b = b
    for epoch in range(2):
        ea, eb = set(keys_a[epoch * 750:(epoch + 1) * 750]), set(keys_b[epoch * 750:(epoch + 1) * 750])
        assert len(ea) == len(eb) == 750 and not ea & eb  # no sample twice, none shared
        assert len(ea | eb) == 1500  # the union is the whole training set
    assert pos_a[24] == Position(0, 750) and pos_a[25] == Position(1, 30)
    assert keys_a[:750] != keys_a[750:1500]  # reshuffled between epochs


def test_eval_split_counts_every_sample_once(ray_cluster, s3, digits):
    import ray

    ds = build_dataset(digits["val"], s3.endpoint, train=False, image_size=16, field="data.val_uri")
    splits = stream_splits_config().configure({"val": ds}, world_size=2, worker_handles=None, worker_node_ids=None)

    @ray.remote(num_cpus=0.5)
    def keys(split):
        return [k for b in split.iter_batches(batch_size=50, batch_format="numpy") for k in b["key"]]

    a, b = ray.get([keys.remote(s["val"]) for s in splits])
    assert len(a) + len(b) == 297 and len(set(a) | set(b)) == 297  # odd count: nothing dropped


def test_take_splits_batches_exactly():
    q = [{"label": np.arange(5)}, {"label": np.arange(5, 8)}]
    out, rest = _take(q, 6)
    assert list(out["label"]) == [0, 1, 2, 3, 4, 5] and list(rest[0]["label"]) == [6, 7]
