"""Apps: named handlers, typed calls and streams, against real daemons and real workers.

The codecs and the registry are tested as plain functions; everything else through a
running Producer (the ``serve`` fixture) or ``gaspar serve examples.apps:app``, with the
blocking, asyncio and Executor clients.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import apps_under_test
import pytest
from conftest import ROOT, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from test_remote import FAST, joined

import gaspar
from gaspar import aio, errors
from gaspar.client import Client
from gaspar.wire import calls
from gaspar.wire.framing import REPLY_HEADER, Status, extended_header, parse_reply_header

# -- the codecs ----------------------------------------------------------------------------

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40).filter(lambda n: len(n.encode()) <= 255), st.lists(VALUES, max_size=4))
def test_a_call_round_trips(name, args):
    body = calls.encode_call(name, tuple(args), {"k": args[:1]})
    assert calls.call_name(body) == (calls.MSGPACK, name)
    codec, got_name, got_args, kwargs = calls.decode_call(body)
    assert (codec, got_name, got_args, kwargs) == (calls.MSGPACK, name, list(args), {"k": args[:1]})


LARGE = st.sampled_from([b"a" * calls.OUT_OF_BAND, bytearray(b"b" * 70_000), b"c" * 200_000])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(VALUES | LARGE, max_size=20),
    st.dictionaries(st.text(max_size=8), VALUES | LARGE, max_size=18),
)
def test_arguments_in_parts_are_msgpacks_own_bytes_and_large_ones_are_not_copied(args, kwargs):
    """A client writes a large bytes argument as its own part (no copy to encode it); the
    parts joined are exactly what msgpack writes, so any msgpack decoder reads them."""
    import msgpack

    parts = calls.encode_arguments(tuple(args), kwargs)
    assert b"".join(parts) == msgpack.packb([args, kwargs], use_bin_type=True)
    large = [v for v in [*args, *kwargs.values()] if type(v) in (bytes, bytearray) and len(v) >= calls.OUT_OF_BAND]
    for value in large:
        assert any(part is value for part in parts)
    assert calls.encode(calls.MSGPACK, b"r" * 100_000) == msgpack.packb(b"r" * 100_000, use_bin_type=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_are_refused_cleanly(data):
    """What a hostile client sends is a call or a ProtocolError (a BadRequest), never a crash."""
    try:
        calls.decode_call(data)
    except errors.ProtocolError:
        pass


def test_pickle_is_refused_unless_allowed_and_its_buffers_are_not_copied():
    big = bytearray(b"z" * 200_000)
    body = calls.encode_call("f", (big,), {"small": b"s"}, codec="pickle")
    with pytest.raises(errors.ProtocolError, match="does not accept pickle"):
        calls.decode_call(body)
    _, _, args, kwargs = calls.decode_call(body, allow_pickle=True)
    assert args[0] == big and kwargs == {"small": b"s"}
    assert isinstance(args[0], bytearray)
    view = memoryview(body)
    _, _, args, _ = calls.decode_call(view, allow_pickle=True)
    assert args[0] == big  # rebuilt over the body's own buffer (out of band), not from the pickle
    assert len(body) < 200_000 + 1000
    with pytest.raises(errors.ProtocolError):
        calls.decode_call(body[:-10], allow_pickle=True)


def test_names_and_arguments_are_checked_before_anything_is_sent():
    with pytest.raises(ValueError):
        calls.encode_call("", (), {})
    with pytest.raises(ValueError):
        calls.encode_call("x" * 256, (), {})
    with pytest.raises(TypeError, match="pickle"):
        calls.encode_call("f", ({1, 2},), {})  # a set is not msgpack
    with pytest.raises(TypeError, match="can not serialize 'set' object") as info:
        calls.encode_call("f", ([1, {2}],), {})  # the type that msgpack refused, not its container
    assert "list" not in str(info.value)
    with pytest.raises(errors.ProtocolError, match="name is empty"):
        calls.call_name(bytes([calls.MSGPACK, 0, 0x90]))
    with pytest.raises(errors.ProtocolError, match="cut short"):
        calls.call_name(bytes([calls.MSGPACK, 9]) + b"abc")
    with pytest.raises(ValueError, match="codec"):
        calls.encode_call("f", (), {}, codec="json")


# -- the registry --------------------------------------------------------------------------


def test_the_registry_keeps_functions_callable_and_named():
    app = gaspar.App()

    @app.handler
    def double(x: int) -> int:
        return 2 * x

    @app.handler(name="triple", workers=2)
    def three(x):
        return 3 * x

    @app.handler
    def items():
        yield 1

    assert double(4) == 8 and three(2) == 6  # callable locally, unchanged
    assert double.__gaspar_handler__ == "double" and three.__gaspar_handler__ == "triple"
    assert app.handlers["triple"].pool == "triple" and app.pools["triple"].workers == 2
    assert app.handlers["double"].pool == "default" and app.handlers["items"].stream
    with pytest.raises(ValueError, match="already"):
        app.handler(name="double")(lambda: None)
    with pytest.raises(ValueError):
        app.handler(workers=0)(lambda: None)
    with pytest.raises(TypeError, match="not a handler"):
        gaspar.Executor("127.0.0.1:1").submit(len, [])


# -- against a daemon ----------------------------------------------------------------------


def test_a_call_to_an_unknown_name_is_refused_at_once_even_when_every_worker_is_busy(serve, caplog):
    """The front end knows the App's names: a call to another is answered NoSuchHandler at
    once, not queued behind busy workers to be shed as Overloaded ("retry") for a call
    that can never run (QA: 20,519 of 22,000 under a closed loop)."""
    s = serve(apps_under_test.app, processes=1, queue_timeout=0.5)
    with Client(s.addr, timeout=10) as c, Client(s.addr, timeout=10) as other:
        busy = threading.Thread(target=lambda: other.call("pause", 1.5), daemon=True)
        busy.start()
        assert wait_for(lambda: s.producer.stats()["running"] == 1, 5)
        t0 = time.monotonic()
        with pytest.raises(errors.NoSuchHandler, match="no handler named 'nope'"):
            c.call("nope")
        with pytest.raises(errors.BadRequest, match="does not accept pickle"):  # nor a codec refused
            c.call("add", 1, codec="pickle")
        assert time.monotonic() - t0 < 0.3
        busy.join(5)
    stats = s.producer.stats()
    assert stats["counters"]["submitted"] == 1  # only the pause ever queued
    # counted and logged as a worker's refusal would be (QA: neither, once refused up front)
    assert stats["outcomes"]["bad_request"] == 2 and stats["handlers"]["add"]["outcomes"]["bad_request"] == 1
    refusals = [r.getMessage() for r in caplog.records if "Refused a call" in r.getMessage()]
    assert len(refusals) == 2 and "NoSuchHandler: no handler named 'nope'" in refusals[0], refusals
    assert "BadRequest: this server does not accept pickle" in refusals[1], refusals


def test_calls_are_typed_and_their_errors_too(serve):
    s = serve(apps_under_test.app, processes=2)
    with Client(s.addr, timeout=10) as c:
        assert c.call("add", 2, b=40) == 42
        assert c.call("add", 1) == 2
        assert c.call("echo", b"\x00" * 1000) == b"\x00" * 1000
        assert isinstance(c.call("whoami"), int)
        with pytest.raises(errors.NoSuchHandler, match="no handler named 'nope'"):
            c.call("nope")
        with pytest.raises(errors.BadRequest, match="add\\(\\).*missing a required argument"):
            c.call("add")
        with pytest.raises(errors.BadRequest, match="unexpected keyword argument 'c'"):
            c.call("add", 1, c=3)
        with pytest.raises(errors.HandlerError) as info:
            c.call("add", "a", b=1)
        assert info.value.remote_type == "TypeError"
        with pytest.raises(errors.BadRequest, match="pickle"):
            c.call("roundtrip", 1, codec="pickle")  # this app takes msgpack only
        with pytest.raises(errors.NoSuchHandler, match="send typed calls"):
            c.request(b"plain bytes to an App")
        assert c.call("add", 5) == 6  # the worker lived through all of it
    counters = s.producer.stats()["outcomes"]
    assert counters["bad_request"] >= 4 and counters["error"] >= 1


def test_large_bytes_arguments_and_results_travel_as_parts_and_arrive_whole(serve):
    """A bytes argument (or keyword value) of 64 KiB or more is written as its own part, and
    a large result joined to its bin header once: what arrives is the same bytes, from the
    sync client, the asyncio one and the Executor."""
    s = serve(apps_under_test.app, processes=1)
    big = bytes(range(256)) * 1024 + b"end"  # 256 KiB and a tail: any shift would show
    with Client(s.addr, timeout=20) as c:
        assert c.call("echo", big) == big
        assert c.call("echo", data=bytearray(big)) == big
        assert c.call("echo", big[: calls.OUT_OF_BAND]) == big[: calls.OUT_OF_BAND]

    async def from_asyncio() -> None:
        async with aio.Client(s.addr, timeout=20) as c:
            assert await c.call("echo", big) == big
            assert await c.call("echo", data=big) == big

    asyncio.run(from_asyncio())
    with gaspar.Executor(s.addr) as executor:
        assert list(executor.map("echo", [big, b"small"])) == [big, b"small"]


def test_a_bytes_daemon_refuses_calls_and_serves_1_0_requests(serve):
    s = serve(lambda m: m.upper(), processes=1)
    with Client(s.addr, timeout=10) as c:
        with pytest.raises(errors.NoSuchHandler, match="not an App"):
            c.call("anything")
    assert s.request(b"abc") == b"ABC"
    with socket.create_connection(tuple(s.producer.server_addr), timeout=10) as raw:  # 1.0, byte for byte
        raw.sendall(b"\x00\x00\x00\x03xyz")
        assert raw.recv(100) == b"XYZ"


def test_pickle_when_the_app_allows_it(serve):
    s = serve(apps_under_test.pickled, processes=1)
    with Client(s.addr, timeout=10) as c:
        value = {"set": {1, 2}, "tuple": (1, "a"), "big": bytearray(300_000)}
        assert c.call("roundtrip", value, codec="pickle") == value


def test_a_stream_yields_items_as_they_come_then_ends(serve):
    s = serve(apps_under_test.app, processes=1)
    with Client(s.addr, timeout=10) as c:
        assert list(c.stream("count", 5, size=3)) == [bytes([i]) * 3 for i in range(5)]
        assert list(c.stream("count", 0)) == []
        got = []
        with pytest.raises(errors.HandlerError, match="KeyError"):
            for item in c.stream("fail_after", 3):
                got.append(item)
        assert got == [0, 1, 2]  # the items before the error arrived
        with pytest.raises(errors.NoSuchHandler):
            list(c.stream("nope"))
        start = time.monotonic()
        first = next(iter(c.stream("count", 3, delay=0.5)))
        assert first == b"\x00" and time.monotonic() - start < 1.4  # not after the whole stream
        assert c.call("add", 1) == 2


def test_an_abandoned_stream_frees_its_worker_within_a_second(serve, tmp_path):
    s = serve(apps_under_test.app, processes=1)
    marker = tmp_path / "closed"
    with Client(s.addr, timeout=10) as c:
        items = c.stream("forever", size=1024, marker=str(marker))
        assert next(items) == b"x" * 1024
        items.close()  # the client leaves: its connection closes
        left = time.monotonic()
        assert wait_for(marker.exists, 5, 0.01), "GeneratorExit never reached the handler"
        assert c.call("add", 1) == 2  # the one worker is free again
        assert time.monotonic() - left < 1.0
    assert s.producer.stats()["running"] == 0


def test_a_client_that_does_not_read_holds_its_stream_at_a_window(serve):
    """64 KiB items from a generator that never ends, to a client that reads nothing: the
    front end holds a window of items, not the stream, and the worker waits."""
    s = serve(apps_under_test.app, processes=1)
    body = calls.encode_call("forever", (), {"size": 65536})
    with socket.create_connection(tuple(s.producer.server_addr), timeout=10) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.sendall(extended_header(len(body), keepalive=True, stream=True) + body)
        time.sleep(1.5)  # at 64 KiB an item, the generator could have made gigabytes by now
        overload = s.producer.stats()["overload"]
        assert overload["buffered_peak"] < 4 * 1024 * 1024, overload
        head = raw.recv(REPLY_HEADER.size, socket.MSG_WAITALL)
        length, _, status = parse_reply_header(head)
        assert status == Status.ITEM and length > 65536 - 100
    assert wait_for(lambda: s.producer.stats()["running"] == 0, 5), "the worker was not freed"


def test_large_items_not_read_are_held_one_at_a_time_not_a_window_of_them(serve):
    """The window is bytes too (STREAM_BYTES): QA's two clients not reading 16 MB items took
    a 64 MiB front end to 544 MB, 16 items each. An item past the byte window goes alone."""
    s = serve(apps_under_test.app, processes=1, max_buffered_bytes=64 << 20)
    body = calls.encode_call("forever", (), {"size": 4 << 20})
    with socket.create_connection(tuple(s.producer.server_addr), timeout=10) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.sendall(extended_header(len(body), keepalive=True, stream=True) + body)
        assert wait_for(lambda: s.producer.stats()["overload"]["buffered_peak"] >= 4 << 20, 5)
        time.sleep(1.0)  # time for a window of 16 such items, were it one
        overload = s.producer.stats()["overload"]
        assert overload["buffered_peak"] < 9 << 20, overload  # one item, and the next in transit at most
        head = raw.recv(REPLY_HEADER.size, socket.MSG_WAITALL)
        assert parse_reply_header(head)[2] == Status.ITEM
    assert wait_for(lambda: s.producer.stats()["running"] == 0, 5), "the worker was not freed"


@pytest.mark.parametrize("size", [65536, 4 << 20], ids=["a window of items", "one item past the byte window"])
def test_a_stream_its_client_does_not_read_is_ended_past_the_timeout_not_its_worker(serve, tmp_path, size):
    """A client that starts an endless stream and reads nothing holds its worker waiting for
    room; past the operator's timeout that is not the handler's fault: the stream is ended
    (GeneratorExit reaches it) and its worker takes other calls, not SIGKILLed (QA: six
    kills in 20 s from two such clients)."""
    s = serve(apps_under_test.app, processes=1, timeout=1.0)
    (pid,) = s.pids()
    marker = tmp_path / "closed"
    body = calls.encode_call("forever", (), {"size": size, "marker": str(marker)})
    with socket.create_connection(tuple(s.producer.server_addr), timeout=10) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.sendall(extended_header(len(body), keepalive=True, stream=True) + body)
        assert wait_for(marker.exists, 5, 0.05), "GeneratorExit never reached the handler"
        with Client(s.addr, timeout=10) as c:
            assert c.call("whoami") == pid  # the same worker, free again
        stats = s.producer.stats()
        assert stats["restarts"] == 0 and stats["counters"]["timeouts"] == 0, stats["counters"]
        raw.settimeout(5)
        got = b""
        while (end := got.find(b"stream ended")) < 0:  # after its items, the client finds why
            chunk = raw.recv(1 << 20)
            assert chunk, "closed without saying why"
            got += chunk
        assert b"WorkerTimeout" in got[: end + 20]


def test_the_timeout_bounds_the_time_between_items(serve):
    s = serve(apps_under_test.app, processes=1, timeout=1.0)
    with Client(s.addr, timeout=10) as c:
        assert len(list(c.stream("count", 6, delay=0.4))) == 6  # 2.4 s in all, 0.4 s apart
        with pytest.raises(errors.WorkerTimeout):
            list(c.stream("count", 2, delay=1.5))
        assert c.call("add", 1) == 2  # a new worker took the killed one's place


def test_the_example_app_from_every_client(cli, tmp_path):
    """examples/apps.py (issue 16's three handlers) from gaspar serve: embed in a pool of its
    own of one worker, whose setup ran in that worker only; every client calls all three."""
    server = cli("examples.apps:app", "--bind", "127.0.0.1:0", "-w", "2", env={"GASPAR_EXAMPLE_MARKS": str(tmp_path)})
    addr = server.wait_listening()
    server.wait_ready(3)
    from examples import apps

    workers = server.stats()["workers"]
    embed_pids = {w["pid"] for w in workers if w["pool"] == "embed"}
    assert len(embed_pids) == 1 and len(workers) == 3
    assert wait_for(lambda: {int(p.name) for p in tmp_path.iterdir()} == embed_pids, 5)  # its setup: there only
    video = bytes(range(256)) * 40
    with Client(addr, timeout=10) as c:
        assert c.call("thumbnail", b"abcdefgh", width=4) == b"aceg"
        [vector] = c.call("embed", ["hello"])
        assert vector[0] == 5 and vector[2] in embed_pids
        assert b"".join(c.stream("frames", video, size=1000)) == video
    with gaspar.Executor(addr) as pool:
        assert pool.submit(apps.thumbnail, b"abcdefgh", width=2).result(10) == b"ae"
        assert [len(r) for r in pool.map(apps.embed, [["a"], ["a", "b"], ["a", "b", "c"]])] == [1, 2, 3]
        assert [len(x) for x in pool.submit(apps.frames, b"abcde", size=2).result(10)] == [2, 2, 1]
        with pytest.raises(errors.BadRequest, match="embed"):
            pool.submit("embed").result(10)

    async def from_asyncio():
        async with aio.Client(addr, timeout=10) as c:
            both = await asyncio.gather(c.call("embed", ["xy"]), c.call("thumbnail", b"xy", width=1))
            chunks = [chunk async for chunk in c.stream("frames", video, size=4096)]
            with pytest.raises(errors.NoSuchHandler):
                await c.call("nope")
            return both, b"".join(chunks)

    ([vector], thumb), streamed = asyncio.run(from_asyncio())
    assert vector[2] in embed_pids and thumb == b"x" and streamed == video

    # docs/apps.rst's "Calling" block, as written (its address made this server's), as a script
    text = (Path(ROOT) / "docs" / "apps.rst").read_text()
    block = text[text.index("    import asyncio\n") : text.index("Code written for ``ProcessPoolExecutor``")]
    script = tmp_path / "calling.py"
    tail = "\nimport json\nprint(len(small), len(future.result()), json.dumps(sizes))\n"
    script.write_text(textwrap.dedent(block).replace("127.0.0.1:8000", addr) + tail)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    small, thumb, sizes = out.stdout.split(" ", 2)
    assert small == thumb == "64" and [len(v) for v in json.loads(sizes)] == [2, 1]


def test_setup_hooks_run_once_in_each_worker(serve, tmp_path):
    marks = tmp_path / "setup"
    marks.mkdir()
    app = gaspar.App()

    @app.setup()
    def mark():
        (marks / str(os.getpid())).write_text("")

    @app.handler
    def me() -> int:
        return os.getpid()

    s = serve(app, processes=2)
    pids = set(s.pids())
    assert wait_for(lambda: {int(p.name) for p in marks.iterdir()} == pids, 5)
    with Client(s.addr, timeout=10) as c:
        assert c.call("me") in pids


def test_results_msgpack_cannot_carry_and_generators_called_plainly(serve):
    s = serve(apps_under_test.app, processes=1)
    with Client(s.addr, timeout=10) as c:
        with pytest.raises(errors.HandlerError, match="can not serialize 'set' object"):
            c.call("a_set")
        assert c.call("count", 2) == [b"\x00", b"\x01"]  # a generator called without streaming: a list
        assert c.call("count", 20, size=100) == [bytes([i]) * 100 for i in range(20)]  # 16 items and more
        # an endless one: refused past 64 MiB of items, not the worker's memory without end (QA: 2.3 GiB in 5 s)
        (pid,) = s.pids()
        with pytest.raises(errors.HandlerError, match="ReplyTooLarge.*call it with stream"):
            c.call("forever", size=1 << 20)
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) << 10
        assert hwm < 400 << 20, hwm
        assert c.call("count", 1) == [b"\x00"]  # the same worker, well


# -- pools ---------------------------------------------------------------------------------


def serve_for_agents(serve, app, processes: int, **options):
    """A front end agents join over loopback (no CURVE), with test_remote's quick liveness."""
    return serve(app, processes=processes, remote_bind="tcp://127.0.0.1:*", insecure=True, **FAST, **options)


def marks(where) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for p in where.iterdir():
        pool, _, pid = p.name.partition("-")
        found.setdefault(pool, set()).add(int(pid))
    return found


def test_a_handler_with_a_pool_of_its_own(serve, tmp_path, monkeypatch):
    """embed has a pool of 1: its setup ran in exactly one worker, only that worker runs it,
    and a flood of slow embed calls never takes the default pool's workers."""
    monkeypatch.setenv("GASPAR_TEST_MARKS", str(tmp_path))
    s = serve(apps_under_test.pooled, processes=2)
    stats = s.producer.stats()
    assert stats["target_workers"] == 3
    by_pool = {}
    for w in stats["workers"]:
        by_pool.setdefault(w["pool"], set()).add(w["pid"])
    assert len(by_pool["embed"]) == 1 and len(by_pool["default"]) == 2
    assert wait_for(lambda: marks(tmp_path) == by_pool, 5), marks(tmp_path)
    with Client(s.addr, timeout=10) as c:
        assert {c.call("embed") for _ in range(10)} == by_pool["embed"]
        assert {c.call("embed_too") for _ in range(5)} == by_pool["embed"]
        assert {c.call("quick") for _ in range(20)} <= by_pool["default"]
    with gaspar.Executor(s.addr, max_workers=4) as pool:
        slow = [pool.submit("embed", 1.0) for _ in range(2)]  # 2 s of work for its one worker
        time.sleep(0.2)
        start = time.monotonic()
        assert {pool.submit("quick").result(5) for _ in range(10)} <= by_pool["default"]
        assert time.monotonic() - start < 0.5  # never behind embed's queue
        assert {f.result(10) for f in slow} == by_pool["embed"]
    pools = s.producer.stats()["pools"]
    assert pools["embed"]["workers"] == 1 and pools["default"]["workers"] == 2


def test_pool_sizes_from_the_command_line(cli, tmp_path):
    server = cli(
        "apps_under_test:pooled",
        "--bind",
        "127.0.0.1:0",
        "-w",
        "1",
        "--pool",
        "embed=2",
        env={"GASPAR_TEST_MARKS": str(tmp_path)},
    )
    addr = server.wait_listening()
    server.wait_ready(3)
    with gaspar.Executor(addr, max_workers=4) as pool:  # at once: both embed workers are used
        assert len({f.result(10) for f in [pool.submit("embed", 0.3) for _ in range(4)]}) == 2
    assert sorted(w["pool"] for w in server.stats()["workers"]) == ["default", "embed", "embed"]
    assert wait_for(lambda: {k: len(v) for k, v in marks(tmp_path).items()} == {"embed": 2, "default": 1}, 5)
    bad = cli("apps_under_test:pooled", "--bind", "127.0.0.1:0", "--pool", "nope=1")
    assert bad.wait(20) == 2 and "no pool named nope" in bad.log


def test_an_agent_serves_a_pool(serve, agent):
    """gaspar worker mod:app --pool embed=1: the agent runs that pool only, and the front end
    routes embed's calls to its worker and the local embed worker, never to others."""
    s = serve_for_agents(serve, apps_under_test.pooled, 1)
    a = agent("apps_under_test:pooled", "--connect", s.producer.gateway.endpoint, "--pool", "embed=1", "--name", "gpu1")
    info = joined(s, "gpu1", 1)
    assert info and len(info["workers"]) == 1, a.log
    remote = info["workers"]
    local = {w["pool"]: w["pid"] for w in s.producer.stats()["workers"]}
    assert set(local) == {"default", "embed"}
    with gaspar.Executor(s.addr, max_workers=4) as pool:
        embedded = {f.result(10) for f in [pool.submit("embed", 0.3) for _ in range(4)]}
        quick = {pool.submit("quick").result(10) for _ in range(10)}
    assert embedded == {local["embed"], remote[0]["pid"]}
    assert quick == {local["default"]}


def test_an_agents_pool_of_min_max_workers_is_sized_by_the_front_ends_queue(serve, agent):
    """gaspar worker mod:app --pool work=1:2: the agent starts one work worker; ten clients
    back to back on 50 ms calls make the front end's queue wait, and it tells the agent to
    grow (SIZE); idle, back to one. Every call is answered (or shed: Overloaded)."""
    import threading

    s = serve_for_agents(
        serve, apps_under_test.scaled, 1, pools={"work": 0}, scale_up_after=0.3, scale_down_idle=1.0, queue_timeout=10
    )
    a = agent(
        "apps_under_test:scaled", "--connect", s.producer.gateway.endpoint, "--pool", "work=1:2", "--name", "cpu1"
    )
    info = joined(s, "cpu1", 1)
    assert info and info["autoscale"] == {"work": {"size": 1, "min": 1, "max": 2}}, a.log

    def live_workers() -> int:
        [row] = [r for r in s.producer.stats()["agents"] if r["name"] == "cpu1" and r["state"] == "joined"]
        return len([w for w in row["workers"] if w["state"] != "retiring"])

    results: list = []
    stop = threading.Event()

    def call() -> None:
        with Client(s.addr, timeout=20) as c:
            while not stop.is_set():
                try:
                    results.append(c.call("work", 0.05))
                except errors.GasparError as exc:
                    results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: live_workers() == 2, 15, 0.1), (s.producer.stats()["agents"], a.log)
        grown = len(results)
        assert wait_for(lambda: len(results) >= grown + 20, 10, 0.05)  # the grown pool serves
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert "Pool work: 1 -> 2 workers" in a.log
    assert wait_for(lambda: live_workers() == 1, 15, 0.1), a.log
    assert all(isinstance(r, (int, errors.Overloaded)) for r in results), {type(r) for r in results}
    assert sum(isinstance(r, int) for r in results) >= 20


def test_a_call_for_a_pool_no_worker_serves_is_refused_at_once(serve):
    s = serve(apps_under_test.pooled, processes=1, pools={"embed": 0})
    with Client(s.addr, timeout=10) as c:
        start = time.monotonic()
        with pytest.raises(errors.ServerUnavailable, match="no worker serves pool 'embed'"):
            c.call("embed")
        assert time.monotonic() - start < 0.5
        assert isinstance(c.call("quick"), int)  # the default pool serves on
    assert [w["pool"] for w in s.producer.stats()["workers"]] == ["default"]


def test_the_bytes_of_docs_protocol_a_call_from_another_language(serve):
    """The example in docs/protocol.rst ("Typed calls"), byte for byte."""
    s = serve(apps_under_test.app, processes=1)
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.rst"), encoding="utf-8").read()
    assert "6d 03 61 64 64  92 91 02 81 a1 62 28" in doc
    request = bytes.fromhex("80 00 00 0c  00 00 00 08  00 00 00 00  00 00 00 03  6d 03 61 64 64  92 91 02 81 a1 62 28")
    with socket.create_connection(tuple(s.producer.server_addr), timeout=10) as raw:
        raw.sendall(request)
        reply = b""
        while chunk := raw.recv(100):
            reply += chunk
    assert reply == bytes.fromhex("00 00 00 01  00 00 00 03  00  2a")


def test_handlers_and_pools_are_seen_in_stats_metrics_and_statsd(serve):
    """Calls counted by handler and pool; a client's made-up names never become labels."""
    from test_metrics import scrape, value

    from gaspar.ops.statsd import format_metrics

    s = serve(apps_under_test.pooled, processes=1, metrics_bind="127.0.0.1:0")
    with Client(s.addr, timeout=10) as c:
        for _ in range(3):
            c.call("embed")
        c.call("quick")
        with pytest.raises(errors.NoSuchHandler):
            c.call("made_up_by_a_client")
        with pytest.raises(errors.BadRequest):
            c.call("quick", 1)  # does not bind
    before = None
    stats = s.producer.stats()
    assert stats["handlers"]["embed"]["pool"] == "embed" and stats["handlers"]["embed"]["outcomes"]["ok"] == 3
    quick = stats["handlers"]["quick"]["outcomes"]
    assert quick["ok"] == 1 and quick["bad_request"] == 1
    assert "made_up_by_a_client" not in stats["handlers"]
    time.sleep(1.1)  # the metrics port renders once a second at most
    m = scrape(s.producer.metrics_addr)
    assert value(m, "gaspar_handler_requests_total", handler="embed", pool="embed", outcome="ok") == 3
    assert value(m, "gaspar_handler_requests_total", handler="quick", pool="default", outcome="bad_request") == 1
    assert value(m, "gaspar_handler_call_duration_seconds_count", handler="embed", pool="embed") == 3
    # every handler's series exist from the start, at 0: one never called, an outcome never seen
    assert value(m, "gaspar_handler_requests_total", handler="embed_too", pool="embed", outcome="ok") == 0
    assert value(m, "gaspar_handler_requests_total", handler="embed", pool="embed", outcome="error") == 0
    assert value(m, "gaspar_pool_workers", pool="embed") == 1 and value(m, "gaspar_pool_workers", pool="default") == 1
    assert not any(dict(k).get("handler") == "made_up_by_a_client" for k in m["gaspar_handler_requests_total"])
    lines = format_metrics(before, stats, "gaspar")
    assert "gaspar.handler.embed.ok:3|c" in lines and "gaspar.pool.embed.workers:1|g" in lines


def test_a_worker_past_max_worker_memory_is_recycled_after_its_request(serve):
    """40 MiB more a call, a limit 100 MiB over the worker's start: within a few calls it is
    replaced, every call answered, and the restart counted as memory."""
    from gaspar.ops.procstat import resident_bytes

    probe = serve(apps_under_test.app, processes=1)
    start = resident_bytes(probe.producer.worker_pids()[0])
    s = serve(apps_under_test.app, processes=1, max_worker_memory=start + (100 << 20))
    pids = []
    with Client(s.addr, timeout=20) as c:
        for _ in range(12):
            pids.append(c.call("hoard", 40))  # none fails
            time.sleep(0.15)
    assert len(set(pids)) >= 2, pids  # recycled at least once
    stats = s.producer.stats()
    assert stats["restarts_by_reason"]["memory"] >= 1
    assert stats["outcomes"]["ok"] == 12 and stats["outcomes"]["error"] == 0


def test_an_agents_worker_past_max_worker_memory_is_recycled_too(serve, agent):
    s = serve_for_agents(serve, apps_under_test.app, 0)
    endpoint = s.producer.gateway.endpoint
    a = agent("apps_under_test:app", "--connect", endpoint, "-w", "1", "--max-worker-memory", str(150 << 20))
    assert joined(s, None, 1), a.log
    pids = []
    with Client(s.addr, timeout=20) as c:
        for _ in range(12):
            pids.append(c.call("hoard", 40))
            time.sleep(0.3)
    assert len(set(pids)) >= 2, (pids, a.log)
    assert s.producer.stats()["restarts_by_reason"]["memory"] >= 1


def test_a_pool_grows_under_a_load_step_and_shrinks_when_idle_without_flapping(serve):
    """work has 1:3 workers. 0.2x of one worker's capacity: it stays at 1. 1.5x: it grows, one
    worker at a time; a call is answered or, while it grows, shed (Overloaded), never failed.
    Idle: back to 1, and never back and forth."""
    import threading

    s = serve(
        apps_under_test.scaled,
        processes=1,
        scale_up_wait=0.05,
        scale_up_after=0.3,
        scale_down_idle=1.0,
        queue_timeout=10,
    )

    def work_workers() -> int:
        return sum(1 for w in s.producer.stats()["workers"] if w["pool"] == "work" and w["state"] != "retiring")

    def call(results: list) -> None:
        try:
            results.append(Client(s.addr, timeout=20).call("work", 0.05))
        except errors.GasparError as exc:
            results.append(exc)

    def load(rate: float, seconds: float, results: list) -> None:
        """Open loop: ``rate`` calls of 50 ms a second, each in a thread of its own."""
        threads = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = threading.Thread(target=call, args=(results,))
            t.start()
            threads.append(t)
            time.sleep(1 / rate)
        for t in threads:
            t.join(30)

    results: list = []
    load(4, 2.0, results)  # 0.2x of one worker (20 calls/s)
    assert work_workers() == 1
    sizes = []
    watcher = threading.Thread(target=lambda: [sizes.append(work_workers()) or time.sleep(0.2) for _ in range(40)])
    watcher.start()
    load(30, 4.0, results)  # 1.5x: one worker cannot keep up
    grown = max(sizes)
    watcher.join(30)
    assert grown >= 2, sizes
    assert wait_for(lambda: work_workers() == 1, 10, 0.2), "it did not shrink back"
    steps = [b - a for a, b in zip(sizes, sizes[1:], strict=False) if b != a]
    assert all(abs(step) == 1 for step in steps), sizes  # one worker at a time
    assert len(results) >= 100  # 128 sent on time; a busy machine starts fewer threads in time
    assert all(isinstance(r, (int, errors.Overloaded)) for r in results), {type(r) for r in results}
    assert sum(isinstance(r, int) for r in results) >= 0.9 * len(results)
    outcomes = s.producer.stats()["outcomes"]
    assert outcomes["error"] == outcomes["worker_died"] == outcomes["timeout"] == 0


def test_the_example_apps_embed_pool_served_by_an_agent(serve, agent, tmp_path, monkeypatch):
    """examples/apps.py with --pool embed=0 here: only an agent's worker (--pool embed=1)
    serves embed, its setup ran there alone, and the rest runs here."""
    from examples import apps

    monkeypatch.setenv("GASPAR_EXAMPLE_MARKS", str(tmp_path))
    s = serve_for_agents(serve, apps.app, 1, pools={"embed": 0})
    with Client(s.addr, timeout=10) as c, pytest.raises(errors.ServerUnavailable, match="pool 'embed'"):
        c.call("embed", ["x"])  # no worker for it yet, anywhere
    a = agent("examples.apps:app", "--connect", s.producer.gateway.endpoint, "--pool", "embed=1", "--name", "gpu1")

    info = joined(s, "gpu1", 1)
    assert info and len(info["workers"]) == 1, a.log
    workers = info["workers"]
    with Client(s.addr, timeout=10) as c:
        [vector] = c.call("embed", ["hello"])
        assert int(vector[2]) == workers[0]["pid"]
        assert c.call("thumbnail", b"abcd", width=2) == b"ac"
    assert {int(p.name) for p in tmp_path.iterdir()} == {workers[0]["pid"]}


def test_the_access_log_names_a_calls_handler(serve, tmp_path):
    path = tmp_path / "access.log"
    s = serve(apps_under_test.pooled, processes=1, access_log=str(path))
    with Client(s.addr, timeout=10) as c:
        c.call("embed")
        c.call("quick")
    lines = wait_for(lambda: (lambda t: t if len(t) >= 2 else None)(path.read_text().splitlines()), 5)
    assert lines and lines[0].endswith(" call=embed") and lines[1].endswith(" call=quick"), lines
    assert " ok in=" in lines[0] and "worker=" in lines[0]


def test_gaspar_top_shows_pools_and_handlers(serve):
    from gaspar.ops import top

    s = serve(apps_under_test.pooled, processes=1)
    before = s.producer.stats()
    with Client(s.addr, timeout=10) as c:
        for _ in range(4):
            c.call("embed")
    after = s.producer.stats()
    frame = top.render(before, after, 2.0, 60, address=s.addr)
    assert all(len(line) <= 60 for line in frame), frame
    text = "\n".join(frame)
    assert "pools:" in text and "handlers:" in text
    [embed] = [line for line in frame if line.startswith("embed (embed)")]
    assert "calls/s 2.0" in embed and "ok 4" in embed, embed
    # errors: it ran (raised, timed out, died with its worker); refused: it never ran
    after["handlers"]["embed"]["outcomes"].update(error=1, timeout=1, worker_died=2, bad_request=1, shed=3)
    [embed] = [line for line in top.render(before, after, 2.0, 100) if line.startswith("embed (embed)")]
    assert "errors 4" in embed and "refused 4" in embed, embed
    assert "handlers:" not in "\n".join(top.render(None, serve(lambda m: m, processes=1).producer.stats(), 1.0, 80))


def test_a_pool_of_zero_to_n_workers_grows_for_its_first_call(serve):
    """work=0:1 on this host: no worker at the start, yet a call is not refused as "no
    worker serves it": it waits, the pool grows, and the call is answered."""
    s = serve(apps_under_test.scaled, processes=1, pools={"work": "0:1"}, scale_up_after=0.2)
    assert [w["pool"] for w in s.producer.stats()["workers"]] == ["default"]
    with Client(s.addr, timeout=10) as c:
        assert isinstance(c.call("work", 0.001), int)
    assert sorted(w["pool"] for w in s.producer.stats()["workers"]) == ["default", "work"]


def test_a_client_limit_passing_while_its_arguments_decode_is_a_timeout_not_a_bad_request():
    """QA: a valid call whose arguments took longer to decode than the client's
    handler_timeout was answered BadRequest (status 4, "do not retry") when the worker's
    reply beat the front end's own timeout answer: the decoding wrapped the SoftTimeout as
    malformed bytes. Here the worker's own answer, with a real SIGALRM limit (msgpack's
    decoding is C code: the signal lands as soon as it returns, inside the decode's try)."""
    import gc
    import signal as signals

    from gaspar.process.running import SoftLimit, call_handler

    before = signals.getsignal(signals.SIGALRM)
    body = memoryview(calls.encode_call("echo", ([{}] * 3_000_000,), {}))
    gc.collect()
    gc.disable()  # a collection's finalizer (of an earlier test's leftovers) would swallow the signal's exception
    try:
        status, reply = call_handler(apps_under_test.app.call, body, limit=(0.005, "handler_timeout"), soft=SoftLimit())
    finally:
        gc.enable()
        signals.signal(signals.SIGALRM, before)
    assert status == bytes([Status.TIMEOUT]), bytes(reply)[:300]
    assert b"handler_timeout" in bytes(reply)


def test_a_stream_past_its_clients_handler_timeout_is_ended_and_its_worker_freed(serve, tmp_path):
    """QA: a stream's client handler_timeout was answered "the worker interrupts it", but a
    stream has no soft limit: the generator went on and its worker stayed busy. It is now
    ended at its next item (GeneratorExit), and the answer says so."""
    s = serve(apps_under_test.app, processes=1)
    (pid,) = s.pids()
    marker = tmp_path / "closed"
    body = calls.encode_call("forever", (), {"size": 16, "marker": str(marker)})
    with socket.create_connection(tuple(s.producer.server_addr), timeout=10) as raw:
        raw.sendall(extended_header(len(body), keepalive=True, stream=True, timeout=0.3) + body)
        items, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 10:
            length, _, status = parse_reply_header(raw.recv(REPLY_HEADER.size, socket.MSG_WAITALL))
            data = raw.recv(length, socket.MSG_WAITALL) if length else b""
            if status != Status.ITEM:
                break
            items += 1
        assert status == Status.TIMEOUT and b"ends the stream at its next item" in data, (status, data)
        assert items > 0
    assert wait_for(marker.exists, 5, 0.05), "GeneratorExit never reached the handler"
    with Client(s.addr, timeout=10) as c:
        assert c.call("whoami") == pid
    assert s.producer.stats()["restarts"] == 0


def test_a_stream_on_a_pooled_connection_the_server_closed_goes_again_on_a_fresh_one(serve):
    """QA: Client.stream() on a pooled connection the server had closed (idle_timeout, a
    restart) raised ConnectionLost, where request() and call() reconnect: nothing ran."""
    s = serve(apps_under_test.app, processes=1, idle_timeout=0.3)
    with Client(s.addr, timeout=10) as c:
        assert c.call("add", 1) == 2  # its connection goes back to the pool
        time.sleep(0.8)  # the server closes it meanwhile
        assert list(c.stream("count", 3)) == [b"\x00", b"\x01", b"\x02"]
        time.sleep(0.8)
        assert c.call("add", 2) == 3


def test_a_stream_read_slowly_but_steadily_is_not_ended_as_stalled(serve):
    """QA: a consumer reading 64 KiB items at 128 KB/s had its stream ended as if it had
    left ("a window unread past the timeout"): the front end writes in the kernel's steps, so
    its worker waited longer than the timeout for room. A client that takes some of it
    within the timeout keeps its stream."""
    s = serve(apps_under_test.app, processes=1, timeout=2.0)
    with Client(s.addr, timeout=10) as c:
        got, t0 = 0, time.monotonic()
        for item in c.stream("forever", size=65536):
            got += len(item)
            time.sleep(0.5)  # 2 items a second
            if time.monotonic() - t0 > 7:
                break
    assert got >= 10 * 65536
    counters = s.producer.stats()["counters"]
    assert counters["timeouts"] == 0 and s.producer.stats()["restarts"] == 0, counters


def test_calls_whose_client_left_before_they_ran_are_counted_by_handler_and_logged_once(serve, tmp_path):
    """QA: 64 calls held or queued on a connection that closed were counted client_gone in
    all but 2 by their handler's figures, and their access-log lines said queue=-1.565ms (a
    held call's wait was counted from when it joined the queue, after the moment taken as
    now). Each is now counted once by its handler, and its wait counts from its arrival."""
    path = tmp_path / "access.log"
    s = serve(apps_under_test.app, processes=1, access_log=str(path), prefetch=0)

    async def main():
        async with aio.Client(s.addr, timeout=10, retry=False) as c:
            calls = [asyncio.ensure_future(c.call("pause", 0.2)) for _ in range(12)]
            await asyncio.sleep(0.3)  # one ran, one runs; the others are queued or held
        for call in calls:  # the connection is closed: the client left
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    asyncio.run(main())

    def settled():
        outcomes = s.producer.stats()["handlers"]["pause"]["outcomes"]
        return outcomes if sum(outcomes.values()) == 12 else None

    outcomes = wait_for(settled, 5)
    assert outcomes, s.producer.stats()["handlers"]["pause"]
    assert outcomes["client_gone"] + outcomes["ok"] == 12 and outcomes["client_gone"] >= 10, outcomes
    lines = [line for line in path.read_text().splitlines() if line.endswith("call=pause")]
    assert len(lines) == 12, lines  # once each
    assert sum(" client_gone " in line for line in lines) == outcomes["client_gone"]
    assert not [line for line in lines if re.search(r"=-\d", line)], lines  # no negative durations


def test_a_handler_argument_called_name_is_passed_by_keyword_from_every_client(serve):
    """QA: ``call("greet", name="bob")`` raised TypeError ("multiple values for argument
    'name'") in Client, aio.Client and Executor: the handler's name is positional-only now,
    so only ``timeout``, ``handler_timeout`` and ``codec`` are the client's own keywords."""
    s = serve(apps_under_test.app, processes=1)
    with Client(s.addr, timeout=10) as c:
        assert c.call("greet", name="bob") == "hello bob"
        assert list(c.stream("count", n=2)) == [b"\x00", b"\x01"]

    async def main():
        async with aio.Client(s.addr, timeout=10) as c:
            return await c.call("greet", name="ann", greeting="hi")

    assert asyncio.run(main()) == "hi ann"
    with gaspar.Executor(s.addr) as pool:
        assert pool.submit("greet", name="eve").result(10) == "hello eve"


def test_a_pool_no_handler_runs_in_is_refused_at_start(cli, tmp_path):
    """QA: ``@app.setup("embd")`` (for "embed") made a pool of its own: a worker loaded the
    model there, serving nothing, and the real pool never ran its setup. A pool that no
    handler runs in is refused when the daemon starts, as ``--pool embd=3`` is."""
    (tmp_path / "typo.py").write_text(
        "import gaspar\n\napp = gaspar.App()\n\n"
        "@app.handler(pool='embed')\ndef embed(x):\n    return x\n\n"
        "@app.setup('embd')\ndef load():\n    pass\n"
    )
    bad = cli("typo:app", "--bind", "127.0.0.1:0", cwd=tmp_path)
    assert bad.wait(20) == 2, bad.log
    assert "no handler runs in pool embd (a setup or app.pool with a typo?); pools: embed" in bad.log


def test_what_a_reload_may_not_change_in_an_app():
    """``shape``: the handlers' names and pools, the pools' sizes; ``reshaped`` says why a
    reload to another shape is refused ("" for the same shape, or a bytes handler)."""
    from gaspar.app import reshaped, shape

    def make(extra: bool = False, pool: str = "p", workers: int = 1) -> gaspar.App:
        app = gaspar.App()
        app.pool(pool, workers=workers)
        app.handler(name="a")(lambda: 1)
        app.handler(name="b", pool=pool)(lambda: 2)
        if extra:
            app.handler(name="c")(lambda: 3)
        return app

    base = shape(make())
    assert shape(gaspar.Consumer(handler=bytes)) is None and reshaped(None, base) == ""
    assert reshaped(base, shape(make())) == ""
    assert "(added c)" in reshaped(base, shape(make(extra=True)))
    assert "(removed c)" in reshaped(shape(make(extra=True)), base)
    assert "moved b (p -> q)" in reshaped(base, shape(make(pool="q")))
    assert "(pools resized)" in reshaped(base, shape(make(workers=2)))
    assert "not an App any more" in reshaped(base, None)


def test_registration_refuses_what_could_never_be_called_right():
    """QA: an async handler was accepted and every call failed ("use codec='pickle'"); a
    name of "" or 5 gave misleading errors; two sizes for one pool silently took the last;
    a parameter named like the client's own keywords was accepted without a word."""
    app = gaspar.App()

    async def co():
        return 1

    async def agen():
        yield 1

    for fn in (co, agen):
        with pytest.raises(TypeError, match="is async: a handler runs in a worker process"):
            app.handler(fn)
    for name in ("", 5):
        with pytest.raises(TypeError, match="a handler's name is a non-empty str"):
            app.handler(name=name)(lambda: 1)
    app.pool("k", workers=2)
    with pytest.raises(ValueError, match="pool 'k' has 2 workers already, not 4"):
        app.handler(name="x", pool="k", workers=4)(lambda: 1)
    app.handler(name="y", pool="k", workers=2)(lambda: 1)  # the same size: fine
    with pytest.warns(UserWarning, match="z: its codec, timeout cannot be given by keyword"):
        app.handler(name="z")(lambda timeout, codec=None: 1)
    assert sorted(app.handlers) == ["y", "z"]
