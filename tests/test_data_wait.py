"""`data_wait`: the share of step time the workers spent waiting for their next batch, and the data-bound warning."""
import time

import pytest

from vitray.train.metrics import DATA_BOUND, MetricsLog, data_bound_message
from vitray.train.waits import WaitWatch

pytestmark = pytest.mark.quick


def test_the_watch_adds_up_the_time_spent_waiting():
    watch = WaitWatch(0, "data")
    with watch:
        time.sleep(0.05)
    time.sleep(0.05)  # outside: not counted
    with watch:
        time.sleep(0.05)
    assert 0.1 <= watch.waited_s < 0.15


def test_each_line_carries_the_data_wait_and_says_when_data_bound(caplog):
    log = MetricsLog("unused", None, world_size=2, total_steps=10, global_batch=8, train_flops_per_image=1.0,
                     peak_flops=1.0, peak_source="test", start_step=0, write=False)
    log.t_window -= 2.0  # the last two seconds held the steps
    row = log.record(2, 1.0, 0.1, data_wait_s=(0.1, 0.3))
    assert row["data_wait"] == pytest.approx(0.05, rel=0.01) and row["data_wait_max"] == pytest.approx(0.15, rel=0.01)
    log.write, log.last_upload = True, time.perf_counter()  # rank 0 logs its lines (and uploads none now)
    log.t_window -= 2.0
    with caplog.at_level("INFO", logger="vitray"):
        log.record(4, 1.0, 0.1, data_wait_s=(0.5, 0.6))
        log.record(6, 1.0, 0.1, data_wait_s=(0.0, 0.0))
    assert "data wait 25% (data-bound)" in caplog.records[0].getMessage() and DATA_BOUND <= 0.25
    assert "data-bound" not in caplog.records[1].getMessage()
    assert data_bound_message(0.25, 0.3).startswith("data-bound: the workers waited for their next batch 25% of")
