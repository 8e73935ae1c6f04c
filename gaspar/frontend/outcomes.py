"""How a request ends, in one place: answered, failed, shed or refused.

Every end of a request is said three ways, and they must agree: to its client (the reply or
a typed error body), to the telemetry (outcome counts and latency histograms behind
``gaspar stats`` and ``/metrics``), and to the operator (the access log, and rate-limited log
lines). :class:`Outcomes` does all three for each kind of end, so the Producer, the router's
rounds, the supervisor and the gateway only say *which* end it was.

A request's waiter is ``(connection, request)``: the connection that read it owns it (in
``conn.requests``) until it ends here.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from gaspar.core.overload import NO_WORKERS, REASONS
from gaspar.core.records import Pending, WorkerOwner, WorkerSlot
from gaspar.errors import RemoteError, WorkerTimeout
from gaspar.frontend.zmqfast import LARGE
from gaspar.ops.logs import access_line, error_report, log_handler_error, log_held_back
from gaspar.ops.telemetry import LogLimiter, ShedReport
from gaspar.wire.envelope import STATUS, timing
from gaspar.wire.framing import Request, Status, error_body, error_for_client

log = logging.getLogger("gaspar")

#: A failure's status -> its outcome in the telemetry and the access log.
FAILED = {Status.TIMEOUT: "timeout", Status.WORKER_DIED: "worker_died", Status.UNAVAILABLE: "unavailable"}

#: A worker's reply status -> its outcome (OK is "ok"; any other, "error": the handler raised).
_REPLY_OUTCOMES = {Status.TIMEOUT: "timeout", Status.BAD_REQUEST: "bad_request"}

#: Why a request was shed -> what its client is told.
SHED_TEXT = {
    "queue_delay": "shed after {ms} ms in a standing queue (overloaded)",
    "queue_timeout": "waited {ms} ms, past queue_timeout",
    "queue_full": "{max_queued} requests were waiting (max_queued); the oldest was shed",
    "deadline": "the client's deadline could not be met",
    "cancelled": "the client left",
}


def error_report_text(body: bytes) -> str:
    """An error body's type and message, for a log line."""
    report = error_report(body)
    return f"{report.get('type')}: {report.get('message')}"


class Outcomes:
    """The ends of requests: said to the client, counted, and logged (rate-limited).

    ``why_no_workers`` explains an empty pool to a client refused for it (the supervisor
    knows); ``access_log`` is the access logger, or None when it is off.
    """

    def __init__(self, settings: Any, dispatcher: Any, telemetry: Any, why_no_workers: Callable[[], str]) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.telemetry = telemetry
        self.why_no_workers = why_no_workers
        self.access_log: logging.Logger | None = None
        self.error_log = LogLimiter(burst=10, period=60.0)  # handler errors
        self.refusal_log = LogLimiter(burst=10, period=60.0)  # bad requests, resets, refusals
        self.shed_report = ShedReport()

    # -- answered by a worker -----------------------------------------------------------------

    def replied(self, req: Pending | None, answered: Pending | None, head: bytes, frame: Any) -> None:
        """A worker's reply: ``req`` the request it was for, if it was still this worker's
        (counted), ``answered`` the one whose client still waits (delivered)."""
        if req is not None:
            self._record(req, head, frame)
        if answered is not None:
            body = frame.bytes if len(frame) < LARGE else frame.buffer
            if head[STATUS] != Status.OK:  # the log had the traceback; the client, as error_detail says
                body = error_for_client(body, self.settings.error_detail)
            conn, request = answered.waiter
            conn.requests.discard(answered)
            conn.deliver(request, head[STATUS], body)

    def item(self, req: Pending, frame: Any) -> None:
        """One item of a running stream, for its client; the stream goes on."""
        conn, request = req.waiter
        conn.deliver_item(req, request, frame.bytes if len(frame) < LARGE else frame.buffer)

    def _record(self, req: Pending, head: bytes, frame: Any) -> None:
        """A worker's reply to ``req`` (answered or not: its client may be gone)."""
        wall, cpu = timing(head)
        now = time.monotonic()
        worker = req.worker
        number = worker.label if worker is not None else 0
        status = head[STATUS]
        ok = status == Status.OK
        outcome = "ok" if ok else _REPLY_OUTCOMES.get(status, "error")
        queued = req.started - req.arrived
        self.telemetry.replied(
            number, ok, wall, cpu, queued, now - req.arrived, counted=not req.cancelled, outcome=outcome
        )
        told = req.revoked == "cancelled"  # handed ahead when its client left: counted and logged then
        if req.handler and not told:
            self.telemetry.call(req.handler, req.pool, "client_gone" if req.cancelled else outcome, wall)
        if outcome == "bad_request":  # a call refused in the worker (no such handler, bad arguments)
            self.log_refusal("Refused a call: %s", error_report_text(frame.bytes))
        elif outcome == "error":
            label, pid = (worker.label, worker.pid) if worker is not None else (None, None)
            log_handler_error(self.error_log, label, pid, frame.bytes)  # what the client saw, 10 a minute
        if self.access_log is not None and not told:
            if req.cancelled:
                outcome = "client_gone"
            self.log_access(req.waiter, outcome, len(frame), queued, wall, now - req.arrived, number, req.handler)

    # -- failed, shed, refused ----------------------------------------------------------------

    def fail(self, pending: Pending, error: type[RemoteError], msg: str, **facts: Any) -> None:
        """End a queued or running request with ``error`` (its status and name travel: see
        ``gaspar.errors.error_class``): a worker died or timed out, the server stops..."""
        conn, request = pending.waiter
        conn.requests.discard(pending)
        now = time.monotonic()
        queued = pending.started - pending.arrived if pending.started else None
        status, body = error.status, error_body(error.__name__, msg, **facts)
        outcome = FAILED.get(status, "unavailable")
        self.telemetry.ended(outcome, queued, now - pending.arrived)
        if pending.handler:  # one killed past the timeout ran that long: its figures say so
            ran = now - pending.started if facts.get("killed") is True else None
            self.telemetry.call(pending.handler, pending.pool, outcome, ran)
        if self.access_log is not None:
            number, out = pending.worker.label if pending.worker is not None else None, _sent(request, body)
            self.log_access(pending.waiter, outcome, out, queued, None, now - pending.arrived, number, pending.handler)
        conn.deliver(request, status, body)

    def shed(self, req: Pending, reason: str, now: float) -> None:
        """A request the dispatcher shed before it ran: ``Overloaded`` with a retry hint,
        or ``ServerUnavailable`` when there was no worker to run it at all."""
        conn, request = req.waiter
        conn.requests.discard(req)
        waited = now - req.arrived
        outcome = "unavailable" if reason == NO_WORKERS else "shed"
        self.telemetry.ended(outcome, waited, waited)
        if req.handler:
            self.telemetry.call(req.handler, req.pool, outcome)
        d = self.dispatcher
        queued_ms = round(waited * 1000, 1)
        if reason == NO_WORKERS:  # not an overload: there was nothing to run it
            text = f"no worker was ready to run it within queue_timeout ({queued_ms} ms): {self.why_no_workers()}"
            facts = {"reason": reason, "queued_ms": queued_ms, "started": False}
            body = error_body("ServerUnavailable", text, **facts)
        else:
            retry_ms = round(d.control.retry_after(d.queued) * 1000, 1)
            text = SHED_TEXT.get(reason, reason).format(ms=queued_ms, max_queued=d.max_queued)
            facts = {"reason": reason, "queued_ms": queued_ms, "retry_after_ms": retry_ms, "started": False}
            body = error_body("Overloaded", text, **facts)
        if self.access_log is not None:
            self.log_access(req.waiter, outcome, _sent(request, body), waited, None, waited, None, req.handler)
        conn.deliver(request, Status.UNAVAILABLE, body)

    def abandoned(self, requests: set[Pending]) -> None:
        """A client left with these requests unanswered: cancelled (a queued or handed-ahead
        one never reaches a handler; a running one finishes, its reply dropped and logged)."""
        self.telemetry.outcome("client_gone", len(requests))
        now = time.monotonic()
        for pending in requests:
            if pending.worker is None or pending.worker.current is not pending:  # running: at its reply
                if pending.handler:  # queued, held or handed ahead: by its handler too
                    self.telemetry.call(pending.handler, pending.pool, "client_gone")
                if self.access_log is not None:
                    waited = now - pending.arrived
                    self.log_access(pending.waiter, "client_gone", 0, waited, None, waited, None, pending.handler)
            self.dispatcher.cancel(pending)

    def bad_request(self, conn: Any, request: Request, bytes_out: int = 0, handler: str = "") -> None:
        """A request refused before it ran (malformed, too large; a call refused up front,
        ``handler`` if it names one of the App's): counted and access-logged; the caller
        answers it (``bytes_out``: its answer's size)."""
        self.telemetry.outcome("bad_request")
        if handler:
            self.telemetry.call(handler, "", "bad_request")
        if self.access_log is not None:
            self.log_access((conn, request), "bad_request", bytes_out, None, None, 0.0, None, handler)

    def refused_call(self, conn: Any, request: Request, kind: str, message: str, handler: str) -> None:
        """A call the front end refuses before it queues (a name the App has not, a codec it
        refuses): answered BadRequest, counted (by ``handler`` too, when it names one of the
        App's), logged and in the access log, as a worker's refusal is."""
        body = error_body(kind, message)
        self.bad_request(conn, request, len(body), handler)
        self.log_refusal("Refused a call: %s: %s", kind, message)
        conn.deliver(request, Status.BAD_REQUEST, body)

    def refused(self, conn: Any, request: Request, why: str = "the server is stopping") -> None:
        """A request refused before it queues: read after the stop began, or a call for a
        pool that no worker serves."""
        self.telemetry.ended("unavailable", None, 0.0)
        if self.access_log is not None:
            self.log_access((conn, request), "unavailable", 0, None, None, 0.0, None)
        conn.deliver(request, Status.UNAVAILABLE, error_body("ServerUnavailable", why))

    def expired(
        self, answered: list[Pending], killed: list[Pending], owner: Callable[[WorkerSlot], WorkerOwner]
    ) -> None:
        """Requests past a limit (``Dispatcher.expire``). ``answered``: past the client's own
        limit, answered now while its worker interrupts the handler and lives on. ``killed``:
        past the operator's ``timeout``, the only limit that kills a worker."""
        for req in answered:
            worker = req.worker
            limit = req.soft_timeout if req.expired == "handler_timeout" else req.client_deadline - req.started
            what = "its handler_timeout" if req.expired == "handler_timeout" else "its deadline"
            does = "ends the stream at its next item" if req.stream else "interrupts it"
            msg = (
                f"handler ran past {what} ({limit:.3g}s, the client's); "
                f"worker {worker.label} (pid {worker.pid}) {does} and lives on"
            )
            facts = {"timeout": round(limit, 6), "limit": req.expired, "killed": False, "pid": worker.pid}
            self.fail(req, WorkerTimeout, msg, **facts)
        for req in killed:
            worker = req.worker
            log.error(
                "WORKER TIMEOUT (worker %s, pid:%s) after %ss: the timeout setting; logging its stack, then SIGKILL",
                worker.label,
                worker.pid,
                req.timeout,
            )
            why = f"its handler ran past the timeout setting ({req.timeout}s)"
            owner(worker).kill(worker, signal.SIGKILL, why, dump=True)
            if not req.cancelled:
                who = f"worker {worker.label} (pid {worker.pid})"
                msg = f"handler ran past the server's timeout ({req.timeout}s); {who} killed"
                facts = {"timeout": req.timeout, "limit": "timeout", "killed": True, "pid": worker.pid}
                self.fail(req, WorkerTimeout, msg, **facts)

    # -- the operator's lines -----------------------------------------------------------------

    def log_access(
        self,
        waiter: tuple[Any, Request],
        outcome: str,
        bytes_out: int,
        queued: float | None,
        handler: float | None,
        total: float,
        worker: int | str | None,
        call: str = "",
    ) -> None:
        """One access-log line for a request (``access_log``; ``call``: a typed call's handler)."""
        conn, request = waiter
        body = len(request.body)
        access_line(self.access_log, conn.peer, outcome, body, bytes_out, queued, handler, total, worker, call)

    def log_refusal(self, message: str, *args: Any) -> None:
        """A refused or reset request or connection, at most 10 lines a minute; the rest
        are counted and summed up once the minute ends."""
        allowed, held = self.refusal_log.allow()
        if allowed:
            log.warning(message + (f" ({held} more not logged)" if held else ""), *args)

    def report(self, now: float) -> None:
        """Each tick: what the rate limits held back, once their window ends; and while
        requests are shed, one summary a second by reason, and one when shedding ends (and
        when overload begins and ends): never one line per request."""
        log_held_back(self.error_log, "handler errors", logging.ERROR)
        c, control = self.dispatcher.counters, self.dispatcher.control
        counts = {reason: getattr(c, "shed_" + reason) for reason in REASONS}
        counts[NO_WORKERS] = c.no_workers
        target_ms = control.effective_target() * 1000
        for level, line in self.shed_report.update(now, counts, control.overloaded, self.dispatcher.queued, target_ms):
            log.log(level, "%s", line)
        log_held_back(self.refusal_log, "refused or reset requests and connections")


def _sent(request: Request, body: bytes) -> int:
    """The bytes an error answer puts on the wire: its body to an extended request, none to
    a 1.0 one (a reset)."""
    return len(body) if request.extended else 0
