"""The Ray folder writer (vitray/data/writer.py, `jobs/write_shards.py --source folder:`): same dataset as the
single-process writer, from a local folder or S3; bad files named or listed; killed and restarted, it keeps what it
committed; restarted with other arguments, it refuses. Real photos (scikit-learn's sample images), real Ray, S3
through the embedded moto server."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from vitray import storage
from vitray.data import writer
from vitray.data.datasets import folder_classes, samples_from_folder
from vitray.data.catalog import read_manifest
from vitray.data.manifest import DataError
from vitray.data.shards import iter_tar, write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _photos(count: int, large: bool = False) -> dict[str, bytes]:
    """{"<class>/<name>": bytes}: crops of the two sample photos (or, `large`, the photos at 1,600 px, copied)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    if large:
        big = [_jpeg(p.resize((1600, 1067), Image.BICUBIC)) for p in photos]
        return {f"c{i % 3}/{i:04d}.jpg": big[i % 2] for i in range(count)}
    out = {}
    for i in range(count):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        x, y = int(rng.integers(0, 640 - w)), int(rng.integers(0, 427 - h))
        out[f"c{i % 3}/{i:04d}.jpg"] = _jpeg(photos[i % 2].crop((x, y, x + w, y + h)))
    return out


def _samples(uri: str, endpoint=None) -> dict[str, tuple[int, str, bytes]]:
    """key → (label, ext, stored bytes) of a whole dataset."""
    manifest, out = read_manifest(uri, endpoint), {}
    for shard in manifest.shards:
        for key, image, ext, label in iter_tar(storage.read_bytes(storage.join(uri, shard.name), endpoint), shard.name):
            out[key] = (label, ext, image)
    return out


def test_plan_is_cut_by_count_and_source_bytes_and_a_different_restart_is_refused(tmp_path):
    files = [(f"/src/c/{i}.jpg", f"c_{i}_jpg", 0, 3000 if i < 4 else 100) for i in range(10)]
    plans = writer.plan_shards(files, max_shard_bytes=8000, max_shard_samples=4)
    assert [len(p.files) for p in plans] == [2, 2, 4, 2] and plans[-1].name == "shard-00003.tar"
    assert writer.plan_shards(files, 8000, 4) == plans  # the same listing, the same plan

    dest = str(tmp_path / "ds")
    first = writer.plan_record("/src", ["c"], files, plans, 0, False, 8000, 4)
    writer.claim(dest, first, None)
    writer.claim(dest, first, None)  # a restart with the same arguments: accepted
    other = writer.plan_record("/src", ["c"], files, writer.plan_shards(files, 8000, 3), 0, False, 8000, 3)
    with pytest.raises(DataError, match="partly written dataset from other arguments .*shard_samples was 4, now 3"):
        writer.claim(dest, other, None)
    changed = [(p, k, lab, s + 1) for p, k, lab, s in files]  # the same names, one byte more each
    with pytest.raises(DataError, match="the source's files changed since"):
        writer.claim(dest, writer.plan_record("/src", ["c"], changed, plans, 0, False, 8000, 4), None)
    (tmp_path / "no-classes").mkdir()
    (tmp_path / "no-classes" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="no-classes: no class folders"):  # before Ray: nothing to start it for
        writer.write_folder(str(tmp_path / "no-classes"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "shard-00000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="holds shards but no _writer/plan.json"):
        writer.claim(str(tmp_path / "stray"), first, None)


@pytest.mark.e2e
def test_ray_writer_from_s3_equals_the_single_process_writer_and_names_bad_files(s3, ray_cluster):
    root, ep = f"s3://{s3.bucket}/writer-src", s3.endpoint
    files = _photos(30)
    files["c1/big.jpg"] = _jpeg(Image.open(io.BytesIO(files["c1/0001.jpg"])).resize((700, 500)))  # > --max-side
    for rel, data in files.items():
        storage.write_bytes(f"{root}/{rel}", data, ep)
    bad = f"{root}/c2/broken.jpg"
    storage.write_bytes(bad, b"GIF89a-not-really", ep)
    options = {"max_shard_samples": 4, "max_side": 256}

    with pytest.raises(DataError, match=re.escape(bad) + ": cannot decode image"):
        writer.write_folder(root, f"s3://{s3.bucket}/writer-strict", ep, **options)

    lines = []
    t = time.perf_counter()
    ray_manifest = writer.write_folder(root, f"s3://{s3.bucket}/writer-ray", ep, skip_bad=True, log=lines.append,
                                       **options)
    print(f"Ray writer: {time.perf_counter() - t:.1f} s; {lines}")
    skipped, classes = [], folder_classes(root, ep)
    single = write_shards(samples_from_folder(root, classes, skipped, max_side=256, endpoint=ep),
                          f"s3://{s3.bucket}/writer-single", classes, ep, max_shard_samples=4, skipped=skipped)

    assert ray_manifest.classes == single.classes == ["c0", "c1", "c2"]
    assert [s["path"] for s in ray_manifest.skipped] == [s["path"] for s in single.skipped] == [bad]
    assert ray_manifest.skipped[0]["reason"].startswith("cannot decode image")
    ray_samples = _samples(f"s3://{s3.bucket}/writer-ray", ep)
    assert ray_samples == _samples(f"s3://{s3.bucket}/writer-single", ep) and len(ray_samples) == 31
    assert Image.open(io.BytesIO(ray_samples["c1_big_jpg"][2])).size == (256, 183)  # --max-side applied
    assert re.fullmatch(r"write_shards: 32/32 files \(100 %\), 8/8 shards, [\d,]+ img/s, ETA 0 s", lines[-1])


def _records(dest) -> list[str]:
    folder = os.path.join(dest, writer.RECORDS)
    return sorted(n for n in os.listdir(folder) if n.startswith("shard-")) if os.path.isdir(folder) else []


@pytest.mark.e2e
def test_killed_writer_keeps_committed_shards_and_a_different_restart_is_refused(tmp_path, capsys):
    src, dest = tmp_path / "src", str(tmp_path / "ds")
    for rel, data in _photos(144, large=True).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "write_shards.py"), "--source", f"folder:{src}", "--dest", dest,
           "--shard-samples", "6", "--max-side", "384", "--progress-every", "1"]

    # Killed (the driver and the local Ray it started, one process group) once two shards are committed.
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_records(dest)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # Ray's worker processes are not in that group: a task already writing may still commit its shard before
    # they notice the driver is gone. Wait until no record has appeared for 3 s.
    seen, still = _records(dest), time.monotonic()
    while time.monotonic() - still < 3 and time.monotonic() < deadline + 60:
        time.sleep(0.2)
        if _records(dest) != seen:
            seen, still = _records(dest), time.monotonic()
    assert not os.path.exists(os.path.join(dest, "manifest.json")), "finished before it could be killed"
    kept = {n: os.stat(os.path.join(dest, n.replace(".json", ".tar"))).st_mtime_ns for n in _records(dest)}
    assert len(kept) >= 2

    # Other arguments into the half-written destination: one error, before Ray starts.
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    import write_shards as job

    assert job.main([*cmd[2:6], "--shard-samples", "5", "--max-side", "384"]) == 2
    err = capsys.readouterr().err
    assert f"error: {dest}: holds a partly written dataset from other arguments (shards was 24, now 29" in err

    # The same arguments: the committed shards are kept as they are, the rest written, then the manifest.
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"keeping {len(kept)} shards already written" in done.stderr
    assert re.search(r"write_shards: 144/144 files \(100 %\), 24/24 shards, [\d,]+ img/s", done.stderr)
    for name, mtime in kept.items():
        assert os.stat(os.path.join(dest, name.replace(".json", ".tar"))).st_mtime_ns == mtime, f"{name} rewritten"

    # The same dataset as one uninterrupted (single-process) write.
    classes = folder_classes(str(src))
    write_shards(samples_from_folder(str(src), classes, max_side=384), str(tmp_path / "ref"), classes)
    assert _samples(dest) == _samples(str(tmp_path / "ref"))
    manifest = json.loads(open(os.path.join(dest, "manifest.json")).read())
    assert len(manifest["shards"]) == 24 and manifest["num_samples"] == 144
    assert job.main(cmd[2:]) == 2 and "already holds a dataset" in capsys.readouterr().err
