"""The daemon's log: ``--log-format json``, ``capture_output``, and the traceback of a
handler module that cannot be imported.

Pure parts (``JsonFormatter``, ``LineSplitter``) without I/O; the rest against real
``gaspar serve`` processes (the ``cli`` fixture kills their group and checks nothing is
left) and one real pipe.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, alive, children_of, wait_for

from gaspar import client
from gaspar.ops.logs import CONTINUATION, LOG_DATEFMT, LOG_FORMAT, JsonFormatter, TextFormatter, escape
from gaspar.process.capture import MAX_LINE, LineSplitter, OutputCapture

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def record(msg="hello %s", args=("world",), exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.getLogger("gaspar.test").makeRecord("gaspar.test", logging.WARNING, "f.py", 7, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


# -- JsonFormatter ------------------------------------------------------------------------------------


def test_json_has_the_fields_on_one_line():
    line = JsonFormatter().format(record())
    assert "\n" not in line
    out = json.loads(line)
    assert list(out) == ["time", "level", "pid", "logger", "message"]
    assert out["level"] == "WARNING" and out["logger"] == "gaspar.test" and out["message"] == "hello world"
    assert out["pid"] == os.getpid()
    when = datetime.datetime.fromisoformat(out["time"])
    assert when.utcoffset() is not None  # ISO 8601 with its offset
    assert abs(when.timestamp() - time.time()) < 60


def test_json_carries_the_traceback():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        rec = record(exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert out["exc_info"].startswith("Traceback (most recent call last):")
    assert out["exc_info"].endswith("ValueError: bad\nvalue")
    assert "exc_info" not in json.loads(JsonFormatter().format(record()))


def test_json_carries_any_extra_field_and_no_internal_one():
    rec = logging.getLogger("gaspar.test").makeRecord(
        "gaspar.test",
        logging.INFO,
        "f.py",
        1,
        "request done",
        (),
        None,
        extra={"worker": 2, "request": {"id": 7, "ms": 1.5}, "path": b"\xff", "where": object},
    )
    out = json.loads(JsonFormatter().format(rec))
    assert out["worker"] == 2 and out["request"] == {"id": 7, "ms": 1.5}
    assert out["path"] == "b'\\xff'" and out["where"] == "<class 'object'>"  # str() of what JSON cannot hold
    for internal in ("msg", "args", "levelno", "created", "process", "thread", "exc_text", "stack_info"):
        assert internal not in out


def test_an_extra_pid_is_the_records_pid():
    """A captured worker line is logged by the fork server but says the worker's pid."""
    out = json.loads(JsonFormatter().format(record(pid=4242, worker=3, stream="stdout")))
    assert out["pid"] == 4242 and out["worker"] == 3 and out["stream"] == "stdout"


def test_json_is_ascii_so_any_stream_keeps_it_valid():
    line = JsonFormatter().format(record("caf\u00e9 \u2603 %s", ("\udcff",)))
    assert line.isascii()
    assert json.loads(line)["message"] == "caf\u00e9 \u2603 \udcff"


# -- TextFormatter: pure ---------------------------------------------------------------------------

FORGED = "[2026-01-01 00:00:00 +0000] [1] [CRITICAL] forged"
HEADER = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[[A-Z]+\] ")


@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain words, café ☃", "plain words, café ☃"),
        ("x\n" + FORGED, "x\\n" + FORGED),
        ("carriage\rreturn\ttab", "carriage\\rreturn\\ttab"),
        ("\x1b[2Jcleared \x00 \x7f \x85", "\\x1b[2Jcleared \\x00 \\x7f \\x85"),
        ("line\u2028sep \u202eevil", "line\\u2028sep \\u202eevil"),
        ("a backslash \\n stays", "a backslash \\n stays"),
    ],
)
def test_escape_keeps_any_text_on_one_line(text, shown):
    assert escape(text) == shown
    assert escape(shown) == shown  # nothing left to escape


def text_format(rec: logging.LogRecord) -> str:
    return TextFormatter(LOG_FORMAT, LOG_DATEFMT).format(rec)


def test_text_format_keeps_a_peers_text_on_its_records_line():
    line = text_format(record("Agent %s joined from %s (pid %d, %.1f ms) %r", ("a1\n" + FORGED, "::1", 7, 1.25, "q\r")))
    assert "\n" not in line and "\r" not in line
    assert line.endswith(f"Agent a1\\n{FORGED} joined from ::1 (pid 7, 1.2 ms) 'q\\r'")
    mapping = text_format(record("%(name)s is %(n)d", ({"name": "\x1b[31mred", "n": 3},)))
    assert mapping.endswith("\\x1b[31mred is 3")
    error = text_format(record("failed: %s", (ValueError("two\nlines"),)))
    assert error.endswith("failed: two\\nlines")


def test_text_format_indents_every_continuation_line_so_only_records_start_a_line():
    try:
        raise ValueError("x\n" + FORGED + "\r\x1b[1A")
    except ValueError:
        rec = record("Handler error: %s", ("x\n" + FORGED,), exc_info=sys.exc_info())
    first, *rest = text_format(rec).split("\n")
    assert HEADER.match(first) and first.endswith("Handler error: x\\n" + FORGED)
    assert rest[0] == CONTINUATION + "Traceback (most recent call last):"
    assert rest[-2:] == [CONTINUATION + "ValueError: x", CONTINUATION + FORGED + "\\r\\x1b[1A"]
    assert all(line.startswith(CONTINUATION) for line in rest)
    # a message built beforehand, with its own line breaks
    built = text_format(record("built\n" + FORGED + "\n", ()))
    assert built.split("\n")[1:] == [CONTINUATION + FORGED]


def test_text_format_leaves_plain_records_as_gunicorns_lines():
    line = text_format(record("Booting worker %s (pid:%s)", (1, 3625)))
    assert HEADER.match(line) and line.endswith("[WARNING] Booting worker 1 (pid:3625)")


CONFIGURE = """
import logging, sys
from gaspar.ops.logs import configure
configure("info", sys.argv[1], sys.stderr)
logging.getLogger("gaspar").debug("not shown")
logging.getLogger("gaspar").info("up %s", 1, extra={"worker": 2})
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("app").exception("failed")
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_sets_the_level_and_the_format(fmt):
    proc = subprocess.run(
        [sys.executable, "-c", CONFIGURE, fmt], capture_output=True, text=True, timeout=20, env=ENV, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    if fmt == "text":  # gunicorn's lines; a traceback on indented continuation lines
        first, second, *tb = proc.stderr.splitlines()
        stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\]"
        assert re.fullmatch(stamp + r" \[INFO\] up 1", first), first
        assert re.fullmatch(stamp + r" \[ERROR\] failed", second), second
        assert tb[0] == "    Traceback (most recent call last):" and tb[-1].startswith("    ZeroDivisionError")
        assert all(line.startswith(CONTINUATION) for line in tb)
        return
    up, failed = (json.loads(line) for line in proc.stderr.splitlines())
    assert up["message"] == "up 1" and up["level"] == "INFO" and up["worker"] == 2 and up["logger"] == "gaspar"
    assert failed["level"] == "ERROR" and failed["exc_info"].endswith("ZeroDivisionError: division by zero")


# -- LineSplitter: pure -----------------------------------------------------------------------------


def test_lines_come_out_whole_or_one_byte_at_a_time_alike():
    data = b"one\ntwo\r\n\nthree and no newline"
    whole = LineSplitter(limit=8)
    expected = [b"one", b"two\r", b"", b"three an", b"d no new"]  # cut every 8 bytes
    assert whole.feed(data) == expected
    assert whole.flush() == [b"line"] and whole.flush() == []
    bytewise, lines = LineSplitter(limit=8), []
    for i in range(len(data)):
        lines += bytewise.feed(data[i : i + 1])
    assert lines == expected and bytewise.flush() == [b"line"]
    junk = LineSplitter(limit=8)  # trailing bytes after complete lines wait for their newline
    assert junk.feed(b"ok\n\x00\xff") == [b"ok"] and junk.feed(b"\n") == [b"\x00\xff"]


def test_a_line_of_exactly_the_limit_is_one_line():
    s = LineSplitter(limit=8)
    assert s.feed(b"12345678\n") == [b"12345678"]
    assert s.feed(b"123456789\n") == [b"12345678", b"9"]
    assert s.flush() == []


def test_an_endless_line_never_holds_more_than_the_limit():
    s, total = LineSplitter(), 0
    chunk = b"x" * 65536
    for _ in range(160):  # 10 MiB, no newline
        pieces = s.feed(chunk)
        assert all(len(p) == MAX_LINE for p in pieces)
        total += sum(map(len, pieces))
        assert len(s.buf) <= MAX_LINE
    assert total + len(b"".join(s.flush())) == 160 * 65536


def test_a_cut_does_not_split_a_character():
    s = LineSplitter(limit=8)
    pieces = s.feed("abcdefg\u20ac\u20ac\n".encode())  # the euro sign is 3 bytes, from byte 7
    assert pieces == [b"abcdefg", "\u20ac\u20ac".encode()]
    assert all(p.decode() for p in pieces)


# -- OutputCapture, with a real pipe ----------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, rec):
        self.records.append(rec)


@pytest.fixture
def capturing():
    """A logger that keeps its records, and a selector for the pipes: closed at the end."""
    logger = logging.getLogger("gaspar.test.capture")
    logger.propagate, logger.level = False, logging.DEBUG
    handler = ListHandler()
    logger.addHandler(handler)
    sel = selectors.DefaultSelector()
    yield logger, handler, sel
    sel.close()
    logger.removeHandler(handler)


def test_capture_logs_each_line_tagged_and_closes_at_the_end(capturing):
    logger, handler, sel = capturing
    capture = OutputCapture(sel, logger)
    pipes = capture.pipes()
    out_r, out_w, err_r, err_w = pipes
    os.write(out_w, b"first\nsecond\npartial")
    os.write(err_w, b"Traceback (most recent call last):\n" + b"y" * (MAX_LINE + 10) + b"\n")
    capture.attach(pipes, 3, 4242)  # the write ends are the worker's now: closed here
    for _ in range(10):
        for key, _ in sel.select(1.0):
            key.data(key.fd)
        if not capture.streams:
            break
    assert not capture.streams and len(sel.get_map()) == 0  # both read ends seen at EOF, closed
    got = [(r.levelname, r.getMessage()[:40], r.worker, r.pid, r.stream) for r in handler.records]
    assert [g for g in got if g[-1] == "stdout"] == [
        ("INFO", "[worker 3 pid:4242] first", 3, 4242, "stdout"),
        ("INFO", "[worker 3 pid:4242] second", 3, 4242, "stdout"),
        ("INFO", "[worker 3 pid:4242] partial", 3, 4242, "stdout"),
    ]
    err = [r.getMessage() for r in handler.records if r.stream == "stderr"]
    assert err[0] == "[worker 3 pid:4242] Traceback (most recent call last):"
    assert [len(m) for m in err[1:]] == [len("[worker 3 pid:4242] ") + n for n in (MAX_LINE, 10)]
    assert all(r.levelname == "WARNING" for r in handler.records if r.stream == "stderr")
    capture.close(4242)  # reaped after its pipes were closed: nothing to do


def test_a_reaped_workers_pipe_is_drained_then_closed(capturing):
    logger, handler, sel = capturing
    capture = OutputCapture(sel, logger)
    out_r, out_w, err_r, err_w = capture.pipes()
    keep = os.dup(out_w)  # as a grandchild that still holds the pipe would
    capture.attach((out_r, out_w, err_r, err_w), 1, 99)
    os.write(keep, b"last words\nno newline")
    capture.close(99)
    assert [r.getMessage() for r in handler.records] == [
        "[worker 1 pid:99] last words",
        "[worker 1 pid:99] no newline",
    ]
    assert not capture.streams and not capture.by_pid and len(sel.get_map()) == 0
    with pytest.raises(BrokenPipeError):  # the read end is gone
        os.write(keep, b"more\n")
    os.close(keep)


# -- the daemon, for real ---------------------------------------------------------------------------


def json_lines(server) -> list[dict]:
    return [json.loads(line) for line in list(server.lines)]


def worker_numbers(server) -> dict[int, int]:
    return {w["pid"]: w["number"] for w in server.stats()["workers"]}


def test_capture_output_logs_what_workers_print_as_json_records(cli):
    server = cli("handlers:chatty", "-b", "127.0.0.1:0", "-w", "2", "--capture-output", "on", "--log-format", "json")
    server.wait_ready(2)
    numbers = worker_numbers(server)
    replies = {f"m{i}": int(client.request(server.addr, f"m{i}".encode(), timeout=10)) for i in range(4)}
    replies["thread1"] = int(client.request(server.addr, b"thread1", timeout=10))

    def captured(text):
        return [r for r in json_lines(server) if r["logger"] == "gaspar.worker" and r["message"].endswith(text)]

    assert wait_for(lambda: captured("uncaught in a thread: thread1"), 10), server.log
    for message, pid in replies.items():
        number = numbers[pid]
        for text, stream, level in ((f"out {message}", "stdout", "INFO"), (f"fd1 {message}", "stdout", "INFO"),
                                    (f"err {message}", "stderr", "WARNING")):  # fmt: skip
            (rec,) = captured(text)
            assert rec["message"] == f"[worker {number} pid:{pid}] {text}"
            assert (rec["worker"], rec["pid"], rec["stream"], rec["level"]) == (number, pid, stream, level)
        # the worker's own logging is a record of its own, not a captured line
        (logged,) = [r for r in json_lines(server) if r["message"] == f"logged {message}"]
        assert logged["logger"] == "handlers" and logged["pid"] == pid and logged["level"] == "WARNING"
    # a traceback Python prints (a thread's uncaught exception): one record per line
    tb = [r for r in json_lines(server) if r["logger"] == "gaspar.worker" and r["stream"] == "stderr"]
    tb = [r["message"].split("] ", 1)[1] for r in tb if r["pid"] == replies["thread1"]]
    start = tb.index("Exception in thread doomed:")
    assert tb[start + 1] == "Traceback (most recent call last):"
    assert tb[tb.index("RuntimeError: uncaught in a thread: thread1") - 1].strip().startswith("raise RuntimeError")
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert wait_for(lambda: "Shutting down: gaspar (exit code 0)" in server.log, 5)
    assert all(isinstance(r, dict) for r in json_lines(server))  # every line of the log is JSON


def test_without_capture_output_workers_write_to_the_daemons_streams(cli):
    server = cli("handlers:chatty", "-b", "127.0.0.1:0", "-w", "1", "--log-format", "json")
    server.wait_ready(1)
    pid = int(client.request(server.addr, b"plain", timeout=10))
    assert wait_for(lambda: "fd1 plain" in server.lines and "err plain" in server.lines, 10), server.log
    records = [json.loads(line) for line in list(server.lines) if line.startswith("{")]
    assert not [r for r in records if r["logger"] == "gaspar.worker"]
    (logged,) = [r for r in records if r["message"] == "logged plain"]
    assert logged["pid"] == pid


def test_a_long_line_is_split_and_a_flood_never_blocks_the_fork_server(cli):
    server = cli("handlers:flood", "-b", "127.0.0.1:0", "-w", "2", "--capture-output", "on")
    server.wait_ready(2)
    (fork_server,) = children_of(server.proc.pid)
    captured = re.compile(r"\[INFO\] \[worker (\d+) pid:(\d+)\] (x+)$")  # gunicorn's lines: text format

    def lines_of(pid):
        return [len(m.group(3)) for m in map(captured.search, list(server.lines)) if m and int(m.group(2)) == pid]

    # one 40,000-byte line: logged in pieces of MAX_LINE bytes
    pid, _ = map(int, client.request(server.addr, b"0 40000", timeout=10).split())
    assert wait_for(lambda: sum(lines_of(pid)) == 40000, 10), server.log[-2000:]
    assert lines_of(pid) == [MAX_LINE, MAX_LINE, 40000 - 2 * MAX_LINE]

    # a worker floods for 3 s; meanwhile the other is killed and the fork server replaces it
    before = set(worker_numbers(server))
    result: dict = {}
    flooder = threading.Thread(target=lambda: result.update(r=client.request(server.addr, b"3 100", timeout=20)))
    flooder.start()
    try:

        def flooding():
            return next((p for p in before if lines_of(p).count(100) > 100), None)

        flooder_pid = wait_for(flooding, 5)
        assert flooder_pid, server.log[-2000:]
        (other,) = before - {flooder_pid}
        killed_at = time.monotonic()
        os.kill(other, signal.SIGKILL)
        new = wait_for(lambda: set(worker_numbers(server)) - before, 10)
        took = time.monotonic() - killed_at
        assert new, server.log[-3000:]
        assert flooder.is_alive() and took < 2.5, took  # replaced while the flood went on
        assert client.request(server.addr, b"0 10", timeout=10)  # and the new one serves
    finally:
        flooder.join(25)
    pid, n = map(int, result["r"].split())
    assert pid == flooder_pid
    # every line arrives: a full pipe only slows its worker down; nothing is dropped
    assert wait_for(lambda: lines_of(pid).count(100) == n, 15), (lines_of(pid).count(100), n)
    assert alive(fork_server)


# -- an import error shows where it happened --------------------------------------------------------


def run_serve(spec: str, path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """``gaspar serve SPEC`` with ``path`` on PYTHONPATH, run to its end in its own session."""
    env = dict(ENV, PYTHONPATH=os.pathsep.join([ENV["PYTHONPATH"], str(path)]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gaspar", "serve", spec, "--bind", "127.0.0.1:0", "-w", "1", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def test_an_import_error_shows_the_frames_in_the_users_code(tmp_path):
    (tmp_path / "conf_loader.py").write_text("import os\n\n\ndef load():\n    raise RuntimeError('no config file')\n")
    (tmp_path / "broken_app.py").write_text("import conf_loader\n\nCONFIG = conf_loader.load()\n")
    result = run_serve("broken_app:handle", tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip(" ^~")]  # no carets (3.11+)
    assert lines[0] == "gaspar: error: cannot import 'broken_app': RuntimeError: no config file"
    assert lines[1:] == [
        "Traceback (most recent call last):",
        f'  File "{tmp_path}/broken_app.py", line 3, in <module>',
        "    CONFIG = conf_loader.load()",
        f'  File "{tmp_path}/conf_loader.py", line 5, in load',
        "    raise RuntimeError('no config file')",
    ], result.stderr
    assert "importlib" not in result.stderr and "gaspar/cli.py" not in result.stderr
    assert "Starting gaspar" not in result.stderr  # nothing was forked


def test_only_the_last_five_frames_are_shown(tmp_path):
    chain = "".join(f"def f{i}():\n    f{i + 1}()\n\n\n" for i in range(8))
    (tmp_path / "deep_app.py").write_text(chain + "def f8():\n    raise KeyError('deep')\n\n\nf0()\n")
    result = run_serve("deep_app:handle", tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "gaspar: error: cannot import 'deep_app': KeyError: 'deep'"
    assert lines[1] == "Traceback (the last 5 of 10 frames):"
    files = [line for line in lines if line.startswith("  File ")]
    assert [f.rsplit(" in ", 1)[1] for f in files] == ["f4", "f5", "f6", "f7", "f8"]
    assert lines[-1] == "    raise KeyError('deep')"


def test_a_syntax_error_shows_the_file_line_and_caret(tmp_path):
    (tmp_path / "typo_app.py").write_text("import os\n\ndef handle(message:\n    return message\n")
    result = run_serve("typo_app:handle", tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0].startswith("gaspar: error: cannot import 'typo_app': SyntaxError: ")
    assert lines[1] == f'  File "{tmp_path}/typo_app.py", line 3'
    assert lines[2] == "    def handle(message:"
    assert lines[3].strip() == "^" and lines[3].index("^") == lines[2].index("(")
    assert len(lines) == 4, result.stderr


def test_a_missing_module_is_still_one_line(tmp_path):
    result = run_serve("surely_not_a_module_here:handle", tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "gaspar: error: cannot import 'surely_not_a_module_here': "
        "ModuleNotFoundError: No module named 'surely_not_a_module_here'"
    ]


def test_a_config_file_that_raises_shows_its_frames_too(tmp_path):
    config = tmp_path / "gaspar_conf.py"
    config.write_text("timeout = 1\nimport surely_not_a_dependency_here\n")
    proc = run_serve("handlers:echo", tmp_path, "--config", str(config))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"gaspar: error: cannot load config '{config}': ModuleNotFoundError: "
        "No module named 'surely_not_a_dependency_here'",
        "Traceback (most recent call last):",
        f'  File "{config}", line 2, in <module>',
        "    import surely_not_a_dependency_here",
    ]
