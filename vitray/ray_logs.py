"""What reaches the terminal from Ray's processes: vitray's own lines, warnings that matter, the summary.

Ray Data logs every dataset execution (its start, plan and end) at INFO to the console of whichever process runs
it — each Train worker, the split coordinator — which was 64 of the smoke run's 156 lines. Ray's own setting for
this is a logging config file named by RAY_DATA_LOGGING_CONFIG; ours (`ray_data_logging.yaml`, beside this file)
keeps Ray Data's full log in the session's `logs/ray-data/` and sends only warnings and errors to the console.
`setup_worker` points every Ray process at it (Ray's `worker_process_setup_hook`, set by `session.init_ray`), on
every node, from the vitray package installed there.

Two lines have no Ray setting of their own: Ray Train's controller logs a C++ error about its PreemptionWatcher
actor at every worker-group start (harmless: ray-project/ray#53727; the watcher itself is what reports preempted
nodes, so it stays on in clusters; a local Ray starts none, `session.LOCAL_ONLY`), and DeepSpeed calls a torch
collective torch has deprecated. The first stays in the controller's own log file in the session's `logs/`;
`quiet_driver` drops only its copy on the driver's terminal. The second is a Python warning, filtered by message in
the workers.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml")
HOOK = "vitray.ray_logs.setup_worker"


DRIVER_DROPS = ("Actor with class name: 'PreemptionWatcher'",)


def setup_worker() -> None:
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", CONFIG)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


class _DropLines:
    """A text stream that passes every line through except those containing one of `drops` (whole lines only:
    text is held until its newline)."""

    def __init__(self, stream, drops: tuple[str, ...]):
        self._stream, self._drops, self._pending = stream, drops, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not any(d in line for d in self._drops):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:  # a partial line (a progress bar's "\r" update) is not held back past a flush
        if self._pending and not any(d in self._pending for d in self._drops):
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...: the real stream's
        return getattr(self._stream, name)


def quiet_driver() -> None:
    """Drop the known-harmless lines Ray forwards from its processes to this driver's terminal (once)."""
    if not isinstance(sys.stderr, _DropLines):
        sys.stderr = _DropLines(sys.stderr, DRIVER_DROPS)


class DropNotices(logging.Filter):
    """Ray Data warnings that are advice about its own display, not about the run."""

    NOTICES = ("Progress bars disabled",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)
