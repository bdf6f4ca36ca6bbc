"""Existing datasets, as they are: WebDataset shards written by other tools (img2dataset's layout, written here
with `tarfile`, not vitray's writer) indexed in place by `jobs/write_shards.py --index`, and Hugging Face Hub
Parquet folders read directly — each with exact-once epochs, resume, and bad input named."""
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitray import storage
from vitray.data.datasets import digits_arrays
from vitray.data.catalog import read_manifest
from vitray.data.manifest import DataError, ShardInfo
from vitray.data.shards import check_shard, tar_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "jobs"))
import write_shards as write_job  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def img2dataset_shards(uri, endpoint, samples: int, per_shard: int, stats: bool = True, split: str = "train") -> dict:
    """The digits as img2dataset writes a dataset: `00000.tar` … holding `<key>.jpg`, `<key>.txt` (here the class
    name), `<key>.json` (metadata, here with "label"), plus `00000_stats.json` and a `00000.parquet` of metadata
    beside each shard. Returns key → label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = digits_arrays(split)
    truth = {}
    for shard, start in enumerate(range(0, samples, per_shard)):
        members, keys = [], []
        for i in range(start, min(start + per_shard, samples)):
            key = f"{shard:05d}{i:04d}"
            members += [(f"{key}.jpg", _jpeg(images[i])), (f"{key}.txt", NAMES[labels[i]].encode()),
                        (f"{key}.json", json.dumps({"key": key, "status": "success", "label": int(labels[i])}).encode())]
            keys.append(key)
            truth[key] = int(labels[i])
        storage.write_bytes(storage.join(uri, f"{shard:05d}.tar"), _tar(members), endpoint)
        if stats:
            counts = {"count": len(keys), "successes": len(keys), "failed_to_download": 0}
            storage.write_bytes(storage.join(uri, f"{shard:05d}_stats.json"), json.dumps(counts).encode(), endpoint)
        meta = io.BytesIO()
        pq.write_table(pa.table({"key": keys}), meta)
        storage.write_bytes(storage.join(uri, f"{shard:05d}.parquet"), meta.getvalue(), endpoint)
    return truth


def hub_parquet(folder, split: str, files: int, row_group: int, samples: int | None = None, names: bool = True) -> dict:
    """The digits as the Hugging Face Hub stores an image dataset: `<split>-0000i-of-0000n.parquet`, column `image` a
    struct {bytes, path} of PNGs, column `label` int64, ClassLabel names in the schema's "huggingface" metadata.
    Returns key (`<file>:<row>`) → label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, labels = digits_arrays(split)
    n = samples or len(labels)
    os.makedirs(folder, exist_ok=True)
    features = {"image": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}
    truth = {}
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        pngs = []
        for i in rows:
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, "PNG")
            pngs.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
        table = pa.table({"image": pngs, "label": pa.array(labels[rows], pa.int64())})
        if names:
            table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        name = f"{split}-{f:05d}-of-{files:05d}.parquet"
        pq.write_table(table, os.path.join(folder, name), row_group_size=row_group)
        truth.update({f"{name}:{r}": int(labels[i]) for r, i in enumerate(rows)})
    return truth


# ---- quick: no Ray ---------------------------------------------------------------------------------------------


def test_tar_keys_follow_webdataset_naming():
    """Member paths with folders, `./` prefixes and directory entries group as WebDataset groups them."""
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, "PNG")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        folder = tarfile.TarInfo("./train")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in (("./train/n01.JPEG", png.getvalue()), ("./train/n01.cls", b"3"),
                              ("train/b.seg.png", png.getvalue()), ("train/b.txt", b"seven")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    samples = tar_samples(buf.getvalue(), "s.tar", labels="cls")
    assert [(k, ext, label) for k, _, ext, label, _ in samples] == [("train/n01", "jpeg", "3"), ("train/b", "", None)]
    assert samples[1][1] is None  # "seg.png": the extension starts at the first dot, so no image (named later)
    assert tar_samples(buf.getvalue(), "s.tar", labels="txt")[1][3] == "seven"


def test_label_sources_name_what_is_wrong():
    from vitray.data.labels import check_source, class_map, label_index

    names = class_map("txt", NAMES)
    assert label_index("three", "txt", names, 10, "w") == 3
    assert label_index('{"label": 4}', "json:label", class_map("json:label", NAMES), 10, "w") == 4
    assert label_index('{"label": "five"}', "json:label", class_map("json:label", NAMES), 10, "w") == 5
    assert label_index(" 7 ", "cls", None, 10, "w") == 7
    for value, source, message in [
        ("ten", "txt", "w: label 'ten' is not one of the 10 classes"),
        ('{"y": 1}', "json:label", "w: .json has no field 'label'"),
        ("seven", "cls", "w: label 'seven' is not an integer"),
        ("12", "cls", "w: label 12 outside the 10 classes"),
        (None, "txt", r"w: missing label \(.txt\)"),
    ]:
        with pytest.raises(DataError, match=message):
            label_index(value, source, class_map(source, NAMES), 10, "w")
    with pytest.raises(DataError, match="--labels: 'caption' is not a label source"):
        check_source("caption")


def test_indexed_shard_without_sha256_is_checked_by_size():
    check_shard(b"x" * 10, ShardInfo("a.tar", 1, "", 10), "a.tar")
    with pytest.raises(DataError, match="shard a.tar: size mismatch against manifest.json"):
        check_shard(b"x" * 9, ShardInfo("a.tar", 1, "", 10), "a.tar")


def test_parquet_bad_columns_named_before_ray(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitray.data.parquet import scan

    truth = hub_parquet(tmp_path / "hub", "val", files=2, row_group=40, samples=100)
    manifest = read_manifest(str(tmp_path / "hub"))  # no manifest.json: made from the footers
    assert manifest.format == "parquet" and manifest.classes == NAMES and manifest.num_samples == len(truth) == 100
    assert [s.name for s in manifest.shards] == [f"val-0000{f}-of-00002.parquet#{g}" for f in (0, 1) for g in (0, 1)]
    with pytest.raises(DataError, match=r"data.train_uri: .*val-00000-of-00002.parquet: no column 'img'"):
        scan(str(tmp_path / "hub"), None, image_column="img")
    os.makedirs(tmp_path / "floats")
    pq.write_table(pa.table({"image": [b"x"], "label": [1.5]}), tmp_path / "floats" / "a.parquet")
    with pytest.raises(DataError, match=r"floats/a.parquet: column 'label' is double, not integer class indices"):
        read_manifest(str(tmp_path / "floats"))
    hub_parquet(tmp_path / "plain", "val", files=1, row_group=50, samples=60, names=False)
    assert read_manifest(str(tmp_path / "plain")).classes == [str(i) for i in range(10)]  # the label column's range


def test_parquet_row_group_decodes_like_a_shard(tmp_path):
    import pyarrow.fs as pafs

    from vitray.data.parquet import decode_row_groups
    from vitray.data.reading import shard_table

    truth = hub_parquet(tmp_path / "hub", "val", files=1, row_group=30, samples=70)
    manifest = read_manifest(str(tmp_path / "hub"))
    path = f"{tmp_path / 'hub'}/val-00000-of-00001.parquet#1"
    out = decode_row_groups({"path": np.array([path])}, pafs.LocalFileSystem(), shard_table(manifest),
                            manifest.columns, train=True, image_size=16, seed=(0, 0),
                            labels=(manifest.labels, tuple(manifest.classes)))
    assert out["image"].shape == (30, 16, 16, 3) and list(out["key"])[0] == "val-00000-of-00001.parquet:30"
    assert [truth[k] for k in out["key"]] == list(out["label"])


def test_parquet_training_data_is_planned_from_its_footers_and_bad_columns_stop_it(tmp_path):
    """The driver reads the row groups once (workers get them in the plan); a wrong column or label type is one
    error naming the file and the column, before any Ray resource is asked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitray.config import ConfigError, smoke
    from vitray.train import launch

    hub_parquet(tmp_path / "hub", "train", files=2, row_group=100, samples=300)
    cfg = smoke().replace(data=dict(builtin="", train_uri=str(tmp_path / "hub"), val_uri=""),
                          storage=dict(uri=str(tmp_path / "runs")), model=dict(name="vit_smoke", num_classes=10))
    _, plan = launch.prepare(cfg)
    assert plan.train_samples == 300 and plan.classes == tuple(NAMES)
    assert [s.num_samples for s in plan.train_manifest.shards] == [100, 50, 100, 50]
    with pytest.raises(ConfigError, match=r"data.train_uri: .*train-00000-of-00002.parquet: no column 'pixels'"):
        launch.prepare(cfg.replace(data=dict(image_column="pixels")))
    os.makedirs(tmp_path / "names")
    pq.write_table(pa.table({"image": [b"x"], "label": ["cat"]}), tmp_path / "names" / "a.parquet")
    with pytest.raises(ConfigError, match=r"names/a.parquet: column 'label' is string, not integer class indices"):
        launch.prepare(cfg.replace(data=dict(train_uri=str(tmp_path / "names"))))
    with pytest.raises(ConfigError, match="data.label_column: must name a Parquet column"):
        launch.prepare(cfg.replace(data=dict(label_column="")))


# ---- end to end: real Ray ---------------------------------------------------------------------------------------


def _epochs_exactly_once(stream_of, partitions: int, epochs: int, per_epoch: int, batch: int):
    """Each partition's keys over `epochs` epochs; asserts each epoch's union is every key once."""
    from vitray.data.batching import micro_batches

    seen = {}
    for p in range(partitions):
        data = stream_of()
        got = []
        for b, position in micro_batches(lambda e: data.epoch(p, e), batch):
            got += list(zip(b["key"].tolist(), b["_epoch"].tolist(), b["label"].tolist()))
            if position.epoch == epochs:
                break
        seen[p] = got
    for e in range(epochs):
        keys = [k for p in seen for k, ep, _ in seen[p] if ep == e]
        assert len(keys) == len(set(keys)) == per_epoch, (e, len(keys), len(set(keys)))
    return [x for p in seen for x in seen[p]]


def test_index_img2dataset_shards_then_stream_every_sample_once(ray_cluster, s3, tmp_path):
    from vitray.data.spec import ReadSpec
    from vitray.data.stream import TrainStream

    uri = f"s3://{s3.bucket}/external/img2dataset"
    truth = img2dataset_shards(uri, s3.endpoint, samples=300, per_shard=50)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    common = ["--endpoint-url", s3.endpoint.url, "--classes", str(classes)]
    # Counts from the _stats.json files, labels from the .json's "label": no shard is read.
    assert write_job.main(["--index", uri, "--labels", "json:label", *common]) == 0
    manifest = read_manifest(uri, s3.endpoint)
    assert manifest.num_samples == 300 and len(manifest.shards) == 6 and manifest.labels == "json:label"
    assert manifest.classes == NAMES and all(s.sha256 == "" and s.bytes > 0 for s in manifest.shards)
    assert write_job.main(["--index", uri, *common]) == 2  # already indexed: never overwritten

    # No stats, class names in the .txt, checksums: every shard read and checked; --verify then passes.
    local = str(tmp_path / "nostats")
    img2dataset_shards(local, None, samples=300, per_shard=50, stats=False)
    assert write_job.main(["--index", local, "--labels", "txt", "--classes", str(classes), "--sha256"]) == 0
    assert [s.num_samples for s in read_manifest(local).shards] == [s.num_samples for s in manifest.shards]
    assert write_job.main(["--verify", local]) == 0

    def stream():
        return TrainStream(uri, s3.endpoint, ReadSpec(16, train=True, seed=0), 2, batch=25, shuffle_buffer=64)

    seen = _epochs_exactly_once(stream, partitions=2, epochs=2, per_epoch=300, batch=25)
    assert all(truth[k] == label for k, _, label in seen)  # the labels as the .json gives them


def test_index_names_every_bad_sample_and_the_read_names_a_changed_shard(ray_cluster, tmp_path):
    from vitray.data.batching import micro_batches
    from vitray.data.spec import ReadSpec
    from vitray.data.stream import TrainStream

    folder = tmp_path / "bad"
    img2dataset_shards(str(folder), None, samples=100, per_shard=50, stats=False)
    members = [(m.name, t.extractfile(m).read()) for t in [tarfile.open(folder / "00001.tar")] for m in t]
    members = [(n, b"GIF89a-no" if n == "000010051.jpg" else p) for n, p in members if n != "000010060.txt"]
    (folder / "00001.tar").write_bytes(_tar(members))
    (tmp_path / "classes.txt").write_text("\n".join(NAMES))
    assert write_job.main(["--index", str(folder), "--labels", "txt", "--classes", str(tmp_path / "classes.txt")]) == 2
    assert not (folder / "manifest.json").exists()
    with pytest.raises(DataError) as e:
        from vitray.data.index import index

        index(str(folder), labels="txt", classes_file=str(tmp_path / "classes.txt"))
    assert "2 bad sample(s)" in str(e.value)
    assert "00001.tar sample 000010051: cannot decode image" in str(e.value)
    assert "00001.tar sample 000010060: missing label (.txt)" in str(e.value)

    # Indexed without the bad shard, then that shard's bytes change: the read names it by size.
    (folder / "00001.tar").unlink()
    index(str(folder), labels="json:label")  # integer labels, no --classes: classes 0..the largest label
    assert read_manifest(str(folder)).classes == [str(i) for i in range(10)]
    (folder / "00000.tar").write_bytes((folder / "00000.tar").read_bytes()[:-1024])
    data = TrainStream(str(folder), None, ReadSpec(16, train=True, seed=0), 1, batch=10)
    with pytest.raises(Exception, match=r"shard .*00000.tar: size mismatch against manifest.json"):
        next(micro_batches(lambda e: data.epoch(0, e), 10))


def test_parquet_streams_every_sample_once_and_resumes_exactly(ray_cluster, tmp_path):
    from vitray.data.batching import micro_batches
    from vitray.data.spec import ReadSpec
    from vitray.data.stream import TrainStream

    # The Hub's layout: both splits in one folder (data/train-0000i-of-00003.parquet, data/val-…); the URI's
    # file-name prefix picks the split. 9 row groups of 40, 40, 20 rows.
    truth = hub_parquet(tmp_path / "data", "train", files=3, row_group=40, samples=300)
    hub_parquet(tmp_path / "data", "val", files=1, row_group=40, samples=50)

    def stream():
        return TrainStream(f"{tmp_path}/data/train-", None, ReadSpec(16, train=True, seed=1), 2, batch=20,
                           shuffle_buffer=50)

    seen = _epochs_exactly_once(stream, partitions=2, epochs=2, per_epoch=300, batch=20)
    assert all(truth[k] == label for k, _, label in seen)

    def partition(start=None):
        data = stream()
        it = micro_batches(lambda e: data.epoch(1, e), 20, **({"start": start} if start else {}))
        return [(b["key"].tolist(), b["image"], p) for b, p in (next(it) for _ in range(12))]

    straight = partition()
    cut = 6
    again = partition(straight[cut][2])[:12 - cut - 1]
    assert [k for k, _, _ in again] == [k for k, _, _ in straight[cut + 1:]]
    assert all(np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(again, straight[cut + 1:]))


def test_trains_on_indexed_shards_once_per_epoch_then_evaluates_parquet(ray_cluster, s3, tmp_path, capsys):
    """One short run (2 workers, 2 data partitions) on img2dataset-style shards: the sample audit shows every
    sample once in each of the first two epochs; the checkpoint's top-1 is then counted on a Hub Parquet folder and
    on the indexed shards (`jobs/evaluate.py` reads both)."""
    import importlib.util

    from vitray.config import smoke
    from vitray.train import launch

    uri = f"s3://{s3.bucket}/external/train-indexed"
    truth = img2dataset_shards(uri, s3.endpoint, samples=200, per_shard=50)
    assert write_job.main(["--index", uri, "--labels", "json:label", "--endpoint-url", s3.endpoint.url]) == 0
    cfg = smoke().replace(
        model=dict(name="vit_smoke", num_classes=10),
        data=dict(builtin="", train_uri=uri, val_uri="", image_size=16, shuffle_buffer=64, crop_area_min=1.0,
                  audit_samples=True),
        optim=dict(global_batch=32, micro_batch=8, warmup_steps=3, lr=3e-3, total_steps=14),
        storage=dict(uri=f"s3://{s3.bucket}/test-runs", endpoint_url=s3.endpoint.url, run_name="indexed"),
        log_every=1,
    )
    cfg, plan = launch.prepare(cfg)
    assert plan.train_samples == 200 and cfg.data.partitions == 2
    assert launch.fit(cfg, plan).error is None
    rows = [json.loads(line) for line in
            storage.read_bytes(storage.join(plan.run_uri, "metrics.jsonl"), plan.endpoint).decode().splitlines()]
    audit = [tuple(x) for r in rows if r.get("event") == "samples" for x in r["samples"]]
    assert len(audit) == 14 * 32  # each partition: 100 samples an epoch, 16 a step → epochs 0 and 1 complete
    for epoch in (0, 1):
        keys = [k for k, e in audit if e == epoch]
        assert sorted(keys) == sorted(truth)

    hub_parquet(tmp_path / "val", "val", files=2, row_group=100)
    spec = importlib.util.spec_from_file_location("evaluate_job", os.path.join(ROOT, "jobs", "evaluate.py"))
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    checkpoint = storage.join(plan.run_uri, "step_00000014")
    assert evaluate.main(["--checkpoint", checkpoint, "--test", str(tmp_path / "val"), "--eval", "top1",
                          "--endpoint-url", s3.endpoint.url]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"]["samples"] == 297 and 0 <= result["top1"]["accuracy"] <= 1
    assert evaluate.main(["--checkpoint", checkpoint, "--test", uri, "--eval", "top1",  # the indexed shards too
                          "--endpoint-url", s3.endpoint.url]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["top1"]["samples"] == 200 and 0 <= result["top1"]["accuracy"] <= 1


def test_trains_on_hub_parquet_once_per_epoch(ray_cluster, s3, tmp_path):
    """A short run straight from a Hub-layout Parquet folder (2 files, 8 row groups, 2 data partitions), validated
    on another: the sample audit shows every row of the training files once in the first epoch."""
    from vitray.config import smoke
    from vitray.train import launch

    truth = hub_parquet(tmp_path / "train", "train", files=2, row_group=25, samples=200)
    hub_parquet(tmp_path / "val", "val", files=1, row_group=100)
    cfg = smoke().replace(
        model=dict(name="vit_smoke", num_classes=10),
        data=dict(builtin="", train_uri=str(tmp_path / "train"), val_uri=str(tmp_path / "val"), image_size=16,
                  shuffle_buffer=64, crop_area_min=1.0, audit_samples=True),
        optim=dict(global_batch=32, micro_batch=8, warmup_steps=3, lr=3e-3, total_steps=7),
        storage=dict(uri=f"s3://{s3.bucket}/test-runs", endpoint_url=s3.endpoint.url, run_name="parquet"),
        log_every=1,
    )
    cfg, plan = launch.prepare(cfg)
    assert plan.train_samples == 200 and cfg.data.partitions == 2
    result = launch.fit(cfg, plan)
    assert result.error is None and 0 <= result.metrics["val_top1"] <= 1
    rows = [json.loads(line) for line in
            storage.read_bytes(storage.join(plan.run_uri, "metrics.jsonl"), plan.endpoint).decode().splitlines()]
    audit = [tuple(x) for r in rows if r.get("event") == "samples" for x in r["samples"]]
    assert len(audit) == 7 * 32  # each partition: 100 rows an epoch, 16 a step → epoch 0 complete after 7 steps
    assert sorted(k for k, e in audit if e == 0) == sorted(truth)
