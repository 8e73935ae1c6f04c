"""Overload rules, with no I/O: when to shed a queued request, in which order to serve,
how much a client may retry, and how many bytes the front end may hold.

Everything here is policy, driven by an injected clock and tested as a table of cases
(``tests/test_overload.py``); the dispatcher and the front end apply it.

**Queue-delay control** (:class:`QueueControl`), CoDel as Facebook's RPC servers use it
("Fail at Scale", ACM Queue 2015; Nichols and Jacobson, "Controlling Queue Delay", 2012):

* Normally requests are served first in, first out and may wait up to ``queue_timeout``.
* The server is **overloaded** when the *minimum* queue delay over an ``interval`` stayed
  above ``target``: for a whole interval, the oldest waiting request had always waited
  longer than the target (the queue never emptied, never caught up). Whether the queue grows
  or holds steady does not matter: a steady queue of two hundred closed-loop clients whose
  requests each wait seconds is the standing queue CoDel exists to remove.
* While overloaded, requests are served **newest first** (adaptive LIFO: the newest are the
  ones whose clients are most likely still there) and a request that has waited longer than
  ``target`` is **shed** at once, with a fast answer, instead of rotting until its client
  gives up. It ends after an interval in which no request waited past the target.

**A legitimate burst is not overload.** A thousand requests sent at once stand in the queue
for a while, then drain. Two things keep them from being shed (measured necessary: with the
standing rule alone, 1,000 connections sending at once on a busy two-core machine lost
hundreds of requests in two runs of five):

* the interval: a burst that drains within it never stands for a whole interval;
* a burst that takes longer is recognised by its drain: once the queue is past its peak
  and shrinking fast enough to empty within ``queue_timeout`` (the longest anyone may wait
  anyway), it is left to drain, first in, first out. Only a queue that holds or grows, or
  shrinks too slowly to empty in time, is overload.

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
QUEUE_DELAY = "queue_delay"  # overloaded: waited past the target
QUEUE_FULL = "queue_full"  # max_queued were waiting: the oldest made room
DEADLINE = "deadline"  # the client's deadline passed, or could not be met
REASONS = (QUEUE_TIMEOUT, QUEUE_DELAY, QUEUE_FULL, DEADLINE)

_EWMA = 0.2  # weight of the newest handler run in the moving average


class QueueControl:
    """CoDel queue-delay control with adaptive LIFO; see the module docstring.

    The dispatcher calls :meth:`check` with the queue's delay (how long its oldest request
    has waited, 0 when it is empty) and length whenever it changes the queue, and at least
    every sweep; and :meth:`observe` with each handler run. :attr:`overloaded` then says
    whether to serve newest first and shed past :meth:`limit`.
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
        self.overloaded = False
        self.above_since: float | None = None  # the queue's delay has stayed >= target since
        self.peak = 0  # the longest the queue has been since above_since
        self.peak_at = 0.0
        self.last_over = 0.0  # overloaded: when a request last waited past the target
        self.since = 0.0  # when the current overload began
        self.episodes = 0  # overloads so far
        #: When the longest run in progress started (None: none runs), given by the
        #: dispatcher: before handlers have finished (a cold start), a long run in progress
        #: is what says they are slow.
        self.oldest_run: Callable[[], float | None] = lambda: None
        self._observed = 0
        self._thresholds()

    # The thresholds change only with the handler's speed and the pool's size; they are kept
    # computed, since the dispatcher asks for them on every request.

    def _thresholds(self) -> None:
        per_worker = self.service / self._workers
        self._interval = max(self.interval, 10 * per_worker)
        target = max(self.target, 2 * per_worker)
        self._target = min(target, self.queue_timeout) if self.queue_timeout else target

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

    def check(self, now: float, delay: float, queued: int) -> None:
        """Update the state from the queue as it is at ``now``: its oldest request has
        waited ``delay`` seconds (0: the queue is empty) and ``queued`` requests wait."""
        if self.overloaded:
            if delay >= self._target:
                self.last_over = now
            elif now - self.last_over >= self._interval:  # an interval with none past the target
                self.overloaded, self.above_since = False, None
            return
        if delay < self._target:  # the minimum delay fell below the target: not standing
            self.above_since = None
            return
        if self.above_since is None:
            # the oldest request has been waiting all along, so the queue's delay has been
            # above the target since it waited that long, however rarely this is called
            self.above_since, self.peak, self.peak_at = now - (delay - self._target), queued, now
        if queued >= self.peak:
            self.peak, self.peak_at = queued, now
        if now - self.above_since < self._interval or self._draining(now, queued) or self._slow(now):
            return
        self.overloaded, self.last_over, self.since = True, now, now
        self.episodes += 1

    def _slow(self, now: float) -> bool:
        """A run in progress is longer than the handlers' average: the interval, ten runs
        per worker, counts it (the queue of a pool whose first runs are 5 s long is not
        overloaded after 100 ms)."""
        started = self.oldest_run()
        if started is None or now - started <= self.service:
            return False
        return now - self.above_since < 10 * (now - started) / self._workers

    def _draining(self, now: float, queued: int) -> bool:
        """A burst on its way out: past its peak and shrinking fast enough to be empty
        within ``queue_timeout`` (2 s when there is none)."""
        if queued >= self.peak or now <= self.peak_at:
            return False
        rate = (self.peak - queued) / (now - self.peak_at)  # requests a second, net
        return queued / rate <= (self.queue_timeout or 2.0)

    @property
    def standing(self) -> bool:
        """True while the queue's delay stays above the target (overloaded, or on its way
        to it unless it drains)."""
        return self.overloaded or self.above_since is not None

    def observe(self, seconds: float) -> None:
        """A handler ran for ``seconds`` (wall time, from its start to its reply)."""
        seconds = max(0.0, seconds)
        first = not self.service
        self.service = seconds if first else self.service + _EWMA * (seconds - self.service)
        self._observed += 1
        if first or not self._observed & 7:  # the thresholds move slowly: every 8th is enough
            self._thresholds()

    def limit(self) -> tuple[float | None, str]:
        """The longest a queued request may have waited, now, and the reason to give one
        shed for that: the target while overloaded, else ``queue_timeout``."""
        if self.overloaded:
            return self._target, QUEUE_DELAY
        return self.queue_timeout, QUEUE_TIMEOUT

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
