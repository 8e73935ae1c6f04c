"""The wire format, exhaustively and without I/O: whole, byte by byte, with trailing bytes."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gaspar import errors
from gaspar.wire.envelope import LIMITS, STATUS, TIMING, Kind, head_id, limits, pack_id, timing
from gaspar.wire.framing import (
    EXTENDED_HEADER,
    FLAG_KEEPALIVE,
    FLAG_STREAM,
    ProtocolError,
    RefusedHeader,
    Request,
    RequestReader,
    RequestTooLarge,
    Status,
    error_body,
    error_for_client,
    extended_header,
    pack,
    pack_extended,
    parse_reply_header,
    reply_header,
)

BODIES = [b"", b"x", bytes(range(256)), b"\x00" * 70000]


def feed_all(data: bytes, chunk: int | None = None, limit: int = 1 << 20) -> list[Request]:
    reader = RequestReader(limit)
    out = []
    step = chunk or max(1, len(data))
    for i in range(0, len(data), step):
        reader.feed(data[i : i + step])
        while (req := reader.next_request()) is not None:
            out.append(req)
    assert not reader.in_progress
    return out


@pytest.mark.parametrize("body", BODIES, ids=len)
@pytest.mark.parametrize("chunk", [None, 1, 3, 4097])
def test_plain_request_whole_and_in_pieces(body, chunk):
    if chunk == 1 and len(body) > 300:
        chunk = 997
    (req,) = feed_all(pack(body), chunk)
    assert bytes(req.body) == body
    assert not req.extended and not req.keepalive and req.tag == 0 and req.timeout is None


def test_pack_is_gaspar_1_format():
    assert pack(b"abc") == struct.pack("!I", 3) + b"abc"
    assert pack(b"") == b"\x00\x00\x00\x00"


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_extended_request_fields(chunk):
    data = pack_extended(b"hello", tag=7, keepalive=True, timeout=1.5)
    assert data[:16] == struct.pack("!IIII", 0x80000005, 1, 1500, 7)
    (req,) = feed_all(data, chunk)
    assert bytes(req.body) == b"hello"
    assert req.extended and req.keepalive and not req.stats
    assert req.tag == 7 and req.timeout == 1.5


def test_stats_flag_and_no_timeout():
    (req,) = feed_all(pack_extended(b"", stats=True))
    assert req.stats and req.timeout is None and bytes(req.body) == b""


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_many_requests_back_to_back(chunk):
    messages = [b"m%d" % i * i for i in range(20)]
    data = b"".join(pack_extended(m, tag=i, keepalive=True) for i, m in enumerate(messages))
    reqs = feed_all(data, chunk)
    assert [bytes(r.body) for r in reqs] == messages
    assert [r.tag for r in reqs] == list(range(20))


def test_trailing_bytes_stay_buffered():
    reader = RequestReader()
    reader.feed(pack(b"one") + b"\x00\x00")
    assert bytes(reader.next_request().body) == b"one"
    assert reader.next_request() is None
    assert reader.in_progress and reader.buffered == 2
    assert reader.wanted == 2


def test_wanted_counts_down_to_the_end_of_the_body():
    reader = RequestReader()
    assert reader.wanted == 4
    reader.feed(struct.pack("!I", 10))
    assert reader.next_request() is None
    assert reader.wanted == 10
    reader.feed(b"12345")
    assert reader.next_request() is None and reader.wanted == 5


def test_too_large_is_refused_from_the_header_alone():
    reader = RequestReader(max_message_size=100)
    reader.feed(struct.pack("!I", 101))  # no body at all
    with pytest.raises(RequestTooLarge) as info:
        reader.next_request()
    assert info.value.length == 101 and info.value.limit == 100
    assert not info.value.request.extended


def test_too_large_extended_keeps_the_tag_for_the_error_reply():
    reader = RequestReader(max_message_size=10)
    reader.feed(extended_header(11, tag=99))
    with pytest.raises(RequestTooLarge) as info:
        reader.next_request()
    assert info.value.request.extended and info.value.request.tag == 99


def test_exactly_the_limit_is_accepted():
    (req,) = feed_all(pack(b"a" * 100), limit=100)
    assert len(req.body) == 100


def test_unknown_flags_are_a_protocol_error_that_keeps_the_tag():
    """The whole header arrived: its refusal is tagged, so a pipelining client can tell
    which of its requests it answers."""
    for flags, match in ((0x80, "unknown request flags 0x80"), (FLAG_STREAM, "STREAM flag needs the CALL flag")):
        reader = RequestReader()
        reader.feed(EXTENDED_HEADER.pack(0x80000000, flags | FLAG_KEEPALIVE, 0, 7))
        with pytest.raises(ProtocolError, match=match) as info:
            reader.next_request()
        assert isinstance(info.value, RefusedHeader)
        assert info.value.request.extended and info.value.request.tag == 7


def test_zero_length_plain_request_is_valid():
    (req,) = feed_all(b"\x00\x00\x00\x00")
    assert bytes(req.body) == b""


def test_reply_header_round_trip():
    head = reply_header(5, 42, Status.HANDLER_ERROR)
    assert head == struct.pack("!IIB", 5, 42, 1)
    assert parse_reply_header(head) == (5, 42, Status.HANDLER_ERROR)
    with pytest.raises(ProtocolError):
        parse_reply_header(struct.pack("!IIB", 0, 0, 200))


def test_envelope_heads():
    """The 0MQ head's layout, as the worker writes it and the front end reads it."""
    head = Kind.REPLY.value + pack_id(2**40 + 3) + bytes([Status.TIMEOUT]) + TIMING.pack(0.25, -1.0)
    assert head_id(head) == 2**40 + 3 and head[STATUS] == Status.TIMEOUT
    assert timing(head) == (0.25, -1.0)
    assert timing(Kind.ACK.value + pack_id(1) + bytes([0])) == (0.0, 0.0)
    request = Kind.REQUEST.value + pack_id(7)
    assert head_id(request) == 7 and limits(request) is None
    assert limits(request + LIMITS.pack(1500, 0)) == (1500, 0)


@pytest.mark.parametrize(
    "status, cls",
    [
        (Status.HANDLER_ERROR, errors.HandlerError),
        (Status.TIMEOUT, errors.WorkerTimeout),
        (Status.WORKER_DIED, errors.WorkerDied),
        (Status.BAD_REQUEST, errors.BadRequest),
        (Status.UNAVAILABLE, errors.ServerUnavailable),
    ],
)
def test_error_bodies_become_typed_errors(status, cls):
    body = error_body("ValueError", "bad thing", pid=12, exitcode=None, signal=9)
    exc = errors.error_from_reply(status, body)
    assert type(exc) is cls and isinstance(exc, errors.GasparError)
    assert exc.remote_type == "ValueError" and exc.remote_message == "bad thing"
    assert "bad thing" in str(exc)
    assert json.loads(body)["pid"] == 12


@pytest.mark.parametrize(
    "status, kind, text, shown",
    [
        (Status.WORKER_DIED, "WorkerLost", "agent a1 was lost", "agent a1 was lost"),
        (Status.WORKER_DIED, "WorkerDied", "worker 1 (pid 7) killed by SIGKILL", "worker 1 (pid 7) killed by SIGKILL"),
        (Status.TIMEOUT, "WorkerTimeout", "handler ran past 1.0s", "handler ran past 1.0s"),
        (Status.UNAVAILABLE, "Overloaded", "shed after 9 ms", "shed after 9 ms"),
        (Status.UNAVAILABLE, "ServerUnavailable", "the server is stopping", "the server is stopping"),
        (Status.HANDLER_ERROR, "ValueError", "boom", "ValueError: boom"),  # another class: named
        (Status.HANDLER_ERROR, "ValueError", "", "ValueError"),
        (Status.BAD_REQUEST, "RequestTooLarge", "over 100 bytes", "RequestTooLarge: over 100 bytes"),
        (Status.WORKER_DIED, "WorkerDied", "", "WorkerDied"),
    ],
)
def test_str_of_a_remote_error_never_repeats_its_own_type(status, kind, text, shown):
    exc = errors.error_from_reply(status, error_body(kind, text))
    assert str(exc) == shown
    assert exc.remote_type == kind and exc.remote_message == text


WORKER_TRACEBACK = 'Traceback (most recent call last):\n  File "/srv/app.py", line 9, in handle\nValueError: boom\n'


@pytest.mark.parametrize(
    "body, stripped",
    [
        (error_body("ValueError", "boom", traceback=WORKER_TRACEBACK), {"type": "ValueError", "message": "boom"}),
        (
            error_body("E", 'ends in \\", "traceback": "no', traceback="t"),
            {"type": "E", "message": 'ends in \\", "traceback": "no'},
        ),
        (error_body("E", "a backslash last \\", traceback="t"), {"type": "E", "message": "a backslash last \\"}),
        (
            error_body("WorkerDied", "worker 1 died", pid=7),
            {"type": "WorkerDied", "message": "worker 1 died", "pid": 7},
        ),
    ],
)
def test_a_clients_error_body_has_the_traceback_only_when_asked(body, stripped):
    assert json.loads(error_for_client(body)) == stripped
    assert error_for_client(body, "traceback") is body
    assert json.loads(bytes(error_for_client(memoryview(body)))) == stripped  # a large frame's buffer
    assert error_for_client(b"\xff not json") == b"\xff not json"


@settings(deadline=None, database=None, max_examples=100)
@given(st.text(), st.text(), st.text())
def test_stripping_the_traceback_keeps_any_type_and_message(kind, message, tb):
    body = error_body(kind, message, traceback=tb)
    assert json.loads(error_for_client(body)) == {"type": kind, "message": message}


def test_error_tree_matches_builtins():
    assert issubclass(errors.WorkerTimeout, TimeoutError)
    assert issubclass(errors.RequestTimeout, TimeoutError)
    assert issubclass(errors.ConnectFailed, ConnectionError)
    assert issubclass(errors.ConnectionLost, ConnectionError)
    assert issubclass(errors.ProtocolError, ValueError)


def test_garbage_error_body_still_gives_an_error():
    exc = errors.error_from_reply(1, b"\xff not json")
    assert isinstance(exc, errors.HandlerError) and exc.remote_type == "Unknown"


@pytest.mark.parametrize("chunk", [None, 1000, 65536, 300000])
def test_large_bodies_whole_in_pieces_and_received_directly(chunk):
    big = bytes(range(256)) * 4096  # 1 MiB
    data = pack(big) + pack_extended(b"after", tag=3)
    assert [bytes(r.body) for r in feed_all(data, chunk, limit=2 << 20)] == [big, b"after"]
    # the same bytes received into body_view() where the reader offers one
    reader = RequestReader(2 << 20)
    pos, out = 0, []
    while pos < len(data):
        view = reader.body_view()
        if view is not None:
            n = min(len(view), chunk or len(view), len(data) - pos)
            view[:n] = data[pos : pos + n]
            reader.advance(n)
        else:
            n = min(chunk or len(data), len(data) - pos)
            reader.feed(data[pos : pos + n])
        pos += n
        while (req := reader.next_request()) is not None:
            out.append(bytes(req.body))
    assert out == [big, b"after"] and not reader.in_progress


def test_a_length_over_the_limit_is_refused_from_the_length_word_alone():
    from gaspar.wire.framing import pack_extended

    whole = pack_extended(b"x" * 17, tag=5)
    r = RequestReader(16)
    r.feed(whole[:4])  # the first word only: refused at once, tag unknown yet
    with pytest.raises(RequestTooLarge) as info:
        r.next_request()
    assert info.value.request.extended and info.value.request.tag == 0
    r = RequestReader(16)
    r.feed(whole[:16])  # the whole header came with it: the refusal carries its tag
    with pytest.raises(RequestTooLarge) as info:
        r.next_request()
    assert info.value.request.tag == 5
    r = RequestReader(16)
    r.feed(b"\x00\x00\x00\x11")  # plain
    with pytest.raises(RequestTooLarge):
        r.next_request()


@pytest.mark.parametrize(
    "seconds, timeout_ms, deadline_ms",
    [
        (1.001, 1001, 1001),
        (0.0004, 1, 0),  # a handler timeout is at least 1 ms (0 means the server's); a deadline may be 0
        (0.0006, 1, 1),
        (-1.0, 1, 0),
        (2.5, 2500, 2500),
        (float("inf"), 0xFFFFFFFF, 0xFFFFFFFF),
        (1e12, 0xFFFFFFFF, 0xFFFFFFFF),
    ],
)
def test_timeouts_go_on_the_wire_rounded_to_the_millisecond(seconds, timeout_ms, deadline_ms):
    head = extended_header(0, timeout=seconds, deadline=seconds)
    assert struct.unpack("!IIIII", head)[2::2] == (timeout_ms, deadline_ms)


def test_one_table_of_errors():
    """Status <-> error class <-> kind: every class the server may name comes back as itself,
    with the status the wire carries; any other kind is a remote exception's own type."""
    from gaspar import errors

    for cls in (
        errors.HandlerError,
        errors.WorkerTimeout,
        errors.WorkerDied,
        errors.WorkerLost,
        errors.BadRequest,
        errors.ServerUnavailable,
        errors.Overloaded,
    ):
        assert Status(cls.status).name  # a status the wire knows
        assert errors.error_class(cls.status, cls.__name__) is cls
        err = errors.error_from_reply(cls.status, error_body(cls.__name__, "why"))
        assert type(err) is cls and err.remote_type == cls.__name__
    assert errors.error_class(Status.HANDLER_ERROR, "ValueError") is errors.HandlerError
    assert errors.error_class(Status.UNAVAILABLE, "WorkerLost") is errors.ServerUnavailable  # not under it
    assert errors.error_class(99, "Overloaded") is errors.RemoteError
