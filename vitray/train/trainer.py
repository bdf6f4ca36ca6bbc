"""The Ray Train trainer every vitray fit uses: `TorchTrainer` without the helper actors a fit has no use for.

Ray Train V2 starts each fit with a controller actor, its workers and three helper actors, each a fresh Python
process: ~2 s of CPU apiece here, against ~35 s for a whole 2-worker fit (`docs/tests.md`, "Where a fit's time
goes"). Two of them need not run:
- the **dataset manager** splits the datasets passed to the trainer; a fit that passes none (vitray's workers read
  their training data themselves, `data/stream.py`; only a held-out set goes through Ray Train) gets no manager.
  The driver's Ray Data settings still reach the workers.
- the **placement-group cleaner** is a detached actor that removes the workers' placement group if the controller
  dies without doing so, for a cluster that outlives the fit. A Ray this process started (`session.init_ray`, a
  laptop run or a test session) ends with this process and removes everything then; only there it is left out.

This leaves Ray Train's callbacks otherwise as they are. It reaches into Ray Train's internal classes (written
against Ray 2.60); if they are not as expected, fits start every helper as Ray does and say so once.
"""
from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer

from vitray import session

logger = logging.getLogger("vitray")

try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    DataParallelTrainer._create_default_callbacks  # noqa: B018 (present, or another Ray)
    for _cls, _attr in ((DatasetsCallback, "_datasets"), (DataParallelTrainer, "train_run_context")):
        if _attr not in _cls.__init__.__code__.co_names:  # set in __init__: read off its code
            raise AttributeError(f"{_cls.__name__}.{_attr}")
    MISSING = ""
except (ImportError, AttributeError) as e:  # another Ray: its callbacks, unchanged
    DatasetsCallback = PlacementGroupCleanerCallback = None
    MISSING = str(e)
_warned = False


class NoDatasets(DatasetsCallback or object):
    """Ray Train's datasets callback for a fit that passes no datasets: no manager actor, the same Ray Data
    settings on the workers (`after_worker_group_start`, inherited)."""

    def before_init_train_context(self, workers):
        return {}


class LeanTorchTrainer(TorchTrainer):
    """`TorchTrainer` starting only the helper actors this fit can use (the module's docstring says which)."""

    def _create_default_callbacks(self):
        global _warned
        callbacks = super()._create_default_callbacks()
        if MISSING:
            if not _warned:
                logger.warning("each fit starts all of Ray Train's helper actors (this Ray lacks %s)", MISSING)
                _warned = True
            return callbacks
        lean = []
        for cb in callbacks:
            if type(cb) is PlacementGroupCleanerCallback and session.started_here():
                continue
            if type(cb) is DatasetsCallback and not cb._datasets:
                cb = NoDatasets(train_run_context=self.train_run_context, datasets={})
            lean.append(cb)
        return lean
