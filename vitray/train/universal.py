"""An elastic resize without the universal conversion on its critical path.

Loading a checkpoint on another number of workers needs DeepSpeed's universal form of it (`checkpoint.make_universal`:
every rank's ZeRO partitions merged, parameter by parameter). Made when the resize happens, it is rank 0's work while
every other worker waits (`resume.find`). An elastic run's driver makes it instead, once per committed checkpoint,
in a thread beside training (`InBackground`, started by `launch.fit`): by the time a node is lost the newest
checkpoint usually has it, and a resize that comes sooner waits only for the rest of that conversion
(`wait_for_background`). The price: the driver's node reads each checkpoint once more and storage holds a second copy
of its model and optimizer state.

`universal/STARTED` says which fit's driver is converting (its `fit_called` time, which its workers know too), so a
worker never waits on a conversion whose driver is gone (a `--resume` after a killed driver).
"""
from __future__ import annotations

import json
import logging
import threading
import time

from vitray import storage
from vitray.checkpoints import COMMIT, scan, step_dir
from vitray.train.checkpoint import UNIVERSAL, make_universal

STARTED = "STARTED"
logger = logging.getLogger("vitray")


def convert_newest(run_uri: str, endpoint, fit: float | None = None) -> tuple[int | None, float]:
    """Make the universal form of the run's newest committed checkpoint, if it has none: (its step, seconds)."""
    complete, _ = scan(run_uri, endpoint)
    if not complete:
        return None, 0.0
    uri = storage.join(run_uri, step_dir(complete[-1]))
    if storage.exists(storage.join(uri, UNIVERSAL, COMMIT), endpoint):
        return complete[-1], 0.0
    began = time.time()
    marker = storage.join(uri, UNIVERSAL, STARTED)
    storage.write_bytes(marker, json.dumps({"fit": fit, "state": "running"}).encode(), endpoint)
    try:
        make_universal(uri, endpoint)
    except Exception:
        storage.write_bytes(marker, json.dumps({"fit": fit, "state": "failed"}).encode(), endpoint)
        raise
    return complete[-1], time.time() - began


class InBackground:
    """The driver's thread: the newest committed checkpoint's universal form, made once, while training goes on."""

    DUTY = 4.0  # wait this many times a conversion's length before the next

    def __init__(self, run_uri: str, endpoint, fit: float, poll_s: float = 2.0):
        self.run_uri, self.endpoint, self.fit, self.poll_s = run_uri, endpoint, fit, poll_s
        self.made: dict[int, float] = {}  # step → seconds its conversion took
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitray-universal", daemon=True)

    def __enter__(self) -> "InBackground":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # a conversion under way is left to finish or die with the driver: STARTED says whose
        self._thread.join(timeout=self.poll_s)

    def _run(self) -> None:
        pause = self.poll_s
        while not self._stop.wait(pause):
            try:
                step, seconds = convert_newest(self.run_uri, self.endpoint, self.fit)
            except Exception as e:  # e.g. Ray Train removed an old checkpoint mid-conversion: the next one will do
                logger.warning(f"universal checkpoint in the background: {e}")
                continue
            # At most a fifth of the driver's time converting: with frequent saves, converting every one would keep
            # a core busy (the elastic test's saves come every ~3 s and each conversion takes ~5 s here), and a
            # resize whose checkpoint missed its turn converts it itself, as before.
            pause = max(self.poll_s, self.DUTY * seconds)
            if step is not None and seconds:
                self.made[step] = seconds
                logger.info(f"{step_dir(step)}: universal form made in the background in {seconds:.1f} s")


def wait_for_background(checkpoint_uri: str, endpoint, fit: float, poll_s: float = 0.2) -> None:
    """Rank 0 of a resized group: wait while this fit's driver is still converting `checkpoint_uri` (converting it
    again beside it would write the same files twice); return at once when no conversion of this fit is under way."""
    marker, done = storage.join(checkpoint_uri, UNIVERSAL, STARTED), storage.join(checkpoint_uri, UNIVERSAL, COMMIT)
    while not storage.exists(done, endpoint) and storage.exists(marker, endpoint):
        started = json.loads(storage.read_bytes(marker, endpoint))
        if started.get("fit") != fit or started.get("state") != "running":
            return
        time.sleep(poll_s)
