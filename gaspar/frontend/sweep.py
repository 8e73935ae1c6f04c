"""Which client connections to end, checked by the front end's sweep every 0.5 s (and the
body rate as bytes arrive): rules over a :class:`gaspar.frontend.connection.Connection`'s
state, with the clock passed in.

* **A request arriving too slowly** (``body_timeout``, ``body_min_rate``): reset.
* **Silent past** ``idle_timeout``: a connection waiting for its request's rest, for the
  byte budget, or for its client to read its replies is reset (a client draining the
  kernel's send buffer at ``body_min_rate`` or faster is reading, though the front end has
  not written to it); one awaiting its next request is closed. A connection whose client
  waits for us (requests in flight, nothing else pending) is exempt: its requests' own
  limits apply.
* **A large body holding the budget from others**: while a body waits for admission, an
  admitted one (its rest committed, up to 64 MiB of the budget) must arrive at
  :data:`ADMITTED_RATE_FACTOR` times ``body_min_rate`` on average since its admission (256
  KiB/s by default, after ``body_timeout`` seconds), or it is reset: ``body_min_rate`` alone
  would let eight clients hold a 512 MiB budget for hours at 2 KiB/s each, and every
  request over 64 KiB wait that long.
* **Under memory pressure** (connections wait for the byte budget, or unsent replies hold
  it and requests wait for them to go: ``ByteBudget.pressed``), a connection holding
  replies is reset, not after ``idle_timeout``, when its client took none of them for
  :data:`PRESSURE_GRACE` seconds; or, once it has been seen taking some, when it took them
  slower than ``body_min_rate`` x :data:`PRESSED_READ_FACTOR` (64 KiB/s by default) over a
  window of :data:`PRESSURE_WINDOW` seconds. The operator's memory is for the clients that
  read: a client that pipelines requests for large replies and never reads them, or reads
  them at 24 KB/s, must not stall everyone else. The kernel tells the front end what a
  client took only in steps (its receive window's updates, 128 KB or more apart): a reader
  seen taking a step is judged over the longer window.
* **Replies may not hold the whole budget for long.** Once unsent replies have held it
  (``ByteBudget.over``: no request starts) for :data:`REPLIES_HOLD` seconds, the connection
  holding the most of them is reset, one a sweep, whatever its client's pace: three
  clients reading 36 MB replies at 100 KB/s would otherwise keep every other client's
  requests from starting for six minutes.
* **A stream its client does not read** (:func:`stalled_streams`): ended when its worker has
  waited for room for the operator's ``timeout`` and its client took nothing meanwhile,
  never its worker killed for it. A client that reads slowly keeps its stream.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import Any

from gaspar.errors import WorkerTimeout
from gaspar.ops.humanize import human_mib
from gaspar.process.running import STREAM_BYTES, STREAM_WINDOW

#: Under memory pressure, replies unread this long (seconds) end their connection...
PRESSURE_GRACE = 1.0
#: ...and this long once its client has been seen taking some: then it must take them at
#: PRESSED_READ_FACTOR times body_min_rate over each such window.
PRESSURE_WINDOW = 4.0
#: Unsent replies may hold the whole budget this long (s) before the largest holder is reset.
REPLIES_HOLD = 10.0
#: While bodies wait for admission, an admitted one must arrive this many times faster than
#: ``body_min_rate``.
ADMITTED_RATE_FACTOR = 256
#: Under memory pressure, a client holding replies must take them this many times faster
#: than ``body_min_rate`` (a 512 kbit/s link) over each PRESSURE_WINDOW, or be reset.
PRESSED_READ_FACTOR = 64


def sweep(conns: list[Any], now: float, settings: Any, budget: Any) -> None:
    """Apply the rules above to each connection (``budget``: the front end's ByteBudget)."""
    rate = settings.body_min_rate * ADMITTED_RATE_FACTOR
    for conn in budget.laggards(now, rate, settings.body_timeout):
        if not conn.closed:
            too_slow(conn, f"its large body arrived slower than {rate:.0f} bytes/s while others waited for memory")
    pressure, idle_timeout = budget.pressed, settings.idle_timeout
    for conn in conns:
        if not conn.closed:
            _sweep(conn, now, idle_timeout, pressure)
    budget.over_since = (budget.over_since or now) if budget.over else 0.0
    if budget.over and now - budget.over_since >= REPLIES_HOLD:
        holder = max((c for c in conns if not c.closed and c.unsent), key=lambda c: c.unsent, default=None)
        if holder is not None:
            why = f"Reset the connection holding the most unsent replies (%s): they held the budget {REPLIES_HOLD:.0f}s"
            _stalled(holder, why, human_mib(holder.unsent))


def _sweep(conn: Any, now: float, idle_timeout: float | None, pressure: bool) -> None:
    if conn.clock.too_slow(now, conn.reader.remaining):
        return too_slow(conn)
    slow = None
    if conn.out:
        if conn.outq is None:  # replies first seen waiting: unread since now, not since the request came
            conn.last_active = max(conn.last_active, now)
        slow = _reading(conn, now, pressure)
    else:
        conn.outq = conn.pressed = None
    quiet = now - conn.last_active
    if pressure and conn.out and not conn.starved:
        if quiet >= (PRESSURE_WINDOW if conn.pressed and conn.pressed[2] else PRESSURE_GRACE):
            return _stalled(conn, "Reset a connection whose replies went unread for %.0fs under memory pressure", quiet)
        if slow is not None:
            why = "Reset a connection taking its replies slower than %s under memory pressure"
            return _stalled(conn, why, slow)
    if not idle_timeout:
        return
    if conn.inflight > 0 and not conn.out and not conn.starved and not conn.reader.in_progress:
        return
    if quiet < idle_timeout:
        return
    if conn.reader.in_progress or conn.out or conn.starved:
        _stalled(conn, "Reset a connection stalled for %ss (idle_timeout)", idle_timeout)
    else:
        conn.close()


def _stalled(conn: Any, why: str, arg: Any) -> None:
    """Reset a connection that stalled (``idle_resets``), logged (rate-limited) with ``why``."""
    conn.front.log_refusal(why, arg)
    conn.front.counters.idle_resets += 1
    conn.abort()


def _reading(conn: Any, now: float, pressure: bool) -> str | None:
    """Replies wait to be written: is the client reading? The front end writes again only
    once the kernel's send buffer (up to MBs on loopback) has room for a large chunk, so its
    own writes say little; what the client took since the last sweep (what was written, less
    what the kernel still holds) at ``body_min_rate`` or faster says it reads, and counts as
    activity. Under memory pressure, what it took over a PRESSURE_WINDOW must come to
    PRESSED_READ_FACTOR times that: else, how slow it was (the connection is to be reset)."""
    try:
        queued = struct.unpack("i", fcntl.ioctl(conn.fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return None
    taken, rate = conn.sent - queued, conn.front.settings.body_min_rate  # taken: by the client, ever
    seen, conn.outq = conn.outq, (taken, now)
    if seen is not None and taken > seen[0] and taken - seen[0] >= rate * (now - seen[1]):
        conn.last_active = now
    if not pressure or conn.pressed is None:  # (this window's start, taken then, seen taking since)
        conn.pressed = (now, taken, False) if pressure else None
        return None
    since, before, moved = conn.pressed
    moved = moved or taken > before
    if now - since < PRESSURE_WINDOW:
        conn.pressed = (since, before, moved)
        return None
    conn.pressed = (now, taken, moved)
    need = rate * PRESSED_READ_FACTOR
    if taken - before >= need * (now - since):
        return None
    return f"{need:.0f} bytes/s ({taken - before} bytes in {now - since:.1f}s)"


def too_slow(conn: Any, why: str = "") -> None:
    """The request in progress arrives too slowly (slower than body_min_rate): reset."""
    s = conn.front.settings
    why = why or f"its request arrived slower than {s.body_min_rate} bytes/s over {s.body_timeout}s (body_min_rate)"
    conn.front.log_refusal("Reset a connection: %s", why)
    conn.front.counters.slow_requests += 1
    conn.abort()


def stalled_streams(front: Any, now: float) -> None:
    """Streams past the operator's timeout (the time between two items) because their
    worker waits for room: the front end holds a whole window of items its client has not
    read (STREAM_WINDOW items, or STREAM_BYTES of them). Not the handler's fault, so not a
    worker killed (``Dispatcher.expire`` would): the stream is ended (CANCEL:
    ``GeneratorExit`` at its ``yield``, ``finally`` blocks run, the worker takes other
    calls) and its client finds ``WorkerTimeout`` (``killed`` false) after the items,
    should it read them."""
    d, ended = front.dispatcher, False
    for worker in list(d.workers.values()):
        req = worker.current
        if req is None or not req.stream or req.cancelled or req.deadline is None or now < req.deadline:
            continue
        conn = req.waiter[0]
        if conn.owed.count(req) < STREAM_WINDOW and req.unread < STREAM_BYTES:
            continue  # the handler had room to send: its own slowness, and the timeout's to end
        if now - conn.last_active < req.timeout:  # its client reads, slowly (the kernel's steps): no stall
            req.deadline = conn.last_active + req.timeout
            continue
        window = f"{STREAM_WINDOW} items or {STREAM_BYTES >> 20} MiB"
        msg = f"its client left a window ({window}) unread past the timeout setting ({req.timeout}s); stream ended"
        front.outcomes.fail(req, WorkerTimeout, msg, timeout=req.timeout, limit="timeout", killed=False, pid=worker.pid)
        req.deadline = None
        d.cancel(req)
        ended = True
    if ended:  # the cancels go to the workers now
        front.router.settle()
