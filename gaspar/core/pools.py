"""Pools per handler: one :class:`~gaspar.core.dispatch.Dispatcher` per pool, behind the
Dispatcher's own interface, so the rest of the front end does not know pools exist.

An App's handler may have a pool of its own (``@app.handler(workers=1)``: a 10 GB model in
one worker, not eight). Each pool has its own workers, queue, fairness, prefetch and
overload control: a flood of calls to one handler sheds that handler's calls, and never
takes another pool's workers. What the pools share is the front end's books: request ids,
the map of pending requests and the counters, so a reply, a cancel or a stats read finds a
request whatever its pool.

A daemon whose consumer has only the default pool (every bytes handler, most Apps) uses a
plain Dispatcher: this costs the hot path nothing unless there are pools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gaspar.core.dispatch import Dispatcher
from gaspar.core.records import Assignment, Pending, WorkerSlot

DEFAULT_POOL = "default"


class Pools:
    """A Dispatcher per pool; ``make()`` makes one (each with its own overload control)."""

    routes = True  # a plain Dispatcher has ``routes = False``: every call to its one pool

    def __init__(
        self, make: Callable[[], Dispatcher], local: dict[str, int], handlers: dict[str, str] | None = None
    ) -> None:
        """``local``: the most workers each pool may have on this host (0: agents' only)."""
        self._make = make
        self.handlers = handlers or {}  # a handler's name -> its pool
        self.local = dict(local)
        self.by_pool: dict[str, Dispatcher] = {}
        first = self._add(DEFAULT_POOL)
        self.pending, self.counters, self.ids = first.pending, first.counters, first.ids
        self.control, self.prefetch, self.max_queued = first.control, first.prefetch, first.max_queued
        self.workers: dict[bytes, WorkerSlot] = {}  # every pool's, by routing id
        for name in self.local:
            self.pool(name)

    def _add(self, name: str) -> Dispatcher:
        d = self.by_pool[name] = self._make()
        if name != DEFAULT_POOL:  # the books are shared
            first = self.by_pool[DEFAULT_POOL]
            d.pending, d.counters, d.ids = first.pending, first.counters, first.ids
        return d

    def pool(self, name: str) -> Dispatcher:
        """The pool's dispatcher (made for a pool first seen in a worker's HELLO)."""
        return self.by_pool.get(name) or self._add(name)

    # -- requests -----------------------------------------------------------------------------

    def serves(self, pool: str) -> bool:
        """A worker of ``pool`` is ready, or this host may run some (booting, coming back, or
        a pool that grows for its calls); False: none anywhere (``--pool NAME=0`` and no
        agent's worker has joined)."""
        return bool(self.pool(pool).workers) or self.local.get(pool, 1) > 0

    def submit(
        self,
        body: Any,
        waiter: Any,
        timeout: float | None = None,
        deadline: float | None = None,
        soft_timeout: float | None = None,
        owner: Any = None,
        pool: str = DEFAULT_POOL,
    ) -> tuple[Pending, list[Assignment]]:
        """As ``Dispatcher.submit``, to the dispatcher of ``pool``."""
        return self.pool(pool).submit(body, waiter, timeout, deadline, soft_timeout, owner, pool)

    def complete(self, routing_id: bytes, request_id: int, ran: bool = True) -> tuple[Pending | None, list[Assignment]]:
        worker = self.workers.get(routing_id)
        return self.pool(worker.pool if worker else DEFAULT_POOL).complete(routing_id, request_id, ran)

    def cancel(self, req: Pending) -> None:
        self.pool(req.pool).cancel(req)

    def requeue(self, req: Pending) -> list[Assignment]:
        return self.pool(req.pool).requeue(req)

    def sweep(self, deadlines: bool = False) -> None:
        for d in self.by_pool.values():
            d.sweep(deadlines)

    def expire(self) -> tuple[list[Pending], list[Pending]]:
        answered: list[Pending] = []
        killed: list[Pending] = []
        for d in self.by_pool.values():
            a, k = d.expire()
            answered += a
            killed += k
        return answered, killed

    def fail_all(self) -> list[Pending]:
        return [req for d in self.by_pool.values() for req in d.fail_all()]

    def dispatch(self, waited_for_memory: bool = False) -> list[Assignment]:
        return [a for d in self.by_pool.values() for a in d.dispatch(waited_for_memory)]

    def hold(self, owner: Any, on: bool) -> bool:
        return any([d.hold(owner, on) for d in self.by_pool.values()])  # each pool's, not the first's

    @property
    def unsettled(self) -> bool:
        return any(d.unsettled for d in self.by_pool.values())

    def take_shed(self) -> list[tuple[Pending, str]]:
        return [s for d in self.by_pool.values() for s in d.take_shed()]

    def take_cancels(self) -> list[tuple[WorkerSlot, Pending]]:
        return [c for d in self.by_pool.values() for c in d.take_cancels()]

    # -- workers ------------------------------------------------------------------------------

    def add_worker(self, worker: WorkerSlot) -> list[Assignment]:
        self.workers[worker.routing_id] = worker
        return self.pool(worker.pool).add_worker(worker)

    def remove_worker(self, routing_id: bytes) -> Pending | None:
        worker = self.workers.pop(routing_id, None)
        return self.pool(worker.pool).remove_worker(routing_id) if worker else None

    def retire(self, routing_id: bytes, reason: str = "scale") -> bool:
        worker = self.workers.get(routing_id)
        return self.pool(worker.pool).retire(routing_id, reason) if worker else False

    def retiring_idle(self) -> list[WorkerSlot]:
        return [w for d in self.by_pool.values() for w in d.retiring_idle()]

    # -- figures ------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return sum(d.queued for d in self.by_pool.values())

    @property
    def held(self) -> int:
        return sum(d.held for d in self.by_pool.values())

    @property
    def running(self) -> int:
        return sum(d.running for d in self.by_pool.values())

    @property
    def prefetched(self) -> int:
        return sum(d.prefetched for d in self.by_pool.values())

    @property
    def idle_count(self) -> int:
        return sum(d.idle_count for d in self.by_pool.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Each pool's figures, for stats."""
        return {
            name: {
                "workers": len(d.workers),
                "queued": d.queued,
                "running": d.running,
                "overloaded": d.control.overloaded,
            }
            for name, d in self.by_pool.items()
        }


def lane(dispatcher: Any, pool: str) -> Dispatcher:
    """The dispatcher of ``pool``: a plain Dispatcher is its one pool (the default)."""
    return dispatcher.pool(pool) if dispatcher.routes else dispatcher


__all__ = ["Pools", "DEFAULT_POOL", "lane"]
