"""Starting or joining the Ray session every job runs in, and checking that the cluster can hold a run.

Jobs, the training driver, the scaling study, the rehearsal and the test fixtures all start Ray through `init_ray`,
so each Ray process gets the same logging set-up; `check_cluster` refuses, before Ray Train asks
for anything, a run the cluster cannot hold.
"""
from __future__ import annotations

import dataclasses
import os

from vitray import storage
from vitray.config.schema import Config, ConfigError

DATA_CPUS = 1.0  # Ray Data's read and decode tasks ask for one CPU each: at least one must stay free for them


def check_cluster(cfg: Config) -> None:
    """Fail fast, before Ray Train asks for anything, when the workers need more than the cluster has (and cannot
    add), or would take every CPU and leave Ray Data none to read with — which otherwise waits forever, silently."""
    import ray

    s, have = cfg.scaling, ray.cluster_resources()
    s = dataclasses.replace(s, num_workers=s.min_workers or s.num_workers)  # an elastic run starts with its minimum
    gpus, cpus = have.get("GPU", 0), have.get("CPU", 0)
    if s.autoscale:  # the cluster grows on demand: what is up now says nothing
        return
    if s.use_gpu and gpus == 0:
        raise ConfigError(
            f"scaling.use_gpu: this recipe needs {s.num_workers} GPU workers but the Ray cluster has no"
            " GPUs. Submit it to a GPU cluster (see cluster/), set scaling.autoscale=true if the cluster adds GPU"
            " nodes on demand, or try the CPU recipe: --preset smoke"
        )
    if s.use_gpu and gpus < s.num_workers:
        raise ConfigError(f"scaling.num_workers: {s.num_workers} GPU workers, but the Ray cluster has {gpus:g} GPUs;"
                          " lower scaling.num_workers or set scaling.autoscale=true if it adds nodes on demand")
    need = s.num_workers * s.cpus_per_worker
    if need > cpus:
        raise ConfigError(f"scaling.cpus_per_worker: {s.num_workers} workers × {s.cpus_per_worker:g} CPUs = {need:g}"
                          f" CPUs, but the Ray cluster has {cpus:g}; lower scaling.cpus_per_worker or"
                          " scaling.num_workers (or set scaling.autoscale=true if the cluster adds nodes)")
    if cpus - need < DATA_CPUS:
        fits = (cpus - DATA_CPUS) / s.num_workers
        raise ConfigError(f"scaling.cpus_per_worker: {s.num_workers} workers × {s.cpus_per_worker:g} CPUs take all"
                          f" {cpus:g} CPUs of the Ray cluster, leaving none for Ray Data's read and decode tasks"
                          f" (the run would wait forever); set scaling.cpus_per_worker to at most {fits:.2g}")


# A local Ray's nodes are this machine's processes: none is ever drained for preemption, so Ray Train's watcher
# (one more actor process per fit, ~2.3 s of CPU measured here, whose end logged an error on every laptop run) has
# nothing to watch. Clusters keep it: on spot capacity it hands a drained node's run a grace period.
LOCAL_ONLY = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# A local Ray's raylet reads these from the environment of the process that starts it. When the first driver
# connects, Ray prestarts Python workers for no job in particular; every vitray driver brings a runtime_env (the
# logging hook), so none of them is ever used: 2 processes started for nothing, ~2.5 CPU-s per local Ray here
# (`tests/test_fit_startup.py` checks that none is started).
LOCAL_RAYLET = {"RAY_prestart_worker_first_driver": "0"}
_started_here = False


def started_here() -> bool:
    """Whether this process started the Ray it is connected to, which then ends with it (`init_ray`)."""
    import ray

    return _started_here and ray.is_initialized()


def init_ray(**local: object) -> None:
    """Join the cluster RAY_ADDRESS names (as under `ray job submit`), or start a local Ray with `local`'s options.

    A local Ray gets its dashboard on a known port, named to its workers as RAY_API_SERVER_ADDRESS: Ray Train's
    placement-group cleaner calls the state API without an address, which otherwise resolves to the cluster the
    machine's last `ray start` recorded. A dead one costs ~13 s of GCS timeouts (and a core) at the end of every
    fit; a live one does not know our controller, and the cleaner would remove our workers' placement group."""
    import ray

    from vitray import ray_logs

    global _started_here
    ray_logs.setup_worker()  # this process too: it runs Ray Data's executions for evaluation
    ray_logs.quiet_driver()
    hook = {"worker_process_setup_hook": ray_logs.HOOK}  # merged with a submitted job's own runtime_env
    address = os.environ.get("RAY_ADDRESS", "local")
    if address != "local":
        # A dashboard named to this driver is named to its workers too (the same cleaner's reason as below).
        api = {"RAY_API_SERVER_ADDRESS": os.environ["RAY_API_SERVER_ADDRESS"]} if "RAY_API_SERVER_ADDRESS" in os.environ else {}
        ray.init(address=address, logging_level="WARNING", runtime_env={**hook, "env_vars": api})
        _started_here = False
        return
    port = storage.free_port()
    env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}", **LOCAL_ONLY}
    for name, value in LOCAL_RAYLET.items():
        os.environ.setdefault(name, value)
    ray.init(address="local", logging_level="WARNING", include_dashboard=True, dashboard_port=port,
             runtime_env={**hook, "env_vars": env}, **local)
    _started_here = True
