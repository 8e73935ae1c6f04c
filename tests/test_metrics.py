"""/metrics, /healthz and /readyz of a real daemon, read with prometheus_client's own parser.

Every figure is checked against what the test did to the daemon: requests that succeeded,
handler exceptions, a worker killed mid-request, the histograms' counts, each worker's RSS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import handlers
import pytest
from conftest import CpuHog, wait_for
from prometheus_client.parser import text_string_to_metric_families

import gaspar
from gaspar import client
from gaspar.frontend.metrics_http import RENDER_EVERY
from gaspar.ops.telemetry import OUTCOMES, RESTART_REASONS
from gaspar.wire.framing import extended_header, pack, parse_reply_header


def get(addr, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(addr) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items -> value}, for every sample of /metrics."""
    status, text = get(addr, "/metrics")
    assert status == 200
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics, name: str, **labels) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


def test_metrics_match_what_the_daemon_did(serve):
    s = serve(handlers.mixed, processes=2, metrics_bind="127.0.0.1:0")
    addr = s.producer.metrics_addr
    before = scrape(addr)
    for outcome in OUTCOMES:  # every label value exists from the start, at 0
        assert value(before, "gaspar_requests_total", outcome=outcome) == 0
    for reason in RESTART_REASONS:
        assert value(before, "gaspar_worker_restarts_total", reason=reason) == 0
    assert value(before, "gaspar_build_info", version=gaspar.__version__) == 1
    assert value(before, "gaspar_workers_desired") == 2 and value(before, "gaspar_workers", state="idle") == 2
    # the one pool of a bytes handler has its pool series too, as monitoring.rst lists them
    assert value(before, "gaspar_pool_workers", pool="default") == 2
    assert value(before, "gaspar_pool_queued", pool="default") == 0
    assert value(before, "gaspar_pool_running", pool="default") == 0

    ok, errors = [0], [0]
    lock = threading.Lock()

    def load(n):
        for i in range(n):
            msg = b"boom" if i % 5 == 0 else b"m%d" % i
            try:
                s.request(msg)
                with lock:
                    ok[0] += 1
            except gaspar.HandlerError:
                with lock:
                    errors[0] += 1

    threads = [threading.Thread(target=load, args=(60,)) for _ in range(4)]
    for t in threads:
        t.start()
    victim = threading.Thread(target=lambda: pytest.raises(gaspar.WorkerDied, s.request, b"sleep 5"))
    victim.start()
    busy = wait_for(lambda: _sleeper(s), 10)
    assert busy
    os.kill(busy, signal.SIGKILL)
    victim.join(10)
    for t in threads:
        t.join(60)
    time.sleep(RENDER_EVERY)  # /metrics is rendered at most once a second: the next one is fresh
    assert wait_for(lambda: value(scrape(addr), "gaspar_workers", state="idle") == 2, 10)

    m = scrape(addr)
    assert value(m, "gaspar_requests_total", outcome="ok") == ok[0] == 192
    assert value(m, "gaspar_requests_total", outcome="error") == errors[0] == 48
    assert value(m, "gaspar_requests_total", outcome="worker_died") == 1
    assert value(m, "gaspar_worker_restarts_total", reason="died") == 1
    replies = ok[0] + errors[0]
    assert value(m, "gaspar_handler_duration_seconds_count") == replies
    assert value(m, "gaspar_request_duration_seconds_count") == replies + 1
    assert value(m, "gaspar_queue_wait_seconds_count") == replies + 1
    assert value(m, "gaspar_handler_duration_seconds_bucket", le="+Inf") == replies
    assert value(m, "gaspar_handler_duration_seconds_sum") > 0
    assert sum(m["gaspar_worker_requests_total"].values()) == replies
    rss = m["gaspar_worker_resident_memory_bytes"]
    assert len(rss) == 2 and all(v > 1 << 20 for v in rss.values())
    assert {dict(k)["worker"] for k in rss} == {"1", "2"}  # worker numbers, never pids
    assert len(m["gaspar_worker_cpu_seconds_total"]) == 2
    assert value(m, "gaspar_hub_lag_seconds_count") > 0
    assert value(m, "process_resident_memory_bytes") > 1 << 20
    assert value(m, "gaspar_queue_length") == 0 and value(m, "gaspar_requests_in_flight") == 0


def test_a_reply_cut_by_a_client_reset_is_counted(serve):
    """QA: ten clients that read 64 KiB of a 20 MB reply and reset were counted ``ok`` with
    nothing else to tell: the outcome is the handler's, and the cut replies are counted apart."""
    s = serve(handlers.big, processes=1, metrics_bind="127.0.0.1:0")
    assert len(s.request(b"big 100000")) == 100000  # written whole: not cut
    host, port = s.addr.rsplit(":", 1)
    for tag in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(extended_header(12, tag=tag) + b"big 20000000")
            got = 0
            while got < 65536:
                got += len(sock.recv(65536))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    counters = lambda: s.producer.stats()["counters"]  # noqa: E731
    assert wait_for(lambda: counters()["replies_cut"] == 3, 10), counters()
    assert 3 * 10_000_000 < counters()["reply_bytes_cut"] < 3 * 20_000_000
    time.sleep(RENDER_EVERY)
    m = scrape(s.producer.metrics_addr)
    assert value(m, "gaspar_replies_cut_total") == 3
    assert value(m, "gaspar_requests_total", outcome="ok") == 4  # the handler's outcome, as documented


def _sleeper(s) -> int | None:
    """The pid of the worker running the long request, once it runs."""
    for w in s.producer.stats()["workers"]:
        if w["busy"]:
            d = s.producer.dispatcher
            slot = next(x for x in d.workers.values() if x.pid == w["pid"])
            if slot.current is not None and bytes(slot.current.body).startswith(b"sleep"):
                return w["pid"]
    return None


def test_healthz_and_readyz_and_readyz_flips_to_503_during_a_stop(serve):
    s = serve(handlers.mixed, processes=1, metrics_bind="127.0.0.1:0", graceful_timeout=10)
    addr = s.producer.metrics_addr
    assert get(addr, "/healthz")[0] == 200 and get(addr, "/readyz")[0] == 200
    assert get(addr, "/nope")[0] == 404
    slow = threading.Thread(target=s.request, args=(b"sleep 1.5",))
    slow.start()
    assert wait_for(lambda: s.producer.stats()["running"] == 1, 5)
    stopper = threading.Thread(target=s.producer.stop, kwargs={"graceful": True})
    stopper.start()
    assert wait_for(lambda: get(addr, "/readyz")[0] == 503, 5)  # a stop has begun: take me out
    assert get(addr, "/healthz")[0] == 200  # still serving what it accepted
    slow.join(10)
    stopper.join(15)
    with pytest.raises(OSError):  # the port is closed once stopped
        get(addr, "/healthz")


def test_cli_metrics_bind_logs_its_address_and_a_missing_library_is_a_usage_error(cli, tmp_path):
    server = cli("handlers:echo", "--bind", "127.0.0.1:0", "--workers", "1", "--metrics-bind", "127.0.0.1:0")
    server.wait_ready(1)
    assert get(metrics_address(server), "/readyz")[0] == 200
    blocker = tmp_path / "prometheus_client.py"
    blocker.write_text("raise ImportError('hidden by the test')\n")
    missing = cli(
        "handlers:echo", "--bind", "127.0.0.1:0", "--metrics-bind", "127.0.0.1:0", env={"PYTHONPATH": _path(tmp_path)}
    )
    assert missing.wait(20) == 2
    assert "metrics need prometheus_client: pip install prometheus_client" in missing.log
    assert "gaspar[metrics]" not in missing.log  # gaspar 2 is not on the index: that would install 1.0


def metrics_address(server) -> tuple[str, int]:
    """The metrics port a CLI server logged ("Metrics at: http://HOST:PORT/metrics")."""
    line = wait_for(lambda: next((x for x in server.lines if "Metrics at: http://" in x), None), 10)
    assert line, server.log
    host, port = line.rsplit("http://", 1)[1].split("/")[0].rsplit(":", 1)
    return host, int(port)


def _path(first) -> str:
    from conftest import ROOT

    return os.pathsep.join([str(first), ROOT, os.path.join(ROOT, "tests")])


def test_stats_json_has_the_same_figures(serve):
    s = serve(handlers.mixed, processes=2)
    for i in range(10):
        s.request(b"x%d" % i)
    with pytest.raises(gaspar.HandlerError):
        s.request(b"boom")
    st = s.producer.stats()
    assert st["outcomes"]["ok"] == 10 and st["outcomes"]["error"] == 1
    assert st["histograms"]["handler_duration_seconds"]["count"] == 11
    assert st["worker_states"] == {"booting": 0, "idle": 2, "busy": 0, "retiring": 0}
    for w in st["workers"]:
        assert w["state"] == "idle" and w["rss_bytes"] > 0 and w["age_seconds"] >= 0
    assert sum(w["requests"] for w in st["workers"]) == 11
    assert st["front_end"]["rss_bytes"] > 0


def restarts(s) -> dict[str, int]:
    return s.producer.stats()["restarts_by_reason"]


def test_each_restart_reason_is_counted(serve, tmp_path, monkeypatch):
    app = tmp_path / "pyreasons.py"
    app.write_text("import time\ndef handle(m):\n    time.sleep(float(m or b'0'))\n    return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import pyreasons

    try:
        s = serve(pyreasons.handle, processes=2, max_requests=5, timeout=1)  # only the operator's timeout kills
        for _ in range(10):  # each worker recycles after 5
            s.request(b"0")
        assert wait_for(lambda: restarts(s)["max_requests"] >= 1, 10), restarts(s)
        with pytest.raises(gaspar.WorkerTimeout):
            s.request(b"5")
        assert wait_for(lambda: restarts(s)["timeout"] == 1, 10), restarts(s)
        assert s.producer.stats()["outcomes"]["timeout"] == 1
        os.kill(s.pids()[0], signal.SIGKILL)
        assert wait_for(lambda: restarts(s)["died"] == 1, 10), restarts(s)
        assert wait_for(lambda: len(s.producer.worker_pids()) == 2, 10)
        s.producer.scale(1)
        assert wait_for(lambda: restarts(s)["scale"] == 1, 10), restarts(s)
        s.producer.scale(2)
        assert wait_for(lambda: s.producer.stats()["worker_states"]["idle"] == 2, 10)
        before = restarts(s)["reload"]
        s.producer.reload()
        assert wait_for(lambda: restarts(s)["reload"] == before + 2, 15), restarts(s)
        final = restarts(s)
        assert final["died"] == 1 and final["timeout"] == 1 and final["scale"] == 1
    finally:
        monkeypatch.delitem(__import__("sys").modules, "pyreasons")


# -- the metrics port's HTTP server: the pure rules ---------------------------------------------


@pytest.mark.parametrize(
    "head, parsed",
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x", (0, "GET", "/metrics")),
        (b"HEAD /healthz?x=1 HTTP/1.0", (0, "HEAD", "/healthz")),
        (b"POST /metrics HTTP/1.1", (405, "POST", "")),
        (b"DELETE / HTTP/1.1", (405, "DELETE", "")),
        (b"GET /metrics", (400, "", "")),
        (b"GET /metrics SPDY/3", (400, "", "")),
        (b"\x16\x03\x01 tls hello", (400, "", "")),
        (b"", (400, "", "")),
    ],
)
def test_a_request_head_is_get_or_head_of_http_1(head, parsed):
    from gaspar.frontend.metrics_http import parse_head

    assert parse_head(head) == parsed


def test_scrapes_get_twenty_turns_a_second_a_burst_of_twenty_and_wait_at_most_4_s():
    from gaspar.frontend.metrics_http import ScrapePace

    now = [100.0]
    pace = ScrapePace(rate=20, clock=lambda: now[0])
    assert [pace.take() for _ in range(20)] == [0.0] * 20  # a burst at once
    assert pace.take() == pytest.approx(0.05)  # then one every 50 ms
    assert pace.take() == pytest.approx(0.10)
    waits = [pace.take() for _ in range(100)]
    given = [w for w in waits if w is not None]  # turns up to 4 s ahead, then none
    assert 3.9 < given[-1] <= 4.0 and waits[len(given) :] == [None] * (100 - len(given)), waits
    assert pace.take() is None  # a refused one takes no turn
    now[0] += 5.0  # the queue drained
    assert pace.take() == 0.0
    now[0] += 100.0  # idle: the whole burst again, never more
    assert [pace.take() for _ in range(21)].count(0.0) == 20


def test_metrics_are_rendered_at_most_once_a_second_and_shared():
    from gaspar.frontend.metrics_http import RenderCache

    now = [100.0]
    made = []
    cache = RenderCache(lambda: made.append(1) or b"m%d" % len(made), every=1.0, clock=lambda: now[0])
    assert [cache.get() for _ in range(8)] == [b"m1"] * 8  # eight scrapers, one render
    now[0] += 0.99
    assert cache.get() == b"m1"
    now[0] += 0.01
    assert cache.get() == b"m2" and cache.renders == 2


def test_the_readme_scrape_config_and_queries_name_real_metrics(serve):
    """The monitoring page's Prometheus section: its scrape target is HOST:PORT, and every
    metric its table and queries name is in a real scrape (prometheus_client's parser)."""
    import os
    import re

    from conftest import ROOT

    with open(os.path.join(ROOT, "docs", "monitoring.rst"), encoding="utf-8") as f:
        page = f.read()
    section = page[page.index("\nPrometheus\n") : page.index("\nstatsd\n")]
    [target] = re.findall(r'targets: \["([^"]+)"\]', section)
    assert re.fullmatch(r"[\w.-]+:\d+", target), target
    named = set(re.findall(r"\b(gaspar_[a-z_]+)", section))
    import apps_under_test

    from gaspar.client import Client

    # an App, and a default pool that sizes itself: their families too
    s = serve(apps_under_test.pooled, processes="1:2", metrics_bind="127.0.0.1:0")
    with Client(s.addr, timeout=10) as c:
        assert isinstance(c.call("quick"), int) and isinstance(c.call("embed"), int)
    status, text = get(s.producer.metrics_addr, "/metrics")
    assert status == 200
    samples = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    families = {family.name for family in text_string_to_metric_families(text)}
    for name in named:
        assert name in samples or name in families, f"docs/monitoring.rst names {name}, which no scrape has"
    assert {"gaspar_stalled", "gaspar_handler_duration_seconds_bucket", "gaspar_requests_total"} <= named | samples
    for query in re.findall(
        r"^    (?! )(.*gaspar_.*)$", section, re.M
    ):  # PromQL and the target: balanced, no stray spaces
        assert query.count("(") == query.count(")") and query.count("{") == query.count("}"), query
        assert not re.search(r"[a-z]  [a-z]", query), query


def test_the_accept_backlog_counts_connections_the_front_end_has_not_taken(cli):
    """Connections the kernel has completed while the front end could not take them (it
    is stopped with SIGSTOP) wait in the listening socket's accept queue, before any
    queue the overload control sees: ``gaspar stats`` and /metrics show how many, and the
    limit from --backlog. A stats request that is first in line sees the 300 behind it;
    then every one of them is served, and the queue is empty again."""
    server = cli(
        "handlers:echo", "--bind", "127.0.0.1:0", "--workers", "1", "--backlog", "512", "--metrics-bind", "127.0.0.1:0"
    )
    server.wait_ready(1)
    metrics_addr = metrics_address(server)
    with open("/proc/sys/net/core/somaxconn") as f:
        limit = min(512, int(f.read()))  # the kernel caps what listen() asks for
    n = min(300, limit - 20)
    idle = server.stats()["overload"]
    assert idle["accept_backlog"] == 0 and idle["accept_backlog_limit"] == limit
    host, port = server.addr.rsplit(":", 1)
    waiting: list[socket.socket] = []
    server.signal(signal.SIGSTOP)
    try:
        assert wait_for(lambda: _state(server.proc.pid) == "T", 5)  # stopped before anyone connects
        asker = socket.create_connection((host, int(port)), timeout=10)
        asker.sendall(extended_header(0, stats=True))
        for i in range(n):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(pack(b"late %d" % i))
            waiting.append(sock)
    finally:
        server.signal(signal.SIGCONT)
    try:
        length, _, status = parse_reply_header(asker.recv(9, socket.MSG_WAITALL))
        seen = json.loads(asker.recv(length, socket.MSG_WAITALL))["overload"]
        assert status == 0
        assert n * 0.8 <= seen["accept_backlog"] <= n, seen
        assert seen["accept_backlog_limit"] == limit
        for i, sock in enumerate(waiting):  # nothing was lost in the kernel's queue
            reply = b"".join(iter(lambda sock=sock: sock.recv(4096), b""))
            assert reply == b"late %d" % i
    finally:
        asker.close()
        for sock in waiting:
            sock.close()
    time.sleep(RENDER_EVERY)
    assert value(scrape(metrics_addr), "gaspar_accept_backlog") == 0
    assert server.stats()["overload"]["accept_backlog"] == 0


def _state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="Linux's schedstat")
def test_cpu_wait_shows_a_worker_and_the_front_end_waiting_behind_a_cpu_hog(cli):
    """A process that spins on one CPU shares it with the worker while it runs a 600 ms
    request, then with the front end's threads while requests stream in: each was ready to
    run but had no CPU, and ``gaspar stats`` and /metrics count it (the worker's main
    thread; the front end over all its threads)."""
    server = cli("handlers:spin_ms", "--bind", "127.0.0.1:0", "--workers", "1", "--metrics-bind", "127.0.0.1:0")
    server.wait_ready(1)
    metrics_addr = metrics_address(server)
    st = server.stats()
    worker, front = st["workers"][0], st["front_end"]
    cpu = min(os.sched_getaffinity(0))
    with CpuHog(cpu):
        os.sched_setaffinity(worker["pid"], {cpu})  # its main thread, which runs the handler
        assert client.request(server.addr, b"600", timeout=10) == b"600"
        mid = server.stats()
        for tid in os.listdir(f"/proc/{server.proc.pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            assert client.request(server.addr, b"0", timeout=10) == b"0"
    after = server.stats()
    assert mid["workers"][0]["cpu_wait_seconds"] - worker["cpu_wait_seconds"] >= 0.1  # about 0.3 s
    assert after["front_end"]["cpu_wait_seconds"] - mid["front_end"]["cpu_wait_seconds"] >= 0.015  # about 0.06 s
    time.sleep(RENDER_EVERY)
    m = scrape(metrics_addr)
    assert value(m, "gaspar_worker_cpu_wait_seconds_total", worker="1") >= mid["workers"][0]["cpu_wait_seconds"]
    assert value(m, "gaspar_front_end_cpu_wait_seconds_total") >= after["front_end"]["cpu_wait_seconds"]
    assert front["cpu_wait_seconds"] >= 0
