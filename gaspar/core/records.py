"""The records the dispatcher keeps: a worker (:class:`WorkerSlot`), a request queued or
running (:class:`Pending`), and the counters of what happened to requests. Plain data; the
rules that change them are the dispatcher's (:mod:`gaspar.core.dispatch`)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gaspar.core.overload import NO_WORKERS


@dataclass(eq=False)
class WorkerSlot:
    """The front end's view of one live worker process."""

    pid: int
    number: int
    generation: int
    routing_id: bytes
    max_requests: int = 0  # recycle after this many; 0: never
    handled: int = 0
    current: Pending | None = None
    ahead: deque[Pending] = field(default_factory=deque)  # prefetched: sent, not started
    retiring: bool = False  # takes no new work; exits once idle
    retire_reason: str = ""  # why: max_requests, reload, scale, timeout, died
    told_exit: bool = False  # asked to exit (once is enough)
    kill_reason: str = ""  # why the front end had it killed (a remote worker's exit log line)
    started: float = 0.0
    agent: Any = None  # the remote agent it lives on (gaspar.core.agents.Agent); None: a local process
    wid: bytes = b""  # a remote worker's own routing id, on its agent's socket
    pool: str = "default"  # an App's pool: it runs only that pool's handlers

    @property
    def busy(self) -> bool:
        """It runs a request."""
        return self.current is not None

    @property
    def label(self) -> int | str:
        """How logs and figures name it: its number, or ``agent/number`` on another host."""
        return self.number if self.agent is None else f"{self.agent.name}/{self.number}"

    def exit_meaning(self, exitcode: int | None) -> tuple[bool, str]:
        """``(expected, reason)`` of its exit with ``exitcode`` (None: killed by a signal):
        expected when it was retiring and exited cleanly; the reason telemetry counts the
        restart under is why it was retired (timeout, or the retirement it finished), else
        "died"."""
        expected = self.retiring and exitcode == 0
        reason = self.retire_reason if self.retire_reason == "timeout" or expected else "died"
        return expected, reason or "scale"


def draw_limit(max_requests: int, jitter: int, rng: Callable[[int, int], int] = random.randint) -> int:
    """A worker's own ``max_requests``, with up to ``jitter`` more so workers do not all
    recycle at once (0: never)."""
    return max_requests + rng(0, jitter) if max_requests else 0


@dataclass(eq=False, slots=True)
class Pending:
    """A request queued or running. ``waiter`` is the caller's; it is never called here.

    Two limits bound a running request. ``timeout`` is the operator's (the ``timeout``
    setting): past it the worker is killed. ``soft_timeout`` (the client's
    ``handler_timeout``, never longer than ``timeout``) and ``client_deadline`` are the
    client's: past them the client is answered at once and the handler is interrupted
    softly in its worker (``gaspar.SoftTimeout``), which lives on.
    """

    id: int
    body: Any
    waiter: Any
    timeout: float | None  # the operator's limit on the handler's run; None: never
    worker: WorkerSlot | None = None
    deadline: float | None = None  # running: when the operator's limit kills its worker
    cancelled: bool = False  # no answer is owed any more: the client is gone, or was answered
    client_deadline: float | None = None  # absolute; the client gives up then
    queued_at: float = 0.0  # when it joined the queue (again: held, requeued); its queue delay counts from here
    arrived: float = 0.0  # when it was submitted: the client's whole wait counts from here
    started: float = 0.0  # when its worker started it
    revoked: str | None = None  # handed ahead, then shed for this reason: answer once skipped
    soft_timeout: float | None = None  # the client's handler_timeout, shorter than timeout
    answer_by: float | None = None  # running: when the client's own limit ends its wait
    expired: str = ""  # the client's limit that ended its wait ("handler_timeout", "deadline")
    owner: Any = None  # its connection when that may pipeline: one share of the queue each
    held: bool = False  # waiting behind its owner's share, not yet in the queue
    call: bytes = b""  # a typed call's byte in its head (gaspar.wire.envelope.CALL_AT); b"": bytes
    stream: bool = False  # a streaming call: its items go out as they come, until its reply
    unread: int = 0  # a stream's: bytes of its items written to its connection, not yet taken
    pool: str = "default"  # the pool whose workers run it (an App's handler's)
    handler: str = ""  # a call's handler, when the App has it (for the figures by handler)

    def begin(self, now: float) -> None:
        """Its worker starts it at ``now``: the operator's limit and the client's count from here."""
        self.started = now
        self.deadline = None if self.timeout is None else now + self.timeout
        answer_by = None if self.soft_timeout is None else now + self.soft_timeout
        if self.client_deadline is not None and (answer_by is None or self.client_deadline < answer_by):
            answer_by = self.client_deadline  # past it, nobody reads the reply
        if answer_by is not None and self.deadline is not None and answer_by >= self.deadline:
            answer_by = None  # the operator's limit comes first
        self.answer_by = answer_by


class LocalWorker:
    """A ready worker process of an agent (``gaspar.process.agent``): it said HELLO (booting
    ones are the pool book's)."""

    __slots__ = ("pid", "number", "generation", "wid", "hello", "announced", "requests", "retiring", "pool")

    def __init__(self, pid: int, number: int, generation: int, wid: bytes, hello: bytes, pool: str) -> None:
        self.pid, self.number, self.generation, self.pool = pid, number, generation, pool
        self.retiring = False  # asked to go once idle (a reload, a smaller pool)
        self.wid, self.hello = wid, hello  # its routing id and HELLO, relayed to the front end
        self.announced = False  # its HELLO went to the front end in this session
        self.requests: set[bytes] = set()  # ids of requests it was given and has not answered

    @property
    def busy(self) -> bool:
        return bool(self.requests)


Assignment = tuple[WorkerSlot, Pending]


@dataclass
class Counters:
    submitted: int = 0
    started: int = 0  # handed to a worker that started it
    completed: int = 0
    failed: int = 0
    timeouts: int = 0
    worker_deaths: int = 0
    unknown_replies: int = 0
    cancelled: int = 0  # the client left before its reply
    shed: int = 0  # refused as Overloaded, by reason below
    shed_queue_timeout: int = 0
    shed_queue_delay: int = 0
    shed_queue_full: int = 0
    shed_deadline: int = 0
    skipped: int = 0  # handed ahead, then revoked before it started
    no_workers: int = 0  # waited past queue_timeout with no worker in the pool at all (not shed)

    def count_shed(self, reason: str) -> None:
        """One request shed, for ``reason`` (one of gaspar.core.overload.REASONS), or refused
        because there was no worker at all (``no_workers``: not an overload)."""
        if reason == NO_WORKERS:
            self.no_workers += 1
            return
        self.shed += 1
        name = "shed_" + reason
        setattr(self, name, getattr(self, name) + 1)


class WorkerOwner(Protocol):
    """Who acts on a worker: the Supervisor for a process on this host, the Gateway for one
    on another host (``gaspar.frontend.producer.Producer.owner``). The same three verbs, wherever it runs."""

    def kill(self, worker: WorkerSlot, sig: int, why: str, dump: bool = False) -> None:
        """Signal it (a timeout: SIGKILL, after a stack dump when ``dump``)."""

    def tell_exit(self, worker: WorkerSlot) -> None:
        """Ask it to exit once the request in hand is done (a reload, a smaller pool)."""

    def broadcast(self, worker: WorkerSlot, message: bytes) -> bool:
        """Deliver ``message`` to it (``Consumer.on_broadcast``); False if it cannot be reached."""


__all__ = ["Assignment", "Counters", "LocalWorker", "Pending", "WorkerOwner", "WorkerSlot", "draw_limit"]
