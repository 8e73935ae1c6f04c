"""Overload rules without I/O: queue-delay control, LIFO, shedding, revoking, budgets.

The clock is injected; each case drives time by hand. The live behaviour (real sockets,
real workers) is in test_overload_live.py.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gaspar.core.admission import BodyClock, ByteBudget, Stall
from gaspar.core.dispatch import Dispatcher
from gaspar.core.overload import DEADLINE, QUEUE_DELAY, QUEUE_FULL, QUEUE_TIMEOUT, QueueControl
from gaspar.core.records import WorkerSlot
from gaspar.retry import RetryBudget, backoff


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


def drive(q: QueueControl, clock: Clock, ms: int, arrive, start, queue=None):
    """Drive ``q`` with a FIFO queue of arrival times in 1 ms steps: ``arrive(t)`` requests
    join it and ``start(t)`` leave it for a worker in millisecond ``t``. Returns the queue
    and the first millisecond at which ``q`` said overloaded (None: never)."""
    queue = deque() if queue is None else queue
    became = None
    for t in range(ms):
        clock.now += 0.001
        for _ in range(arrive(t)):
            queue.append(clock.now)
        for _ in range(min(start(t), len(queue))):
            queue.popleft()
        q.check(clock.now, clock.now - queue[0] if queue else 0.0, len(queue))
        if became is None and q.overloaded:
            became = t
    return queue, became


def control(clock: Clock, **kw) -> QueueControl:
    opts = {"queue_timeout": 2.0, "target": 0.005, "interval": 0.1, "workers": 2}
    opts.update(kw)
    return QueueControl(clock=clock, **opts)


@pytest.mark.parametrize(
    "case, arrive, start, ms, overloaded",
    [
        # a thousand at once, drained at 3 a millisecond: it stands for 333 ms but drains
        ("a burst that drains", lambda t: 1000 if t == 0 else 0, lambda t: 3, 600, False),
        # a thousand over 50 ms, faster than it drains, then drained: not for a whole interval
        ("a burst shorter than the interval", lambda t: 20 if t < 50 else 0, lambda t: 3, 600, False),
        # ten thousand at once, drained in 3.3 s: slower than queue_timeout allows
        ("a burst too long to drain in time", lambda t: 10_000 if t == 0 else 0, lambda t: 3, 400, True),
        # 2x capacity, sustained
        ("sustained growth", lambda t: 2, lambda t: 1, 400, True),
        # 200 closed-loop clients: each reply brings that client's next request, the queue
        # holds steady at 198 and each request waits 99 ms: a standing queue
        ("a steady closed loop", lambda t: 200 if t == 0 else 2, lambda t: 2, 400, True),
        # below capacity, with bursts of a few: the queue empties all the time
        ("light load", lambda t: 3 if t % 10 == 0 else 0, lambda t: 1, 2000, False),
    ],
)
def test_overload_is_a_minimum_queue_delay_above_target_for_an_interval(case, arrive, start, ms, overloaded):
    clock = Clock()
    q = control(clock)
    _, became = drive(q, clock, ms, arrive, start)
    assert (became is not None) == overloaded, case
    if overloaded:
        assert became >= 100, f"{case}: overloaded after {became} ms, before a whole interval"


def test_overload_starts_an_interval_after_the_delay_passed_the_target():
    clock = Clock()
    q = control(clock)
    _, became = drive(q, clock, 400, lambda t: 2, lambda t: 1)
    assert 100 <= became <= 115  # the oldest waits 5 ms after 10 ms; an interval later
    assert q.limit() == (0.1, QUEUE_DELAY) and q.standing


def test_overload_ends_after_an_interval_with_no_request_past_the_target():
    clock = Clock()
    q = control(clock)
    q.check(clock.now, 0.010, 50)
    clock.now += 0.101
    q.check(clock.now, 0.010, 60)
    assert q.overloaded and q.episodes == 1
    assert q.limit() == (0.1, QUEUE_DELAY)  # shed what waited a whole interval
    for _ in range(300):  # shedding keeps the queue short; a moment empty does not end it
        clock.now += 0.001
        q.check(clock.now, 0.0, 0)
        clock.now += 0.001
        q.check(clock.now, 0.006, 3)
        assert q.overloaded
    for ms in range(150):  # light load: nothing waits past the target
        clock.now += 0.001
        q.check(clock.now, 0.001 if ms % 2 else 0.0, 1)
        if ms < 99:
            assert q.overloaded
    assert not q.overloaded and not q.standing
    assert q.limit() == (2.0, QUEUE_TIMEOUT)


def test_a_dip_below_the_target_starts_the_interval_again():
    clock = Clock()
    q = control(clock)
    for ms in range(500):
        clock.now += 0.001
        q.check(clock.now, (ms % 90) / 1000, 100)  # caught up once every 90 ms
        assert not q.overloaded


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
    assert q.limit() == (2.0, QUEUE_TIMEOUT)
    q.overloaded = True
    assert q.limit() == (0.1, QUEUE_DELAY)
    assert QueueControl(queue_timeout=0, clock=clock).limit() == (None, QUEUE_TIMEOUT)


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
    clock.now += 0.004
    newest = d.submit(b"new", None)[0]
    d.control.overloaded = True  # (when it is: test_overload_is_a_minimum_queue_delay_...)
    d.control._target = 1.0  # shed nothing here: only the order is under test
    _, [(_, nxt2)] = d.complete(w1.routing_id, nxt.id)
    assert nxt2 is newest  # overloaded: newest first


def test_overloaded_queue_sheds_what_waited_a_whole_interval_oldest_first():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1)
    d.submit(b"running", None)
    old = [d.submit(b"%d" % i, None)[0] for i in range(5)]
    clock.now += 0.003
    young = d.submit(b"young", None)[0]
    d.control.overloaded = True
    clock.now += 0.094
    d.sweep()
    assert d.take_shed() == []  # past the target, not yet a whole interval
    clock.now += 0.0085
    d.sweep()
    shed = d.take_shed()
    assert [r for r, _ in shed] == old + [young]  # all waited past 100 ms
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
    assert running.answer_by == pytest.approx(clock.now + 0.5)  # sooner than the handler timeout
    assert running.deadline == pytest.approx(clock.now + 30.0)  # the operator's: its worker is killed then
    queued = d.submit(b"q", None, deadline=0.2)[0]
    clock.now += 0.25
    d.sweep(deadlines=True)
    assert d.take_shed() == [(queued, DEADLINE)]
    clock.now += 0.3
    assert d.expire() == ([running], [])  # past its client's deadline: answered, not killed
    assert running.expired == "deadline" and w1.current is running and not w1.retiring


def test_pipelined_bursts_that_drain_are_not_overload_though_their_share_stays_full():
    """Sixteen connections pipeline 64 requests each: the queue holds each one's share (2),
    the rest wait behind their own, so the queue's length stays at 32 while the burst
    drains; counted with those held, the burst is seen shrinking and is left to drain
    (within queue_timeout), none shed."""
    clock = Clock()
    d, workers = dispatcher(clock, workers=2)
    running = {}
    for c in range(16):
        for i in range(64):
            for w, req in d.submit(b"%d" % i, None, owner=f"conn{c}")[1]:
                running[w.routing_id] = req
    assert d.queued == 32 and d.held == 1024 - 32 - 2
    done = 0
    while running:
        clock.now += 0.0004  # 0.4 ms a request on each worker: 0.2 s for the burst
        for rid, req in list(running.items()):
            _, more = d.complete(rid, req.id)
            done += 1
            del running[rid]
            for w, nxt in more:
                running[w.routing_id] = nxt
        d.sweep(deadlines=True)
    assert done == 1024 and d.take_shed() == [] and d.control.episodes == 0


def test_a_deadline_that_cannot_be_met_is_shed_before_it_runs():
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1)
    d.control.observe(0.2)  # handlers take 200 ms
    running = d.submit(b"running", None)[0]
    short = d.submit(b"s", None, deadline=0.1)[0]
    fine = d.submit(b"f", None, deadline=5.0)[0]
    d.sweep(deadlines=True)  # the front end's, every 0.1 s: while it waits
    assert d.take_shed() == [(short, DEADLINE)]
    _, more = d.complete(w1.routing_id, running.id)
    assert more == [(w1, fine)]


def test_slow_runs_do_not_make_every_short_deadline_hopeless_on_an_idle_pool():
    """A client that chose slow inputs took the typical run to 14 s; the pool is idle again.
    A request with a 3 s deadline is run (it would be interrupted at its deadline anyway),
    not refused as hopeless, and the runs bring the typical run back down; queued behind
    a busy worker, the same request is shed as hopeless."""
    clock = Clock()
    d, (w1,) = dispatcher(clock, workers=1)
    d.control.observe(14.0)
    req, assigned = d.submit(b"quick", None, deadline=3.0)
    assert assigned == [(w1, req)] and d.take_shed() == []
    clock.now += 0.002
    for _ in range(20):
        _, more = d.complete(w1.routing_id, w1.current.id)
        assert more == []
        req, assigned = d.submit(b"quick", None, deadline=3.0)
        assert assigned == [(w1, req)]
        clock.now += 0.002
    assert d.control.service < 3.0  # it learns from the runs
    d.control.observe(14.0)
    d.control.observe(14.0)
    queued = d.submit(b"queued", None, deadline=3.0)[0]  # w1 is busy: it waits
    d.sweep(deadlines=True)
    assert d.take_shed() == [(queued, DEADLINE)]


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
    assert d.expire() == ([], [])  # a revoked request is never timed out: it will be skipped
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
        for req in d.expire()[1]:
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
        assert d.queued < rate * 0.1 * 1.1  # at most an interval's arrivals: no backlog of stale work


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


def test_byte_budget_counts_bytes_as_they_arrive_and_reads_never_pass_the_limit():
    b = ByteBudget(100, reserve=10)
    assert b.room("a") == 100
    b.arrived("a", 60)
    assert b.room("b") == 40  # what is left, never more
    b.arrived("b", 40)
    assert b.room("c") == 0 and b.room("a") == 0  # full: both wait, in order
    b.add(5)  # a reply is counted, never refused
    assert b.used == 105 and b.peak == 105
    assert b.release(10) == ["c", "a"]
    assert b.room("a") == 0  # behind c
    assert b.room("c") == 5 and b.room("a") == 5 and b.waiting == 0


def test_byte_budget_is_over_while_unsent_replies_hold_the_limit_less_its_reserve():
    b = ByteBudget(100, reserve=10)
    b.arrived("a", 50)  # request bytes never make it over, however many
    b.arrived("b", 50)
    assert not b.over and b.room("c") == 0 and b.pressed  # c waits: pressure
    b.release(100)
    assert b.ready() == ["c"]
    b.forget("c")
    assert not b.pressed
    b.reply(89)
    assert not b.over and not b.pressed
    b.reply(1)  # 90 of 100 unsent: no request may start (Dispatcher(memory=))
    assert b.over and b.pressed and b.replies == 90 and b.used == 90
    assert b.release(5, replies=5) == [] and not b.over  # written to a client
    b.reply(20)
    assert b.over and b.used == 105  # counted, never refused
    b.release(105, replies=105)  # the connections were reset
    assert b.used == 0 and b.replies == 0 and not b.over


def test_byte_budget_says_when_to_give_memory_back_once_a_burst_is_over():
    b = ByteBudget(1000)
    assert not b.trim_due(100)  # nothing freed yet
    b.add(300)
    b.release(200)
    assert not b.trim_due(100)  # 100 bytes still held: not over
    b.release(100)
    assert b.trim_due(100)  # 300 freed, nothing held
    assert not b.trim_due(100)  # once per burst
    b.add(50)
    b.release(50)
    assert not b.trim_due(100)  # a small one does not count
    b.add(60)
    b.release(60)
    assert b.trim_due(100)  # 110 freed since the last


def test_byte_budget_names_admitted_bodies_too_slow_for_those_waiting_behind_them():
    """Only while a body waits for admission, and only after the grace: an admitted body
    that arrived slower than the rate on average since its admission is a laggard."""
    now = [0.0]
    b = ByteBudget(1000, reserve=100, clock=lambda: now[0])
    assert b.admit("slow", 400) and b.admit("fast", 400)
    now[0] = 5.0
    b.arrived("slow", 40)  # 8 bytes/s
    b.arrived("fast", 300)  # 60 bytes/s
    assert b.laggards(now[0], rate=50, grace=2) == []  # nobody waits
    assert not b.admit("next", 300)  # 800 committed, 100 reserved: it waits
    assert b.laggards(now[0], rate=50, grace=10) == []  # within the grace
    assert b.laggards(now[0], rate=50, grace=2) == ["slow"]
    assert b.laggards(now[0], rate=0, grace=2) == []  # off
    b.forget("slow")  # reset: its commitment freed, the waiting body goes in
    assert b.ready() == ["next"] and b.admit("next", 300)
    assert b.laggards(now[0], rate=50, grace=2) == [] and "slow" not in b._since


def test_byte_budget_admits_a_body_only_when_the_rest_of_it_fits():
    b = ByteBudget(100, reserve=10)
    b.arrived("x", 20)  # first chunks, counted as they came
    b.arrived("y", 20)
    assert b.admit("x", 40)  # 20 + 20 + 40 <= 100: the rest of x is committed
    assert b.committed == 40 and b.room("z") == 20  # others may not use x's commitment
    assert b.room("x") == 60  # x may
    assert not b.admit("y", 40)  # 40 used + 40 committed + 40 > 100 - 10 (the reserve)
    assert b.waiting == 1 and b.room("z") == 20  # small requests still read
    b.arrived("x", 40)  # x's commitment turns into use as it arrives
    assert b.committed == 0 and b.used == 80
    assert b.settle("x") == []  # whole: nothing was left of its commitment
    assert b.release(60) == ["y"]  # x answered: y fits now
    assert b.admit("y", 40) and b.committed == 40


def test_byte_budget_the_first_body_in_line_goes_even_past_the_reserve():
    b = ByteBudget(100, reserve=50)
    assert b.admit("big", 100)  # as large as the limit, nothing else committed: it goes
    assert b.room("big") == 100 and b.room("small") == 0


def test_byte_budget_admission_is_in_arrival_order():
    b = ByteBudget(100, reserve=0)
    assert b.admit("a", 80)
    assert not b.admit("b", 50) and not b.admit("c", 10)  # c would fit, but b is first
    assert b.settle("a") == ["b", "c"] or b.forget("a") == ["b", "c"]
    assert b.admit("b", 50) and b.admit("c", 10)


def test_byte_budget_forgets_a_connection_that_left():
    b = ByteBudget(100, reserve=0)
    b.arrived("a", 50)
    assert b.admit("a", 50)
    assert not b.admit("b", 10) and b.room("c") == 0
    assert b.forget("a") == ["b", "c"]  # its commitment is freed (its bytes by the caller)
    assert b.committed == 0
    b.release(50)
    assert b.admit("b", 10) and b.room("c") == 90


def test_byte_budget_an_admitted_body_never_waits_behind_readers_it_does_not_need():
    b = ByteBudget(100, reserve=0)
    b.arrived("a", 10)
    assert b.admit("a", 80)
    b.arrived("s", 10)  # a small request took the last free byte others may use
    assert b.room("t") == 0  # t waits in line
    assert b.room("a") == 80  # a's bytes are committed: it does not queue behind t


class BudgetMachine(RuleBasedStateMachine):
    """The byte budget driven at random as connections drive it: reads only what ``room``
    gives, bodies admitted after their first chunk, bytes freed when requests end."""

    def __init__(self):
        super().__init__()
        self.b = ByteBudget(1000, reserve=100)
        self.held = {}  # who -> bytes it counted
        self.body = {}  # who -> bytes of its body still to come, once admitted

    @rule(who=st.sampled_from("abcdef"), want=st.integers(1, 300))
    def read(self, who, want):
        n = min(want, self.b.room(who))
        if n > 0:
            if who in self.body:
                n = min(n, max(1, self.body[who]))
                self.body[who] = max(0, self.body[who] - n)
            self.b.arrived(who, n)
            self.held[who] = self.held.get(who, 0) + n

    @rule(who=st.sampled_from("abcdef"), rest=st.integers(1, 900))
    def admit(self, who, rest):
        if who not in self.body and self.b.admit(who, rest):
            self.body[who] = rest

    @rule(who=st.sampled_from("abcdef"))
    def finish(self, who):
        self.b.settle(who)
        self.body.pop(who, None)
        self.b.release(self.held.pop(who, 0))

    @rule(who=st.sampled_from("abcdef"))
    def leave(self, who):
        self.b.forget(who)
        self.body.pop(who, None)
        self.b.release(self.held.pop(who, 0))

    @invariant()
    def reads_never_pass_the_limit(self):
        assert self.b.used <= self.b.limit
        assert self.b.used == sum(self.held.values())

    @invariant()
    def commitments_are_what_admitted_bodies_still_need(self):
        assert self.b.committed == sum(self.body.values())
        assert self.b.used + self.b.committed <= self.b.limit or not self.body

    @invariant()
    def an_admitted_body_can_always_finish(self):
        for rest in self.body.values():
            assert rest == 0 or self.b.limit - self.b.used >= min(rest, 1)


test_byte_budget_state_machine = BudgetMachine.TestCase
test_byte_budget_state_machine.settings = hyp_settings(max_examples=60, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize(
    "case, arrivals, alive",
    [
        # (seconds, bytes) arriving; whether the request is still alive at the end (10 s
        # windows, at least 100 B/s: 1,000 bytes a window)
        ("fast", [(0, 500), (1, 5000)], True),
        ("a trickle: a byte every two seconds", [(t * 2.0, 1) for t in range(8)], False),
        ("slow but steady", [(t, 150) for t in range(25)], True),
        ("a burst, then a trickle", [(0, 5000), *[(1 + t * 2.0, 1) for t in range(12)]], False),
        ("the rest of it, however small, in time", [(0, 10), (9.0, 90)], True),
    ],
)
def test_body_clock_resets_a_request_that_arrives_too_slowly(case, arrivals, alive):
    c = BodyClock(timeout=10.0, min_rate=100)
    total = 100 if case.startswith("the rest") else 1 << 30
    got, ok = 0, True
    for t, n in arrivals:
        got += n
        ok = ok and c.arrived(100.0 + t, n, max(0, total - got) if total - got < 1000 else 0)
    end = 100.0 + arrivals[-1][0] + 0.5
    ok = ok and not c.too_slow(end, max(0, total - got) if total - got < 1000 else 0)
    if total - got <= 0:
        c.end()
        ok = ok and not c.too_slow(end + 100)
    assert ok == alive, case


def test_body_clock_does_not_count_time_spent_waiting_for_memory():
    c = BodyClock(timeout=10.0, min_rate=100)
    c.arrived(100.0, 10, 0)
    c.pause(101.0)
    assert not c.too_slow(200.0)  # not read: not the client's fault
    c.resume(200.0)
    assert not c.too_slow(208.0)
    assert c.too_slow(209.5)  # 10 s of its own, 10 bytes: too slow


def _drive_clock(c: BodyClock, steps, sweep: float = 0.5):
    """Feed ``steps`` (seconds since the last, bytes) to ``c`` from t=100, looking at it every
    ``sweep`` seconds between arrivals as the front end does; the time it died, or None."""
    now = 100.0
    c.begin(now)
    for dt, n in steps:
        end = now + dt
        t = now + sweep
        while t < end:
            if c.too_slow(t):
                return t
            t += sweep
        now = end
        if not c.arrived(now, n, 0):
            return now
    return None


@given(steps=st.lists(st.tuples(st.floats(0.01, 2.0), st.floats(1.0, 3.0)), min_size=1, max_size=80))
def test_body_clock_a_client_at_the_minimum_rate_or_faster_is_never_reset(steps):
    timeout, min_rate = 2.0, 100.0
    c = BodyClock(timeout, min_rate)
    # each arrival brings at least min_rate bytes for each second since the last one
    assert _drive_clock(c, [(dt, int(dt * min_rate * k) + 1) for dt, k in steps]) is None


@given(
    before=st.lists(st.tuples(st.floats(0.01, 2.0), st.integers(0, 5000)), max_size=20),
    silence=st.floats(4.6, 30.0),
)
def test_body_clock_a_client_silent_for_two_windows_is_reset_within_them(before, silence):
    timeout, min_rate = 2.0, 100.0
    c = BodyClock(timeout, min_rate)
    died = _drive_clock(c, [*before, (silence, 0)])
    start_of_silence = 100.0 + sum(dt for dt, _ in before)
    assert died is not None and died <= start_of_silence + 2 * timeout + 0.5


def test_stall_says_why_nothing_moves():
    st_ = Stall(after=5.0, clock=lambda: 100.0)
    st_.sample(100.0, freed=0, worked=0)
    assert st_.reason(104.0, waiting_for_memory=3, queued=5) is None
    st_.sample(104.0, freed=0, worked=1)  # a worker took a request
    assert st_.reason(105.5, 3, 5) == "memory"  # bytes waited for, none freed for 5.5 s
    st_.sample(105.6, freed=100, worked=1)
    assert st_.reason(106.0, 3, 5) is None
    assert st_.reason(109.5, 0, 5) == "workers"  # queued, nothing started or finished since 104
    assert st_.reason(109.5, 0, 5, service=2.0) is None  # three 2 s runs: not yet
    assert st_.reason(109.5, 0, 0) is None  # nothing waits: idle, not stalled
