"""Drivers that tests/test_cluster.py runs in their own processes (each needs a Ray cluster of its own).

    python tests/cluster_probes.py autoscale <gcs address>
    python tests/cluster_probes.py spread '<JSON list of --set overrides>'
    python tests/cluster_probes.py pending
"""
import json
import sys
import time


def autoscale(address: str) -> dict:
    """Ask for three 8-GPU tasks where the type allows two nodes; watch nodes come, serve, and go idle away."""
    import ray

    ray.init(address=address, logging_level="WARNING")

    @ray.remote(num_gpus=8, num_cpus=1)
    def hold(seconds: float) -> str:
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id()

    def alive(gpus: int) -> int:
        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) == gpus)

    refs = [hold.remote(12) for _ in range(3)]
    peak_h100 = peak_l4 = 0
    pending = refs
    while pending:
        _, pending = ray.wait(pending, timeout=1.0, num_returns=len(pending))
        peak_h100, peak_l4 = max(peak_h100, alive(8)), max(peak_l4, alive(4))
    ran_on = ray.get(refs)
    done = time.monotonic()
    while alive(8) and time.monotonic() - done < 180:
        time.sleep(1.0)
    removed_after, after_idle = time.monotonic() - done, alive(8)

    # A spot node reclaimed mid-task: its raylet is killed. Ray retries the task, and the autoscaler brings up a
    # node of the type to run it (what an elastic run's resize check then finds).
    @ray.remote(num_gpus=8, num_cpus=1, max_retries=3)
    def long_hold(flag: str) -> str:
        import os

        if not os.path.exists(flag):  # the first attempt waits to be killed with its node
            open(flag, "w").close()
            time.sleep(600)
        return ray.get_runtime_context().get_node_id()

    import os
    import tempfile

    flag = os.path.join(tempfile.mkdtemp(), "started")
    ref = long_hold.remote(flag)
    while not os.path.exists(flag):
        time.sleep(0.5)
    (victim,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) == 8]
    killed = _kill_raylet(victim)
    replacement = ray.get(ref, timeout=300)
    return {"peak_h100_nodes": peak_h100, "peak_l4_nodes": peak_l4, "task_nodes": len(set(ran_on)),
            "h100_nodes_after_idle": after_idle, "removed_after_s": removed_after,
            "reclaimed": {"killed": killed, "victim": victim, "ran_on": replacement,
                          "victim_alive": any(n["Alive"] for n in ray.nodes() if n["NodeID"] == victim)}}


def _kill_raylet(node_id: str) -> int:
    """SIGKILL the raylet of one node, as a reclaimed spot instance vanishes; how many processes were killed."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        if f"--node_id={node_id}" in (proc.info["cmdline"] or []) and "raylet" in " ".join(proc.info["cmdline"][:1]):
            proc.kill()
            killed += 1
    return killed


def spread(overrides_json: str) -> dict:
    """The reliability run (`--set` overrides) with placement_strategy=SPREAD on a three-node Ray cluster
    (ray.cluster_utils.Cluster): its summary, its loss at every step, and where its tasks ran. The head is a
    CPU-only data node (Ray node label `vitray.io/node-role=data`, 1 CPU: too small for a 1.5-CPU training
    worker); the two others have 3 CPUs each, 1.5 of them left free by their worker, which Ray Data would use
    too if the stream did not place its decode tasks on the data node."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    from vitray import storage
    from vitray.config import smoke
    from vitray.config.schema import apply_overrides
    from vitray.data.placement import DATA_NODE_LABEL
    from vitray.storage import free_port
    from vitray.train import launch

    key, value = DATA_NODE_LABEL
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "labels": {key: value}, "include_dashboard": True, "dashboard_port": free_port()})
    for _ in range(2):
        cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        cfg = apply_overrides(smoke(), json.loads(overrides_json) + [
            "scaling.placement_strategy=SPREAD", "scaling.cpus_per_worker=1.5"])
        summary = launch.run(cfg)
        endpoint = storage.Endpoint(url=cfg.storage.endpoint_url)
        rows = storage.read_bytes(storage.join(summary["run"], "metrics.jsonl"), endpoint).decode().splitlines()
        losses = [r["loss"] for r in map(json.loads, rows) if "loss" in r and "final" not in r]
        # This cluster's state API, named: left to find one, it can pick another test's cluster on this machine.
        api = "http://" + cluster.head_node.address_info["webui_url"].removeprefix("http://")
        decode = {t.node_id for t in list_tasks(address=api, filters=[("type", "=", "NORMAL_TASK")], limit=10_000,
                                                detail=True) if "decode_shards" in t.name}
        workers = {a.node_id for a in list_actors(address=api, filters=[("class_name", "=", "RayTrainWorker")],
                                                  limit=1000)}
        return {**summary, "losses": losses, "nodes": len([n for n in ray.nodes() if n["Alive"]]),
                "data_node": cluster.head_node.node_id, "decode_nodes": sorted(decode), "train_nodes": sorted(workers)}
    finally:
        ray.shutdown()
        cluster.shutdown()


def pending() -> dict:
    """A local Ray whose CPUs another actor holds: a worker's WaitWatch, waiting on a read task that cannot be
    scheduled, says what Ray has pending (the case of Train workers that leave Ray Data no CPU)."""
    import os

    import ray

    from vitray.storage import free_port
    from vitray.train.waits import WaitWatch

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=port, logging_level="ERROR")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # as session.init_ray names it to workers

    @ray.remote(num_cpus=2)
    class Hold:
        def ping(self) -> int:
            return 1

    @ray.remote(num_cpus=1)
    def read_shard() -> int:
        return 1

    hold = Hold.remote()
    ray.get(hold.ping.remote())
    lines: list[str] = []
    watch = WaitWatch(2.0, "training data (rank 0)", log=lines.append)
    with watch:
        ready, _ = ray.wait([read_shard.remote()], timeout=7.0)
    ray.shutdown()
    return {"lines": lines, "finished": bool(ready)}


if __name__ == "__main__":
    result = {"autoscale": autoscale, "spread": spread, "pending": pending}[sys.argv[1]](*sys.argv[2:])
    print("PROBE " + json.dumps(result), flush=True)
