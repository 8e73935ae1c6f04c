"""Queue-delay control, with no I/O: when to shed a queued request, and in which order to
serve.

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
  ones whose clients are most likely still there) and a request that has waited a whole
  ``interval`` is **shed**, with a fast answer, instead of rotting until its client gives up.
  Why the interval and not the target: newest first, an older request is in nobody's way,
  and a client refused sooner comes back sooner; 200 closed-loop clients refused after 50 ms
  came back 2,800 times a second and took a quarter of a core from the workers on two cores;
  after the interval, a third of that. It ends after an interval in which no request waited
  past the target.

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

The client's retry rule is :mod:`gaspar.retry`; memory, slow peers and stalls are
:mod:`gaspar.core.admission`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# why a request was shed: the "reason" of its Overloaded reply
QUEUE_TIMEOUT = "queue_timeout"  # waited past queue_timeout
QUEUE_DELAY = "queue_delay"  # overloaded: waited past the target
QUEUE_FULL = "queue_full"  # max_queued were waiting: the oldest made room
DEADLINE = "deadline"  # the client's deadline passed, or could not be met
REASONS = (QUEUE_TIMEOUT, QUEUE_DELAY, QUEUE_FULL, DEADLINE)
#: Not a shed: the request waited past queue_timeout and the pool had no worker at all (all
#: died and are coming back, or --workers 0 and no agent has joined): ServerUnavailable.
NO_WORKERS = "no_workers"

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
        shed for that: the interval while overloaded, else ``queue_timeout``."""
        if self.overloaded:
            shed = min(self._interval, self.queue_timeout) if self.queue_timeout else self._interval
            return shed, QUEUE_DELAY
        return self.queue_timeout, QUEUE_TIMEOUT

    def may_hand_ahead(self, depth: int) -> bool:
        """May a busy worker be handed its ``depth``-th request ahead? Only while that
        request would not wait in its inbox longer than the target (``depth`` handler runs):
        prefetch hides the round trip between two short requests; behind 50 ms handlers
        four ahead would add 200 ms to every reply."""
        return depth * self.service <= self._target

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


__all__ = ["QueueControl", "REASONS", "QUEUE_TIMEOUT", "QUEUE_DELAY", "QUEUE_FULL", "DEADLINE", "NO_WORKERS"]
