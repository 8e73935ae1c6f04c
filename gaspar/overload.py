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

**Retries** (:class:`RetryBudget`): a shed request never started, so a retry is safe; a
client retries at most once, and only while its retries stay under ~10% of its requests, so
retries cannot multiply an overload (the gRPC/Finagle retry budget).

**Memory** (:class:`ByteBudget`): the bytes of requests and replies the front end holds,
counted as they arrive. A connection that would go past the limit waits (its socket is not
read, so TCP pushes back on the client) and is woken in arrival order as bytes are freed; a
large body is admitted (its rest committed) once its first chunk has arrived, so every
admitted body can finish, and small requests keep a reserve of their own.

**Slow peers** (:class:`BodyClock`): a request that has begun to arrive must keep arriving at
a minimum rate, or its connection is reset. **Stalls** (:class:`Stall`): when work waits and
nothing moves for a few seconds, the daemon says it is not ready, and why.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable

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
    """The bytes the front end holds, against ``limit``: counted as they arrive, never for
    bytes merely declared.

    * ``used``: request bytes read (a request in progress, bodies in flight) and reply
      bytes not yet sent. A reader may read only what fits (:meth:`room`), so reads never
      take ``used`` past the limit; replies are counted but never refused (:meth:`add`).
    * **Large bodies are admitted.** A body longer than one read may go on past its first
      chunk only once :meth:`admit` has *committed* the rest of it: admitted bodies are
      sure to complete (their remaining bytes are kept free for them), so many large
      uploads at once never fill the budget with halves that cannot finish. Bodies are
      admitted in arrival order within ``limit - reserve``, so at least ``reserve`` bytes
      (an eighth of the limit) stay for small requests: a small request is never stuck
      behind large ones. A body is committed only after its first chunk arrived: a client
      that declares 64 MiB and trickles holds what it sent, not what it declared.
    * Waiters (for room, or for admission) go in arrival order; :meth:`release` returns the
      ones that may try again. Each call of :meth:`room` gives one read's worth to the head
      of the line, so readers take turns.
    """

    def __init__(self, limit: int, reserve: int | None = None) -> None:
        self.limit = limit
        self.reserve = limit // 8 if reserve is None else reserve
        self.used = 0
        self.peak = 0
        self.freed = 0  # bytes freed since the start (a stall is a long time without)
        self.committed = 0  # bytes still to come of admitted bodies
        self._admitted: dict[Hashable, int] = {}  # who -> bytes of its body still to come
        self._room: dict[Hashable, None] = {}  # waiting for room to read, in order
        self._admit: dict[Hashable, int] = {}  # waiting for admission, in order, with the bytes

    def room(self, who: Hashable) -> int:
        """Bytes ``who`` may read now (0: wait; it is queued and :meth:`release` wakes it).
        An admitted body may use every free byte, others what admitted bodies do not need."""
        free = self.limit - self.used
        mine = self._admitted.get(who)
        if mine is not None:  # its bytes are committed: it never queues behind others
            free -= self.committed - mine  # what others have committed is theirs
            if free > 0:
                self._room.pop(who, None)
                return free
        elif free - self.committed > 0:
            if not self._room:
                return free - self.committed
            if next(iter(self._room)) is who:
                del self._room[who]
                return free - self.committed
        self._room.setdefault(who, None)
        return 0

    def admit(self, who: Hashable, remaining: int) -> bool:
        """``who``'s body has ``remaining`` bytes still to come: commit them, or queue it
        (False) until they fit. The first body in line always fits once the budget is free
        enough, reserve or not, so a body as large as the limit still goes."""
        if who in self._admitted:
            return True
        if self._admit and next(iter(self._admit)) is not who:
            self._admit.setdefault(who, remaining)
            return False
        room = self.limit - self.used - self.committed
        if remaining <= room - (self.reserve if self.committed else 0):
            self._admit.pop(who, None)
            self._admitted[who] = remaining
            self.committed += remaining
            return True
        self._admit[who] = remaining
        return False

    def arrived(self, who: Hashable, n: int) -> None:
        """``who`` read ``n`` bytes: counted; an admitted body's turn commitment into use."""
        left = self._admitted.get(who)
        if left is not None:
            take = min(n, left)
            self._admitted[who] = left - take
            self.committed -= take
        self.add(n)

    def settle(self, who: Hashable) -> list[Hashable]:
        """``who``'s body is whole (or abandoned): what is left of its commitment is freed."""
        left = self._admitted.pop(who, None)
        if left:
            self.committed -= left
            return self.ready()
        return []

    def add(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def release(self, n: int) -> list[Hashable]:
        self.used = max(0, self.used - n)
        self.freed += n
        return self.ready() if self._room or self._admit else []

    def ready(self) -> list[Hashable]:
        """Waiters that may try again now, in order: readers while anything is free, and
        the bodies at the head of the admission line that fit."""
        out: list[Hashable] = []
        free = self.limit - self.used - self.committed
        if self._admit:
            room, reserve = free, self.reserve if self.committed else 0
            for who, n in self._admit.items():
                if n > room - reserve:
                    break
                out.append(who)
                room, reserve = room - n, self.reserve
        if self._room:
            if free > 0:
                out.extend(w for w in self._room if w not in out)
            else:  # room for admitted bodies only: each its own commitment
                out.extend(w for w in self._room if self._admitted.get(w) and w not in out)
        return out

    def forget(self, who: Hashable) -> list[Hashable]:
        """``who`` is gone (its connection closed): out of every line, commitment freed."""
        self._room.pop(who, None)
        self._admit.pop(who, None)
        left = self._admitted.pop(who, 0)
        self.committed -= left
        return self.ready()

    @property
    def waiting(self) -> int:
        """Connections waiting for memory (for room, or for their body's admission)."""
        return len(self._room) + len(self._admit)


class BodyClock:
    """A request that has begun to arrive must keep arriving (nginx's
    ``client_body_timeout``, Apache's ``mod_reqtimeout``), as a leaky bucket of time: it
    starts with ``timeout`` seconds, loses one each second, and gains one for each
    ``min_rate`` bytes that arrive, banking at most ``timeout`` seconds ahead. Once the
    bucket is empty the request is too slow, and its connection is reset. So a client that
    keeps up ``min_rate`` (in chunks at most ``timeout`` apart) is never reset, and one that
    stops, or trickles after a burst, is reset within ``timeout`` seconds of falling behind.
    Time spent waiting for the front end's memory (:meth:`pause`) does not count: then it
    is the front end that does not read. ``min_rate`` 0: off."""

    __slots__ = ("timeout", "per_byte", "balance", "at", "paused_at")

    def __init__(self, timeout: float, min_rate: float) -> None:
        self.timeout = timeout
        self.per_byte = 1.0 / min_rate if min_rate else 0.0  # seconds each byte earns
        self.balance = timeout
        self.at: float | None = None  # when the balance was last brought up to date; None: idle
        self.paused_at: float | None = None

    @property
    def start(self) -> float | None:
        """None while no request is arriving."""
        return self.at

    def begin(self, now: float) -> None:
        """The first bytes of a request arrived."""
        self.balance, self.at, self.paused_at = self.timeout, now, None

    def end(self) -> None:
        """The request arrived whole."""
        self.at, self.paused_at = None, None

    def arrived(self, now: float, n: int, left: int = 0) -> bool:
        """``n`` more bytes arrived; False if the request is too slow."""
        if self.at is None:
            self.begin(now)
        if self.paused_at is None:
            self.balance -= now - self.at
            self.at = now
        if self.balance < 0 and self.per_byte:
            return False
        self.balance = min(self.timeout, self.balance + n * self.per_byte)
        return True

    def too_slow(self, now: float, left: int = 0) -> bool:
        """True once the bucket ran dry (not while paused, nor when off)."""
        if self.at is None or self.paused_at is not None or not self.per_byte:
            return False
        return self.balance - (now - self.at) < 0

    def pause(self, now: float) -> None:
        if self.at is not None and self.paused_at is None:
            self.balance -= now - self.at
            self.at = self.paused_at = now

    def resume(self, now: float) -> None:
        if self.at is not None and self.paused_at is not None:
            self.at, self.paused_at = now, None


class Stall:
    """No request made progress for a while, though work waits: the daemon cannot serve
    (``/readyz`` says 503, ``gaspar_stalled{reason}`` says why). ``memory``: connections wait
    for the byte budget and no byte of it was freed; ``workers``: requests are queued and no
    worker started or finished one. The time allowed follows the handlers: at least
    ``after`` seconds, and three handler runs."""

    REASONS = ("memory", "workers")

    def __init__(self, after: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.after = after
        self.clock = clock
        now = clock()
        self.freed_at = now  # bytes of the budget last freed
        self.worked_at = now  # a worker last started or finished a request

    def freed(self, now: float) -> None:
        self.freed_at = now

    def worked(self, now: float) -> None:
        self.worked_at = now

    def sample(self, now: float, freed: int, worked: int) -> None:
        """The budget's ``freed`` and the dispatcher's started + finished counts, sampled
        (by the front end's ticker): progress is a change in them."""
        last_freed, last_worked = getattr(self, "_last", (freed, worked))
        if freed != last_freed:
            self.freed_at = now
        if worked != last_worked:
            self.worked_at = now
        self._last = (freed, worked)

    def reason(self, now: float, waiting_for_memory: int, queued: int, service: float = 0.0) -> str | None:
        """Why the daemon is stalled now, or None."""
        allowed = max(self.after, 3 * service)
        if waiting_for_memory and now - self.freed_at > allowed:
            return "memory"
        if queued and now - self.worked_at > allowed:
            return "workers"
        return None


__all__ = ["QueueControl", "RetryBudget", "ByteBudget", "BodyClock", "Stall", "backoff", "REASONS"]
