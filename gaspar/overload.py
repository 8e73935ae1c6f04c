"""Overload rules, with no I/O: when to shed a queued request, in which order to serve,
how much a client may retry, and how many bytes the front end may hold.

Everything here is policy, driven by an injected clock and tested as a table of cases
(``tests/test_overload.py``); the dispatcher and the front end apply it.

**Queue-delay control** (:class:`QueueControl`), after Facebook's RPC servers ("Fail at
Scale", ACM Queue 2015) and CoDel:

* Normally requests are served first in, first out and may wait up to ``queue_timeout``.
* The queue is **standing** when it has not been empty for ``interval`` and, in each of the
  last two intervals, requests arrived clearly faster than workers started them (more than
  1.25x, plus one per worker); it stays so until an interval in which they did not. Then
  requests are served **newest first** (adaptive LIFO: the newest are the ones whose
  clients are most likely still there).
* The server is **overloaded** when the queue has kept standing and growing for two more
  intervals (four in all). Then a request that has waited longer than ``target`` is shed at
  once, with a fast answer, instead of rotting until its client gives up.

The growth test is gaspar's addition to Facebook's rule, measured necessary: a queue that
stands but drains (a burst of a thousand requests at once) or holds steady (a closed loop of
patient clients, each sending its next request when its reply comes) is not overload, and
shedding there would only turn waiting clients into failed ones. Newest-first starts early
because it costs a burst nothing (every request is still served) and keeps the replies of a
real overload fresh from its start; shedding waits two intervals more because a burst that
trickles in over a few intervals on a busy machine (1,000 connections sending at once, the
test client sharing the two cores) looked like overload for two intervals in 2 runs of 5,
and was shed by the hundred.

Both thresholds follow the handler's speed: ``interval`` is at least ten handler runs per
worker and ``target`` at least two, so a short burst of slow requests is not mistaken for
overload, and under overload there is always a fresh request ready when a worker frees up.

**Deadlines**: a request whose client's deadline has passed, or is closer than one typical
handler run, is shed before it runs ("cannot be met").

**Retries** (:class:`RetryBudget`): a shed request never started, so a retry is safe; a
client retries at most once, and only while its retries stay under ~10% of its requests, so
retries cannot multiply an overload (the gRPC/Finagle retry budget).

**Memory** (:class:`ByteBudget`): the bytes of request bodies and replies the front end holds.
A connection that would go past the limit waits (its socket is not read, so TCP pushes back
on the client) and is woken in arrival order as bytes are freed.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Hashable

# why a request was shed: the "reason" of its Overloaded reply
QUEUE_TIMEOUT = "queue_timeout"  # waited past queue_timeout
QUEUE_DELAY = "queue_delay"  # a standing queue: waited past the target
QUEUE_FULL = "queue_full"  # max_queued were waiting: the oldest made room
DEADLINE = "deadline"  # the client's deadline passed, or could not be met
REASONS = (QUEUE_TIMEOUT, QUEUE_DELAY, QUEUE_FULL, DEADLINE)

_EWMA = 0.2  # weight of the newest handler run in the moving average


class QueueControl:
    """CoDel-style queue-delay control with adaptive LIFO; see the module docstring.

    The dispatcher tells it when the queue was seen empty (:meth:`saw_empty`) and how long
    each handler ran (:meth:`observe`); it answers :meth:`standing` (serve newest first) and
    :meth:`limit` (the longest a request may have waited, now).
    """

    def __init__(
        self,
        queue_timeout: float | None = 2.0,
        target: float = 0.005,
        interval: float = 0.1,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue_timeout = queue_timeout or None  # None or 0: no bound in a burst
        self.target = target
        self.interval = interval
        self._workers = max(1, workers)
        self.clock = clock
        self.service = 0.0  # moving average of a handler run, seconds; 0 until one ends
        self.last_empty = clock()
        self.window_start = self.last_empty
        self.arrivals = 0  # in the current window
        self.starts = 0
        self.growing = 0  # consecutive past windows in which the queue grew
        self.lifo = False  # standing: entered as below; left once an interval does not grow
        self._observed = 0
        self._thresholds()

    # The thresholds change only with the handler's speed and the pool's size; they are kept
    # computed, since the dispatcher asks for them on every request.

    def _thresholds(self) -> None:
        per_worker = self.service / self._workers
        self._interval = max(self.interval, 10 * per_worker)
        target = max(self.target, 2 * per_worker)
        self._target = min(target, self.queue_timeout) if self.queue_timeout else target
        self._window_end = self.window_start + self._interval

    @property
    def workers(self) -> int:
        return self._workers

    @workers.setter
    def workers(self, n: int) -> None:
        self._workers = max(1, n)
        self._thresholds()

    @property
    def per_worker(self) -> float:
        """Seconds between two requests finishing, with every worker busy."""
        return self.service / self._workers

    def effective_interval(self) -> float:
        return self._interval

    def effective_target(self) -> float:
        return self._target

    def saw_empty(self, now: float) -> None:
        """The queue was empty at ``now``."""
        self.last_empty = now

    def arrived(self, now: float) -> None:
        """A request joined the queue."""
        if now >= self._window_end:
            self._roll(now)
        self.arrivals += 1

    def started(self, now: float) -> None:
        """A request left the queue for a worker (shed ones do not count)."""
        if now >= self._window_end:
            self._roll(now)
        self.starts += 1

    def _roll(self, now: float) -> None:
        grew = self.arrivals > 1.25 * self.starts + self._workers
        self.growing = self.growing + 1 if grew and now - self.window_start < 2 * self._interval else 0
        if not self.growing:
            self.lifo = False
        self.window_start, self.arrivals, self.starts = now, 0, 0
        self._window_end = now + self._interval

    def observe(self, seconds: float) -> None:
        """A handler ran for ``seconds`` (wall time, from its start to its reply)."""
        seconds = max(0.0, seconds)
        first = not self.service
        self.service = seconds if first else self.service + _EWMA * (seconds - self.service)
        self._observed += 1
        if first or not self._observed & 7:  # the thresholds move slowly: every 8th is enough
            self._thresholds()

    def standing(self, now: float, queued: int) -> bool:
        """True while the queue stands (serve newest first): entered when a queue has not
        been empty for an interval and grew in the last two; left at the end of the first
        interval in which it did not grow. A queue kept short by shedding may empty for a
        moment; that alone does not end it."""
        if not queued:
            return False
        if now >= self._window_end:
            self._roll(now)
        if not self.lifo and self.growing >= 2 and now - self.last_empty >= self._interval:
            self.lifo = True
        return self.lifo

    def overloaded(self, now: float, queued: int) -> bool:
        """True while overloaded (shed what waited past the target): the queue stands and
        has grown for four intervals in a row."""
        return self.standing(now, queued) and self.growing >= 4

    def mode(self, now: float, queued: int) -> tuple[bool, float | None, str]:
        """``(standing, limit, reason)`` at once: serve newest first?, the longest a queued
        request may have waited, and the reason to give one shed for that."""
        lifo = self.standing(now, queued)
        if lifo and self.growing >= 4:
            return True, self._target, QUEUE_DELAY
        return lifo, self.queue_timeout, QUEUE_TIMEOUT

    def limit(self, now: float, queued: int) -> tuple[float | None, str]:
        """The longest a queued request may have waited at ``now``, and the shed reason."""
        _, limit, reason = self.mode(now, queued)
        return limit, reason

    def hopeless(self, now: float, deadline: float | None) -> bool:
        """True if a client's (absolute) deadline has passed or is closer than one typical
        handler run: running the request would only produce a reply nobody reads."""
        return deadline is not None and deadline - now <= self.service

    def retry_after(self, queued: int) -> float:
        """Seconds after which a retry is likely to be served: the time the queue in front
        of it takes to drain, at least one handler run (at least 1 ms)."""
        wait = max(self.service, (queued + 1) * self.per_worker)
        if self.queue_timeout:
            wait = min(wait, self.queue_timeout)
        return max(0.001, wait)


class RetryBudget:
    """At most one retry per shed request, and retries at most ``ratio`` of the requests.

    Each request deposits ``ratio`` of a token (up to ``cap``); a retry spends one. A client
    starts with one token, so its first refusal can be retried.
    """

    def __init__(self, ratio: float = 0.1, cap: float = 10.0) -> None:
        self.ratio, self.cap = ratio, cap
        self.tokens = 1.0

    def on_request(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)

    def try_retry(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def backoff(retry_after: float | None, left: float | None, rng: Callable[[], float] = random.random) -> float | None:
    """Seconds to wait before the one retry of a shed request: the server's ``retry_after``
    (at least 5 ms, at most 1 s) with full jitter, ``None`` if the client's time ``left``
    would not cover the wait plus that much again for the request itself."""
    base = min(1.0, max(0.005, retry_after or 0.0))
    delay = base * (0.5 + rng())  # jitter: 0.5x to 1.5x, so retries do not arrive together
    if left is not None and left < delay + base:
        return None
    return delay


class ByteBudget:
    """Bytes held by the front end, against ``limit``; the over-limit wait in FIFO order.

    :meth:`take` reserves bytes ahead of reading them (False: wait, you are queued);
    :meth:`add` counts bytes that are held already (a small body read whole, a reply);
    :meth:`release` frees bytes and returns the waiters that may go on now, in order.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiting: deque[tuple[Hashable, int]] = deque()
        self._queued: set[Hashable] = set()

    def take(self, who: Hashable, n: int) -> bool:
        if (not self._waiting or self._waiting[0][0] == who) and self.used + n <= self.limit:
            if self._waiting and self._waiting[0][0] == who:
                self._waiting.popleft()
                self._queued.discard(who)
            self.add(n)
            return True
        if who not in self._queued:
            self._queued.add(who)
            self._waiting.append((who, n))
        return False

    def room(self, who: Hashable) -> bool:
        """True if ``who`` may read at all: below the limit, and nobody waiting ahead of it.
        Otherwise ``who`` waits in line (for a single byte of room)."""
        if self.used < self.limit and not self._waiting:
            return True
        if self._waiting and self._waiting[0][0] == who and self.used < self.limit:
            self._waiting.popleft()
            self._queued.discard(who)
            return True
        if who not in self._queued:
            self._queued.add(who)
            self._waiting.append((who, 1))
        return False

    def add(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def release(self, n: int) -> list[Hashable]:
        self.used = max(0, self.used - n)
        return self.ready() if self._waiting else []

    def ready(self) -> list[Hashable]:
        """Waiters at the head of the line whose bytes now fit (they call take again)."""
        out, room = [], self.limit - self.used
        for who, n in self._waiting:
            if n > room:
                break
            out.append(who)
            room -= n
        return out

    def forget(self, who: Hashable) -> list[Hashable]:
        """``who`` stopped waiting (its connection closed)."""
        if who in self._queued:
            self._queued.discard(who)
            self._waiting = deque(w for w in self._waiting if w[0] != who)
        return self.ready()

    @property
    def waiting(self) -> int:
        return len(self._waiting)


__all__ = ["QueueControl", "RetryBudget", "ByteBudget", "backoff", "REASONS"]
