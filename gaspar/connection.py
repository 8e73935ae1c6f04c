"""One client connection in the front end: read requests, write their replies.

Runs as a green thread of the producer's eventlet hub (this module and ``producer`` are the
only ones that import eventlet). The framing is ``gaspar.framing``'s; this module only moves
bytes.

* A plain (gaspar 1.0) request gets its reply bytes and a normal close, or, on any error,
  an abortive close (SO_LINGER 0: the client's read fails with a reset). Bytes sent just
  before a reset may be discarded by the client's kernel, so no error text rides along.
* An extended request gets a framed reply (status, tag, body). With KEEPALIVE the connection
  stays open and may carry several requests at once (pipelining, up to ``max_pipeline``);
  their replies are written as they complete, each with its request's tag.
* ``idle_timeout`` bounds how long a connection may be silent while a request is awaited or
  half-read; it does not apply while the client waits for its own replies.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

import eventlet
from eventlet.queue import LightQueue

from .errors import ProtocolError
from .framing import Request, RequestReader, RequestTooLarge, Status, error_body, reply_header

if TYPE_CHECKING:
    from .producer import Producer

log = logging.getLogger("gaspar")

_LINGER_RESET = struct.pack("ii", 1, 0)


class _CutShort(ProtocolError):
    """The client closed its side before a whole request: it gets a reset, not a reply."""


_CHUNK = 256 * 1024


class Connection:
    """The state of one client connection. ``deliver`` is what a request's outcome calls."""

    __slots__ = (
        "sock",
        "producer",
        "results",
        "inflight",
        "broken",
        "closing",
        "writer",
        "room",
        "requests",
        "partial",
    )

    def __init__(self, sock: Any, producer: Producer) -> None:
        self.sock = sock
        self.producer = producer
        self.results: LightQueue = LightQueue()
        self.inflight = 0
        self.broken = False
        self.closing = False  # the client sent its last request
        self.writer = None
        self.room: Any = None  # a semaphore bounding pipelined requests
        self.requests: set[Any] = set()  # Pending entries of this connection
        self.partial = False  # some bytes of a request are read, not all

    @property
    def busy(self) -> bool:
        """A graceful stop waits for busy connections: a request read, or being read."""
        return self.inflight > 0 or self.partial

    # -- outcomes (called by the producer, from any green thread; never blocks) -------------

    def deliver(self, request: Request, status: int, body: Any) -> None:
        self.results.put((request, status, body))

    # -- the connection's life --------------------------------------------------------------

    def serve(self) -> None:
        producer = self.producer
        settings = producer.settings
        reader = RequestReader(settings.max_message_size)
        try:
            while True:
                try:
                    request = self._read(reader, settings.idle_timeout)
                except RequestTooLarge as exc:
                    log.warning("Refused a request: %s", exc)
                    self._fail_now(exc.request, Status.BAD_REQUEST, "RequestTooLarge", str(exc))
                    return
                except ProtocolError as exc:
                    log.info("Refused a malformed request: %s", exc)
                    head = Request(b"", extended=reader.extended and not isinstance(exc, _CutShort))
                    self._fail_now(head, Status.BAD_REQUEST, "ProtocolError", str(exc))
                    return
                except TimeoutError:
                    if reader.in_progress:
                        log.info("Closed a connection stalled mid-request for %ss", settings.idle_timeout)
                        self._reset()
                    else:
                        self._close()
                    return
                if request is None:  # the client is done sending
                    break
                if not request.keepalive and self.writer is None:
                    self._one_shot(request)
                    return
                self._start_pipelining()
                self.room.acquire()
                self.inflight += 1
                producer.submit(self, request)
                if not request.keepalive:
                    break
            self._finish_pipelined()
        except OSError:
            self.broken = True
            self._cancel_all()
            self.results.put(None)  # a writer stops on a broken connection
            self._reset()
        finally:
            producer.forget_connection(self)

    def _read(self, reader: RequestReader, idle_timeout: float | None) -> Request | None:
        """The next whole request, None on a clean EOF; raises TimeoutError when stalled."""
        request = reader.next_request()
        while request is None:
            self.sock.settimeout(idle_timeout if self.inflight == 0 else None)
            try:
                data = self.sock.recv(min(max(reader.wanted, 65536), _CHUNK))
            except TimeoutError:
                raise TimeoutError from None
            if not data:
                if reader.in_progress:
                    raise _CutShort("connection closed mid-request")
                return None
            reader.feed(data)
            request = reader.next_request()
            self.partial = reader.in_progress
        return request

    def _one_shot(self, request: Request) -> None:
        """The common case: one request, one reply, close. No extra green thread."""
        self.inflight = 1
        self.producer.submit(self, request)
        _, status, body = self.results.get()
        self.inflight = 0
        if self._write(request, status, body) and (status == Status.OK or request.extended):
            self._close()
        else:
            self._reset()

    def _start_pipelining(self) -> None:
        if self.writer is None:
            self.room = eventlet.semaphore.Semaphore(self.producer.settings.max_pipeline)
            self.writer = eventlet.spawn(self._write_loop)

    def _write_loop(self) -> None:
        while not self.broken and not (self.closing and self.inflight == 0):
            item = self.results.get()
            if item is None:
                continue
            request, status, body = item
            self.inflight -= 1
            self.room.release()
            if not self.broken:
                self._write(request, status, body)

    def _finish_pipelined(self) -> None:
        """The client sent its last request: write the replies still due, then close."""
        if self.writer is not None:
            self.closing = True
            self.results.put(None)  # wakes the writer if nothing else is due
            self.writer.wait()
        self._close()

    def _write(self, request: Request, status: int, body: Any) -> bool:
        try:
            if request.extended:
                head = reply_header(len(body), request.tag, status)
                if len(body) < 65536:
                    self.sock.sendall(head + bytes(body))
                else:
                    self.sock.sendall(head)
                    self.sock.sendall(body)
            elif status == Status.OK:
                self.sock.sendall(body)
            else:
                return False
            return True
        except OSError:
            self.broken = True  # the client left; its reply is dropped
            return False

    def _fail_now(self, request: Request, status: Status, kind: str, message: str) -> None:
        if request.extended:
            self._write(request, status, error_body(kind, message))
            self._close()
        else:
            self._reset()

    def _cancel_all(self) -> None:
        for pending in list(self.requests):
            self.producer.dispatcher.cancel(pending)
        self.requests.clear()

    def _close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _reset(self) -> None:
        """Abortive close: the client sees a reset, never a clean (empty) reply."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        self._close()
