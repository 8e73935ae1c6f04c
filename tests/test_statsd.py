"""The statsd pusher: its lines from hand-made snapshots (no I/O), its packets, its loop's
failures, and a real daemon pushing to a UDP socket of the test."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time

import handlers
import pytest

from gaspar import client
from gaspar.ops.statsd import StatsdPusher, format_metrics, interval_histogram, packets, sanitize
from gaspar.ops.telemetry import OUTCOMES, RESTART_REASONS, WORKER_STATES, Histogram

LINE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*:[0-9]+(\.[0-9]+)?\|[cg]$")


def hist(values=()) -> dict:
    h = Histogram()
    for v in values:
        h.observe(v)
    return h.snapshot()


def worker(number, pid, cpu, rss=1000, age=100.0) -> dict:
    return {"number": number, "pid": pid, "cpu_seconds": cpu, "rss_bytes": rss, "age_seconds": age}


def snap(
    time=1000.0,
    pid=100,
    uptime=50.0,
    outcomes=None,
    shed=None,
    restarts=None,
    workers=(),
    front=(2.0, 50_000),
    handler=(),
    queue_wait=(),
    request=(),
    **top,
) -> dict:
    """A ``Producer._stats()`` snapshot with the fields the pusher reads."""
    st = {
        "pid": pid,
        "uptime": uptime,
        "time": time,
        "target_workers": 2,
        "workers": list(workers),
        "worker_states": dict.fromkeys(WORKER_STATES, 0) | {"idle": len(workers)},
        "queued": 0,
        "pending": 0,
        "connections": 0,
        "front_end": {
            "cpu_seconds": front[0],
            "rss_bytes": front[1],
            "cpu_wait_seconds": front[2] if len(front) > 2 else None,
        }
        if front
        else None,
        "outcomes": dict.fromkeys(OUTCOMES, 0) | (outcomes or {}),
        "restarts_by_reason": dict.fromkeys(RESTART_REASONS, 0) | (restarts or {}),
        "histograms": {
            "queue_wait_seconds": hist(queue_wait),
            "handler_duration_seconds": hist(handler),
            "request_duration_seconds": hist(request),
            "hub_lag_seconds": hist(),
        },
        "counters": {"submitted": 0, "shed": 0}
        | {f"shed_{r}": 0 for r in ("queue_timeout", "queue_delay", "queue_full", "deadline")}
        | {f"shed_{r}": n for r, n in (shed or {}).items()},
        "overload": {"overloaded": False, "buffered_bytes": 0},
    }
    st.update(top)
    return st


def parse(lines) -> dict[str, tuple[float, str]]:
    out = {}
    for line in lines:
        assert LINE.match(line), line
        name, rest = line.split(":")
        value, kind = rest.split("|")
        assert name not in out, f"{name} twice"
        out[name] = (float(value), kind)
    return out


# -- counters ------------------------------------------------------------------------


def test_counters_are_deltas_and_a_counter_that_did_not_move_is_left_out():
    prev = snap(outcomes={"ok": 5, "error": 1}, shed={"queue_delay": 2}, restarts={"died": 1})
    now = snap(time=1010.0, outcomes={"ok": 8, "error": 1, "shed": 4}, shed={"queue_delay": 6}, restarts={"died": 2})
    m = parse(format_metrics(prev, now, "gaspar"))
    assert m["gaspar.requests.ok"] == (3, "c")
    assert m["gaspar.requests.shed"] == (4, "c")
    assert m["gaspar.shed.queue_delay"] == (4, "c")
    assert m["gaspar.worker_restarts.died"] == (1, "c")
    counters = {name for name, (_, kind) in m.items() if kind == "c"}
    assert counters == {
        "gaspar.requests.ok",
        "gaspar.requests.shed",
        "gaspar.shed.queue_delay",
        "gaspar.worker_restarts.died",
    }


def test_the_first_push_counts_from_the_start():
    m = parse(format_metrics(None, snap(outcomes={"ok": 7}, shed={"deadline": 1}, restarts={"scale": 2}), "gaspar"))
    assert m["gaspar.requests.ok"] == (7, "c")
    assert m["gaspar.shed.deadline"] == (1, "c")
    assert m["gaspar.worker_restarts.scale"] == (2, "c")


@pytest.mark.parametrize(
    "restart",
    [
        {"pid": 200},  # another daemon behind the stats callable
        {"uptime": 1.0},  # the same pid, started again
        {},  # neither says so: only the figures going down
    ],
)
def test_a_reset_counts_from_the_new_start_never_negative(restart):
    prev = snap(outcomes={"ok": 100, "error": 9}, restarts={"died": 3}, handler=[0.01] * 100)
    now = snap(time=1010.0, outcomes={"ok": 4}, handler=[0.01] * 4, **({"uptime": 60.0} | restart))
    lines = format_metrics(prev, now, "gaspar")
    m = parse(lines)  # the pattern has no minus sign
    assert m["gaspar.requests.ok"] == (4, "c")
    assert "gaspar.requests.error" not in m and "gaspar.worker_restarts.died" not in m
    assert m["gaspar.handler_ms.count"] == (4, "c")
    assert m["gaspar.handler_ms.mean"] == (10.0, "g")


# -- gauges --------------------------------------------------------------------------


def test_gauges():
    now = snap(
        queued=3,
        pending=5,
        connections=7,
        target_workers=4,
        worker_states={"booting": 1, "idle": 0, "busy": 2, "retiring": 1},
        overload={"overloaded": True, "buffered_bytes": 12345, "accept_backlog": 77},
    )
    m = parse(format_metrics(snap(), now, "gaspar"))
    expect = {
        "queue_length": 3,
        "in_flight": 5,
        "connections": 7,
        "workers_desired": 4,
        "workers.booting": 1,
        "workers.idle": 0,
        "workers.busy": 2,
        "workers.retiring": 1,
        "buffered_bytes": 12345,
        "overloaded": 1,
        "accept_backlog": 77,
        "front_end.rss_bytes": 50_000,
    }
    for name, value in expect.items():
        assert m["gaspar." + name] == (value, "g"), name
    assert parse(format_metrics(None, snap(), "gaspar"))["gaspar.overloaded"] == (0, "g")


def test_cpu_percent_per_worker_over_the_interval():
    prev = snap(time=1000.0, front=(2.0, 9, 0.5), workers=[worker(1, 11, 1.0), worker(2, 12, 3.0), worker(3, 13, 1.0)])
    now = snap(
        time=1002.0,
        front=(2.5, 9, 0.9),  # ready but without a CPU 0.4 s of the 2
        workers=[
            worker(1, 11, 1.5, rss=4096),  # 0.5 s of CPU in 2 s
            worker(2, 22, 0.25, age=0.5),  # replaced during the interval: over its life
            worker(3, 13, None, rss=None),  # gone before /proc was read
            worker(4, 14, 0.1, age=1.0),  # scaled up
        ],
    )
    m = parse(format_metrics(prev, now, "gaspar"))
    assert m["gaspar.worker.1.cpu_percent"] == (25.0, "g")
    assert m["gaspar.worker.1.rss_bytes"] == (4096, "g")
    assert m["gaspar.worker.2.cpu_percent"] == (50.0, "g")
    assert m["gaspar.worker.4.cpu_percent"] == (10.0, "g")
    assert not any(name.startswith("gaspar.worker.3.") for name in m)
    assert m["gaspar.front_end.cpu_percent"] == (25.0, "g")
    assert m["gaspar.front_end.cpu_wait_percent"] == (20.0, "g")
    assert "gaspar.front_end.cpu_wait_percent" not in parse(format_metrics(snap(), snap(time=1002.0), "gaspar"))


def test_front_end_cpu_needs_two_snapshots_and_a_clock_that_moved():
    assert "gaspar.front_end.cpu_percent" not in parse(format_metrics(None, snap(), "gaspar"))
    assert "gaspar.front_end.cpu_percent" not in parse(format_metrics(snap(), snap(front=(3.0, 1)), "gaspar"))
    stepped_back = parse(format_metrics(snap(), snap(time=990.0, workers=[worker(1, 11, 1.0)]), "gaspar"))
    assert "gaspar.front_end.cpu_percent" not in stepped_back
    assert stepped_back["gaspar.worker.1.cpu_percent"] == (1.0, "g")  # over its life


# -- timings -------------------------------------------------------------------------


def test_quantiles_and_mean_are_of_the_interval_from_the_bucket_deltas():
    slow, fast = [2.0] * 100, [0.0015] * 98 + [0.2, 0.2]
    prev = snap(handler=slow, request=slow)
    now = snap(time=1010.0, handler=slow + fast, request=slow + fast)
    m = parse(format_metrics(prev, now, "gaspar"))
    alone = Histogram()
    for v in fast:
        alone.observe(v)
    assert m["gaspar.handler_ms.count"] == (100, "c")
    assert m["gaspar.handler_ms.mean"][0] == pytest.approx(sum(fast) / 100 * 1000, abs=0.001)
    assert m["gaspar.handler_ms.p50"][0] == pytest.approx(alone.quantile(0.5) * 1000, abs=0.001)
    assert m["gaspar.handler_ms.p99"][0] == pytest.approx(alone.quantile(0.99) * 1000, abs=0.001)
    assert 1.0 <= m["gaspar.handler_ms.p50"][0] <= 2.5  # the cumulative p50 would be in the 2 s bucket
    assert 100.0 <= m["gaspar.handler_ms.p99"][0] <= 250.0
    assert m["gaspar.request_ms.p99"] == m["gaspar.handler_ms.p99"]
    assert not any(name.startswith("gaspar.queue_wait_ms") for name in m)  # nothing queued in it


def test_an_idle_interval_sends_no_timing():
    prev = snap(handler=[0.01] * 5, queue_wait=[0.001] * 5, request=[0.02] * 5)
    m = parse(
        format_metrics(prev, snap(time=1010.0, handler=[0.01] * 5, queue_wait=[0.001] * 5, request=[0.02] * 5), "g")
    )
    assert not [name for name in m if "_ms." in name]


def test_interval_histogram_is_the_whole_snapshot_without_prev_or_after_a_reset():
    now = hist([0.003, 0.004, 0.5])
    for prev in (None, hist([0.003] * 10)):
        h = interval_histogram(prev, now)
        assert (h.count, h.sum, sum(h.counts)) == (3, now["sum"], 3)


def test_tiny_values_are_written_without_exponents():
    m = parse(format_metrics(None, snap(handler=[0.000016] * 3), "gaspar"))
    assert m["gaspar.handler_ms.mean"] == (0.016, "g")


# -- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix, first",
    [
        ("gaspar", "gaspar.requests.ok"),
        ("My App/Prod", "my_app_prod.requests.ok"),
        (".svc..gaspar:x|y.", "svc.gaspar_x_y.requests.ok"),
        ("", "requests.ok"),
        ("...", "requests.ok"),
    ],
)
def test_the_prefix_is_sanitized(prefix, first):
    lines = format_metrics(None, snap(outcomes={"ok": 1}, workers=[worker(1, 11, 1.0)], handler=[0.1]), prefix)
    assert lines[0] == first + ":1|c"
    parse(lines)


def test_sanitize():
    assert sanitize("A-b c.D") == "a_b_c.d"
    assert sanitize("a..b...c") == "a.b.c"
    assert sanitize("é") == "_"


# -- packets -------------------------------------------------------------------------


def test_packets_stay_under_the_size_and_never_split_a_line():
    lines = [f"gaspar.worker.{i}.rss_bytes:{i * 7919}|g" for i in range(500)]
    out = packets(lines, size=200)
    assert len(out) > 1 and all(len(p) <= 200 for p in out)
    assert b"\n".join(out).decode().split("\n") == lines  # every line, whole, in order
    assert all(len(a) + 1 + len(b.split(b"\n")[0]) > 200 for a, b in zip(out, out[1:], strict=False))  # full


def test_packets_edges():
    assert packets([]) == []
    assert packets(["a:1|c"]) == [b"a:1|c"]
    assert packets(["a" * 10, "b:1|c", "c:2|c"], size=9) == [b"a" * 10, b"b:1|c", b"c:2|c"]  # too long: alone
    assert packets(["a:1|c", "b:1|c"], size=11) == [b"a:1|c\nb:1|c"]  # exactly the size
    assert all(len(p) <= 1432 for p in packets(["x" * 100] * 100))


# -- the loop ------------------------------------------------------------------------


class FailingSocket:
    def __init__(self, exc: OSError):
        self.exc, self.tries = exc, 0

    def sendto(self, data, target):
        self.tries += 1
        raise self.exc

    def close(self):
        pass


def test_send_errors_are_counted_and_warned_about_once_a_minute(caplog):
    now = [0.0]
    pusher = StatsdPusher(lambda: snap(), ("127.0.0.1", 9), "gaspar", 10, clock=lambda: now[0])
    pusher.sock, pusher.target = FailingSocket(BlockingIOError(11, "Resource temporarily unavailable")), ("x", 9)
    with caplog.at_level(logging.WARNING, logger="gaspar"):
        for _ in range(5):
            assert pusher.push() == 0
            now[0] += 10
        assert pusher.errors == pusher.sock.tries == 5  # one packet a round
        assert len(caplog.records) == 1
        now[0] += 20  # a minute since the warning
        pusher.push()
    assert len(caplog.records) == 2 and "5 failure(s)" in caplog.records[1].getMessage()


def test_a_round_that_raises_does_not_end_the_loop(caplog):
    calls = []

    def stats():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bad snapshot")
        return snap(outcomes={"ok": len(calls)})

    stop = threading.Event()

    def sleep(seconds):
        if len(calls) >= 3:
            stop.set()

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        pusher = StatsdPusher(stats, rx.getsockname(), "t", 0.01)
        with caplog.at_level(logging.WARNING, logger="gaspar"):
            pusher.run(sleep=sleep, stop=stop)
        assert len(calls) == 3 and pusher.errors == 1 and pusher.sent == 2
        assert "a bad snapshot" in caplog.text
        first, second = rx.recv(2048).decode(), rx.recv(2048).decode()
    assert "t.requests.ok:2|c" in first.split("\n") and "t.requests.ok:1|c" in second.split("\n")
    assert pusher.sock is None  # closed when the loop ends


def test_a_name_that_does_not_resolve_is_tried_again(caplog, monkeypatch):
    def getaddrinfo(*args, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)  # no DNS in the test
    rounds = []
    stop = threading.Event()

    def sleep(seconds):
        rounds.append(seconds)
        if len(rounds) > 2:
            stop.set()

    pusher = StatsdPusher(lambda: snap(), ("no-such-host.invalid", 8125), "gaspar", 0.01)
    with caplog.at_level(logging.WARNING, logger="gaspar"):
        pusher.run(sleep=sleep, stop=stop)
    assert pusher.errors == 2 and pusher.sent == 0 and len(caplog.records) == 1


# -- a real daemon -------------------------------------------------------------------


def test_a_live_daemon_pushes_what_it_did(serve):
    """--statsd-host: the pusher runs in the daemon's own hub."""
    n = 25
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.5)
        port = rx.getsockname()[1]
        s = serve(handlers.echo, processes=2, statsd_host=f"127.0.0.1:{port}", statsd_interval=0.2)
        for i in range(n):
            assert client.request(s.addr, b"m%d" % i, timeout=5) == b"m%d" % i
        received: list[str] = []

        def total(name: str) -> float:
            return sum(float(line.split(":")[1].split("|")[0]) for line in received if line.startswith(name + ":"))

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                received += rx.recv(65536).decode().split("\n")
            except TimeoutError:
                continue
            if total("gaspar.requests.ok") >= n and any(line.startswith("gaspar.worker.2.") for line in received):
                break
    assert all(LINE.match(line) for line in received), received
    assert total("gaspar.requests.ok") == n
    assert total("gaspar.handler_ms.count") == total("gaspar.request_ms.count") == n
    assert "gaspar.requests.error" not in {line.split(":")[0] for line in received}
    for number in (1, 2):
        assert any(line.startswith(f"gaspar.worker.{number}.rss_bytes:") for line in received)
        assert any(line.startswith(f"gaspar.worker.{number}.cpu_percent:") for line in received)
    assert "gaspar.workers_desired:2|g" in received and "gaspar.workers.idle:2|g" in received


def test_agents_on_other_hosts_are_pushed_when_there_are_any():
    def remote(**counts):
        base = dict.fromkeys(
            ("agents_lost", "requests_lost", "joins_refused", "handshakes_failed", "stale_messages"), 0
        )
        return {"agents_live": 1, **base, **counts}

    agents = [
        {"name": "gpu.1", "state": "joined", "slots": 8, "busy": 3, "rss_bytes": 100, "workers": [{"rss_bytes": 20}]},
        {"name": "old", "state": "lost", "slots": 0, "busy": 0},
        {"name": "quiet", "state": "joined", "slots": 1, "busy": 0, "rss_bytes": None, "workers": []},
    ]
    prev = snap(remote=remote(agents_lost=1), agents=agents)
    now = snap(time=1010.0, remote=remote(agents_lost=3, requests_lost=2), agents=agents)
    m = parse(format_metrics(prev, now, "gaspar"))
    assert m["gaspar.agents.live"] == (1, "g")
    assert m["gaspar.agents.agents_lost"] == (2, "c") and m["gaspar.agents.requests_lost"] == (2, "c")
    assert "gaspar.agents.stale_messages" not in m  # did not move
    assert m["gaspar.agent.gpu_1.workers"] == (8, "g") and m["gaspar.agent.gpu_1.busy"] == (3, "g")
    assert m["gaspar.agent.gpu_1.rss_bytes"] == (120, "g")  # the agent's own and its workers'
    assert "gaspar.agent.quiet.rss_bytes" not in m  # no pong with figures yet: no gauge
    assert not any(name.startswith("gaspar.agent.old") for name in m)  # ended sessions: not a gauge
    assert not any("agent" in name for name in parse(format_metrics(None, snap(), "gaspar")))
