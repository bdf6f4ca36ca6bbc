"""Shard-writing throughput: the Ray writer (`write_folder`, one task per shard on every CPU) against the
single-process writer (`write_shards(samples_from_folder(...))`, the old path), on the same folder of real photos,
the same cores, into the same kind of destination (local disk), rounds interleaved. Both read every file, decode
it once to validate it, and write the same samples; the Ray path also writes its per-shard records.

The photos are ImageNet-sized crops (240–427 × 320–640 px JPEG) of the two sample photos inside scikit-learn,
as in benchmarks/ingest.py. From the Ray writer's rate per core, the time to write ImageNet-21k (14.2 M images) on
one 64-core node is *modelled* (rate per core × 64, storage assumed to keep up; the bandwidth it needs is shown).

    python benchmarks/write_shards.py [--images 2000] [--workers 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from common import write_result
from ingest import make_jpegs

def cpu_s() -> float:
    """CPU seconds used so far by this process and everything it started (the local Ray: raylet, workers, ...).
    Wall-clock rates on shared cores depend on what else runs; CPU seconds per image do not, much."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            total += sum(proc.cpu_times()[:2])  # user + system of that process (children are counted as processes)
        except psutil.Error:
            pass
    return total


IN21K_IMAGES = 14_197_122  # ImageNet-21k (fall 2011 release), the paper's pre-training set
NODE_CORES = 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2, help="CPUs for the Ray writer (the single-process one uses 1)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    import ray

    from vitray.data.datasets import folder_classes, samples_from_folder
    from vitray.data.shards import write_shards
    from vitray.data.writer import write_folder

    # Ray runs its workers 15 niceness steps below the raylet (its default, so the raylet keeps priority). Where the
    # cores are shared with other work, a single process at niceness 0 would win CPU the Ray writer's workers
    # cannot: the whole benchmark runs at 15 and the workers inherit it, so both writers compete on equal terms.
    os.nice(15 - os.nice(0))
    os.environ["RAY_worker_niceness"] = "0"
    load_before = os.getloadavg()[0]  # the cores may be shared: a busy machine shows here
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "photos")
        make_jpegs(src, args.images, "imagenet")
        source_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs)
        classes = folder_classes(src)
        # The Ray writer works one shard per task: 8 shards per worker keeps every worker busy to the end.
        per_shard = max(1, args.images // (8 * args.workers))
        t = time.perf_counter()
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
        ray_start_s = time.perf_counter() - t
        single, parallel, lines, single_cpu, parallel_cpu = [], [], [], [], []
        write_folder(src, os.path.join(tmp, "warm-up"), max_shard_samples=per_shard, log=lines.append)  # workers up
        shutil.rmtree(os.path.join(tmp, "warm-up"))
        for r in range(args.rounds):
            dest = os.path.join(tmp, f"single-{r}")
            t, c = time.perf_counter(), cpu_s()
            write_shards(samples_from_folder(src, classes), dest, classes, max_shard_samples=per_shard)
            single.append(args.images / (time.perf_counter() - t))
            single_cpu.append(args.images / (cpu_s() - c))
            shutil.rmtree(dest)
            dest = os.path.join(tmp, f"ray-{r}")
            t, c = time.perf_counter(), cpu_s()
            write_folder(src, dest, max_shard_samples=per_shard, log=lines.append)
            parallel.append(args.images / (time.perf_counter() - t))
            parallel_cpu.append(args.images / (cpu_s() - c))
            shutil.rmtree(dest)
            print(f"round {r}: single process {single[-1]:.0f} img/s ({single_cpu[-1]:.0f} per CPU-second),"
                  f" Ray writer {parallel[-1]:.0f} img/s ({parallel_cpu[-1]:.0f} per CPU-second)")
        ray.shutdown()

    ratios = [b / a for a, b in zip(single, parallel)]
    # Per core from CPU time, not wall-clock ÷ workers: on shared cores the workers may not have had them all.
    per_core = statistics.median(parallel_cpu)
    in21k_s = IN21K_IMAGES / (per_core * NODE_CORES)
    write_result("write_shards", {
        "photos": f"{args.images} ImageNet-sized real-photo JPEGs (240–427 × 320–640 px), local disk → local disk",
        "mean_file_kb": round(source_bytes / args.images / 1024, 1),
        "workers": args.workers, "rounds": args.rounds, "shard_samples": per_shard,
        "single_process_img_s": [round(x, 1) for x in single],
        "ray_writer_img_s": [round(x, 1) for x in parallel],
        "ratio_median": round(statistics.median(ratios), 2),
        "ray_start_s": round(ray_start_s, 1),
        "single_process_img_per_cpu_s": [round(x, 1) for x in single_cpu],
        "ray_writer_img_per_cpu_s": [round(x, 1) for x in parallel_cpu],
        "ray_writer_cpu_efficiency": round(per_core / statistics.median(single_cpu), 2),
        "ray_writer_per_core_img_s": round(per_core, 1),
        "last_progress_line": lines[-1],
        "niceness": os.nice(0),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "in21k_64_cores_modelled": {
            "model": f"{IN21K_IMAGES:,} images / (Ray writer's median images per CPU-second here × {NODE_CORES}"
                     " cores);"
                     " storage assumed to keep up",
            "minutes": round(in21k_s / 60, 1),
            "single_process_hours": round(IN21K_IMAGES / statistics.median(single_cpu) / 3600, 1),
            "read_bandwidth_needed_mb_s": round(per_core * NODE_CORES * source_bytes / args.images / 1e6),
        },
    })


if __name__ == "__main__":
    main()
