"""gaspar's wire format, with no I/O: bytes go in, requests and replies come out.

The caller owns the sockets. Every size limit is enforced here, from the header, before a
byte of the body is buffered. The whole protocol, with examples of the bytes, is in
``docs/protocol.rst``; in short:

* A **plain request** (gaspar 1.0) is ``!I`` length then the body; its reply is the bytes,
  then the server closes. An error is an abortive close (a TCP reset).
* An **extended request** sets bit 31 of the length word and adds three words:
  ``!IIII`` = ``(0x80000000 | length, flags, timeout_ms, tag)``. Its reply is framed:
  ``!IIB`` = ``(length, tag, status)`` then the body; an error's body is a UTF-8 JSON object.
  Flag ``KEEPALIVE`` keeps the connection open for more (pipelined) extended requests;
  flag ``STATS`` asks for the server's counters instead of running a handler; flag
  ``DEADLINE`` adds a fifth word, ``deadline_ms``: the client's own time left, so the
  server drops the request rather than run it for nobody (``!IIIII``, 20 bytes).

Between the front end and its workers, messages are 0MQ multipart frames: see
``gaspar.wire.envelope``.
"""

from __future__ import annotations

import enum
import json
import mmap
import re
import struct
from dataclasses import dataclass
from typing import Any

from gaspar.errors import ProtocolError

PLAIN_HEADER = struct.Struct("!I")
EXTENDED_HEADER = struct.Struct("!IIII")
DEADLINE_WORD = struct.Struct("!I")
REPLY_HEADER = struct.Struct("!IIB")

EXTENDED = 0x80000000
LENGTH_MASK = 0x7FFFFFFF
FLAG_KEEPALIVE = 0x1
FLAG_STATS = 0x2
FLAG_DEADLINE = 0x4  # a u32 deadline_ms follows the 16-byte header
FLAG_CALL = 0x8  # a typed call: the body names a handler (gaspar.wire.calls)
FLAG_STREAM = 0x10  # with CALL: the handler's items come back as they are made (ITEM replies)
KNOWN_FLAGS = FLAG_KEEPALIVE | FLAG_STATS | FLAG_DEADLINE | FLAG_CALL | FLAG_STREAM

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
DIRECT_BODY = 256 * 1024  # bodies this large are received into a buffer of their own
# Private, not mmap's default MAP_SHARED: a shared anonymous mapping is shmem, and each of
# its pages costs a page-cache insert when first written and a removal when unmapped.
_PRIVATE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


class Status(enum.IntEnum):
    """The status byte of an extended reply; the same codes travel from the workers."""

    OK = 0
    HANDLER_ERROR = 1
    TIMEOUT = 2
    WORKER_DIED = 3
    BAD_REQUEST = 4
    UNAVAILABLE = 5  # not run: the server is stopping, or shed it (Overloaded)
    ITEM = 6  # one item of a stream; more follow, and the stream's own reply ends it


@dataclass(slots=True)
class Request:
    """One parsed request. ``body`` may be a view into the reader's buffer.

    Made from its header, then given its body once the body is whole; not changed after
    that. Not a frozen dataclass: a frozen one's ``__init__`` sets each field through
    ``object.__setattr__``, about five times the cost, on every request's hot path."""

    body: bytes | memoryview
    extended: bool = False
    keepalive: bool = False
    stats: bool = False
    timeout: float | None = None  # seconds asked for by the client; None: server default
    tag: int = 0
    deadline: float | None = None  # seconds the client will wait, from when it was read
    call: bool = False  # a typed call (gaspar.wire.calls)
    stream: bool = False  # a call whose items are sent as they come


class RefusedHeader(ProtocolError):
    """A whole header that is refused (unknown flags, STREAM without CALL); it carries what
    the header said, so the reply is framed and tagged for the request it answers."""

    def __init__(self, message: str, request: Request, length: int) -> None:
        super().__init__(message)
        self.request = request
        self.length = length  # the body it declared (not read)


class RequestTooLarge(RefusedHeader):
    """The declared length is over the limit; the body was not read."""

    def __init__(self, length: int, limit: int, request: Request) -> None:
        super().__init__(f"request of {length} bytes is over max_message_size ({limit})", request, length)
        self.limit = limit


class RequestReader:
    """Incremental request parser: ``feed`` bytes, then take requests with ``next_request``.

    Raises :class:`RequestTooLarge` or :class:`ProtocolError` from the header alone.
    After an error the reader is unusable; the connection is to be closed.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._head: Request | None = None  # header parsed, body pending
        self._head_size = 0
        self._length = 0
        # A large body is received straight into its own buffer (see body_view): no
        # growing buffer, no copy out of it. The buffer is an anonymous mapping, whose pages
        # the kernel provides as they are written: memory follows the bytes that arrived,
        # not the length the client declared.
        self._body: mmap.mmap | None = None
        self._direct = False  # the body in progress goes to a buffer of its own
        self._filled = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._direct and self._body is None:
            self._make_body()
        if self._body is not None:
            take = min(len(data), self._length - self._filled)
            self._body[self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
        if data:
            self._buf += data

    def body_view(self) -> memoryview | None:
        """A writable view of the rest of a large body, to receive into directly
        (``sock.recv_into``, then :meth:`advance`); None when bytes should go to ``feed``."""
        if self._direct and self._body is None:
            self._make_body()
        if self._body is None or self._filled >= self._length:
            return None
        return memoryview(self._body)[self._filled :]

    def _make_body(self) -> None:
        size = self._head_size
        self._body = mmap.mmap(-1, self._length, flags=_PRIVATE)
        got = len(self._buf) - size
        self._body[:got] = self._buf[size:]
        self._filled = got
        self._buf = bytearray()

    def advance(self, n: int) -> None:
        """``n`` bytes were written into the view :meth:`body_view` gave."""
        self._filled += n

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a request."""
        return len(self._buf) + self._filled

    @property
    def allocated(self) -> int:
        """Bytes this reader holds in buffers, whole-body buffers included."""
        return len(self._buf) + (len(self._body) if self._body is not None else 0)

    @property
    def wanted(self) -> int:
        """How many more bytes complete the request in progress (at least 1)."""
        if self._body is not None:
            return max(1, self._length - self._filled)
        if self._head is None:
            need = PLAIN_HEADER.size
            if self._is_extended():
                need = EXTENDED_HEADER.size
                if len(self._buf) >= need and EXTENDED_HEADER.unpack_from(self._buf)[1] & FLAG_DEADLINE:
                    need += DEADLINE_WORD.size
            return max(1, need - len(self._buf))
        return max(1, self._head_size + self._length - len(self._buf))

    @property
    def remaining(self) -> int:
        """Bytes still to come to complete the request in progress, once its header is
        parsed (0 before that)."""
        if self._head is None:
            return 0
        if self._body is not None:
            return self._length - self._filled
        return max(0, self._head_size + self._length - len(self._buf))

    @property
    def in_progress(self) -> bool:
        """True when some bytes of a request are buffered but not the whole of it."""
        return bool(self._buf) or self._head is not None

    def _is_extended(self) -> bool:
        return bool(self._buf) and bool(self._buf[0] & 0x80)

    @property
    def extended(self) -> bool:
        """True when the request in progress is an extended one (it wants framed replies)."""
        return self._head.extended if self._head is not None else self._is_extended()

    def next_request(self) -> Request | None:
        """Return the next whole request, or None until more bytes arrive."""
        if self._head is None and not self._parse_header():
            return None
        head = self._head
        if self._body is not None:
            if self._filled < self._length:
                return None
            body_buf, self._body, self._filled, self._head = self._body, None, 0, None
            self._direct = False
            head.body = memoryview(body_buf)
            return head
        end = self._head_size + self._length
        if len(self._buf) < end:
            return None
        head = self._head
        if end == len(self._buf):
            body: bytes | memoryview = memoryview(self._buf)[self._head_size :]
            self._buf = bytearray()
        else:
            body = bytes(self._buf[self._head_size : end])
            del self._buf[:end]
        self._head = None
        head.body = body  # the header's Request is the reader's own until now: no copy of it
        return head

    def _parse_header(self) -> bool:
        buf = self._buf
        if len(buf) < PLAIN_HEADER.size:
            return False
        (word,) = PLAIN_HEADER.unpack_from(buf)
        length = word & LENGTH_MASK
        extended = bool(word & EXTENDED)
        if length > self.max_message_size and (not extended or len(buf) < EXTENDED_HEADER.size):
            # refused from the length word alone, before the rest of the header arrives
            raise RequestTooLarge(length, self.max_message_size, Request(b"", extended=extended))
        if extended:
            if len(buf) < EXTENDED_HEADER.size:
                return False
            _, flags, timeout_ms, tag = EXTENDED_HEADER.unpack_from(buf)
            size = EXTENDED_HEADER.size + (DEADLINE_WORD.size if flags & FLAG_DEADLINE else 0)
            deadline = None
            if flags & FLAG_DEADLINE:
                if len(buf) < size:
                    if length > self.max_message_size:
                        raise RequestTooLarge(length, self.max_message_size, Request(b"", extended=True, tag=tag))
                    return False
                (deadline_ms,) = DEADLINE_WORD.unpack_from(buf, EXTENDED_HEADER.size)
                deadline = deadline_ms / 1000.0
            head = Request(
                b"",
                extended=True,
                keepalive=bool(flags & FLAG_KEEPALIVE),
                stats=bool(flags & FLAG_STATS),
                timeout=timeout_ms / 1000.0 if timeout_ms else None,
                tag=tag,
                deadline=deadline,
                call=bool(flags & FLAG_CALL),
                stream=bool(flags & FLAG_STREAM),
            )
            if flags & ~KNOWN_FLAGS:
                raise RefusedHeader(f"unknown request flags {flags & ~KNOWN_FLAGS:#x}", head, length)
            if flags & FLAG_STREAM and not flags & FLAG_CALL:
                raise RefusedHeader("the STREAM flag needs the CALL flag", head, length)
        else:
            head, size = Request(b""), PLAIN_HEADER.size
        if length > self.max_message_size:
            raise RequestTooLarge(length, self.max_message_size, head)
        self._head, self._head_size, self._length = head, size, length
        if length >= DIRECT_BODY and len(buf) < size + length:
            self._direct = True  # its buffer is made when the first byte of it is to be kept
        return True

    @property
    def declared(self) -> int:
        """The body length of the request in progress once its header is parsed, else 0."""
        return self._length if self._head is not None else 0


def pack(message: bytes) -> bytes:
    """A plain (gaspar 1.0) request: the 4-byte big-endian length, then the message."""
    if len(message) > LENGTH_MASK:
        raise ValueError("message too long for the wire format")
    return PLAIN_HEADER.pack(len(message)) + message


def pack_extended(
    message: bytes,
    *,
    tag: int = 0,
    keepalive: bool = False,
    timeout: float | None = None,
    stats: bool = False,
    deadline: float | None = None,
    call: bool = False,
    stream: bool = False,
) -> bytes:
    """The header of an extended request followed by the message."""
    flags = {"keepalive": keepalive, "stats": stats, "call": call, "stream": stream}
    head = extended_header(len(message), tag=tag, timeout=timeout, deadline=deadline, **flags)
    return head + message


def extended_header(
    length: int,
    *,
    tag: int = 0,
    keepalive: bool = False,
    timeout: float | None = None,
    stats: bool = False,
    deadline: float | None = None,
    call: bool = False,
    stream: bool = False,
) -> bytes:
    """The header of an extended request whose body is ``length`` bytes: 16 bytes, or 20
    with a ``deadline`` (seconds the client will wait for the reply, from now)."""
    if length > LENGTH_MASK:
        raise ValueError("message too long for the wire format")
    flags = (FLAG_KEEPALIVE if keepalive else 0) | (FLAG_STATS if stats else 0)
    flags |= (FLAG_CALL if call or stream else 0) | (FLAG_STREAM if stream else 0)
    timeout_ms = 0 if timeout is None else max(1, _millis(timeout))
    if deadline is None:
        return EXTENDED_HEADER.pack(EXTENDED | length, flags, timeout_ms, tag & 0xFFFFFFFF)
    deadline_ms = _millis(deadline)
    head = EXTENDED_HEADER.pack(EXTENDED | length, flags | FLAG_DEADLINE, timeout_ms, tag & 0xFFFFFFFF)
    return head + DEADLINE_WORD.pack(deadline_ms)


def _millis(seconds: float) -> int:
    """Seconds as a u32 of milliseconds, rounded; past the range (or infinite), the most."""
    if not seconds > 0:
        return 0
    return min(round(seconds * 1000), 0xFFFFFFFF) if seconds < 0xFFFFFFFF / 1000 else 0xFFFFFFFF


def reply_header(length: int, tag: int, status: int) -> bytes:
    """The 9-byte header of an extended reply."""
    return REPLY_HEADER.pack(length, tag, status)


def parse_reply_header(data: bytes | bytearray | memoryview) -> tuple[int, int, Status]:
    """``(length, tag, status)`` from the first 9 bytes of an extended reply."""
    length, tag, status = REPLY_HEADER.unpack_from(data)
    try:
        return length, tag, Status(status)
    except ValueError:
        raise ProtocolError(f"unknown reply status {status}") from None


def error_body(kind: str, message: str, **facts: Any) -> bytes:
    """The JSON body of an error reply: the error's type, its message, and its facts."""
    return json.dumps({"type": kind, "message": message, **facts}).encode("utf-8")


#: What an extended client learns of a handler's exception (the ``error_detail`` setting):
#: its type and message, or its traceback too (file paths, source lines: for development).
ERROR_DETAILS = ("message", "traceback")
_TRACEBACK_KEY = re.compile(rb', "traceback": ')


def error_for_client(body: bytes | memoryview, detail: str = "message") -> bytes | memoryview:
    """A worker's error body as its client gets it: without the handler's traceback unless
    ``detail`` is ``traceback``. The daemon's own log keeps the traceback either way.

    The worker writes the traceback last (``error_body(type, message, traceback=...)``), and
    JSON never has an unescaped quote inside a string, so the first ``, "traceback": `` of
    the body is that key: cutting there and closing the object drops it (and anything after
    it) without parsing the body. A message may quote a whole request: parsing a 64 MiB one
    would hold the front end's event loop for most of a second; a search takes some 50 ms.
    A body without the key is returned as it is.
    """
    if detail == "traceback":
        return body
    found = _TRACEBACK_KEY.search(body)
    if found is None:
        return body
    return bytes(body[: found.start()]) + b"}"
