"""Shared by the benchmark scripts: the machine and versions every result is written with."""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def machine() -> dict:
    from vitray.cost import machine as vitray_machine

    return vitray_machine()


def write_result(name: str, result: dict) -> str:
    """benchmarks/results/<name>.json: the figures, the machine, the versions, the date."""
    path = os.path.join(ROOT, "benchmarks", "results", f"{name}.json")
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result, "machine": machine()}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(record, indent=1))
    return path
