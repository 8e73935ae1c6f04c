"""Overload rules without I/O: queue-delay control, LIFO, shedding, revoking, budgets.

The clock is injected; each case drives time by hand. The live behaviour (real sockets,
real workers) is in test_overload_live.py.
"""

from __future__ import annotations

import random

import pytest

from gaspar.dispatch import Dispatcher, WorkerSlot
from gaspar.overload import (
    DEADLINE,
    QUEUE_DELAY,
    QUEUE_FULL,
    QUEUE_TIMEOUT,
    ByteBudget,
    QueueControl,
    RetryBudget,
    backoff,
)


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def worker(n: int) -> WorkerSlot:
    return WorkerSlot(pid=1000 + n, number=n, generation=1, routing_id=b"w%d" % n)


def dispatcher(
    clock: Clock, workers: int = 2, prefetch: int = 0, mq: int = 0, **control
) -> tuple[Dispatcher, list[WorkerSlot]]:
    opts = {"queue_timeout": 2.0, "target": 0.005, "interval": 0.1}
    opts.update(control)
    d = Dispatcher(clock, prefetch=prefetch, control=QueueControl(clock=clock, **opts), max_queued=mq)
    ws = [worker(i + 1) for i in range(workers)]
    for w in ws:
        d.add_worker(w)
    return d, ws


def run_for(d: Dispatcher, clock: Clock, seconds: float, arrivals_per_s: float, service: float) -> dict:
    """Drive a dispatcher with fixed-rate arrivals and fixed service time, 1 ms steps.
    Returns counts of started and shed requests and the waits of the started ones."""
    step, t_end = 0.001, clock.now + seconds
    next_arrival = clock.now
    due = d.__dict__.setdefault("_test_due", {})  # worker -> (finish time, request), across runs
    started, waits, shed = 0, [], []

    def hand_out(assignments):
        nonlocal started
        for w, req in assignments:
            if w.current is req:
                due[w.routing_id] = (clock.now + service, req)
                started += 1
                waits.append(clock.now - req.queued_at)

    while clock.now < t_end:
        while next_arrival <= clock.now:
            _, a = d.submit(b"x", None)
            hand_out(a)
            next_arrival += 1.0 / arrivals_per_s
        for rid, (finish, req) in list(due.items()):
            if finish <= clock.now:
                del due[rid]
                _, a = d.complete(rid, req.id)
                hand_out(a)
        d.sweep(deadlines=True)
        shed += d.take_shed()
        clock.now += step
    return {"started": started, "waits": waits, "shed": shed}


# -- QueueControl ----------------------------------------------------------------------------


def test_a_burst_that_trickles_in_over_three_intervals_is_served_newest_first_not_shed():
    clock = Clock()
    q = QueueControl(queue_timeout=2.0, target=0.005, interval=0.1, workers=2, clock=clock)
    for ms in range(600):
        clock.now += 0.001
        if ms < 300:  # 1,000 requests over 300 ms, on a busy machine starting 1 per ms
            for _ in range(3):
                q.arrived(clock.now)
        q.started(clock.now)
        assert not q.overloaded(clock.now, 100)


def test_a_draining_burst_is_not_overload():
    clock = Clock()
    q = QueueControl(queue_timeout=2.0, target=0.005, interval=0.1, workers=2, clock=clock)
    for _ in range(1000):  # a thousand at once, then nothing more
        q.arrived(clock.now)
    for ms in range(400):
        clock.now += 0.001
        for _ in range(3):
            q.started(clock.now)
        assert not q.standing(clock.now, 1000 - 3 * ms)


def test_a_steady_closed_loop_is_not_overload():
    clock = Clock()
    q = QueueControl(queue_timeout=2.0, target=0.005, interval=0.1, workers=2, clock=clock)
    for _ in range(200):
        q.arrived(clock.now)  # 200 patient clients
    for _ in range(2000):  # each reply brings that client's next request
        clock.now += 0.001
        q.started(clock.now)
        q.arrived(clock.now)
        assert clock.now - 100.0 < 0.2 or not q.standing(clock.now, 198)


def test_sustained_growth_is_overload_within_two_intervals_and_ends_when_it_stops():
    clock = Clock()
    q = QueueControl(queue_timeout=2.0, target=0.005, interval=0.1, workers=2, clock=clock)
    first = shedding = None
    for ms in range(600):  # 2x: two arrivals for every start
        clock.now += 0.001
        q.arrived(clock.now)
        q.arrived(clock.now)
        q.started(clock.now)
        if first is None and q.standing(clock.now, 10):
            first = ms
        if shedding is None and q.overloaded(clock.now, 10):
            shedding = ms
    assert first is not None and 190 <= first <= 310  # newest first after two intervals
    assert shedding is not None and 390 <= shedding <= 510  # shedding after four
    for _ in range(300):  # shedding keeps the queue short; a moment empty does not end it
        clock.now += 0.001
        q.saw_empty(clock.now)
        q.arrived(clock.now)
        q.arrived(clock.now)
        q.started(clock.now)
        assert q.standing(clock.now, 1)
    for _ in range(200):  # 0.3x
        clock.now += 0.001
        q.started(clock.now)
        if random.random() < 0.3:
            q.arrived(clock.now)
    assert not q.standing(clock.now, 10)


@pytest.mark.parametrize(
    "service, workers, interval, target",
    [
        (0.0, 2, 0.1, 0.005),  # nothing measured yet: the settings
        (0.0001, 2, 0.1, 0.005),  # fast handlers: the settings
        (0.010, 2, 0.1, 0.010),  # 10 ms on 2 workers: target two runs per worker
        (0.050, 2, 0.25, 0.05),  # slow handlers: ten runs per worker before it is overload
        (1.0, 2, 5.0, 1.0),
        (10.0, 1, 100.0, 2.0),  # the target never exceeds queue_timeout
    ],
)
def test_thresholds_follow_the_handlers_speed(service, workers, interval, target):
    q = QueueControl(queue_timeout=2.0, target=0.005, interval=0.1, workers=workers, clock=Clock())
    q.observe(service)
    assert q.effective_interval() == pytest.approx(interval)
    assert q.effective_target() == pytest.approx(target)


def test_limit_is_queue_timeout_unless_overloaded():
    clock = Clock()
    q = QueueControl(queue_timeout=2.0, target=0.005, interval=0.1, workers=1, clock=clock)
    assert q.limit(clock.now, 5) == (2.0, QUEUE_TIMEOUT)
    clock.now += 0.2
    q.growing, q.window_start = 2, clock.now  # as if the last two intervals grew
    q._thresholds()
    assert q.standing(clock.now, 5) and q.limit(clock.now, 5) == (2.0, QUEUE_TIMEOUT)  # LIFO only
    q.growing = 4
    assert q.limit(clock.now, 5) == (0.005, QUEUE_DELAY)
    assert QueueControl(queue_timeout=0, clock=clock).limit(clock.now, 5) == (None, QUEUE_TIMEOUT)


def test_hopeless_and_retry_after():
    q = QueueControl(queue_timeout=2.0, workers=2, clock=Clock())
    assert q.hopeless(10.0, 10.0) and q.hopeless(10.0, 9.0)
    assert not q.hopeless(10.0, None) and not q.hopeless(10.0, 10.001)
    q.observe(0.1)
    assert q.hopeless(10.0, 10.05)  # closer than one handler run: cannot be met
    assert q.retry_after(0) == pytest.approx(0.1)
    assert q.retry_after(9) == pytest.approx(0.5)  # ten in line, two workers
    assert q.retry_after(10_000) == 2.0  # never past queue_timeout
    q.observe(0.2)
    assert 0.1 < q.service < 0.2  # a moving average


# -- the dispatcher under overload -------------------------------------------------------------


def test_fifo_while_not_overloaded_lifo_once_it_is():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1)
    d.control.observe = lambda seconds: None  # handlers too fast to matter
    first, [(_, running)] = d.submit(b"a", None)
    reqs = [d.submit(b"%d" % i, None)[0] for i in range(3)]
    _, [(_, nxt)] = d.complete(w1.routing_id, running.id)
    assert nxt is reqs[0]  # oldest first
    d.control.growing = 2
    clock.now += 0.11
    d.control.window_start = clock.now
    d.control._thresholds()
    newest = d.submit(b"new", None)[0]
    _, [(_, nxt2)] = d.complete(w1.routing_id, nxt.id)
    assert nxt2 is newest  # a standing, growing queue: newest first


def test_overloaded_queue_sheds_what_waited_past_the_target_oldest_first():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1)
    d.submit(b"running", None)
    old = [d.submit(b"%d" % i, None)[0] for i in range(5)]
    clock.now += 0.003
    young = d.submit(b"young", None)[0]
    d.control.growing = 4
    clock.now += 0.11 - 0.003
    d.control.window_start = clock.now
    d.control._thresholds()
    clock.now += 0.001
    d.sweep()
    shed = d.take_shed()
    assert [r for r, _ in shed] == old + [young]  # all waited past 5 ms
    assert {why for _, why in shed} == {QUEUE_DELAY}
    assert d.queued == 0 and set(d.pending) == {next(iter(d.pending))}
    assert d.counters.shed == 6 and d.counters.shed_queue_delay == 6


def test_queue_timeout_bounds_any_wait():
    clock = Clock()
    d, _ = dispatcher(clock, workers=1, queue_timeout=0.5)
    d.submit(b"running", None)
    waiting = d.submit(b"w", None)[0]
    clock.now += 0.4
    d.sweep()
    assert d.take_shed() == []
    clock.now += 0.2
    d.sweep()
    assert d.take_shed() == [(waiting, QUEUE_TIMEOUT)]
    assert waiting.id not in d.pending


def test_max_queued_sheds_the_oldest():
    clock = Clock()
    d, _ = dispatcher(clock, workers=1, mq=2)
    d.submit(b"running", None)
    a, b = d.submit(b"a", None)[0], d.submit(b"b", None)[0]
    c = d.submit(b"c", None)[0]
    assert d.take_shed() == [(a, QUEUE_FULL)]
    assert d.queued == 2 and b.id in d.pending and c.id in d.pending


def test_a_deadline_that_passes_in_the_queue_is_shed_and_bounds_a_running_request():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1)
    running, [(_, r)] = d.submit(b"running", None, timeout=30.0, deadline=0.5)
    assert running.deadline == pytest.approx(clock.now + 0.5)  # sooner than the handler timeout
    queued = d.submit(b"q", None, deadline=0.2)[0]
    clock.now += 0.25
    d.sweep(deadlines=True)
    assert d.take_shed() == [(queued, DEADLINE)]
    clock.now += 0.3
    assert d.expire() == [running]  # past its client's deadline: a timeout


def test_a_deadline_that_cannot_be_met_is_shed_before_it_runs():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1)
    d.control.observe(0.2)  # handlers take 200 ms
    running = d.submit(b"running", None)[0]
    short = d.submit(b"s", None, deadline=0.1)[0]
    fine = d.submit(b"f", None, deadline=5.0)[0]
    _, more = d.complete(w1.routing_id, running.id)
    assert more == [(w1, fine)]
    assert d.take_shed() == [(short, DEADLINE)]


def test_a_cancelled_request_handed_ahead_is_revoked_and_skipped():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1, prefetch=2)
    running = d.submit(b"running", None)[0]
    a = d.submit(b"a", None)[0]
    b, assigned = d.submit(b"b", None)
    assert assigned == [(w1, a)] and list(w1.ahead) == [a]  # a handed ahead
    d.cancel(a)
    assert d.take_cancels() == [(w1, a)]
    done, more = d.complete(w1.routing_id, running.id)
    assert done is running and w1.current is a
    assert d.expire() == []  # a revoked request is never timed out: it will be skipped
    skipped, more = d.complete(w1.routing_id, a.id, ran=False)
    assert skipped is None and more == [(w1, b)]  # the client is gone: nothing to answer
    assert d.counters.skipped == 1 and d.counters.completed == 1 and w1.handled == 1
    assert a.id not in d.pending


def test_a_handed_ahead_request_past_its_deadline_is_revoked_then_answered_as_shed():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1, prefetch=2)
    running = d.submit(b"running", None)[0]
    a = d.submit(b"a", None, deadline=0.2)[0]
    d.submit(b"b", None)
    assert list(w1.ahead) == [a]
    clock.now += 0.3
    d.sweep(deadlines=True)
    assert d.take_cancels() == [(w1, a)] and a.revoked == DEADLINE
    d.complete(w1.routing_id, running.id)
    skipped, _ = d.complete(w1.routing_id, a.id, ran=False)
    assert skipped is a  # the caller answers it Overloaded(deadline)
    assert d.counters.shed_deadline == 1
    # had the worker started it before the cancel arrived, its real reply would be delivered
    c = d.submit(b"c", None, deadline=0.2)[0]
    d.submit(b"d", None)
    d.submit(b"e", None)
    clock.now += 0.3
    d.sweep(deadlines=True)
    raced = [r for _, r in d.take_cancels()]
    for req in [w1.current, *w1.ahead]:
        done, _ = d.complete(w1.routing_id, req.id)
        if req is c:
            assert done is c and c in raced


def test_a_worker_that_dies_gives_back_revoked_work_without_running_it():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1, prefetch=2)
    d.submit(b"running", None)
    a = d.submit(b"a", None)[0]
    b = d.submit(b"b", None)[0]
    d.cancel(a)
    d.remove_worker(w1.routing_id)
    assert a.id not in d.pending and b.id in d.pending and d.queued == 1


def test_map_is_empty_after_a_random_overload_run():
    clock = Clock()
    d, ws = dispatcher(clock, workers=2, prefetch=3, mq=50)
    rng = random.Random(11)
    live = []
    for _ in range(3000):
        clock.now += rng.random() * 0.004
        if rng.random() < 0.6:
            req, _ = d.submit(b"x", None, deadline=rng.choice([None, 0.05, 1.0]))
            live.append(req)
        if rng.random() < 0.15 and live:
            d.cancel(rng.choice(live))
        for w in ws:
            if w.current is not None and rng.random() < 0.5:
                d.complete(w.routing_id, w.current.id, ran=not w.current.revoked)
        d.sweep(deadlines=rng.random() < 0.1)
        d.take_shed()
        d.take_cancels()
        for req in d.expire():
            req.worker.retiring = False
            d._idle[req.worker.routing_id] = req.worker
    for _ in range(200):
        clock.now += 1.0
        for w in ws:
            if w.current is not None:
                d.complete(w.routing_id, w.current.id, ran=not w.current.revoked)
        d.sweep(deadlines=True)
        d.take_shed()
    assert d.pending == {} and d.queued == 0
    assert all(w.current is None and not w.ahead for w in ws)


def test_simulated_2x_and_10x_overload_keep_the_workers_on_fresh_requests():
    for rate in (400, 2000):  # 10 ms handlers on 2 workers: capacity 200/s
        clock = Clock()
        d, _ = dispatcher(clock, workers=2, mq=10_000)
        result = run_for(d, clock, 3.0, rate, 0.010)
        assert result["started"] >= 0.95 * 200 * 3.0  # the workers never idle
        waits = sorted(result["waits"])
        late = waits[int(len(waits) * 0.99)]
        assert late < 0.25, f"p99 wait {late * 1000:.0f} ms at {rate}/s"
        assert waits[len(waits) // 2] < 0.02  # newest first: most start at once
        assert d.queued < 50  # the queue is kept short, not a backlog of stale work


def test_simulated_burst_then_light_load_recovers_at_once():
    clock = Clock()
    d, _ = dispatcher(clock, workers=2, mq=10_000)
    run_for(d, clock, 2.0, 2000, 0.010)
    after = run_for(d, clock, 2.0, 60, 0.010)
    waits = sorted(after["waits"])
    assert waits[int(len(waits) * 0.9)] < 0.05


# -- retry budget, back-off, byte budget --------------------------------------------------------


def test_retry_budget_allows_about_one_retry_in_ten_requests():
    b = RetryBudget()
    retries = 0
    for _ in range(1000):
        b.on_request()
        retries += b.try_retry()  # every request refused: the worst case
    assert 95 <= retries <= 102


@pytest.mark.parametrize(
    "retry_after, left, lo, hi",
    [
        (0.1, None, 0.05, 0.15),
        (0.1, 10.0, 0.05, 0.15),
        (0.0, None, 0.0025, 0.0075),  # at least 5 ms, jittered
        (30.0, None, 0.5, 1.5),  # never more than 1 s, jittered
    ],
)
def test_backoff_is_jittered_around_retry_after(retry_after, left, lo, hi):
    delays = [backoff(retry_after, left, rng=random.Random(i).random) for i in range(200)]
    assert all(lo <= x <= hi for x in delays)
    assert len({round(x, 6) for x in delays}) > 100


def test_backoff_gives_up_when_the_time_left_would_not_cover_it():
    assert backoff(0.5, 0.6, rng=lambda: 0.5) is None
    assert backoff(0.1, 0.25, rng=lambda: 0.5) == pytest.approx(0.1)


def test_byte_budget_waiters_go_in_arrival_order():
    b = ByteBudget(100)
    assert b.take("a", 60)
    assert not b.take("b", 50)  # waits
    assert not b.take("c", 10)  # fits, but must not overtake b
    b.add(5)  # bytes already held (a reply) count, beyond any wait
    assert b.used == 65
    assert b.release(60) == ["b", "c"]  # both fit now, in order
    assert not b.take("c", 10)  # still behind b
    assert b.take("b", 50) and b.take("c", 10)
    assert b.used == 65 and b.waiting == 0 and b.peak == 65


def test_byte_budget_forgets_a_waiter_that_left():
    b = ByteBudget(10)
    b.take("a", 10)
    b.take("b", 8)
    b.take("c", 2)
    assert b.forget("b") == []
    assert b.release(10) == ["c"]


def test_byte_budget_room_stops_every_reader_past_the_limit_in_turn():
    b = ByteBudget(10)
    assert b.room("a")
    b.add(12)  # small requests read whole may go past the limit
    assert not b.room("a") and not b.room("b")
    assert b.release(3) == ["a"]  # one byte of room: the first in line reads again
    assert not b.room("b")  # behind a, and no room left for it
    assert b.room("a") and b.room("b") and b.waiting == 0
