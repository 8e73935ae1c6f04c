"""Property tests of ``RequestReader``: whatever the bytes and however they are cut.

The front end parses untrusted bytes, in whatever pieces TCP delivers them, through
:class:`gaspar.wire.framing.RequestReader`. For any byte stream, fed whole, one byte at a time or
cut anywhere, through ``feed`` or (as the server does for a large body) by writing into the
view ``body_view()`` offers and calling ``advance(n)``, the reader must give

* a sequence of requests, then possibly a ``ProtocolError`` (``RequestTooLarge`` is one),
  and never any other exception; after an error nothing more is fed (the server closes);
* the same requests, the same outcome and the same state at the end, however it was cut;
* bodies that stay what they were when taken, whatever is fed after them (the server sends a
  request's body to its worker only at the end of the round, after more reads);
* for streams of valid requests (``pack``, ``pack_extended`` with any flags, tags, timeouts
  and bodies, empty ones and ones over ``DIRECT_BODY`` that take the direct path), exactly
  the requests that were packed;
* never more buffered than ``max_message_size`` plus one header, once the whole requests fed
  have been taken (as the server takes them after every read).

What a refusal carries may depend on the cuts, by design: a length over the limit is refused
from its 4-byte length word alone, so its error reply has the request's tag only when the rest
of the header came with it (tag 0 otherwise; see docs/protocol.rst). Whether a stream is
refused does not depend on the cuts.

Written against the public API (``pack``, ``pack_extended``, ``extended_header``, the
``Request`` fields), so a new header flag (``KNOWN_FLAGS``) or field keeps them meaningful.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import struct
from collections.abc import Callable, Iterable

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gaspar.errors import ProtocolError
from gaspar.wire import framing
from gaspar.wire.framing import Request, RequestReader, RequestTooLarge, extended_header, pack, pack_extended

DIRECT = framing.DIRECT_BODY
KNOWN_FLAGS = getattr(framing, "KNOWN_FLAGS", framing.FLAG_KEEPALIVE | framing.FLAG_STATS)
FLAG_BITS = [1 << i for i in range(32) if KNOWN_FLAGS >> i & 1]
# The largest header: 16 bytes, and one word more with FLAG_DEADLINE (when framing has it).
#: A refusal that carries its header's facts (RequestTooLarge is one).
RefusedHeader = getattr(framing, "RefusedHeader", RequestTooLarge)
HEADER_MAX = framing.EXTENDED_HEADER.size + (4 if getattr(framing, "FLAG_DEADLINE", 0) else 0)
HAS_DEADLINE = "deadline" in inspect.signature(extended_header).parameters
SMALL_STREAM = 4096  # fed one byte at a time only up to this size (it is slow past it)

FAST = settings(
    deadline=None,  # timings vary on shared machines; the file's run time is what counts
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- feeding a reader ----------------------------------------------------------------------


def facts(req: Request) -> tuple:
    """Every field of a request, the body as bytes (whatever new fields Request grows)."""
    return tuple(
        (f.name, bytes(v) if f.name == "body" else v) for f in dataclasses.fields(req) for v in [getattr(req, f.name)]
    )


def pieces(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@dataclasses.dataclass
class Outcome:
    requests: list[tuple]  # facts() of each request, as it was when taken
    error: ProtocolError | None
    state: tuple | None  # (in_progress, wanted) at the end, when no error

    def same_as(self, other: Outcome, strict: bool = False) -> None:
        assert self.requests == other.requests
        assert (self.error is None) == (other.error is None), (self.error, other.error)
        assert self.state == other.state
        if strict:
            assert refusal(self.error) == refusal(other.error)


def refusal(error: ProtocolError | None) -> tuple | None:
    """What the server's refusal would say: the error's type and text and, for a request
    over the limit or a refused header, the header's facts it frames the error reply with (its tag...)."""
    if error is None:
        return None
    return type(error).__name__, str(error), facts(error.request) if isinstance(error, RefusedHeader) else None


def read(
    stream: bytes, cuts: Iterable[int], limit: int, direct: bool, check: Callable[[RequestReader], None] | None = None
) -> Outcome:
    """Feed ``stream`` cut at ``cuts``, taking every whole request after each read, as the
    server does. ``direct``: write into ``body_view()`` whenever it offers a view (up to
    the view's length; the rest of the piece goes on to the next read), else ``feed``."""
    reader = RequestReader(limit)
    taken: list[Request] = []
    seen: list[tuple] = []
    error = None
    try:
        for piece in pieces(stream, cuts):
            while piece:
                view = reader.body_view() if direct else None
                if view is not None:
                    hypothesis.event("a body received through body_view")
                    n = min(len(view), len(piece))
                    view[:n] = piece[:n]
                    reader.advance(n)
                else:
                    n = len(piece)
                    chunk = bytearray(piece)
                    reader.feed(chunk)
                    chunk[:] = b"\xa5" * n  # the caller may reuse its buffer: the reader copied
                piece = piece[n:]
                while (req := reader.next_request()) is not None:
                    taken.append(req)
                    seen.append(facts(req))
                if check is not None:
                    check(reader)
    except ProtocolError as exc:  # anything else is a bug, and fails the test
        error = exc
        if isinstance(exc, RequestTooLarge):
            assert exc.length > exc.limit == limit and isinstance(exc.request, Request)
    # a body taken earlier is not changed by what was fed after it
    assert [facts(r) for r in taken] == seen
    state = None if error else (reader.in_progress, reader.wanted)
    return Outcome(seen, error, state)


def read_every_way(stream: bytes, cuts: list[int], step: int, limit: int, check=None, strict=False) -> Outcome:
    """Whole, in reads of ``step`` bytes (as ``recv`` gives them), at ``cuts``, and one byte
    at a time (small streams); each through ``feed`` and through ``body_view``. Every way
    must give the same outcome; return it."""
    step = max(step, len(stream) // 1000)  # at most a thousand reads
    ways = [[], cuts, range(step, len(stream), step)]
    if len(stream) <= SMALL_STREAM:
        ways.append(range(1, len(stream)))
    first = read(stream, [], limit, direct=False, check=check)
    hypothesis.event(f"outcome: {type(first.error).__name__ if first.error else 'no error'}")
    hypothesis.event(f"requests: {min(len(first.requests), 3)}{'+' if len(first.requests) >= 3 else ''}")
    for way in ways:
        for direct in (False, True):
            if way or direct:  # (whole, through feed) is `first`
                read(stream, way, limit, direct, check).same_as(first, strict)
    return first


# -- strategies ----------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
known_flags = st.sets(st.sampled_from(FLAG_BITS)).map(sum)


def filler(size: int, seed: int) -> bytes:
    """``size`` random bytes from ``seed``: bodies too large for hypothesis to draw."""
    return random.Random(seed).randbytes(size)


small_bodies = st.binary(max_size=24)
sized_bodies = st.builds(filler, st.integers(25, 70000), u32)
large_bodies = st.builds(
    filler, st.sampled_from([DIRECT - 1, DIRECT, DIRECT + 1]) | st.integers(DIRECT, DIRECT + 8192), u32
)
bodies = st.one_of(small_bodies, small_bodies, sized_bodies, large_bodies)


@st.composite
def valid_requests(draw: Callable, body=bodies) -> tuple[bytes, Request]:
    """A packed request and the Request it must read back as."""
    message = draw(body)
    if draw(st.booleans()):
        return pack(message), Request(message)
    kw = {"tag": draw(u32), "keepalive": draw(st.booleans()), "stats": draw(st.booleans())}
    want = dict(kw, extended=True)
    # whole milliseconds on the wire, rounded
    if (timeout_ms := draw(st.none() | st.integers(1, 0xFFFFFFFF))) is not None:
        kw["timeout"], want["timeout"] = timeout_ms / 1000, timeout_ms / 1000
    if HAS_DEADLINE and (deadline_ms := draw(st.none() | st.integers(0, 0xFFFFFFFF))) is not None:
        kw["deadline"], want["deadline"] = deadline_ms / 1000, deadline_ms / 1000
    return pack_extended(message, **kw), Request(message, **want)


@st.composite
def odd_headers(draw: Callable, limit: int, max_length: int) -> bytes:
    """A header of any shape (plain or extended, any flags, lengths near the limit or
    anywhere), then some bytes that may or may not be its body."""
    near_limit = st.sampled_from([max(0, limit - 1), limit, limit + 1])
    length = draw(st.one_of(st.integers(0, 64), st.integers(0, 64), near_limit, st.integers(0, max_length)))
    extended = draw(st.booleans())
    head = struct.pack("!I", length | (framing.EXTENDED if extended else 0))
    if extended:
        head += struct.pack("!III", draw(st.one_of(known_flags, known_flags, u32)), draw(u32), draw(u32))
        head += draw(st.just(b"") | st.binary(min_size=4, max_size=4))  # a fifth word, or not
    return head + draw(st.binary(max_size=80))


@st.composite
def large_headers(draw: Callable) -> bytes:
    """A header declaring a body around DIRECT_BODY, then a body that may be cut short or
    run into what follows."""
    length = draw(st.sampled_from([DIRECT - 1, DIRECT, DIRECT + 1]) | st.integers(DIRECT, DIRECT + 20000))
    head = extended_header(length, tag=draw(u32)) if draw(st.booleans()) else struct.pack("!I", length)
    return head + filler(draw(st.integers(0, length + 32)), draw(u32))


def segment(limit: int, max_length: int = 0x7FFFFFFF, large: bool = True) -> st.SearchStrategy[bytes]:
    valid = valid_requests(small_bodies).map(lambda r: r[0])
    parts = [valid, valid, valid, odd_headers(limit, max_length), st.binary(max_size=40)]
    if large:
        parts.append(large_headers())
    return st.one_of(parts)


@st.composite
def streams(draw: Callable, parts: st.SearchStrategy[bytes], max_parts: int = 8) -> tuple[bytes, list[int]]:
    """Segments back to back; the stream and where each segment starts."""
    segments = draw(st.lists(parts, max_size=max_parts))
    starts, at = [], 0
    for s in segments:
        starts.append(at)
        at += len(s)
    return b"".join(segments), starts


def cuts_for(stream: bytes, boundaries: list[int]) -> st.SearchStrategy[list[int]]:
    """Where to cut: anywhere, and a few bytes either side of the segments' boundaries (and
    of the headers that start them), where the parser changes state."""
    anywhere = st.integers(0, len(stream))
    if not boundaries:
        return st.lists(anywhere, min_size=1, max_size=40)
    marks = [b + k for b in boundaries for k in (0, 4, 16, 20)]
    near = st.builds(lambda m, d: m + d, st.sampled_from(marks), st.integers(-3, 3))
    return st.lists(anywhere | near, min_size=1, max_size=40)


steps = st.integers(1, 65536)  # the size of each read, as recv(65536) gives them


# -- properties ----------------------------------------------------------------------------


@settings(FAST, max_examples=150)
@given(
    st.sampled_from([16, 1000, 1 << 20, 1 << 20]).flatmap(
        lambda limit: st.tuples(st.just(limit), streams(segment(limit)))
    ),
    st.data(),
)
def test_any_bytes_in_any_pieces_give_requests_or_a_protocol_error(limit_and_stream, data):
    limit, (stream, starts) = limit_and_stream
    cuts = data.draw(cuts_for(stream, starts), label="cuts")
    read_every_way(stream, cuts, data.draw(steps, label="step"), limit)


@settings(FAST, max_examples=60)
@given(st.lists(valid_requests(), max_size=6), st.data())
def test_valid_requests_round_trip_in_any_pieces(requests, data):
    stream = b"".join(packed for packed, _ in requests)
    starts = [0]
    for packed, _ in requests:
        starts.append(starts[-1] + len(packed))
    cuts = data.draw(cuts_for(stream, starts), label="cuts")
    largest = max((len(want.body) for _, want in requests), default=0)
    limit = data.draw(st.sampled_from([framing.DEFAULT_MAX_MESSAGE_SIZE, largest]), label="limit")  # exactly fits
    out = read_every_way(stream, cuts, data.draw(steps, label="step"), limit)
    assert out.error is None, repr(out.error)
    assert out.requests == [facts(want) for _, want in requests]
    assert out.state == (False, framing.PLAIN_HEADER.size)  # nothing left over


def internal_buffers(reader: RequestReader) -> dict[str, int]:
    """The length of every bytes-like attribute of the reader, whatever its layout."""
    names = set(getattr(reader, "__dict__", {}))
    names.update(n for cls in type(reader).__mro__ for n in getattr(cls, "__slots__", ()))
    values = {n: getattr(reader, n, None) for n in names}
    return {n: len(v) for n, v in values.items() if isinstance(v, (bytes, bytearray, memoryview))}


@settings(FAST, max_examples=150)
@given(streams(segment(1000, max_length=1100, large=False), max_parts=12), st.data())
def test_buffering_is_bounded_by_the_limit(stream_and_starts, data):
    limit = 1000
    bound = limit + HEADER_MAX
    stream, starts = stream_and_starts
    cuts = data.draw(cuts_for(stream, starts), label="cuts")

    def check(reader: RequestReader) -> None:
        assert reader.buffered <= bound
        buffers = internal_buffers(reader)
        assert buffers, "the reader has no buffer we can see: update internal_buffers()"
        assert all(n <= bound for n in buffers.values()), buffers

    read_every_way(stream, cuts, data.draw(steps, label="step"), limit, check)
