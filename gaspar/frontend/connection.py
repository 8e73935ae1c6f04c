"""Client connections in the front end: callbacks on one epoll inside the eventlet hub
(``hub.py``), no green thread each (a green thread, socket, timer and queue each cost more
than the rest of a request). Per connection (:class:`Connection`):

* A plain (gaspar 1.0) request gets its reply bytes and a normal close, or, on any error,
  an abortive close (SO_LINGER 0: the client's read fails with a reset). Bytes sent just
  before a reset may be discarded by the client's kernel, so no error text rides along.
* An extended request gets a framed reply (status, tag, body). With KEEPALIVE the
  connection stays open and may carry several requests at once (pipelining, up to
  ``max_pipeline``; past that it is not read until replies go out); replies are written as
  they complete, each with its request's tag, those of one 0MQ round in one system call.
* ``idle_timeout`` bounds how long a connection may be silent while a request is awaited
  or half-read, while it waits for memory, or while its replies wait to be read by the
  client; it does not apply while the client waits for its own replies. A client that
  leaves more than ``MAX_UNSENT`` bytes of replies unread is not read (no new requests)
  and none of its waiting requests goes to a worker (``FrontEnd.hold``) until it reads them;
  under memory pressure it is reset sooner (``gaspar.frontend.sweep``). A request that has
  begun to arrive must keep arriving (``body_timeout``, ``body_min_rate``:
  ``gaspar.core.admission.BodyClock``), or it is reset. A sweep checks both every 0.5 s.
* **A client that leaves** (a reset, or with ``abort_on_close`` a FIN, seen as EPOLLRDHUP
  while its requests wait) is dropped at once: the connection is reset and its requests
  cancelled, so a queued or handed-ahead one never reaches a handler (a running one
  finishes; its reply is dropped). Replies it left unwritten are counted (``replies_cut``).
* **Memory**: bytes as they arrive, bodies in flight and unsent replies count against
  ``max_buffered_bytes`` (:class:`gaspar.core.admission.ByteBudget`: a body past
  ``FIRST_CHUNK`` goes on once the rest of it is admitted); a connection for which nothing
  fits is not read, and is woken in turn as bytes are freed.

Every callback here runs in the hub's own greenlet, so nothing here may block or switch.
What a connection needs of the front end is :class:`gaspar.frontend.contract.FrontEnd`.
"""

from __future__ import annotations

import _socket
import select
import socket
import time
from collections import deque
from itertools import islice
from typing import Any

from gaspar.core.admission import BodyClock
from gaspar.errors import ProtocolError
from gaspar.frontend.contract import FrontEnd
from gaspar.frontend.linger import linger_reset
from gaspar.frontend.sweep import too_slow
from gaspar.wire.framing import RefusedHeader, Request, RequestReader, RequestTooLarge, Status, error_body, reply_header

_READ = select.EPOLLIN | select.EPOLLRDHUP
_WRITE = select.EPOLLOUT
# Edge-triggered, registered once for reading and writing: no epoll_ctl call to change
# interest per request, and none at close (closing the fd drops it from the epoll).
_CONN_EVENTS = _READ | _WRITE | select.EPOLLET
RECV_SIZE = 64 * 1024  # one read of a small request
_HEAD = len(reply_header(0, 0, 0))  # an extended reply's head, 9 bytes
#: A body longer than this is *admitted* once this much of it has arrived: the rest of it is
#: committed in the budget (ByteBudget.admit). A client that trickles holds what it sent.
FIRST_CHUNK = 64 * 1024
#: A client that leaves more than this many reply bytes unread is not read until it reads
#: them; idle_timeout ends it if it never does.
MAX_UNSENT = 1024 * 1024
GATHER = 256  # replies written by one sendmsg at most (Linux takes 1,024 buffers)


class Connection:
    """One client connection's state machine. ``deliver`` is what a request's outcome calls."""

    __slots__ = (
        "sock fd front reader inflight out paused closed eof keepalive last_active requests close_after "
        "budget held_reader held_bodies unsent admitted starved clock abort_on_close peer owed dirty drain holding "
        "outq sent pressed"
    ).split()

    def __init__(self, sock: _socket.socket, front: FrontEnd) -> None:
        sock.setblocking(False)
        s = front.settings
        self.sock = sock
        self.fd = sock.fileno()
        self.front = front
        self.reader = RequestReader(s.max_message_size)
        self.inflight = 0
        self.out: deque[memoryview] = deque()
        self.paused = False  # not reading: max_pipeline requests in flight, or MAX_UNSENT unsent
        self.closed = False
        self.eof = False  # the client sent its last request (or half-closed)
        self.keepalive = False
        self.last_active = time.monotonic()  # a byte read or written
        self.requests: set[Any] = set()  # Pending entries of this connection
        self.close_after = False  # close once the output is flushed
        self.budget = front.budget
        # bytes counted in the budget: in the reader, bodies of requests in flight, replies
        # not yet sent
        self.held_reader = 0
        self.held_bodies = 0
        self.unsent = 0
        self.admitted = False  # the body being read had the rest of it committed
        self.starved = False  # not reading: waiting for the budget
        self.clock = BodyClock(s.body_timeout, s.body_min_rate)
        self.abort_on_close = s.abort_on_close
        self.peer = None
        self.owed: list[Any] = []  # streams whose items wait in ``out``: a credit each once written
        self.dirty = False  # replies delivered, to write at the end of the round (write_soon)
        self.drain = 0  # a refused request's bytes to read and drop before the close (linger.py)
        self.holding = False  # over MAX_UNSENT: none more of its requests goes to a worker
        self.outq: tuple[int, float] | None = None  # the last sweep's: bytes its client had taken, when
        self.sent = 0  # bytes written to the socket, ever
        self.pressed: tuple[float, int, bool] | None = None  # under memory pressure: see sweep._reading
        if front.outcomes.access_log is not None:
            try:
                self.peer = sock.getpeername()[:2]
            except OSError:
                pass

    @property
    def partial(self) -> bool:
        return self.reader.in_progress

    @property
    def held(self) -> int:
        """Bytes of this connection counted in the budget."""
        return self.held_reader + self.held_bodies + self.unsent

    @property
    def awaiting_first(self) -> bool:
        """A new connection whose first request has not arrived yet."""
        return not self.keepalive and not self.eof and self.inflight == 0

    @property
    def busy(self) -> bool:
        """A graceful stop waits for busy connections: a request read, or being read."""
        return self.inflight > 0 or self.reader.in_progress or bool(self.out)

    def start(self) -> None:
        self.front.connections.add(self)
        self.front.ioloop.register(self.fd, _CONN_EVENTS, self.on_events)
        self.on_readable()  # the request has often arrived with the connection

    def on_events(self, events: int) -> None:
        if events & (select.EPOLLHUP | select.EPOLLERR):  # reset or fully closed: gone
            return self.abort()
        if events & _WRITE and self.out:
            self.flush()
        if events & _READ and not self.closed:
            self.on_readable()
            if events & select.EPOLLRDHUP and not self.closed:
                self.on_peer_closed()

    def on_peer_closed(self) -> None:
        """The client sent its FIN (seen even while this connection is not being read)."""
        if self.inflight and self.abort_on_close:
            self.front.counters.abandoned += 1
            self.abort()  # its requests are cancelled: queued ones never run

    # -- reading ------------------------------------------------------------------------

    def on_readable(self) -> None:
        if self.closed or self.eof or self.paused or self.starved:
            return
        reader, budget = self.reader, self.budget
        while True:
            if self.keepalive and (self.inflight >= self.front.settings.max_pipeline or self.unsent > MAX_UNSENT):
                self.paused = True  # back-pressure: read again when replies go out
                return
            left = reader.remaining
            if left and not self.admitted and reader.declared - left >= FIRST_CHUNK:
                # a large body past its first chunk: the rest of it must be sure to fit
                if not budget.admit(self, left):
                    return self._starve()
                self.admitted = True
            room = budget.room(self)
            if room <= 0:
                return self._starve()
            view = reader.body_view()
            try:
                if view is not None:  # a large body: straight into its buffer
                    n = self.sock.recv_into(view, min(room, len(view)))
                    data = None
                else:
                    data = self.sock.recv(min(RECV_SIZE, room))
                    n = len(data)
            except BlockingIOError:
                return
            except OSError:
                return self.abort()
            if not n:
                return self.on_eof()
            now = time.monotonic()
            self.last_active = now
            if data is None:
                reader.advance(n)
            else:
                reader.feed(data)
            self._count_reader()
            if not self.clock.arrived(now, n, reader.remaining):
                return too_slow(self)
            if not self._take_requests() or self.closed:
                return

    def _count_reader(self) -> None:
        """Bring the budget in line with the bytes the reader holds now."""
        buffered = self.reader.buffered
        delta = buffered - self.held_reader
        self.held_reader = buffered
        if delta > 0:
            self.budget.arrived(self, delta)
        elif delta < 0:  # a header dropped from the reader
            self._free(-delta)

    def _starve(self) -> None:
        """Wait for the budget (woken in turn, see resume); the body clock stops meanwhile:
        it is the front end that does not read."""
        self.starved = True
        self.clock.pause(time.monotonic())

    def resume(self) -> None:
        """The budget may have room for this connection now."""
        if self.starved and not self.closed:
            self.starved = False
            self.clock.resume(time.monotonic())
            self.on_readable()

    def _take_requests(self) -> bool:
        """Submit every whole request buffered; False once no more are to be read."""
        reader, pipeline = self.reader, self.front.settings.max_pipeline
        while True:
            if self.keepalive and self.inflight >= pipeline:
                self.paused = True  # the rest waits in the reader until replies go out
                return False
            before = reader.buffered
            try:
                request = reader.next_request()
            except ProtocolError as exc:
                big = isinstance(exc, RequestTooLarge)
                self.front.log_refusal("Refused a request: %s" if big else "Refused a malformed request: %s", exc)
                refused = isinstance(exc, RefusedHeader)
                head, n = (exc.request, exc.length) if refused else (Request(b"", extended=reader.extended), 0)
                self.fail_now(head, "RequestTooLarge" if big else "ProtocolError", str(exc), n)
                return False
            if request is None:
                if reader.in_progress and self.clock.start is None:
                    self.clock.begin(time.monotonic())  # the next request has begun
                return True
            consumed, body = before - reader.buffered, len(request.body)
            self.held_reader -= consumed
            self.held_bodies += body
            if consumed > body:  # its header is done with
                self._free(consumed - body)
            self.clock.end()
            if self.admitted:
                self.admitted = False
                self.front.wake_starved(self.budget.settle(self))
            again = self.keepalive  # not its connection's first request
            if request.keepalive and not again:
                self.keepalive = True
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.inflight += 1
            if not request.keepalive:
                self.eof = True  # its last request: read no more
            if again and self.front.draining:  # a stop began: accepted work is done, this is new
                self.front.outcomes.refused(self, request)
            else:
                self.front.submit(self, request)
            if self.eof:
                return False

    def on_eof(self) -> None:
        self.eof = True
        if self.reader.in_progress:  # cut short mid-request: an error, never a clean reply
            self.front.log_refusal("A client closed its side mid-request")
            self.abort()
        elif self.inflight == 0 and not self.out:
            self.close()
        elif self.inflight and self.abort_on_close:
            self.on_peer_closed()
        # else: answer what is due, then close (see deliver)

    # -- writing ------------------------------------------------------------------------

    def deliver(self, request: Request, status: int, body: Any) -> None:
        """A request's outcome. Never blocks: what the socket does not take waits for EPOLLOUT."""
        self.inflight -= 1
        if self.closed:
            return
        n = len(request.body)
        self.held_bodies -= n
        self._free(n)  # the request is done with
        if request.extended:
            self._queue(reply_header(len(body), request.tag, status), body)
        elif status == Status.OK:
            self._queue(b"", body)
        else:
            return self.abort()  # a plain client learns of an error by a reset
        if self.eof and self.inflight == 0:
            self.close_after = True
        elif self.unsent > MAX_UNSENT and self.keepalive and not self.holding:
            self._hold(True)  # its client does not read: its other requests wait for it
        if not self.dirty:
            self.dirty = True
            self.front.write_soon(self)

    def write(self) -> None:
        """Write what was delivered: at the end of the 0MQ round that delivered it, so the
        round's replies to one pipelining client go out in one system call."""
        self.dirty = False
        if not self.closed:
            self.flush()

    def deliver_item(self, pending: Any, request: Request, body: Any) -> None:
        """One item of a stream (ITEM; its own reply ends it). Its worker is credited once it
        is written: a client that does not read holds its worker, not the front end's memory."""
        if self.closed:
            return
        self._queue(reply_header(len(body), request.tag, Status.ITEM), body)
        self.owed.append(pending)
        pending.unread += len(body)
        self.flush()

    def _queue(self, head: bytes, body: Any) -> None:
        """A reply (its framing ``head``, or none for a plain one) or an item into the
        output, counted in the budget; a large body is queued as it is, not copied."""
        if len(body) < 65536:
            self.out.append(memoryview(head + bytes(body) if head else body))
        else:
            if head:  # a bytearray: _replies tells it from a reply of its own
                self.out.append(memoryview(bytearray(head)))
            self.out.append(memoryview(body))
        n = len(head) + len(body)
        self.budget.reply(n)
        self.unsent += n

    def flush(self) -> None:
        out, sock = self.out, self.sock
        written = 0
        # the last reply before a close: MSG_MORE holds it for the close, whose FIN then
        # rides the same segment (one trip through loopback's softirq, not two)
        more = socket.MSG_MORE if self.close_after else 0
        try:
            while out:
                if len(out) == 1:
                    chunks = (out[0],)
                    sent = sock.send(out[0], more)
                else:  # a round's replies to this connection, in one system call
                    chunks = tuple(islice(out, GATHER))
                    sent = sock.sendmsg(chunks, (), more)
                written += sent
                left = sent
                while out and len(out[0]) <= left:
                    left -= len(out.popleft())
                if left:
                    out[0] = out[0][left:]
                if sent < sum(map(len, chunks)):
                    return  # EPOLLOUT (edge) calls flush again
        except BlockingIOError:
            return
        except OSError:  # the client left; its replies are dropped
            return self.abort()
        finally:
            if written:
                self.last_active = time.monotonic()
                self.unsent -= written
                self.sent += written
                self._free(written, written)
            if (self.paused or self.holding) and self.unsent <= MAX_UNSENT and not self.closed:
                if self.holding:
                    self._hold(False)
                if self.paused and self.inflight < self.front.settings.max_pipeline:
                    self.paused = False  # back-pressure released: read again, soon
                    self.front.ioloop.hub.schedule_call_global(0, self._unpause)
        if self.owed and not out and not self.closed:
            owed, self.owed = self.owed, []
            self.front.credit(owed)
        if self.close_after:
            self.close()

    def _hold(self, on: bool) -> None:
        """Its client stopped (``on``) or resumed reading its replies (``FrontEnd.hold``)."""
        self.holding = on
        self.front.hold(self, on)

    def _unpause(self) -> None:
        """Take the requests already read first (the socket may have nothing new), then read."""
        if not self.closed and not self.paused and self._take_requests() and not self.closed:
            self.on_readable()

    def _free(self, n: int, replies: int = 0) -> None:
        """``n`` bytes counted in the budget are no longer held (``replies`` of them unsent)."""
        if n:
            woken = self.budget.release(n, replies)
            if woken:  # connections waiting for the budget: rarely any
                self.front.wake_starved(woken)

    def fail_now(self, request: Request, kind: str, message: str, declared: int = 0) -> None:
        """Refuse a request before it runs (its body of ``declared`` bytes unread), and end
        the connection: read no more, close once the requests read before it are answered too
        (a pipelining client loses none), and let its client send the rest meanwhile."""
        self.front.outcomes.bad_request(self, request)
        self.eof = True
        if request.extended:
            self.drain, self.inflight = declared, self.inflight + 1
            self.deliver(request, Status.BAD_REQUEST, error_body(kind, message))
            self.flush()
        else:
            self.abort()

    # -- ending -------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.front.ioloop.forget(self.fd)
        self.front.connections.discard(self)
        try:
            if self.drain:
                self.front.ioloop.lingering.close(self.sock, self.drain)
            else:
                self.sock.close()
        except OSError:
            pass
        if self.requests:
            self.front.outcomes.abandoned(self.requests)
            self.requests.clear()
        if self.holding:
            self._hold(False)  # out of the queue's paused owners
        self.front.settle()  # revoke what was handed ahead to a worker
        held, unsent = self.held, self.unsent
        if unsent:  # replies (or items) not written whole: the client reset, or was reset
            self.front.counters.cut(_replies(self.out), unsent)
            self.out.clear()
        self.held_reader = self.held_bodies = self.unsent = 0
        self.admitted = False
        wake = self.budget.forget(self)
        if held:
            wake = self.budget.release(held, unsent)
        if wake:
            self.front.wake_starved(wake)

    def abort(self) -> None:
        """Abortive close: the client sees a reset, never a clean (empty) reply."""
        if self.closed:
            return
        linger_reset(self.sock)
        self.drain = 0
        self.close()


def _replies(out: deque[memoryview]) -> int:
    """How many replies (or items) ``out`` holds: a large body's chunk follows its head's (a bytearray's)."""
    return len(out) - sum(isinstance(chunk.obj, bytearray) and len(chunk.obj) == _HEAD for chunk in out)
