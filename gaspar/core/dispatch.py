"""Fair dispatch and request correlation, with no I/O: who runs what, and who waits for it.

The front end owns one :class:`Dispatcher`. It keeps

* the workers, each idle, busy with exactly one request, or retiring;
* a FIFO queue of requests that no idle worker could take yet;
* the map of request id -> :class:`Pending` for every request queued or running.

**Fairness.** A worker gets a request when it is idle (its ready credit is one request),
so a request never waits behind a busy worker while another is idle: a 50 ms request
holds up nothing but its own worker. This is the "ROUTER with ready credits" pattern; a
plain PUSH socket would round-robin blindly into busy workers' queues.

**Prefetch (under overload only).** Between two requests a worker would sit idle for a
round trip through the front end. With more requests queued than workers, each busy
worker is also handed its *next* request, to start the moment it replies; with more than
workers x 2, a second, and so on up to ``prefetch`` (default 8) while that many runs fit in
the queue's target; many ride one wake-up of 0MQ's I/O threads (docs/performance.rst). A
prefetched request's timeout starts when its worker starts it; if the worker dies first,
it goes back to the head of the queue. With a short queue there is no prefetch, so the
fairness above holds where it matters.

**Overload** (rules in ``gaspar.core.overload``). The queue is first in, first out while bursts
come and go; once it has stood for an interval it is served newest first, and requests that
waited past the limit, whose client's deadline passed, or that overflow ``max_queued`` are
shed: removed and listed in :meth:`take_shed` with the reason, for the caller to answer.
A vanished client's request is dropped from the queue; one already handed ahead to a worker
is *revoked*: the caller sends the worker a cancel (:meth:`take_cancels`), and the worker
answers ``SKIPPED`` instead of running it (or, if it had started, its reply is dropped).

**Memory.** While unsent replies hold the front end's byte budget (``memory``, a ByteBudget
that is ``over``), no request starts: they wait in the queue (not overload: queue_timeout and
deadlines apply) until clients read or are reset for not reading; then the caller dispatches.

**One connection, one share** (:mod:`gaspar.core.fairqueue`): a persistent connection holds at
most as many places in the queue as there are workers; its other requests wait behind its own.

**No leaks.** Every outcome removes the entry: ``complete``, ``remove_worker``, ``expire``,
``cancel``, ``take_shed``, ``fail_all``. A reply for an unknown id is counted and dropped.

The caller sends what these methods return; the clock is injected, so tests drive time.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from gaspar.core.admission import ByteBudget
from gaspar.core.fairqueue import FairQueue
from gaspar.core.overload import DEADLINE, NO_WORKERS, QUEUE_FULL, QUEUE_TIMEOUT, QueueControl
from gaspar.core.records import Assignment, Counters, Pending, WorkerSlot


class Dispatcher:
    """Assigns requests to idle workers and tracks every request until its outcome."""

    routes = False  # one pool: calls are not routed by handler (see gaspar.core.pools)

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        prefetch: int = 1,
        control: QueueControl | None = None,
        max_queued: int = 0,
        memory: ByteBudget | None = None,
    ) -> None:
        self.clock, self.memory = clock, memory or ByteBudget(1 << 62)  # none starts while it is over
        self.prefetch = prefetch
        self.control = control or QueueControl(queue_timeout=None, target=0.0, interval=float("inf"), clock=clock)
        self.control.oldest_run, self.max_queued = self._oldest_run, max_queued  # max_queued 0: no cap
        self._memory_back = 0.0  # when replies last stopped holding the memory (see _check)
        self.workers: dict[bytes, WorkerSlot] = {}
        self._idle: dict[bytes, WorkerSlot] = {}  # insertion-ordered set
        self._queue = FairQueue(lambda: len(self.workers), lambda: self.control.overloaded, clock)
        self.pending: dict[int, Pending] = {}
        self.counters = Counters()
        self.ids = itertools.count(1)  # request ids (shared by the pools of an App: see pools.py)
        self._shed: list[tuple[Pending, str]] = []
        self._cancels: list[tuple[WorkerSlot, Pending]] = []

    # -- requests -------------------------------------------------------------------------

    def submit(
        self,
        body: Any,
        waiter: Any,
        timeout: float | None = None,
        deadline: float | None = None,
        soft_timeout: float | None = None,
        owner: Any = None,
        pool: str = "default",
    ) -> tuple[Pending, list[Assignment]]:
        """Register a request; return it and the assignments to send now. ``timeout``: the
        operator's limit on its handler (its worker is killed past it); ``soft_timeout``:
        the client's, honoured only when shorter; ``deadline``: the seconds its client will
        wait, from now; ``owner``: the connection, when it may pipeline (one share of the
        queue each); ``pool``: kept on the request (the one dispatcher of a pool, see
        ``gaspar.core.pools``). A request may be shed at once (see :meth:`take_shed`): a deadline
        that cannot be met, or a full queue's oldest."""
        now = self.clock()
        req = Pending(next(self.ids), body, waiter, timeout, queued_at=now, arrived=now)
        if soft_timeout is not None and (timeout is None or soft_timeout < timeout):
            req.soft_timeout = soft_timeout
        if deadline is not None:
            req.client_deadline = now + deadline
        self.pending[req.id] = req
        self.counters.submitted += 1
        req.owner, req.pool = owner, pool
        if not self._queue.submit(req):
            return req, []  # held behind its own connection's share
        if self.max_queued and len(self._queue.items) > self.max_queued:
            self._drop(self._queue.pop(True), QUEUE_FULL)  # the oldest: the least likely still wanted
        return req, self._assign()

    def hold(self, owner: Any, on: bool) -> bool:
        """``owner`` stopped (``on``) or resumed reading its replies (``FairQueue.pause``);
        True when requests of it joined the queue (the caller dispatches)."""
        return self._queue.pause(owner) if on else self._queue.resume(owner)

    @property
    def unsettled(self) -> bool:
        """Decisions wait for the caller: requests shed or cancels to send (a read, no change)."""
        return bool(self._shed or self._cancels)

    def take_shed(self) -> list[tuple[Pending, str]]:
        """Requests shed since the last call, with the reason; removed, to be answered."""
        shed, self._shed = self._shed, []
        return shed

    def take_cancels(self) -> list[tuple[WorkerSlot, Pending]]:
        """Requests handed ahead and then revoked: tell each worker not to start them."""
        cancels, self._cancels = self._cancels, []
        return cancels

    def sweep(self, deadlines: bool = False) -> None:
        """Shed held requests past ``queue_timeout`` (first: then held ones join the queue), then the queue's past
        its limit; with ``deadlines``, also the hopeless (revoking such handed-ahead ones). Cheap when none is due."""
        now = self.clock()
        self._check(now)
        queue, control, (limit, reason) = self._queue, self.control, self.control.limit()
        held = queue.take_held(now - control.queue_timeout) if control.queue_timeout else []
        if held or (limit is not None and queue and now - queue.oldest.queued_at > limit):
            none = NO_WORKERS if not any(not w.retiring for w in self.workers.values()) else ""  # not overload
            for req in held:
                self._drop(req, none or QUEUE_TIMEOUT)
            while limit is not None and queue and now - queue.oldest.queued_at > limit:
                self._drop(queue.pop(True), none or reason)
        if deadlines:
            hopeless = [r for r in (*queue, *queue.held_requests()) if control.hopeless(now, r.client_deadline)]
            for req in hopeless:
                queue.remove(req)
                self._drop(req, DEADLINE)
            for worker in self.workers.values():
                for req in worker.ahead:
                    if not req.cancelled and not req.revoked and control.hopeless(now, req.client_deadline):
                        self._revoke(req, DEADLINE)
        self._check(now)

    def _oldest_run(self) -> float | None:
        """When the longest-running request started (None: none runs)."""
        return min((w.current.started for w in self.workers.values() if w.current is not None), default=None)

    def _check(self, now: float) -> None:
        """Tell the overload control how the queue stands: its oldest request's wait. With
        no worker at all, or no memory for replies, the queue is not served, not overloaded:
        it waits (up to queue_timeout), as when every worker died or no agent joined yet; a
        wait for memory does not count as the queue's once it is over either."""
        items = self._queue.items
        served = items and self.workers and not self.memory.over
        waited = now - max(items[0].queued_at, self._memory_back) if served else 0.0
        self.control.check(now, waited, len(items) + self._queue.held)  # those behind their own too

    def complete(self, routing_id: bytes, request_id: int, ran: bool = True) -> tuple[Pending | None, list[Assignment]]:
        """A worker replied (``ran``) or skipped a revoked request. Return the request (None
        if unknown, or its client is gone) and new work. A worker that reached its
        ``max_requests`` is marked retiring instead of idle (see :meth:`retiring_idle`)."""
        worker = self.workers.get(routing_id)
        req = self.pending.get(request_id)
        if not ran and worker is not None and req is not None and req in worker.ahead:
            # skipped before its turn (a cancel for one further back in its inbox): its running one goes on
            worker.ahead.remove(req)
            del self.pending[request_id]
            self._count_skipped(req)
            return (None if req.cancelled else req), self._assign()
        if worker is None or worker.current is None or worker.current.id != request_id:
            # Not the request this worker runs: a worker answers in order, so this is a
            # message from another life of it, never matched to a request.
            self.counters.unknown_replies += 1
            return None, []
        if req is not worker.current:  # it runs a request already ended elsewhere: free it
            self.counters.unknown_replies += 1
            req = worker.current
            req.cancelled = True
        self.pending.pop(request_id, None)
        now = self.clock()
        worker.current = None
        if ran:
            self.counters.completed += 1
            worker.handled += 1
            if req.started and not req.stream:  # a stream's length says nothing of the load
                self.control.observe(now - req.started)
        else:
            self._count_skipped(req)
        if worker.ahead:  # the worker has started its next prefetched request
            worker.current = worker.ahead.popleft()
            self._start(worker.current)
        elif worker.max_requests and worker.handled >= worker.max_requests:
            worker.retiring, worker.retire_reason = True, "max_requests"
        elif not worker.retiring:
            self._idle[routing_id] = worker
        return (None if req.cancelled else req), self._assign()

    def _count_skipped(self, req: Pending) -> None:
        self.counters.skipped += 1
        if req.revoked and not req.cancelled:  # shed while handed ahead: counted now
            self.counters.count_shed(req.revoked)

    def cancel(self, req: Pending) -> None:
        """The client is gone: drop a queued request, revoke one handed ahead to a worker
        (see :meth:`take_cancels`), end a running stream the same way, and let any other
        running one finish unheard."""
        if req.cancelled or req.id not in self.pending:
            return
        req.cancelled = True
        self.counters.cancelled += 1
        if req.worker is None:
            self._queue.remove(req)
            del self.pending[req.id]
        elif req.worker.current is not req and not req.revoked:
            req.revoked = "cancelled"
            self._cancels.append((req.worker, req))
        elif req.stream:  # running: its worker closes the generator and is free again
            self._cancels.append((req.worker, req))

    def expire(self) -> tuple[list[Pending], list[Pending]]:
        """Running requests past a limit: ``(answered, killed)``. ``answered``: past the
        client's own limit (``soft_timeout`` or its deadline): the caller answers each at
        once (``expired`` says which limit); the request stays its worker's until the worker
        replies (its handler interrupted softly; a stream cancelled) and that reply is dropped.
        ``killed``: past the operator's ``timeout``: removed, its worker marked retiring; the
        caller kills ``req.worker`` and answers the request unless it was answered already
        (``cancelled``)."""
        now, answered, killed = self.clock(), [], []
        for worker in self.workers.values():
            req = worker.current
            if req is None or req.revoked:
                continue
            if req.deadline is not None and now >= req.deadline:
                worker.current = None
                worker.retiring, worker.retire_reason = True, "timeout"
                self._idle.pop(worker.routing_id, None)
                self.pending.pop(req.id, None)
                self.counters.timeouts += not req.cancelled
                killed.append(req)
                if worker.ahead:  # they will never start there: queue them again
                    self._unprefetch(worker)
            elif req.answer_by is not None and now >= req.answer_by and not req.cancelled:
                req.cancelled = True
                soft = req.soft_timeout is not None and req.started + req.soft_timeout <= req.answer_by
                req.expired = "handler_timeout" if soft else "deadline"
                self.counters.timeouts += 1
                answered.append(req)
                if req.stream:  # no soft limit in a stream: it is ended at its next item instead
                    self._cancels.append((worker, req))
        return answered, killed

    def fail_all(self) -> list[Pending]:
        """Remove every request, queued or running (a fast stop); the caller fails them."""
        reqs = [r for r in self.pending.values() if not r.cancelled]
        self.counters.failed += len(reqs)
        self.pending.clear()
        self._queue.clear()
        for worker in self.workers.values():
            worker.current = None
            worker.ahead.clear()
        return reqs

    def requeue(self, req: Pending) -> list[Assignment]:
        """Put back, at the head of the queue, a request that never reached its worker
        (unless it has ended meanwhile: failed, shed, cancelled)."""
        if self.pending.get(req.id) is not req:
            return self._assign()
        if req.worker is not None and req.worker.current is req:
            req.worker.current = None
        if req.worker is not None and req in req.worker.ahead:
            req.worker.ahead.remove(req)
        req.worker, req.deadline, req.answer_by, req.queued_at = None, None, None, self.clock()
        self._queue.put(req, first=True)
        return self._assign()

    # -- workers --------------------------------------------------------------------------

    def add_worker(self, worker: WorkerSlot) -> list[Assignment]:
        """A worker said it is ready: it joins the idle set and may take queued work."""
        worker.started = self.clock()
        self.workers[worker.routing_id] = self._idle[worker.routing_id] = worker
        self.control.workers = len(self.workers)
        return self._assign()

    def remove_worker(self, routing_id: bytes) -> Pending | None:
        """A worker is gone. Return the request it held (removed; to fail), if any."""
        worker = self.workers.pop(routing_id, None)
        self._idle.pop(routing_id, None)
        if worker is None:
            return None
        self.control.workers = max(1, len(self.workers))
        self.counters.worker_deaths += 1
        if worker.ahead:  # never started: not lost, first in line again
            self._unprefetch(worker)
        req, worker.current = worker.current, None
        if req is None:
            return None
        self.pending.pop(req.id, None)
        self.counters.failed += 1
        return None if req.cancelled else req

    def retire(self, routing_id: bytes, reason: str = "scale") -> bool:
        """Take a worker out of rotation. True if it is idle now (tell it to exit now)."""
        worker = self.workers.get(routing_id)
        if worker is None:
            return False
        worker.retiring, worker.retire_reason = True, worker.retire_reason or reason
        return self._idle.pop(routing_id, None) is not None or worker.current is None

    def retiring_idle(self) -> list[WorkerSlot]:
        """Retiring workers with nothing in hand: the ones to tell to exit."""
        return [w for w in self.workers.values() if w.retiring and w.current is None and not w.ahead]

    def queue_delay(self, now: float) -> float:
        """How long the longest-waiting request has waited, queued, held behind its
        connection's share or handed ahead to a busy worker (0: none waits): what a pool's
        users feel, and what sizes a pool of MIN:MAX workers."""
        queued = self._queue.oldest_arrival()
        times = [w.ahead[0].queued_at for w in self.workers.values() if w.ahead] + ([] if queued is None else [queued])
        return now - min(times, default=now)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def queued(self) -> int:
        return len(self._queue.items)

    @property
    def held(self) -> int:
        """Requests waiting behind their own connection's share of the queue."""
        return self._queue.held

    @property
    def running(self) -> int:
        return sum(1 for w in self.workers.values() if w.current is not None)

    @property
    def prefetched(self) -> int:
        return sum(len(w.ahead) for w in self.workers.values())

    def dispatch(self, waited_for_memory: bool = False) -> list[Assignment]:
        """Assignments possible now (after a worker left and its queued work came back; after
        replies held the memory: a wait ``queue_timeout`` counts, the overload control not)."""
        if waited_for_memory:
            self._memory_back = self.clock()
        return self._assign()

    def _assign(self) -> list[Assignment]:
        out: list[Assignment] = []
        items = self._queue.items
        if not items or self.memory.over:
            return out  # replies unsent hold the memory: the caller dispatches once they go
        now = self.clock()
        control = self.control
        lifo = control.overloaded  # newest first
        limit, reason = control.limit()
        while items and self._idle:
            req = self._take(lifo, now, limit, reason, True)
            if req is None:
                break
            _, worker = self._idle.popitem()
            req.worker = worker
            worker.current = req
            self._start(req, now)
            out.append((worker, req))
        n, depth = len(self.workers), self.prefetch
        if depth and len(items) > n:
            # a busy worker takes its k-th request ahead only while more than n x k are
            # queued, up to `prefetch`; 0MQ then carries several requests per wake-up of its
            # I/O threads
            for worker in self.workers.values():
                ahead = worker.ahead
                if worker.current is None or worker.retiring or worker.current.stream:
                    continue  # nothing waits behind a stream: it runs as long as its client reads
                while (
                    len(ahead) < depth and len(items) > n * (len(ahead) + 1) and control.may_hand_ahead(len(ahead) + 1)
                ) and not (ahead and ahead[-1].stream):
                    if worker.max_requests and worker.handled + len(ahead) + 1 >= worker.max_requests:
                        break  # it retires after the requests in hand
                    req = self._take(lifo, now, limit, reason, False)
                    if req is None:
                        break
                    req.worker, req.deadline, req.answer_by = worker, None, None
                    ahead.append(req)
                    out.append((worker, req))
        self._check(now)
        return out

    def _take(self, lifo: bool, now: float, limit: float | None, why: str, idle: bool) -> Pending | None:
        """The next request to hand out, shedding on the way those past use (to an ``idle``
        worker, a deadline only once passed: it keeps the typical run fed; see overload.rst)."""
        control, queue, most = self.control, self._queue, self.control.queue_timeout
        while queue.items:
            req = queue.pop(not lifo)
            if limit is not None and now - req.queued_at > limit:
                self._drop(req, why)
            elif most and now - req.arrived > most:  # held, then queued: its whole wait is bounded too
                self._drop(req, QUEUE_TIMEOUT)
            elif (d := req.client_deadline) is not None and (d <= now if idle else control.hopeless(now, d)):
                self._drop(req, DEADLINE)
            else:
                return req
        return None

    def _drop(self, req: Pending, reason: str) -> None:
        """Shed a request that is out of the queue (never started): to be answered."""
        self.pending.pop(req.id, None)
        self.counters.count_shed(reason)
        self._shed.append((req, reason))

    def _revoke(self, req: Pending, reason: str) -> None:
        """Shed a request handed ahead to a worker: it is answered once the worker skips it."""
        req.revoked = reason
        self._cancels.append((req.worker, req))

    def _start(self, req: Pending, now: float | None = None) -> None:
        self.counters.started += 1
        req.begin(self.clock() if now is None else now)

    def _unprefetch(self, worker: WorkerSlot) -> None:
        while worker.ahead:
            req = worker.ahead.pop()  # last first, so the queue keeps their order
            if req.cancelled:
                self.pending.pop(req.id, None)
                continue
            req.worker, req.deadline, req.answer_by, req.queued_at, req.revoked = None, None, None, self.clock(), None
            self._queue.put(req, first=True)


__all__ = ["Dispatcher"]
