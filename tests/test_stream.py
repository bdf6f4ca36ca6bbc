"""The Ray Data path: shards in S3 → decode/augment tasks → one split per worker, every sample once per epoch."""
import numpy as np
import pytest

from vitray.data.batching import _take, micro_batches
from vitray.data.reading import build_dataset, stream_splits_config
from vitray.data.spec import ReadSpec
from vitray.data.stream import Position, TrainStream, partition_shards


def _keys(stream, n):
    """n micro-batches of a stream: their keys, images and the position after each."""
    out = [next(stream) for _ in range(n)]
    return [b["key"].tolist() for b, _ in out], [b["image"] for b, _ in out], [p for _, p in out]


def test_two_partitions_disjoint_union_once_per_epoch(ray_cluster, s3, digits):
    def consume(rank, epochs):
        data = TrainStream(digits["train"], s3.endpoint, ReadSpec(16, train=True, seed=0), 2, batch=30, shuffle_buffer=64)
        keys, _, positions = _keys(micro_batches(lambda e: data.epoch(rank, e), 30), epochs * 25)
        assert all(len(k) == 30 for k in keys)
        return sum(keys, []), positions

    # 1,500 training digits in 6 shards of 250, 2 ranks: 3 shards (750 samples, 25 micro-batches of 30) each per epoch.
    (keys_a, pos_a), (keys_b, _) = consume(0, 2), consume(1, 2)
    for epoch in range(2):
        ea, eb = set(keys_a[epoch * 750:(epoch + 1) * 750]), set(keys_b[epoch * 750:(epoch + 1) * 750])
        assert len(ea) == len(eb) == 750 and not ea & eb  # no sample twice, none shared
        assert len(ea | eb) == 1500  # the union is the whole training set
    assert pos_a[24] == Position(0, 750) and pos_a[25] == Position(1, 30)
    assert keys_a[:750] != keys_a[750:1500]  # reshuffled between epochs


def test_resumed_stream_replays_exactly(ray_cluster, s3, digits):
    """A stream restarted from any saved position (mid-epoch, or across an epoch boundary) yields exactly the
    samples — and the same augmented pixels — an uninterrupted stream yields from there on."""
    def stream(start=Position()):
        data = TrainStream(digits["train"], s3.endpoint, ReadSpec(16, train=True, area_min=0.5, flip=True, seed=3), 2,
                           batch=32, shuffle_buffer=100)
        return micro_batches(lambda e: data.epoch(1, e), 32, start)

    keys, images, positions = _keys(stream(), 30)  # 750 samples per epoch: batch 23 straddles the boundary
    for cut in (9, 22):
        again_keys, again_images, again_positions = _keys(stream(positions[cut]), 30 - cut - 1)
        assert again_keys == keys[cut + 1:] and again_positions == positions[cut + 1:]
        assert all(np.array_equal(a, b) for a, b in zip(again_images, images[cut + 1:]))
    assert positions[22] == Position(0, 736) and positions[23] == Position(1, 18)


def test_partition_shards_deal_every_shard_once():
    names = [f"s{i}" for i in range(7)]
    for epoch in range(3):
        dealt = [partition_shards(names, 0, epoch, r, 3) for r in range(3)]
        assert sorted(sum(dealt, [])) == names and [len(d) for d in dealt] == [3, 2, 2]
    assert partition_shards(names, 0, 0, 0, 3) != partition_shards(names, 0, 1, 0, 3)


def _dataset_with_faults(path, faults):
    """40 real digits in 4 shards of 10 under `path`, then damaged: "image" (sample 7 is not an image), "label"
    (sample 12 has a non-integer label), "checksum" (shard 2 truncated), "missing" (shard 3 deleted)."""
    import io
    import tarfile

    from sklearn.datasets import load_digits

    from vitray.data.datasets import samples_from_arrays
    from vitray.data.manifest import Sample
    from vitray.data.shards import write_shards

    d = load_digits()
    images = np.repeat(np.repeat((d.images[:40] * 16).clip(0, 255).astype(np.uint8), 2, 1), 2, 2)
    samples = list(samples_from_arrays(np.stack([images] * 3, -1), d.target[:40]))
    if "image" in faults:
        samples[7] = Sample(samples[7].key, b"not an image", "png", samples[7].label)
    write_shards(samples, str(path), [str(i) for i in range(10)], max_shard_samples=10)
    if "label" in faults:  # rewrite shard 1 with one label that is not a number, and fix its manifest entry
        import hashlib
        import json

        buf = io.BytesIO()
        with tarfile.open(path / "shard-00001.tar") as src, tarfile.open(fileobj=buf, mode="w") as dst:
            for m in src:
                data = src.extractfile(m).read()
                if m.name == f"{samples[12].key}.cls":
                    data, m.size = b"seven", 5
                dst.addfile(m, io.BytesIO(data))
        (path / "shard-00001.tar").write_bytes(buf.getvalue())
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["shards"][1].update(sha256=hashlib.sha256(buf.getvalue()).hexdigest(), bytes=len(buf.getvalue()))
        (path / "manifest.json").write_text(json.dumps(manifest))
    if "checksum" in faults:
        data = (path / "shard-00002.tar").read_bytes()
        (path / "shard-00002.tar").write_bytes(data[: len(data) // 2])
    if "missing" in faults:
        (path / "shard-00003.tar").unlink()
    return samples


@pytest.mark.parametrize("fault, message", [
    ("image", r"shard .*shard-00000.tar sample img0000007: cannot decode image"),
    ("label", r"shard .*shard-00001.tar sample img0000012: label 'seven' is not an integer"),
    ("checksum", r"shard .*shard-00002.tar: checksum mismatch against manifest.json"),
    ("missing", r"shard .*shard-00003.tar: missing \(listed in manifest.json but not in storage\)"),
])
def test_bad_data_is_named_by_default(ray_cluster, tmp_path, fault, message):
    _dataset_with_faults(tmp_path / "ds", [fault])
    data = TrainStream(str(tmp_path / "ds"), None, ReadSpec(16, train=True, seed=0), 1, batch=10)
    with pytest.raises(Exception, match=message):
        _keys(micro_batches(lambda e: data.epoch(0, e), 10), 4)


def test_bad_data_skipped_and_counted_when_asked(ray_cluster, tmp_path):
    samples = _dataset_with_faults(tmp_path / "ds", ["image", "label", "checksum", "missing"])
    data = TrainStream(str(tmp_path / "ds"), None, ReadSpec(16, train=True, bad_samples="skip", seed=0), 1, batch=9)
    keys, _, positions = _keys(micro_batches(lambda e: data.epoch(0, e), 9), 2)  # 40 − 1 − 1 − 10 − 10 = 18 good samples
    seen = sum(keys, [])
    assert data.skipped == 22 and positions[-1] == Position(0, 18)
    assert sorted(seen) == sorted(s.key for s in samples[:20] if s.key not in (samples[7].key, samples[12].key))


def test_eval_split_counts_every_sample_once(ray_cluster, s3, digits):
    import ray

    ds = build_dataset(digits["val"], s3.endpoint, ReadSpec(16, train=False), field="data.val_uri")
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
