"""List the runs under a storage location, and plot their curves.

    python jobs/runs.py                                  # ./runs: where laptop runs go (no storage.uri)
    python jobs/runs.py s3://my-bucket/vitray [--endpoint-url URL] [--json]
    python jobs/runs.py ./runs --plot vit_smoke-20261130-210728 other-run [--out curves.png]

One line per run: name, state (running, finished, stopped, failed, diverged, interrupted), model, resolution,
step / total, newest committed checkpoint, accelerator-days, best held-out metric, and when it last wrote. A
failed run's error is printed under it. `--plot NAME...` draws those runs' training loss and held-out metric
into one PNG. The same numbers are in TensorBoard: tensorboard --logdir <storage>/runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("uri", nargs="?", default="runs", help="a storage.uri (its runs/ are listed) or a runs folder")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    p.add_argument("--plot", nargs="+", metavar="NAME", help="draw these runs' loss and held-out curves")
    p.add_argument("--out", default="runs.png", help="where --plot writes its PNG (local or s3://)")
    args = p.parse_args(argv)

    from vitray import runs, storage

    endpoint = storage.Endpoint(url=args.endpoint_url)
    try:
        root = args.uri
        if not storage.exists(root, endpoint):
            raise storage.StorageError(f"{root}: does not exist")
        if storage.exists(runs.runs_root(root), endpoint):  # given the storage.uri rather than its runs/
            root = runs.runs_root(root)
        if args.plot:
            curves, metric = {}, {}
            for name in args.plot:
                uri = storage.join(root, name)
                if not storage.exists(uri, endpoint):
                    raise storage.StorageError(f"--plot: no run {name!r} under {root}")
                curves[name] = runs.metrics_rows(uri, endpoint)
                metric[name] = runs.summary(uri, endpoint)["metric"]
            png = runs.plot(curves, metric)
            storage.write_bytes(args.out if storage.is_s3(args.out) else os.path.abspath(args.out), png, endpoint)
            print(f"{args.out}: loss and held-out curves of {', '.join(args.plot)}")
            return 0
        listing = runs.list_runs(root, endpoint)
    except storage.StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in listing:
            print(json.dumps(r))
        return 0
    if not listing:
        print(f"{root}: no runs")
        return 0
    print(runs.table(listing))
    for r in listing:
        if r["error"] and r["state"] in ("failed", "diverged", "interrupted"):
            print(f"\n{r['name']} ({r['state']}): {r['error'].strip().splitlines()[-1][:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
