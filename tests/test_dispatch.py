"""Dispatch and correlation without I/O: fairness, every outcome removes its entry."""

from __future__ import annotations

import random
import signal

import pytest
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gaspar.core.dispatch import Dispatcher
from gaspar.core.overload import QueueControl
from gaspar.core.records import WorkerSlot


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def worker(n: int, max_requests: int = 0) -> WorkerSlot:
    return WorkerSlot(pid=1000 + n, number=n, generation=1, routing_id=b"w%d" % n, max_requests=max_requests)


def two_workers(clock: Clock | None = None) -> tuple[Dispatcher, WorkerSlot, WorkerSlot]:
    """A dispatcher with workers 1 and 2 ready."""
    d = Dispatcher(clock or Clock())
    w1, w2 = worker(1), worker(2)
    d.add_worker(w1)
    d.add_worker(w2)
    return d, w1, w2


def test_a_request_goes_only_to_an_idle_worker():
    d = Dispatcher(Clock())
    w1, w2 = worker(1), worker(2)
    assert d.add_worker(w1) == [] and d.add_worker(w2) == []
    r1, a1 = d.submit(b"long", "c1")
    r2, a2 = d.submit(b"short", "c2")
    assert {a1[0][0], a2[0][0]} == {w1, w2}  # both busy now, one each
    r3, a3 = d.submit(b"queued", "c3")
    assert a3 == [] and d.queued == 1  # never stacked behind a busy worker
    busy_short = r2.worker
    done, more = d.complete(busy_short.routing_id, r2.id)
    assert done is r2
    assert more == [(busy_short, r3)]  # the first worker to free up takes it


class Memory:
    over = False


def test_no_request_starts_while_unsent_replies_hold_the_memory():
    """Replies are never refused, so the dispatcher keeps more from being made: while the
    budget is ``over`` nothing starts or is handed ahead; ``dispatch`` starts them after."""
    memory, clock = Memory(), Clock()
    control = QueueControl(queue_timeout=10.0, target=0.005, interval=0.1, clock=clock)
    d = Dispatcher(clock, prefetch=2, control=control, memory=memory)
    w1 = worker(1)
    d.add_worker(w1)
    _, [(w, _)] = d.submit(b"a", "c1")
    memory.over = True
    r2, a2 = d.submit(b"b", "c2")
    r3, a3 = d.submit(b"c", "c3")
    assert a2 == a3 == [] and d.queued == 2 and not w1.ahead  # not even handed ahead
    done, more = d.complete(w1.routing_id, w1.current.id)
    assert done is not None and more == [] and d.idle_count == 1  # idle, and still nothing
    clock.now += 3.0  # longer than any queue target: that wait was for memory, not the queue's
    d.sweep(deadlines=True)
    assert not d.control.standing and d.take_shed() == []
    memory.over = False
    assert d.dispatch(waited_for_memory=True) == [(w1, r2)] and d.queued == 1
    d.sweep(deadlines=True)  # r3 has waited 3 s, but for memory: not a standing queue
    assert not d.control.standing and d.take_shed() == []
    clock.now += 7.5  # queue_timeout (10 s) counts every wait, though
    d.sweep()
    assert d.take_shed() == [(r3, "queue_timeout")]


def test_nothing_is_handed_ahead_to_wait_behind_a_stream():
    """A stream runs as long as its client reads: a request handed ahead behind one would
    wait that long (QA: 38 s) while other workers free up. So a worker running a stream is
    handed nothing ahead, and a stream handed ahead is the last in its worker's line."""
    d = Dispatcher(Clock(), prefetch=4)
    w1 = worker(1)
    d.add_worker(w1)
    s, [(w, _)] = d.submit(b"stream", "c0")
    s.stream = True  # the front end marks a call's kind as it submits it
    for i in range(6):
        assert d.submit(b"q%d" % i, "c")[1] == []
    assert not w1.ahead and d.queued == 6  # behind the running stream: none
    d.complete(w1.routing_id, s.id)  # the stream ended: w1 takes q0, and some ahead
    assert w1.current.body == b"q0" and len(w1.ahead) >= 1
    d2 = Dispatcher(Clock(), prefetch=4)
    w2 = worker(2)
    d2.add_worker(w2)
    d2.submit(b"long", "c0")
    s2, _ = d2.submit(b"stream", "c1")
    s2.stream = True
    queued = [d2.submit(b"q%d" % i, "c")[0] for i in range(6)]
    assert w2.ahead[-1] is s2 and not any(r in w2.ahead for r in queued)  # nothing after it


def test_unknown_and_wrong_worker_replies_are_dropped():
    d, w1, w2 = two_workers()
    r, [(w, _)] = d.submit(b"x", "c")
    other = w2 if w is w1 else w1
    assert d.complete(other.routing_id, r.id) == (None, [])
    assert d.complete(w.routing_id, 999) == (None, [])
    assert d.counters.unknown_replies == 2
    assert d.complete(w.routing_id, r.id)[0] is r
    assert d.complete(w.routing_id, r.id) == (None, [])  # a duplicate reply


def test_map_is_empty_after_many_requests_with_every_outcome():
    clock = Clock()
    d = Dispatcher(clock)
    rng = random.Random(7)
    workers = [worker(i) for i in range(4)]
    for w in workers:
        d.add_worker(w)
    next_n = 10
    for i in range(5000):
        req, _ = d.submit(b"%d" % i, i, timeout=1.0)
        outcome = rng.random()
        if req.worker is None:
            d.cancel(req)
            continue
        if outcome < 0.8:
            d.complete(req.worker.routing_id, req.id)
        elif outcome < 0.9:
            clock.now += 2
            assert d.expire() == ([], [req])
            d.remove_worker(req.worker.routing_id)
            d.add_worker(worker(next_n))
            next_n += 1
        else:
            assert d.remove_worker(req.worker.routing_id) is req
            d.add_worker(worker(next_n))
            next_n += 1
    assert d.pending == {} and d.queued == 0 and d.running == 0


def test_worker_death_fails_only_its_request_and_keeps_the_queue():
    d = Dispatcher(Clock())
    w1 = worker(1)
    d.add_worker(w1)
    r1, _ = d.submit(b"a", "c1")
    r2, _ = d.submit(b"b", "c2")
    assert d.remove_worker(w1.routing_id) is r1
    assert r1.id not in d.pending and r2.id in d.pending and d.queued == 1
    w2 = worker(2)
    assert d.add_worker(w2) == [(w2, r2)]


def test_expire_marks_the_worker_retiring():
    clock = Clock()
    d = Dispatcher(clock)
    w = worker(1)
    d.add_worker(w)
    r, _ = d.submit(b"a", "c", timeout=5)
    clock.now += 4.9
    assert d.expire() == ([], [])
    clock.now += 0.2
    assert d.expire() == ([], [r])
    assert w.retiring and d.idle_count == 0 and d.pending == {}
    r2, a = d.submit(b"b", "c")
    assert a == []  # a retiring worker takes nothing


def test_max_requests_retires_after_the_reply():
    d = Dispatcher(Clock())
    w = worker(1, max_requests=2)
    d.add_worker(w)
    for _ in range(2):
        r, _ = d.submit(b"a", "c")
        d.complete(w.routing_id, r.id)
    assert w.retiring and d.retiring_idle() == [w]
    r, a = d.submit(b"b", "c")
    assert a == [] and d.queued == 1


def test_cancel_a_queued_request_removes_it_and_a_running_one_drops_its_reply():
    d = Dispatcher(Clock())
    w = worker(1)
    d.add_worker(w)
    running, _ = d.submit(b"a", "c1")
    queued, _ = d.submit(b"b", "c2")
    d.cancel(queued)
    assert queued.id not in d.pending and d.queued == 0
    d.cancel(running)
    assert d.complete(w.routing_id, running.id)[0] is None
    assert d.pending == {}


def test_retire_idle_and_busy():
    d, w1, w2 = two_workers()
    r, [(busy, _)] = d.submit(b"a", "c")
    idle = w1 if busy is w2 else w2
    assert d.retire(idle.routing_id) is True
    assert d.retire(busy.routing_id) is False  # exits after its reply
    d.complete(busy.routing_id, r.id)
    assert set(d.retiring_idle()) == {w1, w2}


def test_requeue_puts_a_request_back_first():
    d = Dispatcher(Clock())
    w = worker(1)
    d.add_worker(w)
    r1, _ = d.submit(b"a", "c1")
    r2, _ = d.submit(b"b", "c2")
    d.retire(w.routing_id)
    d.requeue(r1)
    w2 = worker(2)
    assert d.add_worker(w2) == [(w2, r1)]


def test_fail_all_empties_everything():
    d = Dispatcher(Clock())
    d.add_worker(worker(1))
    reqs = [d.submit(b"%d" % i, i)[0] for i in range(5)]
    assert set(d.fail_all()) == set(reqs)
    assert d.pending == {} and d.queued == 0 and d.running == 0


def test_prefetch_only_when_more_are_queued_than_there_are_workers():
    clock = Clock()
    d, w1, w2 = two_workers(clock)
    for i in range(4):
        d.submit(b"%d" % i, i, timeout=5)
    # two running, two queued: not more queued than workers, no prefetch
    assert d.prefetched == 0 and d.queued == 2
    r5, sent = d.submit(b"5", 5, timeout=5)
    assert len(sent) == 1 and d.prefetched == 1 and d.queued == 2
    (busy, pre) = sent[0]
    assert list(busy.ahead) == [pre] and pre.deadline is None  # its timeout has not started
    clock.now += 1
    running = busy.current
    done, more = d.complete(busy.routing_id, running.id)
    assert done is running and busy.current is pre and not busy.ahead
    assert pre.deadline == clock.now + 5  # started now
    assert d.idle_count == 0  # it went straight on to the prefetched one


def test_no_prefetch_keeps_the_short_queue_fair():
    d, w1, w2 = two_workers()
    long_req, _ = d.submit(b"long", "a")
    short1, _ = d.submit(b"short", "b")
    short2, sent = d.submit(b"short", "c")
    assert sent == [] and d.prefetched == 0  # waits for whichever worker frees up first
    _, more = d.complete(short1.worker.routing_id, short1.id)
    assert more == [(short1.worker, short2)]


def test_a_dead_workers_prefetched_request_is_not_lost():
    d = Dispatcher(Clock())
    w1 = worker(1)
    d.add_worker(w1)
    running, _ = d.submit(b"a", "c")
    queued = [d.submit(b"%d" % i, i)[0] for i in range(3)]
    (pre,) = w1.ahead
    assert pre is queued[0]
    assert d.remove_worker(w1.routing_id) is running
    assert pre.id in d.pending and pre.worker is None
    w2 = worker(2)
    assert d.add_worker(w2)[0] == (w2, pre)  # first in line again


def test_expired_request_returns_the_prefetched_one_to_the_queue():
    clock = Clock()
    d = Dispatcher(clock)
    w = worker(1)
    d.add_worker(w)
    running, _ = d.submit(b"a", "c", timeout=1)
    queued = [d.submit(b"%d" % i, i, timeout=1)[0] for i in range(3)]
    assert list(w.ahead) == [queued[0]]
    clock.now += 2
    assert d.expire() == ([], [running])
    assert not w.ahead and d.queued == 3 and queued[0].worker is None


def test_prefetch_depth_grows_with_the_queue_and_zero_turns_it_off():
    d = Dispatcher(Clock(), prefetch=4)
    w = worker(1)
    d.add_worker(w)
    reqs = [d.submit(b"%d" % i, i)[0] for i in range(10)]
    # 1 running; ahead while more than 1 x depth are queued: 4 ahead, 5 queued
    assert w.current is reqs[0] and list(w.ahead) == reqs[1:5] and d.queued == 5
    for expected in reqs[1:5]:  # they start in order, as the worker replies
        d.complete(w.routing_id, w.current.id)
        assert w.current is expected
    off = Dispatcher(Clock(), prefetch=0)
    w0 = worker(2)
    off.add_worker(w0)
    for i in range(10):
        off.submit(b"%d" % i, i)
    assert not w0.ahead and off.queued == 9


def busy_with_one_ahead(clock: Clock) -> tuple[Dispatcher, WorkerSlot, object, object]:
    """One worker running a request, with the next handed ahead to it (prefetch)."""
    d = Dispatcher(clock, prefetch=1)
    w = worker(1)
    d.add_worker(w)
    running, _ = d.submit(b"a", "c1")
    d.submit(b"b", "c2")
    ahead, assigned = d.submit(b"c", "c3")  # two queued for one worker: b is handed ahead
    assert w.current is running and len(w.ahead) == 1
    return d, w, running, w.ahead[0]


def test_a_reply_for_a_request_handed_ahead_is_not_taken_for_the_running_one():
    """A worker answers in order; a reply for its next request before the running one's
    comes from another life of it. It must not end the running request, nor feed the
    handler-time estimate a request that never started (it once made every deadline look
    hopeless)."""
    clock = Clock()
    d, w, running, ahead = busy_with_one_ahead(clock)
    clock.now += 0.01
    assert d.complete(w.routing_id, ahead.id) == (None, [])
    assert w.current is running and list(w.ahead) == [ahead] and ahead.id in d.pending
    assert d.counters.unknown_replies == 1 and d.control.service == 0.0
    done, _ = d.complete(w.routing_id, running.id)
    assert done is running and w.current is ahead
    assert d.control.service == pytest.approx(0.01)


def test_a_request_that_ended_elsewhere_is_not_put_back_and_frees_its_worker():
    clock = Clock()
    d, w, running, ahead = busy_with_one_ahead(clock)
    # it ended while its send was pending (its worker's host was lost): failed, removed
    d.pending.pop(running.id)
    assert d.requeue(running) == [] and d.queued == 1  # only the one still waiting
    # the worker still runs it: its reply frees the worker, and reaches nobody
    assert d.complete(w.routing_id, running.id)[0] is None
    assert w.current is ahead and d.counters.unknown_replies == 1
    clock.now += 1000
    w.current.deadline = clock.now - 1
    d.pending.pop(ahead.id)
    assert d.expire() == ([], [ahead])  # its entry is gone already: no KeyError


def test_a_request_skipped_before_its_turn_is_answered_and_the_running_one_goes_on():
    """Two requests handed ahead; the second is revoked and the worker, looking for cancels
    before the first, skips it at once: its SKIPPED comes while another request runs."""
    clock = Clock()
    d = Dispatcher(clock, prefetch=2)
    w = worker(1)
    d.add_worker(w)
    running, _ = d.submit(b"a", "c1")
    for body in (b"b", b"c", b"d", b"e"):
        d.submit(body, "c")
    assert len(w.ahead) == 2
    first, second = w.ahead
    d.cancel(second)
    assert d.take_cancels() == [(w, second)]
    assert d.complete(w.routing_id, second.id, ran=False)[0] is None  # its client is gone: no answer
    assert w.current is running and list(w.ahead) == [first] and second.id not in d.pending
    assert d.counters.skipped == 1 and d.counters.unknown_replies == 0
    done, _ = d.complete(w.routing_id, running.id)
    assert done is running and w.current is first


@pytest.mark.parametrize(
    "retiring, retire_reason, exitcode, meaning",
    [
        (False, "", 0, (False, "died")),  # exited on its own: not asked to
        (False, "", None, (False, "died")),  # killed by a signal
        (True, "max_requests", 0, (True, "max_requests")),
        (True, "reload", 0, (True, "reload")),
        (True, "", 0, (True, "scale")),  # retired without a named reason: a scale-down
        (True, "max_requests", 1, (False, "died")),  # retiring, but it crashed on the way out
        (True, "timeout", None, (False, "timeout")),  # killed by us for running past its timeout
    ],
)
def test_a_workers_exit_means_what_its_retirement_said(retiring, retire_reason, exitcode, meaning):
    """One rule for local and remote workers: was the exit expected, and which restart
    reason do the metrics count it under."""
    slot = WorkerSlot(1, 1, 1, b"w", retiring=retiring, retire_reason=retire_reason)
    assert slot.exit_meaning(exitcode) == meaning


def test_an_exit_we_caused_says_why_instead_of_guessing():
    from gaspar.core.pool import describe_exit

    killed = signal.SIGKILL  # a wait status of a process killed by SIGKILL is the signal number
    assert describe_exit(killed) == (None, killed, "killed by SIGKILL. Perhaps out of memory?")
    why = "its handler ran past 1s"
    assert describe_exit(killed, why) == (None, killed, f"killed by SIGKILL because {why}")
    assert describe_exit(3 << 8, "ignored for a clean exit") == (3, None, "exited with code 3")


# -- one connection, one share of the queue --------------------------------------------------


def busy_two_workers(clock: Clock) -> tuple[Dispatcher, list]:
    """Two workers (no prefetch), both running something, and what runs."""
    d = Dispatcher(clock, prefetch=0)
    d.add_worker(worker(1))
    d.add_worker(worker(2))
    running = [d.submit(b"r%d" % i, "other")[0] for i in range(2)]
    return d, running


def run_down(d: Dispatcher, running: list) -> list[bytes]:
    """Complete what runs, one reply at a time, until nothing starts: the bodies started."""
    order, busy = [], list(running)
    while busy:
        req = busy.pop(0)
        _, assigned = d.complete(req.worker.routing_id, req.id)
        for _, nxt in assigned:
            order.append(nxt.body)
            busy.append(nxt)
    return order


def test_a_pipelining_connection_holds_one_share_and_a_newcomer_waits_behind_it_only():
    clock = Clock()
    d, running = busy_two_workers(clock)
    for i in range(50):
        d.submit(b"h%d" % i, "hog", owner="conn")
    assert d.queued == 2 and d.held == 48  # two workers: two places in the queue
    probe, _ = d.submit(b"probe", "probe")  # a plain client: no owner
    assert d.queued == 3
    order = run_down(d, running)
    assert order.index(b"probe") == 2  # behind the two hog requests queued before it, no more
    assert order == [b"h0", b"h1", b"probe"] + [b"h%d" % i for i in range(2, 50)]  # the hog keeps its order
    assert d.queued == 0 and d.held == 0 and not d.pending and not d._queue._in_queue and not d._queue._held


def test_a_connection_that_does_not_read_its_replies_is_paused_and_its_requests_wait():
    """Paused (its client leaves replies unread), a connection keeps what is in the queue
    and running, but none more of its requests joins the queue, while another connection's
    are served; resumed, its held ones join again, up to its share; paused and gone, it
    leaves nothing behind."""
    clock = Clock()
    d, running = busy_two_workers(clock)
    for i in range(6):
        d.submit(b"a%d" % i, "a", owner="A")
    assert d.queued == 2 and d.held == 4
    assert d.hold("A", True) is False
    d.submit(b"a6", "a", owner="A")  # a new one while paused: held, though A's share is full anyway
    for i in range(3):
        d.submit(b"b%d" % i, "b", owner="B")
    order = run_down(d, running)
    assert order == [b"a0", b"a1", b"b0", b"b1", b"b2"]  # A's queued two ran; its held ones wait
    assert d.queued == 0 and d.held == 5 and d.idle_count == 2
    assert d.hold("A", False) is True  # it reads again: two join the queue (its share)...
    assigned = d.dispatch()
    assert [r.body for _, r in assigned] == [b"a2", b"a3"]
    assert d.queued == 2 and d.held == 1  # as they left the queue, two more joined it
    d.hold("A", True)
    nxt = [d.complete(w.routing_id, r.id)[1] for w, r in assigned]  # those two in the queue still run...
    assert [r.body for a in nxt for _, r in a] == [b"a4", b"a5"]
    for [(w, r)] in nxt:
        assert d.complete(w.routing_id, r.id)[1] == []  # ...then none more while paused
    assert d.held == 1 and d.queued == 0 and d.idle_count == 2
    for req in [r for r in d.pending.values() if r.owner == "A"]:
        d.cancel(req)  # the connection is gone
    assert d.hold("A", False) is False
    assert not d.pending and not d._queue._held and not d._queue._paused and not d._queue._in_queue


def test_alone_a_pipelining_connection_keeps_every_worker_busy():
    d = Dispatcher(Clock())
    workers = [worker(n) for n in range(4)]
    for w in workers:
        d.add_worker(w)
    reqs = [d.submit(b"%d" % i, "c", owner="conn") for i in range(20)]
    assert sum(len(a) for _, a in reqs) == 4 and d.queued == 4 and d.held == 12
    done = 0
    while d.pending:
        for w in workers:
            if w.current is not None:
                d.complete(w.routing_id, w.current.id)
                done += 1
        assert d.queued + d.held == 0 or d.running == 4  # no worker idles while its requests wait
    assert done == 20


def controlled(clock: Clock) -> tuple[Dispatcher, QueueControl]:
    """Two workers, no prefetch, and a queue control with a 2 s queue_timeout."""
    control = QueueControl(queue_timeout=2.0, target=0.005, interval=0.1, workers=2, clock=clock)
    d = Dispatcher(clock, prefetch=0, control=control)
    d.add_worker(worker(1))
    d.add_worker(worker(2))
    return d, control


def test_while_newest_first_a_held_request_joins_at_the_head_and_is_shed_first():
    clock = Clock()
    d, control = controlled(clock)
    running = [d.submit(b"r%d" % i, "other")[0] for i in range(2)]
    hog = [d.submit(b"h%d" % i, "hog", owner="conn")[0] for i in range(6)]
    clock.now += 0.05
    others = [d.submit(b"o%d" % i, "o")[0] for i in range(3)]
    control.overloaded = True
    clock.now += 0.01
    _, [(_, first)] = d.complete(running[0].worker.routing_id, running[0].id)
    assert first is others[-1]  # newest first
    _, [(_, second)] = d.complete(running[1].worker.routing_id, running[1].id)
    assert second is others[-2]
    # a hog request leaves (its client gave up): its next joins at the head, as old as the oldest
    d.cancel(hog[1])
    assert d._queue.oldest is hog[2] and hog[2].queued_at == hog[0].queued_at
    # shedding takes the old end first: the hog's, before others' newer ones
    clock.now += 5.0
    d.sweep()
    shed = [req for req, _ in d.take_shed()]
    assert hog[0] in shed and hog[2] in shed


def test_a_held_request_can_be_cancelled_failed_or_shed_for_its_deadline():
    clock = Clock()
    d, running = busy_two_workers(clock)
    hog = [d.submit(b"h%d" % i, "hog", owner="conn", deadline=1.0 if i == 4 else None)[0] for i in range(6)]
    assert [r.held for r in hog] == [False, False, True, True, True, True]
    d.cancel(hog[3])
    assert d.held == 3 and hog[3].id not in d.pending
    clock.now += 2.0
    d.sweep(deadlines=True)
    assert [req for req, reason in d.take_shed()] == [hog[4]] and d.held == 2
    failed = d.fail_all()
    assert set(failed) == set(running + [hog[0], hog[1], hog[2], hog[5]])
    assert not d._queue._held and not d._queue._in_queue and d.queued == 0


def test_queue_timeout_bounds_a_held_requests_whole_wait():
    """QA: 200 calls gathered on one aio.Client (one connection) waited 10-20 s, held behind
    their connection's share, never shed: queue_timeout (2 s) bounds a held one's wait too.
    Its queue delay still counts from when it joined the queue (``queued_at``); the client's
    whole wait from ``arrived``."""
    clock = Clock()
    d, control = controlled(clock)
    first = [d.submit(b"a%d" % i, "aio", owner="conn")[0] for i in range(6)]  # 2 run, 2 queue, 2 held
    clock.now += 1.5
    late = [d.submit(b"b%d" % i, "aio", owner="conn")[0] for i in range(2)]
    assert [r.held for r in first + late] == [False] * 4 + [True] * 4
    _, [(_, joined)] = d.complete(first[0].worker.routing_id, first[0].id)  # a queued one runs, a held joins
    assert joined is first[2] and first[4].held is False
    assert first[4].queued_at == clock.now and first[4].arrived == 100.0  # its queue delay counts from now
    clock.now += 0.4  # 1.9 s: nobody is past 2 s yet
    d.sweep()
    assert d.take_shed() == []
    clock.now += 0.2  # 2.1 s: the held one that arrived first is shed, the queued first[3] too
    d.sweep()
    assert d.take_shed() == [(first[5], "queue_timeout"), (first[3], "queue_timeout")]
    assert first[5].id not in d.pending and d.held == 1 and d.queued == 2  # first[4], and late[0] joined
    # first[4] arrived 2.1 s ago but joined the queue 0.6 s ago: it is shed when a worker would take it
    _, more = d.complete(first[1].worker.routing_id, first[1].id)
    assert more == [(first[1].worker, late[0])] and d.take_shed() == [(first[4], "queue_timeout")]
    assert d.held == 0 and d.queued == 1  # late[1] joined as first[4] left
    clock.now += 1.6  # late[1] arrived 2.2 s ago, joined 1.6 s ago: shed when a worker would take it
    d.sweep()
    assert d.take_shed() == []
    _, more = d.complete(first[2].worker.routing_id, first[2].id)
    assert more == [] and d.take_shed() == [(late[1], "queue_timeout")] and not d.pending.keys() - {late[0].id}
    # a connection that does not read its replies (paused) keeps its held ones: answers
    # would only refresh its life; idle_timeout ends it, and them with it
    paused = [d.submit(b"p%d" % i, "hog", owner="hog")[0] for i in range(4)]
    assert d.hold("hog", True) is False and sum(r.held for r in paused) >= 1
    clock.now += 3.0
    d.sweep()
    assert not any(r in [x for x, _ in d.take_shed()] for r in paused if r.held)
    assert all(r.id in d.pending for r in paused if r.held)
    # with no worker at all, it is not overload: no_workers (the caller's ServerUnavailable)
    d2 = Dispatcher(clock, prefetch=0, control=QueueControl(queue_timeout=2.0, workers=1, clock=clock))
    held = [d2.submit(b"x", "aio", owner="conn2")[0] for _ in range(3)]
    assert [r.held for r in held] == [False, True, True]
    clock.now += 2.5
    d2.sweep()
    assert sorted(reason for _, reason in d2.take_shed()) == ["no_workers"] * 3


class ShareMachine(RuleBasedStateMachine):
    """Any mix of pipelining and plain requests, replies, cancels, deaths and sheds: the
    per-connection books always match the queue, nothing is lost, nothing leaks."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.control = QueueControl(queue_timeout=1.0, target=0.005, interval=0.1, workers=2, clock=self.clock)
        self.d = Dispatcher(self.clock, prefetch=2, control=self.control, max_queued=12)
        self.n = 0
        self.answered: set[int] = set()

    @rule(owner=st.sampled_from([None, "a", "b"]), deadline=st.sampled_from([None, 0.05, 5.0]))
    def submit(self, owner, deadline):
        self.d.submit(b"x", "c", deadline=deadline, owner=owner)

    @rule()
    def add_worker(self):
        self.n += 1
        self.d.add_worker(worker(self.n))

    @rule(data=st.data())
    def complete(self, data):
        busy = [w for w in self.d.workers.values() if w.current is not None]
        if busy:
            w = data.draw(st.sampled_from(busy))
            self.d.complete(w.routing_id, w.current.id)

    @rule(data=st.data())
    def remove_worker(self, data):
        if self.d.workers:
            self.d.remove_worker(data.draw(st.sampled_from(sorted(self.d.workers))))
            self.d.dispatch()

    @rule(data=st.data())
    def cancel(self, data):
        if self.d.pending:
            self.d.cancel(self.d.pending[data.draw(st.sampled_from(sorted(self.d.pending)))])

    @rule(dt=st.sampled_from([0.001, 0.05, 0.3, 2.0]), overloaded=st.booleans())
    def time_passes(self, dt, overloaded):
        self.clock.now += dt
        self.control.overloaded = overloaded
        self.d.sweep(deadlines=True)
        self.d.take_shed()
        self.d.take_cancels()

    @invariant()
    def books_match(self):
        d = self.d
        counts: dict = {}
        q = d._queue
        for req in q:
            assert not req.held
            if req.owner is not None:
                counts[req.owner] = counts.get(req.owner, 0) + 1
        assert counts == q._in_queue
        for owner, held in q._held.items():
            assert held and all(r.held and r.owner == owner for r in held)
            assert q._in_queue.get(owner, 0) >= 1  # a held request always has one of its own ahead
        queued = {r.id for r in q} | {r.id for r in q.held_requests()}
        hands = {r.id for w in d.workers.values() for r in ([w.current] if w.current else []) + list(w.ahead)}
        assert queued <= set(d.pending) <= queued | hands


TestShareMachine = ShareMachine.TestCase
TestShareMachine.settings = hyp_settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_the_queue_delay_counts_requests_held_behind_their_connections_share():
    """What a pool's autoscaler reads: the longest wait, queued or held (one pipelining
    connection's requests are mostly held, and they wait all the same)."""
    clock = Clock()
    d = Dispatcher(clock, prefetch=0)
    assert d.queue_delay(clock()) == 0.0
    d.add_worker(worker(1))
    for i in range(6):
        d.submit(b"%d" % i, "c", owner="conn")
    assert d.held > 0
    clock.now += 0.3
    assert d.queue_delay(clock()) == pytest.approx(0.3)
