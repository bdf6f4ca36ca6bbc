"""Where Ray Data's read and decode tasks run.

A cluster may have CPU-only nodes for decoding (cluster/aws-gpu.yaml's data_cpu, the KubeRay files). While it has
one, every read + decode task goes there and leaves the accelerator nodes' CPUs to the training workers; without
one, Ray places the tasks wherever it likes. Every reader (`reading.py`) asks here, so the tar and Parquet paths,
training and evaluation, place their tasks the same way.
"""
from __future__ import annotations

# The Ray node label a data node carries (set in the cluster files; tests/cluster_probes.py checks it).
DATA_NODE_LABEL = ("vitray.io/node-role", "data")


def decode_placement() -> dict:
    """Ray remote args for read + decode tasks: on the data nodes when any is alive, else wherever Ray likes."""
    import ray

    key, value = DATA_NODE_LABEL
    if any(n["Alive"] and n.get("Labels", {}).get(key) == value for n in ray.nodes()):
        return {"label_selector": {key: value}}
    return {}
