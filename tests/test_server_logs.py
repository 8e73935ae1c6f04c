"""What the daemon writes to its own log about requests: handler errors (with their
traceback, escaped, rate-limited with a summary of what was held back) and the access log
(one line per request)."""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import threading

import handlers
import pytest
from conftest import wait_for

import gaspar
from gaspar import client
from gaspar.ops.logs import (
    CONTINUATION,
    MAX_REPORT,
    JsonFormatter,
    access_line,
    log_handler_error,
    log_held_back,
)
from gaspar.ops.telemetry import LogLimiter
from gaspar.wire.framing import error_body


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_limiter_allows_a_burst_then_reports_what_it_held_back():
    clock = Clock()
    limit = LogLimiter(burst=3, period=60.0, clock=clock)
    assert [limit.allow() for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    clock.now = 30.0
    assert limit.allow() == (False, 0)
    clock.now = 61.0
    assert limit.allow() == (True, 3)  # the next line says 3 were not logged
    assert limit.allow() == (True, 0)


def test_the_limiters_summary_comes_once_its_window_has_ended():
    clock = Clock()
    limit = LogLimiter(burst=2, period=10.0, clock=clock)
    assert limit.flush() == 0  # nothing held back
    assert [limit.allow()[0] for _ in range(5)] == [True, True, False, False, False]
    clock.now = 9.9
    assert limit.flush() == 0  # its window is still open
    clock.now = 10.0
    assert limit.flush() == 3  # the summary: 3 held back...
    assert limit.flush() == 0  # ...said once
    assert limit.allow() == (True, 0)  # and not again with the next line
    assert [limit.allow()[0] for _ in range(3)] == [True, False, False]
    clock.now = 15.0
    assert limit.flush() == 0
    assert limit.flush(final=True) == 2  # at a stop: now, window or not


def test_the_summary_line_says_how_many_of_what_were_held_back():
    clock, seen = Clock(), Records()
    logger = logging.getLogger("gaspar.test.summary")
    logger.addHandler(seen)
    try:
        limit = LogLimiter(burst=1, period=60.0, clock=clock)
        for _ in range(24):
            limit.allow()
        assert log_held_back(limit, "refusals", logger=logger) == 0 and not seen.records
        clock.now = 60.0
        assert log_held_back(limit, "refusals", logger=logger) == 23
        assert log_held_back(limit, "refusals", logger=logger) == 0
    finally:
        logger.removeHandler(seen)
    (rec,) = seen.records
    assert rec.levelname == "WARNING"
    assert rec.getMessage() == "Not logged: 23 more refusals in the last minute (at most 1 per minute)"
    out = json.loads(JsonFormatter().format(rec))
    assert out["held_back"] == 23 and out["log_limit"] == "refusals"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, rec):
        self.records.append(rec)


@pytest.fixture
def gaspar_records():
    seen = Records()
    logger = logging.getLogger("gaspar")
    logger.addHandler(seen)
    yield seen.records
    logger.removeHandler(seen)


def test_a_handler_errors_record_is_one_line_and_its_traceback(gaspar_records):
    tb = 'Traceback (most recent call last):\n  File "app.py", line 3, in handle\nValueError: bad\nthing\n'
    log_handler_error(LogLimiter(), 2, 4242, error_body("ValueError", "bad\nthing", traceback=tb))
    (rec,) = gaspar_records
    assert rec.getMessage() == "Handler error in worker 2 (pid:4242): ValueError: bad\\nthing"
    assert rec.exc_text == tb.rstrip("\n") and rec.exc_info is None
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == rec.getMessage() and out["exc_info"] == tb.rstrip("\n")
    assert (out["worker"], out["worker_pid"], out["error_type"]) == (2, 4242, "ValueError")


def test_a_huge_error_report_is_logged_by_its_start_without_parsing_it(gaspar_records):
    body = error_body("ValueError", "x" * MAX_REPORT, traceback="Traceback...\n" + "x" * MAX_REPORT)
    log_handler_error(LogLimiter(), 1, 7, body)
    log_handler_error(LogLimiter(), 1, 7, b"\xff not JSON")
    huge, garbage = gaspar_records
    assert huge.error_type == "ValueError" and huge.exc_text is None
    assert f"a report of {len(body)} bytes, too large to log whole" in huge.getMessage()
    assert len(huge.getMessage()) < 1200
    assert garbage.error_type == "Unknown" and "not JSON" in garbage.getMessage()


def test_a_handler_error_is_logged_by_the_server_with_its_traceback(serve, caplog):
    caplog.set_level(logging.ERROR, logger="gaspar")
    s = serve(handlers.boom, processes=1)
    with pytest.raises(gaspar.HandlerError):
        s.request(b"boom now")
    record = wait_for(lambda: next((r for r in caplog.records if "Handler error" in r.getMessage()), None), 5)
    assert record is not None
    assert record.getMessage().endswith("ValueError: bad input b'boom now'")
    assert record.exc_text.startswith("Traceback (most recent call last)")
    assert "handlers.py" in record.exc_text  # where it was raised
    assert record.worker == 1 and record.worker_pid == s.pids()[0]


def test_handler_errors_cannot_flood_the_log_and_what_was_held_back_is_summed_up(serve, caplog):
    caplog.set_level(logging.ERROR, logger="gaspar")
    s = serve(handlers.boom, processes=1)
    s.producer.outcomes.error_log = LogLimiter(burst=10, period=1.0)  # the daemon's 10 a minute, in a second
    for _ in range(30):
        with pytest.raises(gaspar.HandlerError):
            s.request(b"boom")
    assert s.producer.stats()["outcomes"]["error"] == 30
    logged = [r for r in caplog.records if "Handler error" in r.getMessage()]
    assert len(logged) == 10
    # nothing more comes, and the ticker still writes the count once the window ends
    summary = wait_for(lambda: [r for r in caplog.records if r.getMessage().startswith("Not logged")], 5)
    assert [r.getMessage() for r in summary] == [
        "Not logged: 20 more handler errors in the last second (at most 10 per second)"
    ]


def test_a_handler_exceptions_text_cannot_forge_a_line_of_the_text_log(cli):
    forged = "[2026-01-01 00:00:00 +0000] [1] [CRITICAL] forged"
    server = cli("handlers:raise_text", "-b", "127.0.0.1:0", "-w", "1")
    server.wait_ready(1)
    with pytest.raises(gaspar.HandlerError) as info:
        client.request(server.addr, f"x\n{forged}\r", timeout=10)
    assert info.value.remote_message == f"x\n{forged}\r"  # the client gets the text as it was
    assert wait_for(lambda: any(line.endswith(forged + "\\r") for line in server.lines), 10), server.log
    lines = list(server.lines)
    assert not [line for line in lines if line.startswith(forged[:26])], server.log
    header = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] ")
    assert all(header.match(line) or line.startswith(CONTINUATION) for line in lines), server.log
    at = next(i for i, line in enumerate(lines) if "Handler error" in line)
    assert lines[at].endswith(f"ValueError: x\\n{forged}\\r")
    tb = lines[at + 1 : at + 1 + next(i for i, line in enumerate(lines[at + 1 :]) if line.endswith(forged + "\\r")) + 1]
    assert tb[0] == CONTINUATION + "Traceback (most recent call last):"
    assert any("handlers.py" in line for line in tb) and tb[-2:] == [
        CONTINUATION + "ValueError: x",
        CONTINUATION + forged + "\\r",
    ]


def test_the_json_log_has_a_handler_errors_traceback_as_exc_info(cli):
    server = cli(
        "handlers:raise_text", "-b", "127.0.0.1:0", "-w", "1", "--log-format", "json", "--error-detail", "traceback"
    )
    server.wait_ready(1)
    with pytest.raises(gaspar.HandlerError) as info:
        client.request(server.addr, "two\nlines", timeout=10)

    def logged():
        return [r for r in map(json.loads, list(server.lines)) if r.get("error_type")]

    assert wait_for(logged, 10), server.log
    (rec,) = logged()
    pid = server.stats()["workers"][0]["pid"]
    assert rec["message"] == f"Handler error in worker 1 (pid:{pid}): ValueError: two\\nlines"
    assert (rec["level"], rec["worker"], rec["worker_pid"], rec["error_type"]) == ("ERROR", 1, pid, "ValueError")
    assert rec["exc_info"].startswith("Traceback (most recent call last):") and "handlers.py" in rec["exc_info"]
    assert rec["exc_info"] == info.value.remote_traceback.rstrip("\n")  # error_detail traceback: the client's too


def test_access_log_has_one_line_per_request_with_its_facts(serve, tmp_path):
    path = tmp_path / "access.log"
    s = serve(handlers.mixed, processes=1, access_log=str(path), max_message_size=100)
    assert s.request(b"hello") == b"hello"
    with pytest.raises(gaspar.HandlerError):
        s.request(b"boom")
    host, port = s.addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:  # too large: refused
        sock.sendall(struct.pack("!I", 1000))
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert client.request(s.addr, b"sleep 0.05") == b"sleep 0.05"
    lines = wait_for(lambda: (lambda t: t if len(t) >= 4 else None)(path.read_text().splitlines()), 5)
    assert lines and len(lines) == 4, path.read_text()
    ok, error, bad, slow = lines
    assert " ok in=5B out=5B " in ok and "worker=1" in ok and "127.0.0.1:" in ok
    assert " error in=4B " in error and "handler=" in error
    assert re.search(r" bad_request in=0B out=0B queue=- handler=- total=[\d.]+ms worker=-$", bad), bad
    handler_ms = float(slow.split("handler=")[1].split("ms")[0])
    assert 45 <= handler_ms < 1000


def test_an_access_line_says_dash_in_text_and_null_in_json_for_what_did_not_happen():
    logger = logging.getLogger("gaspar.test.access")
    logger.setLevel(logging.INFO)  # as open_access_log makes it
    seen = Records()
    logger.addHandler(seen)
    try:
        access_line(logger, ("10.0.0.1", 5), "shed", 3, 0, 0.0123, None, 0.0124, None)
        access_line(logger, None, "bad_request", 0, 0, None, None, 0.0, None)
    finally:
        logger.removeHandler(seen)
    shed, bad = seen.records
    assert shed.getMessage() == "10.0.0.1:5 shed in=3B out=0B queue=12.3ms handler=- total=12.4ms worker=-"
    assert bad.getMessage() == "- bad_request in=0B out=0B queue=- handler=- total=0.0ms worker=-"
    assert "None" not in shed.getMessage() + bad.getMessage()
    out = json.loads(JsonFormatter().format(shed))
    assert out["message"] == shed.getMessage()
    assert (out["queue_ms"], out["handler_ms"], out["total_ms"], out["worker"]) == (12.3, None, 12.4, None)
    assert json.loads(JsonFormatter().format(bad))["peer"] is None


def test_an_overloaded_answer_has_its_size_in_the_access_log_and_a_killed_call_its_run_time(serve, tmp_path):
    """QA: the access log said out=0B for the Overloaded answers clients read, and a handler
    killed past the timeout was left out of its run times (a hanging handler looked fast)."""
    import apps_under_test

    path = tmp_path / "access.log"
    s = serve(apps_under_test.app, processes=1, access_log=str(path), timeout=0.5, queue_timeout=0.2, prefetch=0)
    with client.Client(s.addr, timeout=10) as c, client.Client(s.addr, timeout=10, retry=False) as other:
        done = threading.Thread(target=lambda: pytest.raises(gaspar.WorkerTimeout, c.call, "spin_for", 5.0))
        done.start()
        assert wait_for(lambda: s.producer.stats()["running"] == 1, 5)
        with pytest.raises(gaspar.Overloaded):
            other.call("add", 1)  # queued behind the spinning one past queue_timeout
        done.join(10)
    lines = wait_for(lambda: (lambda t: t if len(t) >= 2 else None)(path.read_text().splitlines()), 5)
    shed = [line for line in lines if " shed " in line]
    assert shed and re.search(r" out=[1-9]\d*B ", shed[0]), lines
    spun = s.producer.stats()["handlers"]["spin_for"]
    assert spun["outcomes"]["timeout"] == 1 and spun["duration_seconds"]["count"] == 1, spun
    assert spun["duration_seconds"]["sum"] >= 0.5, spun
