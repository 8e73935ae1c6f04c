"""Admission, with no I/O: how many bytes the front end may hold, how fast a request must
arrive, and when the daemon is stalled. Tested as state machines (``tests/test_overload.py``).

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

import time
from collections.abc import Callable, Hashable


class ByteBudget:
    """The bytes the front end holds, against ``limit``: counted as they arrive, never for
    bytes merely declared.

    * ``used``: request bytes read (a request in progress, bodies in flight) and reply
      bytes not yet sent. A reader may read only what fits (:meth:`room`), so reads never
      take ``used`` past the limit; a reply is counted but never refused (:meth:`reply`):
      its worker has run. Instead, while unsent replies alone hold the limit less the
      reserve (:attr:`over`), no request goes to a worker (``Dispatcher(memory=)``), so
      clients that never read the replies they asked for (a small request for a large
      reply, on many connections) cannot take the front end past the limit by more than
      the replies already being made.
    * **Large bodies are admitted.** A body longer than one read may go on past its first
      chunk only once :meth:`admit` has *committed* the rest of it: admitted bodies are
      sure to complete (their remaining bytes are kept free for them), so many large
      uploads at once never fill the budget with halves that cannot finish. Bodies are
      admitted in arrival order within ``limit - reserve``, so at least ``reserve`` bytes
      (an eighth of the limit) stay for small requests: a small request is never stuck
      behind large ones. A body is committed only after its first chunk arrived: a client
      that declares 64 MiB and trickles holds what it sent, not what it declared. While
      others wait for admission, an admitted body must keep arriving fast (:meth:`laggards`).
    * Waiters (for room, or for admission) go in arrival order; :meth:`release` returns the
      ones that may try again. Each call of :meth:`room` gives one read's worth to the head
      of the line, so readers take turns.
    """

    def __init__(self, limit: int, reserve: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.reserve = limit // 8 if reserve is None else reserve
        self.used = 0
        self.replies = 0  # of ``used``: reply bytes not yet sent
        self.gate = limit - self.reserve  # unsent replies from this many on: ``over``
        self.over_since = 0.0  # since when they have been (the sweep's clock; 0: not over)
        #: Unsent replies hold the budget less its reserve: start no more requests until
        #: clients read them, or are reset for not reading (memory pressure). An attribute,
        #: kept by :meth:`reply` and :meth:`release`: the dispatcher reads it per request.
        self.over = False
        self.peak = 0
        self.freed = 0  # bytes freed since the start (a stall is a long time without)
        self.committed = 0  # bytes still to come of admitted bodies
        self._trimmed_at = 0  # ``freed`` when trim_due last said yes
        self._admitted: dict[Hashable, int] = {}  # who -> bytes of its body still to come
        self._since: dict[Hashable, tuple[float, int]] = {}  # who -> when admitted, bytes then to come
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
            self._since[who] = (self.clock(), remaining)
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
        self._since.pop(who, None)
        if left:
            self.committed -= left
            return self.ready()
        return []

    def laggards(self, now: float, rate: float, grace: float) -> list[Hashable]:
        """While bodies wait for admission: the admitted ones arriving slower than ``rate``
        bytes a second on average since their admission (after ``grace`` seconds), to be
        reset. A commitment keeps up to the whole budget from everyone else, so it must keep
        moving much faster than ``body_min_rate``, which alone would let eight clients hold
        a 512 MiB budget for hours at 2 KiB/s each. No one waiting: none (``rate`` 0: off)."""
        if not self._admit or not rate:
            return []
        out = []
        for who, (since, size) in self._since.items():
            elapsed = now - since
            if elapsed > grace and size - self._admitted[who] < rate * elapsed:
                out.append(who)
        return out

    def add(self, n: int) -> None:
        self.used += n
        if self.used > self.peak:
            self.peak = self.used

    def reply(self, n: int) -> None:
        """A reply (or a stream's item) of ``n`` bytes to send: counted, never refused."""
        self.replies += n
        self.over = self.replies >= self.gate
        self.add(n)

    def release(self, n: int, replies: int = 0) -> list[Hashable]:
        """``n`` bytes are no longer held, ``replies`` of them unsent reply bytes."""
        if replies:
            self.replies = max(0, self.replies - replies)
            self.over = self.replies >= self.gate
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
        self._since.pop(who, None)
        left = self._admitted.pop(who, 0)
        self.committed -= left
        return self.ready()

    def trim_due(self, every: int) -> bool:
        """True when nothing is held and ``every`` bytes or more were freed since the last
        True: the moment to hand the allocator's free memory back to the system (a flood of
        large bodies or replies leaves the process's RSS at its peak otherwise)."""
        if self.used or self.freed - self._trimmed_at < every:
            return False
        self._trimmed_at = self.freed
        return True

    @property
    def waiting(self) -> int:
        """Connections waiting for memory (for room, or for their body's admission)."""
        return len(self._room) + len(self._admit)

    @property
    def pressed(self) -> bool:
        """Memory pressure: connections wait for memory, or requests for replies to go."""
        return bool(self._room or self._admit) or self.over


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
    for the byte budget, or requests for unsent replies to go, and no byte of it was freed;
    ``workers``: requests are queued and no worker started or finished one. The time
    allowed follows the handlers: at least ``after`` seconds, and three handler runs."""

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

    def reason(self, now: float, waiting_for_memory: int | bool, queued: int, service: float = 0.0) -> str | None:
        """Why the daemon is stalled now, or None."""
        allowed = max(self.after, 3 * service)
        if waiting_for_memory and now - self.freed_at > allowed:
            return "memory"
        if queued and now - self.worked_at > allowed:
            return "workers"
        return None


__all__ = ["ByteBudget", "BodyClock", "Stall"]
