"""The cluster YAMLs users launch: Ray's own validation, the KubeRay CRD, a local autoscaling cluster with the same
node types, and Train workers spread across nodes."""
import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "cluster")


def _load(name: str):
    with open(os.path.join(CLUSTER, name)) as f:
        return list(yaml.safe_load_all(f))


def _text(name: str) -> str:
    with open(os.path.join(CLUSTER, name)) as f:
        return f.read()


def test_aws_yaml_passes_rays_validation_and_keeps_secrets_and_ports_closed():
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _load("aws-gpu.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's schema for cluster launcher files
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_h100_spot"]["max_worker"] = 16  # a typo Ray must catch
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = {k: v for k, v in types.items() if v.get("resources", {}).get("GPU")}
    assert {"gpu_h100_spot", "gpu_h100_ondemand", "gpu_l4"} <= set(gpu)
    assert all(v["min_workers"] == 0 and v["max_workers"] > 0 for v in gpu.values())
    assert types["gpu_h100_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in types["gpu_h100_ondemand"]["node_config"]
    assert all(v["node_config"]["IamInstanceProfile"]["Name"] for v in types.values())  # S3 through the role
    assert config["idle_timeout_minutes"] > 0
    # Token auth on every node, the token copied from the user's file, never written in the YAML.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    # Nothing listens to the world: dashboard on localhost, SSH only from one network.
    assert "0.0.0.0" not in _text("aws-gpu.yaml") and "--dashboard-host=127.0.0.1" in " ".join(starts)
    ingress = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ingress] == [(22, 22)]
    # The submit command in the header is the job the README documents.
    assert "jobs/pretrain_vit_h14.py" in _text("aws-gpu.yaml")


def _check(node, schema, where="") -> list[str]:
    """Every field of `node` named in the CRD's schema, with the right JSON type; required fields present."""
    errors = []
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        if not isinstance(node, dict):
            return [f"{where}: expected an object"]
        for req in schema.get("required", []):
            if req not in node:
                errors.append(f"{where}.{req}: required")
        props = schema.get("properties")
        for k, v in node.items():
            if props is not None and k in props:
                errors += _check(v, props[k], f"{where}.{k}")
            elif props is not None and not schema.get("open"):
                errors.append(f"{where}.{k}: not a field of the CRD")
    elif kind == "array":
        if not isinstance(node, list):
            return [f"{where}: expected a list"]
        for i, item in enumerate(node):
            errors += _check(item, schema.get("items", {}), f"{where}[{i}]")
    elif kind == "string" and not isinstance(node, str):
        errors.append(f"{where}: expected a string, got {node!r}")
    elif kind == "integer" and not isinstance(node, int):
        errors.append(f"{where}: expected an integer, got {node!r}")
    elif kind == "boolean" and not isinstance(node, bool):
        errors.append(f"{where}: expected true/false, got {node!r}")
    return errors


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests_match_the_crd(name):
    with open(os.path.join(ROOT, "tests", "data", "kuberay_crd_v1.json")) as f:
        crds = json.load(f)
    (manifest,) = _load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    schema = crds[manifest["kind"]]
    assert _check(manifest, schema) == []
    typo = copy.deepcopy(manifest)
    spec = typo["spec"].get("rayClusterSpec", typo["spec"])
    spec["workerGroupSpecs"][0]["maxReplica"] = 3
    spec["headGroupSpec"]["rayStartParams"] = ["not", "a", "map"]
    assert len(_check(typo, schema)) == 2  # the checker finds real mistakes

    cluster = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert cluster["authOptions"]["mode"] == "token" and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"  # no LoadBalancer / NodePort to the world
    assert not re.search(r"(?i)aws_secret|AKIA[0-9A-Z]{16}|auth_token:", _text(name))
    assert any(g["template"]["spec"].get("nodeSelector", {}).get("karpenter.sh/capacity-type") == "spot"
               for g in cluster["workerGroupSpecs"])  # a preemptible pool
    if manifest["kind"] == "RayJob":  # the job's own command line makes a valid config: elastic, with a failure budget
        entry = shlex.split(manifest["spec"]["entrypoint"])
        assert entry[:2] == ["python", "jobs/pretrain_vit_h14.py"]
        shown = subprocess.run([sys.executable, *entry[1:], "--print-config"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "min_workers: 64" in shown.stdout.replace('"', "").replace("=", ": "), shown.stdout[-2000:]


@pytest.mark.e2e
def test_local_autoscaling_cluster_launches_up_to_max_and_removes_idle_nodes(tmp_path):
    (local,) = _load("local-autoscale.yaml")
    (aws,) = _load("aws-gpu.yaml")
    for name, node in local["available_node_types"].items():  # the AWS types, scaled down to a laptop
        if name != local["head_node_type"]:
            assert node["resources"]["GPU"] == aws["available_node_types"][name]["resources"]["GPU"]

    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "token"}
    port = 6379  # the fake provider joins its nodes to the head at ray start's default port
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--num-cpus=1", "--include-dashboard=false",
         f"--autoscaling-config={os.path.join(CLUSTER, 'local-autoscale.yaml')}", "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        probe = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cluster_probes.py"), "autoscale",
                                f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=400)
        out = probe.stdout + probe.stderr
        assert probe.returncode == 0, out[-3000:]
        result = json.loads(out[out.index("PROBE ") + 6:].splitlines()[0])
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=90)
    h100_max = local["available_node_types"]["gpu_h100_spot"]["max_workers"]
    assert result["peak_h100_nodes"] == h100_max  # launched on demand, and no more than the type allows
    assert result["peak_l4_nodes"] == 0  # 8-GPU tasks do not fit the 4-GPU type: none launched
    assert result["task_nodes"] == h100_max
    assert result["h100_nodes_after_idle"] == 0  # idle nodes removed after idle_timeout_minutes
    assert result["removed_after_s"] >= local["idle_timeout_minutes"] * 60 * 0.9
    # A spot node lost mid-task comes back: the task is retried on a node the autoscaler launched in its place.
    reclaimed = result["reclaimed"]
    assert reclaimed["killed"] == 1 and not reclaimed["victim_alive"]
    assert reclaimed["ran_on"] != reclaimed["victim"]


@pytest.mark.e2e
def test_train_workers_spread_across_nodes_train_exactly_as_on_one(s3, digits):
    """The reference run (tests/reference.py) with its two workers spread over two nodes, beside a CPU-only data node: the same loss at
    every step as the stored known-good curve (one node): placement changes where workers run, never what they
    compute. Every read + decode task ran on the data node, every training worker on the other two."""
    from reference import CURVE, overrides

    env = {**os.environ, "PYTHONPATH": ROOT}
    sets = json.dumps(overrides(s3, digits, "spread"))
    probe = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cluster_probes.py"), "spread", sets],
                           env=env, capture_output=True, text=True, timeout=600)
    out = probe.stdout + probe.stderr
    assert probe.returncode == 0, out[-3000:]
    result = json.loads(out[out.index("PROBE ") + 6:].splitlines()[0])
    assert result["nodes"] == 3 and result["worker_nodes"] == 2  # SPREAD: one worker on each of two nodes
    assert result["decode_nodes"] == [result["data_node"]]
    assert len(result["train_nodes"]) == 2 and result["data_node"] not in result["train_nodes"]
    with open(CURVE) as f:
        assert result["losses"] == pytest.approx(json.load(f)["loss"], rel=2e-3)


@pytest.mark.e2e
def test_eight_workers_on_a_multi_node_cluster_stream_commit_and_resume():
    """8 workers (0.25 CPU each) over a 4-node local cluster (benchmarks/worker_scaling.py): trained to the
    half-way point (checkpoints every quarter), stopped, resumed to the end; every checkpoint holds all 8 ranks' data positions and its
    commit marker, and the workers ran on more than one node."""
    script = os.path.join(ROOT, "benchmarks", "worker_scaling.py")
    proc = subprocess.run([sys.executable, script, "--workers", "8", "--steps", "8", "--json"], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": ROOT})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    (row,) = json.loads(out[out.index("RESULT ") + 7:].splitlines()[0])
    checks = row["checks"]
    assert checks["committed_steps"] == [2, 4, 6, 8] and checks["commit_markers"]
    assert checks["position_files"] == {"2": 8, "4": 8, "6": 8, "8": 8}
    assert (checks["stopped_at"], checks["resumed_at"], checks["finished_at"]) == (4, [4], 8)
    assert checks["worker_nodes"] >= 2 and checks["final_loss"] == checks["final_loss"]  # not NaN
    assert row["startup_s"] > 0 and row["checkpoint_commit_s"] > 0


@pytest.mark.e2e
def test_a_waiting_worker_says_what_ray_cannot_schedule():
    """Another actor holds both CPUs of a local Ray; a read task waits for one. The wait watch names it, with the
    resources it asks for and what the cluster has free, every 2 s while the wait lasts."""
    probe = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cluster_probes.py"), "pending"],
                           env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=180)
    out = probe.stdout + probe.stderr
    assert probe.returncode == 0, out[-3000:]
    result = json.loads(out[out.index("PROBE ") + 6:].splitlines()[0])
    assert not result["finished"] and len(result["lines"]) >= 2
    assert re.fullmatch(r"waited \d+ s for training data \(rank 0\): pending in Ray: 1 × read_shard \{CPU: 1\}; "
                        r"free now: CPU 0 of 2", result["lines"][0]), result["lines"]
