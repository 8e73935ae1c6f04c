"""``gaspar top``: the frame rendered from hand-made stats (rates, missing figures, a
retiring worker, an unreachable server, narrow terminals), the sampler, ``--once``, and the
live view in a real terminal (tmux) against a real daemon."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import uuid

import pytest
from conftest import ROOT, alive, children_of, wait_for

import gaspar
from gaspar import client
from gaspar.cli import main
from gaspar.errors import ConnectFailed
from gaspar.ops import humanize, top
from gaspar.ops.telemetry import OUTCOMES, Histogram

MiB = 2**20


def worker(number, pid, state="idle", requests=0, cpu=0.0, rss=32 * MiB, avg=None, p99=None, restarts=0, age=10.0):
    return {
        "pid": pid,
        "number": number,
        "state": state,
        "retiring": state == "retiring",
        "busy": state == "busy",
        "requests": requests,
        "cpu_seconds": cpu,
        "rss_bytes": rss,
        "handler_avg_ms": avg,
        "handler_p99_ms": p99,
        "restarts": restarts,
        "age_seconds": age,
    }


def histogram(*values: float) -> dict:
    h = Histogram()
    for v in values:
        h.observe(v)
    return h.snapshot()


def stats(workers=(), pid=100, front_cpu=1.0, requests=(), waits=(), overloaded=False, **outcomes) -> dict:
    """A stats dict as ``gaspar stats`` prints it (the fields ``top`` reads)."""
    workers = list(workers)
    states = dict.fromkeys(("booting", "idle", "busy", "retiring"), 0)
    for w in workers:
        states[w["state"]] += 1
    return {
        "pid": pid,
        "version": "2.0.0",
        "uptime": 3725.0,
        "time": 1_700_000_000.0,
        "target_workers": 2,
        "workers": workers,
        "worker_states": states,
        "queued": 7,
        "pending": 9,
        "running": 2,
        "connections": 11,
        "restarts": 1,
        "front_end": {"cpu_seconds": front_cpu, "rss_bytes": 40 * MiB} if front_cpu is not None else None,
        "outcomes": {**dict.fromkeys(OUTCOMES, 0), **outcomes},
        "histograms": {"request_duration_seconds": histogram(*requests), "queue_wait_seconds": histogram(*waits)},
        "overload": {"standing": overloaded, "overloaded": overloaded},
    }


def table(lines: list[str], width: int = 80) -> list[dict[str, str]]:
    """The worker rows of a frame, as {column title: cell}, read by the columns' positions."""
    cols = top.fit_columns(width)
    start = lines.index(top.table_header(width)) + 1
    rows = []
    for line in lines[start:]:
        cells, at = {}, 0
        for c in cols:
            cells[c.title] = line[at : at + c.width].strip()
            at += c.width + 1
        rows.append(cells)
    return rows


def header_text(lines: list[str]) -> str:
    return "\n".join(lines[: lines.index("")])


# -- the frame ---------------------------------------------------------------------------


def test_two_samples_give_rates():
    before = stats(
        [worker(1, 11, requests=60, cpu=1.0), worker(2, 12, requests=40, cpu=2.0)],
        front_cpu=1.0,
        ok=90,
        error=10,
        shed=5,
    )
    after = stats(
        [worker(1, 11, "busy", requests=120, cpu=2.5, avg=4.25, p99=12.5), worker(2, 12, requests=80, cpu=2.0)],
        front_cpu=1.5,
        ok=170,
        error=30,
        shed=25,
        client_gone=1000,  # not a reply from a handler: not in req/s
    )
    lines = top.render(before, after, 2.0, 80, address="127.0.0.1:10123")
    head = header_text(lines)
    assert "req/s 50.0" in head and "shed 25 (10.0/s)" in head
    assert "front end cpu 25.0%" in head and "rss 40.0M" in head
    assert lines[0].startswith("gaspar top 127.0.0.1:10123  pid 100  v2.0.0  up 1h2m")
    assert "overloaded: no" in lines[0]
    assert "workers 2 of 2  booting 0  idle 1  busy 1  retiring 0  restarts 1" in head
    assert "queued 7  in flight 9  running 2  connections 11" in head
    one, two = table(lines)
    assert one == {
        "#": "1",
        "PID": "11",
        "STATE": "busy",
        "REQUESTS": "120",
        "REQ/S": "30.0",
        "AVG ms": "4.25",
        "P99 ms": "12.5",
        "CPU%": "75.0",
        "RSS": "32.0M",
        "RESTARTS": "0",
        "AGE": "10s",
    }
    assert (two["REQ/S"], two["CPU%"], two["AVG ms"]) == ("20.0", "0.0", "-")
    assert all(len(line) <= 80 for line in lines)


def test_an_agent_line_shows_its_workers_cpu_and_the_memory_of_its_processes():
    def agent(session, cpus, rss=None):
        workers = [
            {"pid": 500 + i, "number": i + 1, "state": "idle", "cpu_seconds": c, "rss_bytes": 20 * MiB}
            for i, c in enumerate(cpus)
        ]
        row = {"name": "gpu1", "host": "b", "session": session, "state": "joined", "slots": len(workers)}
        row.update(busy=0, done=5, lost=0, rtt_ms=0.7, last_heard_seconds_ago=0.2, rss_bytes=rss, workers=workers)
        return row

    def with_agents(*rows):
        st = stats([worker(1, 11)])
        st["agents"], st["remote"] = list(rows), {"agents_live": len(rows)}
        return st

    before = with_agents(agent(1, [1.0, 2.0], rss=10 * MiB))
    after = with_agents(agent(1, [1.5, 3.0], rss=10 * MiB))
    text = " ".join(top.render(before, after, 2.0, 200))
    assert "gpu1@b" in text and "cpu 75.0%" in text and "rss 50.0M" in text  # (0.5 + 1.0) / 2 s; 10 + 2 x 20
    text = " ".join(top.render(None, after, 0.0, 200))
    assert "cpu -" in text and "rss 50.0M" in text  # no rate from one sample
    rejoined = with_agents(agent(2, [0.1, 0.1]))  # a new session: its workers' CPU starts again
    text = " ".join(top.render(after, rejoined, 2.0, 200))
    assert "cpu -" in text and "rss 40.0M" in text
    unknown = with_agents(agent(1, [None, None]))
    for w in unknown["agents"][0]["workers"]:
        w["rss_bytes"] = None
    assert "rss -" in " ".join(top.render(after, unknown, 2.0, 200))


def test_the_first_frame_has_no_rates_and_latency_since_start():
    now = stats([worker(1, 11, requests=5)], ok=5, requests=[0.002] * 5, waits=[0.0005] * 5)
    lines = top.render(None, now, 0.0, 80)
    head = header_text(lines)
    assert "req/s -" in head and "shed 0 (-/s)" in head and "front end cpu -%" in head
    assert "latency, since start:" in head
    p50 = humanize.human_duration(now["histograms"]["request_duration_seconds"]["p50"])
    assert f"request p50 {p50}" in head
    assert table(lines)[0]["REQ/S"] == "-" and table(lines)[0]["CPU%"] == "-"


def test_latency_is_that_of_the_requests_between_the_samples():
    fast, slow = [0.002] * 100, [0.2] * 100
    before, after = histogram(*fast), histogram(*fast, *slow)
    p50, p99 = top.quantiles(before, after)
    assert 0.1 < p50 <= 0.25 and 0.1 < p99 <= 0.25  # only the slow ones ended in between
    assert top.quantiles(None, after) == (after["p50"], after["p99"])  # since the start
    assert top.quantiles(after, after) == (None, None)  # nothing ended in between
    lines = top.render(stats(requests=fast), stats(requests=fast + slow), 1.0, 80)
    assert f"latency, last 1.0s:  request p50 {humanize.human_duration(p50)}" in header_text(lines)


def test_missing_figures_are_dashes():
    """A process gone between the read of its pid and of /proc (None), a worker that never
    ran a request, and a front end whose usage could not be read."""
    gone = worker(1, 11, cpu=None, rss=None, age=None)
    gone["requests"] = None
    before, after = stats([gone], front_cpu=None), stats([dict(gone)], front_cpu=None)
    lines = top.render(before, after, 1.0, 80)
    (row,) = table(lines)
    assert {row[k] for k in ("REQUESTS", "REQ/S", "AVG ms", "P99 ms", "CPU%", "RSS", "AGE")} == {"-"}
    assert "front end cpu -%  rss -" in header_text(lines)


def test_a_retiring_worker_shows_after_the_live_one_with_its_number():
    """A reload: the new worker 1 is live while the old one finishes; figures kept per
    number show on the live row only."""
    before = stats([worker(1, 10, requests=50), worker(2, 12, requests=10)])
    after = stats(
        [worker(1, 10, "retiring", requests=70), worker(2, 12, requests=10), worker(1, 20, requests=70, age=1)],
        ok=20,
    )
    lines = top.render(before, after, 1.0, 80)
    rows = table(lines)
    assert [(r["#"], r["PID"], r["STATE"]) for r in rows] == [
        ("1", "20", "idle"),
        ("1", "10", "retiring"),
        ("2", "12", "idle"),
    ]
    assert rows[0]["REQUESTS"] == "70" and rows[0]["REQ/S"] == "20.0"
    assert rows[1]["REQUESTS"] == "-" and rows[1]["REQ/S"] == "-" and rows[1]["CPU%"] == "0.0"
    assert "workers 2 of 2  booting 0  idle 2  busy 0  retiring 1" in header_text(lines)


def test_no_rate_spans_a_restart():
    """A worker's new process (new pid): no CPU %; the daemon's restart (new pid): no rates."""
    before = stats([worker(1, 10, requests=100, cpu=9.0)], ok=100, shed=50)
    after = stats([worker(1, 11, requests=110, cpu=0.1)], ok=110, shed=50)
    (row,) = table(top.render(before, after, 1.0, 80))
    assert row["CPU%"] == "-" and row["REQ/S"] == "10.0"
    restarted = stats([worker(1, 30, requests=3, cpu=0.1)], pid=101, ok=3)
    lines = top.render(after, restarted, 1.0, 80)
    assert "req/s -" in header_text(lines) and "shed 0 (-/s)" in header_text(lines)
    assert table(lines)[0]["REQ/S"] == "-" and "latency, since start:" in header_text(lines)


def test_overload_shows_in_the_first_line():
    assert "OVERLOADED" in top.render(None, stats(overloaded=True), 0.0, 80)[0]


def test_an_accept_backlog_shows_in_the_header_only_when_there_is_one():
    waiting = stats()
    waiting["overload"]["accept_backlog"] = 812
    assert any("accept backlog 812" in line for line in top.render(None, waiting, 0.0, 80))
    for idle in (stats(), {**stats(), "overload": {"overloaded": False, "accept_backlog": 0}}):
        assert not any("backlog" in line for line in top.render(None, idle, 0.0, 80))


def test_an_unreachable_server_says_so_in_the_header():
    error = "ConnectFailed: cannot connect to 127.0.0.1:9: [Errno 111] Connection refused"
    for width in (80, 30):
        lines = top.render(None, None, 0.0, width, address="127.0.0.1:9", error=error)
        assert lines[0] == "gaspar top 127.0.0.1:9" and all(len(line) <= width for line in lines)
        text = " ".join(lines[1:])
        assert text.startswith("UNREACHABLE: ConnectFailed") and "Connection refused" in text and "retrying" in text


@pytest.mark.parametrize("width", [200, 80, 79, 60, 40, 20, 5, 1])
def test_every_line_fits_the_width(width):
    workers = [worker(n, 4_194_000 + n, "retiring" if n == 3 else "busy", 99_999_999, 1e5, 2**40, 99.9, 1e6, 10**9)
               for n in (1, 2, 3)]  # fmt: skip
    lines = top.render(stats(workers, ok=10**12), stats(workers, ok=10**13, shed=10**9), 0.5, width)
    assert all(len(line) <= width for line in lines)
    titles = [c.title for c in top.fit_columns(width)]
    assert titles[:2] == ["#", "PID"]
    if width >= 80:
        assert titles == [c.title for c in top.COLUMNS]
    if width < 80:
        assert "AGE" not in titles  # the least useful column goes first
    if 20 <= width:
        assert len(table(lines, width)) == 3


def test_human_figures():
    ages = {0: "0s", 12.9: "12s", 59: "59s", 60: "1m", 300: "5m", 3599: "59m", 3 * 3600: "3h", 2 * 86400 + 5: "2d"}
    assert {s: humanize.human_age(s) for s in ages} == ages
    assert humanize.human_age(None) == "-" and humanize.human_uptime(2 * 86400 + 3 * 3600) == "2d3h"
    assert [humanize.human_mib(b) for b in (None, 32 * MiB, 812 * MiB)] == ["-", "32.0M", "812M"]
    assert [humanize.human_duration(s) for s in (None, 0.0004, 0.243, 1.25)] == ["-", "0.4ms", "243ms", "1.25s"]
    assert humanize.number(123_456_789, 8, 0) == "123457k" and humanize.number(1e30, 4) == "****"


def test_the_sampler_keeps_retrying_and_rates_span_the_last_good_samples():
    answers = [ConnectFailed("refused"), stats(ok=0), ConnectFailed("refused"), stats(ok=30)]
    clock = iter([10.0, 13.0])

    def fetch(address, timeout):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sampler = top.Sampler("127.0.0.1:9", 2.0, fetch=fetch, clock=lambda: next(clock))
    assert not sampler.poll() and "UNREACHABLE: ConnectFailed: refused" in sampler.render(80)[1]
    assert sampler.poll() and "req/s -" in header_text(sampler.render(80))
    assert not sampler.poll() and "UNREACHABLE" in sampler.render(80)[1]
    assert sampler.poll() and "req/s 10.0" in header_text(sampler.render(80))  # 30 in 3 s


# -- the command -------------------------------------------------------------------------


def test_top_needs_a_terminal_or_once(capsys):
    assert main(["top", "127.0.0.1:9"]) == 2  # pytest's stdin is no terminal
    assert "use --once" in capsys.readouterr().err
    assert main(["top", "127.0.0.1:9", "--interval", "0"]) == 2


def test_once_against_nothing_prints_unreachable_and_fails(capsys):
    assert main(["top", "127.0.0.1:9", "--once", "--interval", "0.05"]) == 1
    assert "UNREACHABLE: ConnectFailed" in capsys.readouterr().out


def _drive(addr: str, stop: threading.Event, threads: int = 4) -> list[threading.Thread]:
    """Requests from ``threads`` threads until ``stop``, so both workers run some."""

    def loop():
        while not stop.is_set():
            try:
                client.request(addr, b"0.01", timeout=5)
            except gaspar.GasparError:
                pass

    started = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in started:
        t.start()
    return started


def _row_pattern(number: int, pid: int) -> re.Pattern:
    return re.compile(rf"^\s*{number}\s+{pid}\s+(?:idle|busy)\s+([1-9]\d*)\s", re.M)


def test_once_against_a_daemon_prints_a_row_per_worker(cli):
    server = cli("handlers:sleepy", "--bind", "127.0.0.1:0", "--workers", "2")
    server.wait_ready(2)
    pids = {w["number"]: w["pid"] for w in server.stats()["workers"]}
    stop = threading.Event()
    threads = _drive(server.addr, stop)
    try:
        wait_for(lambda: all(w["requests"] for w in server.stats()["workers"]), 10, 0.05)
        cmd = [sys.executable, "-m", "gaspar", "top", server.addr, "--once", "--interval", "0.3"]
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=20, env=dict(os.environ, COLUMNS="80")
        )
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert done.returncode == 0, done.stderr
    for number, pid in pids.items():
        assert _row_pattern(number, pid).search(done.stdout), done.stdout
    assert re.search(r"req/s \d+\.\d", done.stdout) and "latency, last 0.3s:" in done.stdout


@pytest.fixture
def tmux(tmp_path):
    """``tmux(args...)`` on a tmux server of this test's own (``-L``), killed at teardown."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux; .ci/run installs it)")
    name = f"gaspar-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "tmux.conf"  # not the user's: a dead pane stays, to read its exit status
    conf.write_text("set -g remain-on-exit on\nset -g default-terminal screen\n")
    panes: list[int] = []

    def run(*args: str) -> str:
        done = subprocess.run(["tmux", "-L", name, "-f", str(conf), *args], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    run.panes = panes
    yield run
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True, timeout=10)
    socket_dir = os.path.join(os.environ.get("TMUX_TMPDIR") or "/tmp", f"tmux-{os.getuid()}")
    if os.path.exists(os.path.join(socket_dir, name)):
        os.unlink(os.path.join(socket_dir, name))
    left = [p for p in panes if wait_for(lambda p=p: not alive(p), 5) is False]
    assert not left, f"processes left behind in tmux: {left}"


def test_top_in_a_real_terminal(cli, tmux, tmp_path):
    server = cli("handlers:sleepy", "--bind", "127.0.0.1:0", "--workers", "2")
    server.wait_ready(2)
    info = server.stats()
    pids = {w["number"]: w["pid"] for w in info["workers"]}
    top_command = f"{shlex.quote(sys.executable)} -m gaspar top {server.addr} --interval 0.2"

    def start(name: str, tmux_command: tuple[str, ...]):
        """Run ``gaspar top`` in the pane; return the file its exit status will be in (tmux's
        own #{pane_dead_status} is not always filled in). ``trap : INT`` keeps the shell
        alive through a Ctrl-C (top itself gets the default SIGINT back)."""
        status = tmp_path / f"exit-{name}"
        tmux(*tmux_command, f"trap : INT; {top_command}; echo $? > {shlex.quote(str(status))}")
        shell = int(tmux("display", "-p", "-t", "top", "#{pane_pid}"))
        tmux.panes.append(shell)
        tmux.panes.extend(wait_for(lambda: children_of(shell), 10) or [])
        return status

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "top")

    def shows_both_workers_busy() -> str | None:
        text = screen()
        return text if all(_row_pattern(n, pid).search(text) for n, pid in pids.items()) else None

    def exit_status(path) -> str | None:
        text = path.read_text() if path.exists() else ""
        return text.strip() if text.endswith("\n") else None

    stop = threading.Event()
    threads = _drive(server.addr, stop)
    try:
        status = start("q", ("new-session", "-d", "-s", "top", "-x", "100", "-y", "30", "-c", ROOT))
        text = wait_for(shows_both_workers_busy, 15, 0.1)
        assert text, f"no row with requests for workers {pids}:\n{screen()}"
        assert f"gaspar top {server.addr}  pid {info['pid']}" in text and "REQUESTS" in text
        tmux("send-keys", "-t", "top", "q")
        assert wait_for(lambda: exit_status(status), 10, 0.05) == "0", screen()
        assert "REQUESTS" not in screen()  # curses gave the screen back
        # once more, quitting with Ctrl-C
        status = start("ctrl-c", ("respawn-pane", "-t", "top"))
        assert wait_for(shows_both_workers_busy, 15, 0.1), screen()
        tmux("send-keys", "-t", "top", "C-c")
        assert wait_for(lambda: exit_status(status), 10, 0.05) == "0", screen()
        assert "REQUESTS" not in screen() and "Traceback" not in screen()
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def test_the_front_ends_wait_for_a_cpu_shows_only_when_it_waits():
    before, after = stats(), stats()
    before["front_end"]["cpu_wait_seconds"], after["front_end"]["cpu_wait_seconds"] = 3.0, 3.4
    assert "waits for a cpu 20%" in header_text(top.render(before, after, 2.0, 80))
    after["front_end"]["cpu_wait_seconds"] = 3.01  # 0.5%: noise, not shown
    assert "waits" not in header_text(top.render(before, after, 2.0, 80))
    assert "waits" not in header_text(top.render(stats(), stats(), 2.0, 80))  # not Linux: no field
