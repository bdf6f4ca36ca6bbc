"""How an elastic run's worker group is sized when it (re)starts: on the workers the cluster holds now.

Ray Train V2 sizes a starting group from the resources its autoscaling coordinator (an actor shared with Ray Data)
has reserved for the run. The coordinator refreshes its node list every 20 s, so just after a node is lost it can
still count that node: the first restart then asks for the old size and waits out the group-start timeout
(`scaling.group_start_timeout_s`, Ray's default 60 s) before a second attempt starts on the workers that are left.
The coordinator can answer from a fresh look at the live nodes (`get_reserved_resources(recompute=True)`, which Ray
keeps for callers that must not count dead nodes). `FreshRestarts` asks for that whenever no group is running;
while one runs, resize checks use the cached view as before.

This reaches into Ray Train's internal classes (written against Ray 2.60). If they are not as expected, the run
uses Ray Train's own policy unchanged and says so once (`trainer_class`).
"""
from __future__ import annotations

import logging

import ray
from ray.train.torch import TorchTrainer

logger = logging.getLogger("vitray")

try:
    from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import \
        AUTOSCALING_REQUESTS_GET_TIMEOUT_S
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    from ray.train.v2._internal.util import time_monotonic

    for _name in ("make_decision_for_non_running_worker_group", "make_decision_for_running_worker_group",
                  "_get_reserved_resources", "GET_RESERVED_RESOURCES_INTERVAL_S"):
        getattr(ElasticScalingPolicy, _name)
    MISSING = ""
except (ImportError, AttributeError) as e:  # another Ray: its own policy, unchanged
    ElasticScalingPolicy, MISSING = object, str(e)


class FreshRestarts(ElasticScalingPolicy):
    """Ray Train's elastic policy, sizing each (re)start on a fresh look at the live nodes."""

    _stale = True  # Ray's cached view predates this start
    _starting = False

    def make_decision_for_running_worker_group(self, *args, **kwargs):
        self._stale = True  # the next start follows a failure or a resize
        return super().make_decision_for_running_worker_group(*args, **kwargs)

    def make_decision_for_non_running_worker_group(self):
        self._starting = True
        try:
            return super().make_decision_for_non_running_worker_group()
        finally:
            self._starting = False

    def _get_reserved_resources(self):
        if not self._starting:
            return super()._get_reserved_resources()
        since = time_monotonic() - self._latest_reserved_resources_query_time
        if not self._stale and since < self.GET_RESERVED_RESOURCES_INTERVAL_S:
            return self._latest_reserved_resources  # waiting for room: a fresh look at most once a second
        self._stale = False
        try:
            reserved = ray.get(self._autoscaling_coordinator.get_reserved_resources.remote(
                self._requester_id, recompute=True), timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
        except Exception:  # as Ray's own query: its cached view decides, and the next poll asks again
            logger.warning("could not get a fresh view of the cluster from Ray; its cached one decides", exc_info=True)
            return super()._get_reserved_resources()
        self._latest_reserved_resources_query_time = time_monotonic()
        self._latest_reserved_resources = reserved
        return reserved


class ElasticTorchTrainer(TorchTrainer):
    """`TorchTrainer` with `FreshRestarts` in place of the policy Ray Train builds from the scaling config."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = FreshRestarts(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def trainer_class() -> type:
    """The trainer for an elastic run: `ElasticTorchTrainer`, or Ray's own where this Ray differs (said once)."""
    if MISSING:
        logger.warning("elastic restarts use Ray Train's own sizing (this Ray lacks %s)", MISSING)
        return TorchTrainer
    return ElasticTorchTrainer
