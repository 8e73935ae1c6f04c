"""The front end's figures without I/O: histograms, outcomes, per-worker figures."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import CpuHog

from gaspar.ops.procstat import CpuWaits, cpu_wait, proc_usage
from gaspar.ops.telemetry import BUCKETS, OUTCOMES, RESTART_REASONS, Histogram, Telemetry


def test_histogram_buckets_are_cumulative_and_end_with_inf():
    h = Histogram()
    for v in (0.0005, 0.001, 0.002, 0.3, 400.0):
        h.observe(v)
    cum = dict(h.cumulative())
    assert cum[0.001] == 2  # le: the bound itself is inside
    assert cum[0.0025] == 3 and cum[0.5] == 4 and cum[300.0] == 4 and cum[float("inf")] == 5
    assert h.count == 5 and h.sum == pytest.approx(400.3035)
    assert BUCKETS[0] == 0.001 and BUCKETS[-1] == 300.0


@pytest.mark.parametrize(
    "values, q, lo, hi",
    [
        ([0.0015] * 100, 0.5, 0.001, 0.0025),
        ([0.0015] * 99 + [9.0], 0.5, 0.001, 0.0025),
        ([0.0015] * 98 + [9.0] * 2, 0.99, 5.0, 10.0),
        ([1000.0], 0.5, 300.0, 300.0),  # past the largest bucket: the bound
    ],
)
def test_histogram_quantiles_land_in_the_right_bucket(values, q, lo, hi):
    h = Histogram()
    for v in values:
        h.observe(v)
    assert lo <= h.quantile(q) <= hi


def test_an_empty_histogram_has_no_quantile():
    assert Histogram().quantile(0.5) is None
    snap = Histogram().snapshot()
    assert snap["count"] == 0 and snap["p99"] is None and snap["buckets"][-1] == ["+Inf", 0]


def test_telemetry_counts_each_outcome_and_each_worker():
    t = Telemetry()
    assert set(t.outcomes) == set(OUTCOMES) and set(t.restarts) == set(RESTART_REASONS)
    t.replied(1, True, 0.010, 0.009, 0.001, 0.012)
    t.replied(1, False, 0.020, 0.019, 0.002, 0.023)
    t.replied(2, True, 0.030, 0.001, 0.0, 0.031)
    t.ended("shed", 0.2, 0.2)
    t.ended("worker_died", None, 1.0)
    t.outcome("client_gone", 3)
    t.restarted(1, "died")
    t.restarted(None, "died")
    snap = t.snapshot()
    assert snap["outcomes"] == {**dict.fromkeys(OUTCOMES, 0), "ok": 2, "error": 1, "shed": 1, "worker_died": 1,
                                "client_gone": 3}  # fmt: skip
    assert snap["restarts_by_reason"]["died"] == 2
    hist = snap["histograms"]
    assert hist["handler_duration_seconds"]["count"] == 3
    assert hist["queue_wait_seconds"]["count"] == 4  # replies and the shed one
    assert hist["request_duration_seconds"]["count"] == 5
    w1 = t.worker(1).snapshot()
    assert w1["requests"] == 2 and w1["errors"] == 1 and w1["restarts"] == 1
    assert w1["handler_avg_ms"] == pytest.approx(15.0) and w1["handler_p99_ms"] == pytest.approx(20.0)
    assert w1["handler_cpu_seconds"] == pytest.approx(0.028)


def test_proc_usage_of_this_process_and_of_one_that_is_gone():
    cpu, rss, started = proc_usage(os.getpid())
    assert cpu > 0 and rss > 1 << 20 and started > 1e9
    assert proc_usage(2**22 + 12345) is None


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="Linux's schedstat")
def test_cpu_wait_is_the_time_ready_to_run_without_a_cpu_and_a_threads_share_outlives_it():
    """A thread and a spinning process pinned to one CPU each wait for it about half the
    time; the process's wait, over all its threads, keeps the ended thread's share."""
    cpu = min(os.sched_getaffinity(0))
    waits = CpuWaits()
    before = waits.read(os.getpid())

    spun, counted = threading.Event(), threading.Event()

    def spin(seconds: float) -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        spun.set()
        counted.wait(10)  # alive until read: a thread seen by no read is not counted

    with CpuHog(cpu) as hog:
        hog_before = cpu_wait(hog.pid)
        spinner = threading.Thread(target=spin, args=(0.6,))
        spinner.start()
        assert spun.wait(10)
        during = waits.read(os.getpid())
        hog_after = cpu_wait(hog.pid)
        counted.set()
        spinner.join(10)
    assert during - before >= 0.1, (before, during)  # about 0.3 s
    assert hog_after - hog_before >= 0.1, (hog_before, hog_after)
    assert waits.read(os.getpid()) >= during  # the spinning thread has ended: still counted
    assert cpu_wait(hog.pid) is None and CpuWaits().read(hog.pid) is None  # gone


def test_a_histogram_comes_back_from_its_snapshot_and_two_give_what_came_between():
    h = Histogram()
    for v in (0.0005, 0.02, 3.0):
        h.observe(v)
    earlier = Histogram.from_snapshot(h.snapshot())
    assert earlier.counts == h.counts and earlier.count == 3 and earlier.sum == pytest.approx(h.sum)
    for v in (0.02, 0.03):
        h.observe(v)
    between = Histogram.from_snapshot(h.snapshot()).minus(earlier)
    assert between.count == 2 and sum(between.counts) == 2 and between.sum == pytest.approx(0.05)
    assert earlier.minus(Histogram.from_snapshot(h.snapshot())) is None  # counts went down: a restart
    assert h.minus(Histogram([1.0, 2.0])) is None  # other buckets
