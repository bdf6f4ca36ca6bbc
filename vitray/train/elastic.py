"""How an elastic run's worker group is sized: on the nodes the cluster holds now.

Ray Train V2 sizes a (re)starting group, and decides at each resize check whether to resize a running one, from the
resources its autoscaling coordinator (an actor shared with Ray Data) has reserved for the run. The coordinator
refreshes its node list every 20 s, so its answer can be that old. Just after a node is lost it can still count that
node: the restart then asks for the old size and waits out the group-start timeout (`scaling.group_start_timeout_s`,
Ray's default 60 s) before a second attempt starts on the workers that are left. A node that returns can go unseen
for up to 20 s of resize checks. The coordinator can answer from a fresh look at the live nodes
(`get_reserved_resources(recompute=True)`, kept in Ray for callers that must not count dead nodes); `FreshView`
asks it that way at each resize check (`scaling.resize_check_s`) of a running group, at the first ask after a group
stops (the restart), and every 5 s while a group waits for room (Ray asks every second; a fresh look costs the
coordinator a full tick, so the asks between use its cached view).

This reaches into Ray Train's internal classes (written against Ray 2.60). If they are not as expected, the run
uses Ray Train's own policy unchanged and says so once (`trainer_class`).
"""
from __future__ import annotations

import logging

import ray

from vitray.train.trainer import LeanTorchTrainer

logger = logging.getLogger("vitray")

try:
    import inspect

    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import _AutoscalingCoordinatorActor
    from ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client import \
        AUTOSCALING_REQUESTS_GET_TIMEOUT_S
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    from ray.train.v2._internal.util import time_monotonic

    for _name in ("_get_reserved_resources", "_autoscaling_coordinator", "GET_RESERVED_RESOURCES_INTERVAL_S"):
        getattr(ElasticScalingPolicy, _name)
    if "recompute" not in inspect.signature(_AutoscalingCoordinatorActor.get_reserved_resources).parameters:
        raise AttributeError("get_reserved_resources(recompute=...)")
    MISSING = ""
except (ImportError, AttributeError) as e:  # another Ray: its own policy, unchanged
    ElasticScalingPolicy, MISSING = object, str(e)


class FreshView(ElasticScalingPolicy):
    """Ray Train's elastic policy, deciding on a fresh look at the live nodes instead of one up to 20 s old."""

    FRESH_WHILE_WAITING_S = 5  # a fresh look costs the coordinator a full tick: not every second while a group waits
    _after_group = False  # a group ran since the last start: the next start must not reuse a view from before
    _starting = False
    _fresh_at = float("-inf")

    def make_decision_for_running_worker_group(self, *args, **kwargs):
        self._after_group = True
        return super().make_decision_for_running_worker_group(*args, **kwargs)

    def make_decision_for_non_running_worker_group(self):
        self._starting = True
        try:
            return super().make_decision_for_non_running_worker_group()
        finally:
            self._starting = False

    def _get_reserved_resources(self):
        now = time_monotonic()
        restart = self._starting and self._after_group
        if not restart and now - self._latest_reserved_resources_query_time < self.GET_RESERVED_RESOURCES_INTERVAL_S:
            return self._latest_reserved_resources
        # Ray asks from a running group once per resize check: always fresh. While one waits, every few seconds.
        fresh = restart or not self._starting or now - self._fresh_at >= self.FRESH_WHILE_WAITING_S
        reserved = None
        try:
            reserved = ray.get(self._autoscaling_coordinator.get_reserved_resources.remote(
                self._requester_id, recompute=fresh), timeout=AUTOSCALING_REQUESTS_GET_TIMEOUT_S)
            if fresh:
                self._fresh_at, self._after_group = now, self._after_group and not restart
        except Exception:  # as in Ray's own query: no decision this time, the next one asks again
            logger.warning("could not get the cluster's resources from Ray; no resize decided this time",
                           exc_info=True)
        self._latest_reserved_resources_query_time = time_monotonic()
        self._latest_reserved_resources = reserved
        return reserved


class ElasticTorchTrainer(LeanTorchTrainer):
    """vitray's trainer (`train/trainer.py`) with `FreshView` in place of the policy Ray Train builds from the scaling config."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["scaling_policy"] = FreshView(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def trainer_class() -> type:
    """The trainer for an elastic run: `ElasticTorchTrainer`, or one with Ray's own policy where this Ray differs (said once)."""
    if MISSING:
        logger.warning("elastic restarts use Ray Train's own sizing (this Ray lacks %s)", MISSING)
        return LeanTorchTrainer
    return ElasticTorchTrainer
