"""What the front end counts and times, with no I/O: the figures behind ``gaspar stats``,
``/metrics``, statsd and ``gaspar top``.

The front end aggregates everything itself (no multiprocess files, no per-pid state on
disk): each worker sends its handler's wall and CPU time back with every reply, and the
front end records, per request, its outcome, how long it queued, how long its handler ran
and how long the whole request took; per worker, what it handled. Per-process CPU and
memory are read when asked (:mod:`gaspar.ops.procstat`), not sampled in the background.

Every figure here is a plain number or a :class:`Histogram` with fixed buckets (1 ms to
5 min), cheap enough to update on the hot path (a bisect and two additions).
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

#: Histogram buckets (upper bounds, seconds), 1 ms to 5 min.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: How a request ended, each a label value of ``gaspar_requests_total``.
OUTCOMES = ("ok", "error", "timeout", "worker_died", "bad_request", "shed", "client_gone", "unavailable")
#: Why a worker process ended, each a label value of ``gaspar_worker_restarts_total``.
RESTART_REASONS = ("died", "timeout", "max_requests", "memory", "reload", "scale")
WORKER_STATES = ("booting", "idle", "busy", "retiring")
RECENT = 512  # handler times kept per worker, for its p99 in `gaspar top`


class Histogram:
    """Counts per bucket (not cumulative), their sum, and the total."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: Iterable[float] = BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: over the largest bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` per bucket, ending with ``(inf, count)``."""
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float | None:
        """An estimate of the ``q`` quantile: linear within its bucket (None when empty)."""
        if not self.count:
            return None
        rank, seen, lower = q * self.count, 0, 0.0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            if n and seen + n >= rank:
                return lower + (bound - lower) * (rank - seen) / n
            seen += n
            lower = bound
        return self.buckets[-1]  # past the largest bound: say the bound

    @classmethod
    def from_snapshot(cls, snap: dict[str, Any]) -> Histogram:
        """The histogram a :meth:`snapshot` describes (its buckets, counts and sum)."""
        h = cls(float(le) for le, _ in snap["buckets"] if le != "+Inf")
        seen = 0
        for i, (_, cumulative) in enumerate(snap["buckets"]):
            h.counts[i] = cumulative - seen
            seen = cumulative
        h.count, h.sum = seen, snap.get("sum", 0.0)
        return h

    def minus(self, earlier: Histogram) -> Histogram | None:
        """What was observed since ``earlier`` (an older state of this histogram); None if
        the two do not fit (other buckets, or a count went down: a restart in between)."""
        if earlier.buckets != self.buckets:
            return None
        counts = [a - b for a, b in zip(self.counts, earlier.counts, strict=True)]
        if min(counts) < 0:
            return None
        h = Histogram(self.buckets)
        h.counts, h.count, h.sum = counts, self.count - earlier.count, self.sum - earlier.sum
        return h

    def snapshot(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": round(self.sum, 6),
            "p50": _round(self.quantile(0.5)),
            "p99": _round(self.quantile(0.99)),
            "buckets": [[_le(b), n] for b, n in self.cumulative()],
        }


class WorkerFigures:
    """What one worker number has done since the daemon started (across its restarts)."""

    __slots__ = ("requests", "errors", "handler_seconds", "cpu_seconds", "recent", "restarts")

    def __init__(self) -> None:
        self.requests = 0  # replies, errors included
        self.errors = 0
        self.handler_seconds = 0.0
        self.cpu_seconds = 0.0  # handler CPU reported with replies (of handlers of 1 ms or more)
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.restarts = 0

    def snapshot(self) -> dict[str, Any]:
        recent = sorted(self.recent)
        p99 = recent[min(len(recent) - 1, int(len(recent) * 0.99))] if recent else None
        return {
            "requests": self.requests,
            "errors": self.errors,
            "handler_seconds": round(self.handler_seconds, 6),
            "handler_cpu_seconds": round(self.cpu_seconds, 6),
            "handler_avg_ms": _round(self.handler_seconds / self.requests * 1000 if self.requests else None),
            "handler_p99_ms": _round(p99 * 1000 if p99 is not None else None),
            "restarts": self.restarts,
        }


class HandlerFigures:
    """What one App handler's calls came to: outcomes, and its run times."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.duration = Histogram()

    def snapshot(self) -> dict[str, Any]:
        return {"pool": self.pool, "outcomes": dict(self.outcomes), "duration_seconds": self.duration.snapshot()}


class Telemetry:
    """The front end's figures. Called from the hub thread only."""

    def __init__(self, handlers: dict[str, str] | None = None) -> None:
        """``handlers``: an App's, name -> pool, whose figures exist from the start, at 0."""
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)
        self.queue_wait = Histogram()
        self.handler = Histogram()
        self.request = Histogram()
        self.hub_lag = Histogram()
        self.workers: dict[int, WorkerFigures] = {}
        # an App's, by name (its registry: bounded)
        self.handlers = {name: HandlerFigures(pool) for name, pool in (handlers or {}).items()}

    def call(self, handler: str, pool: str, outcome: str, wall: float | None = None) -> None:
        """A call to an App's ``handler`` ended so (``wall``: its run time, if it ran)."""
        h = self.handlers.get(handler)
        if h is None:
            h = self.handlers[handler] = HandlerFigures(pool)
        h.outcomes[outcome] += 1
        if wall is not None:
            h.duration.observe(wall)

    def outcome(self, name: str, n: int = 1) -> None:
        self.outcomes[name] += n

    def replied(
        self,
        number: int,
        ok: bool,
        wall: float,
        cpu: float,
        queued: float,
        total: float,
        counted: bool = True,
        outcome: str | None = None,
    ) -> None:
        """A worker's reply: ``wall`` and ``cpu`` of the handler, ``queued`` seconds in the
        queue, ``total`` seconds from the request's arrival to its reply. ``counted``: False
        when its outcome was counted already (its client left while it ran: client_gone;
        or the client's own limit answered it). ``outcome``: ``ok``/``error`` by ``ok``
        unless given (``timeout``: the client's limit interrupted the handler)."""
        if counted:
            self.outcomes[outcome or ("ok" if ok else "error")] += 1
        self.handler.observe(wall)
        self.queue_wait.observe(queued)
        self.request.observe(total)
        w = self.worker(number)
        w.requests += 1
        w.errors += not ok
        w.handler_seconds += wall
        if cpu >= 0:  # -1: not measured (a handler under 1 ms)
            w.cpu_seconds += cpu
        w.recent.append(wall)

    def ended(self, outcome: str, queued: float | None, total: float) -> None:
        """A request that ended without a reply from its handler (timeout, death, shed...)."""
        self.outcomes[outcome] += 1
        if queued is not None:
            self.queue_wait.observe(queued)
        self.request.observe(total)

    def restarted(self, number: int | None, reason: str) -> None:
        self.restarts[reason] += 1
        if number is not None:
            self.worker(number).restarts += 1

    def worker(self, number: int) -> WorkerFigures:
        w = self.workers.get(number)
        if w is None:
            w = self.workers[number] = WorkerFigures()
        return w

    def snapshot(self) -> dict[str, Any]:
        return {
            "outcomes": dict(self.outcomes),
            "restarts_by_reason": dict(self.restarts),
            "handlers": {name: h.snapshot() for name, h in self.handlers.items()},
            "histograms": {
                "queue_wait_seconds": self.queue_wait.snapshot(),
                "handler_duration_seconds": self.handler.snapshot(),
                "request_duration_seconds": self.request.snapshot(),
                "hub_lag_seconds": self.hub_lag.snapshot(),
            },
        }


class LogLimiter:
    """At most ``burst`` log lines per ``period`` seconds; the rest are held back and
    counted, so a failing handler or a hostile peer cannot flood the log and nothing is
    silently lost.

    The count is reported once: by :meth:`flush` once the window in which the lines were
    held back has ended (the front end's ticker calls it and logs the summary, see
    ``gaspar.ops.logs.log_held_back``), or else with the next line allowed (:meth:`allow`).
    A window starts with the first line after the previous one ended. ``clock`` is
    injected (monotonic seconds).
    """

    def __init__(self, burst: int = 10, period: float = 60.0, clock: Any = time.monotonic) -> None:
        self.burst, self.period, self.clock = burst, period, clock
        self.window = clock()
        self.used = 0
        self.suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """(may this line be logged, how many were held back and not reported yet)."""
        now = self.clock()
        if now - self.window >= self.period:
            self.window, self.used = now, 0
        if self.used < self.burst:
            self.used += 1
            suppressed, self.suppressed = self.suppressed, 0
            return True, suppressed
        self.suppressed += 1
        return False, 0

    def flush(self, final: bool = False) -> int:
        """How many lines were held back in a window that has now ended (``final``: whether
        it has ended or not), reported once: 0 if none, or if the window is still open."""
        if not self.suppressed or (not final and self.clock() - self.window < self.period):
            return 0
        held, self.suppressed = self.suppressed, 0
        return held


class ShedReport:
    """What the log says of shedding, with no I/O: one summary a ``period`` while requests
    are shed (how many, by reason), one when shedding ends, and a line when overload begins
    and ends; never one line per request. :meth:`update` is called by the front end's ticker
    with the counts so far and returns the lines to log."""

    def __init__(self, period: float = 1.0, quiet: float = 1.0) -> None:
        self.period, self.quiet = period, quiet
        self.reported: dict[str, int] = {}  # counts at the last summary
        self.at = 0.0  # when the last summary was written
        self.episode: dict[str, int] | None = None  # counts when the shedding began
        self.began = 0.0
        self.changed = 0.0  # when the counts last moved
        self.last: dict[str, int] = {}
        self.overloaded = False
        self.overloaded_since = 0.0

    def update(
        self, now: float, counts: dict[str, int], overloaded: bool, queued: int, target_ms: float
    ) -> list[tuple[int, str]]:
        """``(level, line)`` to log now, from the counts by reason so far."""
        lines: list[tuple[int, str]] = []
        if overloaded and not self.overloaded:
            self.overloaded, self.overloaded_since = True, now
            lines.append(
                (
                    logging.WARNING,
                    f"Overloaded: requests have waited longer than {target_ms:g} ms for a whole interval; "
                    f"serving newest first and shedding what waits longer ({queued} queued)",
                )
            )
        elif not overloaded and self.overloaded:
            self.overloaded = False
            lines.append((logging.INFO, f"No longer overloaded, after {now - self.overloaded_since:.1f}s"))
        if not self.last:  # the first look: the counts so far are the baseline
            self.last = self.reported = dict(counts)
        if counts != self.last:
            self.last, self.changed = dict(counts), now
            if self.episode is None:
                self.episode, self.began = dict(self.reported), now
                self.at = -math.inf  # the first summary goes out at once
        if self.episode is None:
            return lines
        if counts != self.reported and now - self.at >= self.period:
            since = "so far" if self.at == -math.inf else f"in the last {now - self.at:.1f}s"
            lines.append((logging.WARNING, f"Shed {_tally(counts, self.reported)} {since}; {queued} queued"))
            self.reported, self.at = dict(counts), now
        if now - self.changed >= self.quiet and counts == self.reported:
            total = _tally(counts, self.episode)
            lines.append((logging.INFO, f"Shedding ended: {total} shed over {self.changed - self.began:.1f}s"))
            self.episode = None
        return lines


def _tally(now: dict[str, int], then: dict[str, int]) -> str:
    """``12 requests (queue_delay 10, deadline 2)``: what changed from ``then`` to ``now``."""
    moved = {k: v - then.get(k, 0) for k, v in now.items() if v - then.get(k, 0)}
    total = sum(moved.values())
    parts = ", ".join(f"{k} {v}" for k, v in moved.items())
    return f"{total} request{'s' if total != 1 else ''} ({parts})"


def _le(bound: float) -> float | str:
    return "+Inf" if bound == float("inf") else bound


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


__all__ = [
    "LogLimiter",
    "ShedReport",
    "Telemetry",
    "Histogram",
    "WorkerFigures",
    "BUCKETS",
    "OUTCOMES",
    "RESTART_REASONS",
]
