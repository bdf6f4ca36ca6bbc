"""The image-folder writer on Ray: every CPU of the cluster turns `root/<class>/*.jpg` into shards, restartably.

    write_folder("s3://bucket/imagenet21k/train", "s3://bucket/shards/in21k", endpoint)  # or local paths

1. The driver lists the folder and plans the shards (files in (class, name) order, cut by sample count and source
   bytes) before it asks Ray for anything: a folder without class folders, two files that become one sample
   key, or entries that cannot be used (non-UTF-8 names, broken links, empty class folders) fail at once, naming
   them — or, under --skip-bad, the entries are skipped with one warning line.
2. The plan's summary and fingerprint go to `<dest>/_writer/plan.json`. A destination holding another plan is
   refused, so a restart with other arguments, or after the source changed, can never mix two datasets.
3. One Ray task per shard (1 CPU) reads its files (local or S3), decodes each one to validate it (a bad file is
   named by its path, or listed under --skip-bad), writes the tar as one atomic object, then its record
   `<dest>/_writer/shard-NNNNN.json`. A shard with a record is committed.
4. Started again with the same arguments, the writer keeps every committed shard whose object still has the
   recorded size and runs only the rest.
5. `manifest.json` comes last, from the records: until then the dataset cannot be read.

A local folder must be readable at the same path on every node of a multi-node cluster (a shared filesystem);
an S3 prefix is read from every node directly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from vitray import storage
from vitray.data.datasets import prepare_image, read_source, scan_folder
from vitray.data.manifest import MANIFEST, DataError, Manifest, Sample, ShardInfo
from vitray.data.shards import _tar_bytes
from vitray.storage import Endpoint, StorageError

RECORDS = "_writer"  # under the destination: plan.json and one record per committed shard
PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    name: str  # shard-NNNNN.tar
    files: tuple[tuple[str, str, int], ...]  # (source path, sample key, label)


def plan_shards(files: list[tuple[str, str, int, int]], max_shard_bytes: int,
                max_shard_samples: int) -> list[ShardPlan]:
    """Cut the listing into shards the way `write_shards` cuts samples, but by the source files' sizes (known
    before anything is decoded): the same listing always gives the same plan."""
    shards: list[ShardPlan] = []
    current: list[tuple[str, str, int]] = []
    nbytes = 0
    for path, key, label, size in files:
        current.append((path, key, label))
        nbytes += size + 1024  # + tar headers
        if nbytes >= max_shard_bytes or len(current) >= max_shard_samples:
            shards.append(ShardPlan(f"shard-{len(shards):05d}.tar", tuple(current)))
            current, nbytes = [], 0
    if current:
        shards.append(ShardPlan(f"shard-{len(shards):05d}.tar", tuple(current)))
    return shards


def plan_record(root: str, classes: list[str], files: list[tuple[str, str, int, int]], plans: list[ShardPlan],
                max_side: int, skip_bad: bool, max_shard_bytes: int, max_shard_samples: int) -> dict:
    """What `<dest>/_writer/plan.json` holds: the arguments, in words a mismatch error can name, and a fingerprint
    of the whole plan (every file's key and size, every shard's members), so a changed source is caught too."""
    digest = hashlib.sha256(json.dumps([root, classes, max_side, skip_bad]).encode())
    sizes = {key: size for _, key, _, size in files}
    for plan in plans:
        digest.update(json.dumps([plan.name, [(key, sizes[key]) for _, key, _ in plan.files]]).encode())
    return {"source": root, "classes": len(classes), "files": len(files), "shards": len(plans),
            "max_side": max_side, "skip_bad": skip_bad, "shard_bytes": max_shard_bytes,
            "shard_samples": max_shard_samples, "fingerprint": digest.hexdigest()}


def claim(dest: str, record: dict, endpoint: Endpoint | None) -> None:
    """Make `dest` this plan's destination, or find it already is (a restart); refuse anything else."""
    if storage.exists(storage.join(dest, MANIFEST), endpoint):
        raise DataError(f"{dest}: already holds a dataset ({MANIFEST} exists); choose another destination")
    uri = storage.join(dest, RECORDS, PLAN)
    if storage.exists(uri, endpoint):
        before = json.loads(storage.read_bytes(uri, endpoint))
        if before != record:
            changed = [f"{k} was {before.get(k)!r}, now {v!r}" for k, v in record.items()
                       if k != "fingerprint" and before.get(k) != v]
            raise DataError(f"{dest}: holds a partly written dataset from other arguments ("
                            + ("; ".join(changed) or "same arguments, but the source's files changed since")
                            + "): run again with the arguments it was started with, or write to another destination")
        return
    if any(name.startswith("shard-") for name in storage.list_files(dest, endpoint)):
        raise DataError(f"{dest}: holds shards but no {RECORDS}/{PLAN} (another writer's, interrupted); remove them"
                        " or choose another destination")
    storage.write_bytes(uri, json.dumps(record, indent=1).encode(), endpoint)


def committed(dest: str, fingerprint: str, endpoint: Endpoint | None) -> dict[str, dict]:
    """The records of the shards a previous start of this plan finished (name → record), each checked against
    its object's size: a shard removed or replaced since is written again."""
    def check(name: str) -> dict | None:
        record = json.loads(storage.read_bytes(storage.join(dest, RECORDS, name), endpoint))
        if record["fingerprint"] != fingerprint:
            return None
        if record["num_samples"] == 0 or storage.size(storage.join(dest, record["name"]), endpoint) == record["bytes"]:
            return record
        return None

    names = [n for n in storage.list_files(storage.join(dest, RECORDS), endpoint) if n.startswith("shard-")]
    with ThreadPoolExecutor(32) as pool:  # two small requests per shard: thousands of them on S3 for ImageNet-21k
        return {r["name"]: r for r in pool.map(check, names) if r is not None}


def build_shard(plan: ShardPlan, dest: str, endpoint: Endpoint | None, max_side: int, skip_bad: bool,
                fingerprint: str) -> dict:
    """One Ray task: read, validate and prepare the shard's files, write the tar atomically, then its record."""
    samples, skipped = [], []
    for path, key, label in plan.files:
        try:
            image, ext = prepare_image(path, read_source(path, endpoint), max_side)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append({"path": path, "reason": str(e).removeprefix(f"{path}: ")})
            continue
        samples.append(Sample(key=key, image=image, ext=ext, label=label))
    record = {"name": plan.name, "files": len(plan.files), "num_samples": len(samples), "sha256": "", "bytes": 0,
              "skipped": skipped, "fingerprint": fingerprint}
    if samples:  # a shard whose files were all skipped is left out of the manifest
        data = _tar_bytes(samples)
        storage.write_bytes(storage.join(dest, plan.name), data, endpoint)
        record.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    # Written after the shard: a record always means a whole shard (the tar is one atomic object).
    storage.write_bytes(storage.join(dest, RECORDS, plan.name.replace(".tar", ".json")), json.dumps(record).encode(),
                        endpoint)
    return record


def write_folder(root: str, dest: str, endpoint: Endpoint | None = None, max_shard_bytes: int = 256 << 20,
                 max_shard_samples: int = 10_000, skip_bad: bool = False, max_side: int = 0,
                 progress_every_s: float = 10.0, log: Callable[[str], None] | None = None) -> Manifest:
    """`root/<class>/<file>` (local or s3://) → shards and manifest under `dest`, on every CPU of the Ray cluster
    (the one RAY_ADDRESS names, the one this process already joined, or a local one). Same samples, keys, labels
    and checks as `write_shards(samples_from_folder(...))`; shard boundaries follow the source sizes instead.
    `log` receives the progress lines (default: stderr)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if not storage.is_s3(root):
        root = os.path.abspath(root)  # Ray workers need not share the driver's working directory
    # Before Ray is asked for anything: a folder refused for its listing costs no cluster start-up.
    classes, files = scan_folder(root, endpoint, skip_bad, log)
    plans = plan_shards(files, max_shard_bytes, max_shard_samples)
    record = plan_record(root, classes, files, plans, max_side, skip_bad, max_shard_bytes, max_shard_samples)
    claim(dest, record, endpoint)
    done = committed(dest, record["fingerprint"], endpoint)
    todo = [p for p in plans if p.name not in done]
    if done:
        log(f"write_shards: {dest}: keeping {len(done)} shards already written "
            f"({sum(r['files'] for r in done.values()):,} files); writing the other {len(todo)}")
    progress = _Progress(len(files), sum(r["files"] for r in done.values()), len(plans), len(done), log)
    for result in _run(todo, dest, endpoint, max_side, skip_bad, record["fingerprint"], progress, progress_every_s):
        done[result["name"]] = result
    records = [done[p.name] for p in plans]
    shards = [ShardInfo(r["name"], r["num_samples"], r["sha256"], r["bytes"]) for r in records if r["num_samples"]]
    if not shards:
        raise DataError(f"{dest}: no samples to write (every file was skipped)")
    manifest = Manifest(classes=classes, shards=shards, skipped=[s for r in records for s in r["skipped"]])
    storage.write_bytes(storage.join(dest, MANIFEST), manifest.to_json().encode(), endpoint)
    return manifest


def connect_ray() -> bool:
    """Join the cluster RAY_ADDRESS names (as under `ray job submit`) or start a local Ray on this machine's CPUs,
    unless this process has joined one already. True when this call started it (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "local")
    ray.init(address=address, logging_level="WARNING",
             **({"include_dashboard": False} if address == "local" else {}))
    return True


def _run(todo: list[ShardPlan], dest: str, endpoint: Endpoint | None, max_side: int, skip_bad: bool,
         fingerprint: str, progress: "_Progress", every_s: float) -> Iterator[dict]:
    """Run one task per shard over the cluster, yielding each record as its shard commits; progress to `log`."""
    if not todo:
        return
    import ray

    started = connect_ray()
    try:
        task = ray.remote(num_cpus=1)(build_shard)
        # Two per CPU keeps every core busy while the driver collects results, without queueing a million tasks.
        in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        queue, running = list(reversed(todo)), {}
        progress.log(f"write_shards: {progress.total - progress.kept:,} files in {len(todo)} shards, on"
                     f" {int(ray.cluster_resources().get('CPU', 1))} CPUs")
        progress.t0 = time.monotonic()  # the rate counts from here, not from Ray's start-up
        next_report = time.monotonic() + every_s
        while queue or running:
            while queue and len(running) < in_flight:
                plan = queue.pop()
                running[task.remote(plan, dest, endpoint, max_side, skip_bad, fingerprint)] = plan
            ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, next_report - time.monotonic()))
            for ref in ready:
                running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    for other in running:
                        ray.cancel(other)
                    # The task's own DataError (naming the file) or StorageError, not Ray's wrapper and traceback.
                    if isinstance(e.cause, (DataError, StorageError)):
                        raise e.cause from None
                    raise
                progress.shard_done(result["files"])
                yield result
            if time.monotonic() >= next_report:
                progress.report()
                next_report = time.monotonic() + every_s
        progress.report()
    finally:
        if started:
            ray.shutdown()


class _Progress:
    """`write_shards: 1,200/2,000 files (60 %), 6/10 shards, 612 img/s, ETA 1 s` — files count when their shard
    commits; the rate and ETA are this run's (shards kept from an earlier start are counted done, not timed)."""

    def __init__(self, total: int, kept: int, shards: int, kept_shards: int, log):
        self.total, self.kept, self.shards, self.log = total, kept, shards, log
        self.files, self.done_shards = 0, kept_shards
        self.t0 = time.monotonic()

    def shard_done(self, files: int) -> None:
        self.files += files
        self.done_shards += 1

    def report(self) -> None:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        done, rate = self.kept + self.files, self.files / elapsed
        eta = _duration((self.total - done) / rate) if rate else "unknown"
        self.log(f"write_shards: {done:,}/{self.total:,} files ({100 * done / self.total:.0f} %), "
                 f"{self.done_shards}/{self.shards} shards, {rate:,.0f} img/s, ETA {eta}")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
