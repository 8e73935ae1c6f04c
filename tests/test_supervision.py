"""Supervision and lifecycle, against real processes and real faults.

Each fault is provoked for real: ``kill -9`` from the test, a handler that segfaults or
calls ``os._exit``, one that sleeps past its timeout, a ``post_fork`` hook that fails, a
module that kills every worker it forks. Each test checks what the client saw (and how
soon: bounds are generous, these run on shared 2-core machines), that the other requests
got their right replies, the pool's size and pids afterwards, that no request entry leaked
(``stats()['pending'] == 0``) and, through the fixtures, that no process is left behind.

Signals go to a real ``gaspar serve`` subprocess while threads keep requests running.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import signal
import socket
import struct
import textwrap
import threading
import time

import handlers
import pytest
from conftest import ROOT, alive, children_of, descendants, wait_for

import gaspar
from gaspar import aio, client
from gaspar.wire.framing import extended_header

# -- helpers -------------------------------------------------------------------------------


def raw_request(addr: str, message: bytes, timeout: float = 15.0) -> bytes:
    """A gaspar 1.0 client: length-prefixed request, then read to EOF."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("!I", len(message)) + message)
        with sock.makefile("rb") as f:
            return f.read()


class Call:
    """One request in a thread: ``.result`` or ``.error`` once done, and how long it took."""

    def __init__(self, addr: str, message: bytes, raw: bool = False, **kw) -> None:
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.elapsed: float | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(addr, message, raw, kw), daemon=True)
        self.thread.start()

    def _run(self, addr, message, raw, kw) -> None:
        try:
            if raw:
                self.result = raw_request(addr, message, kw.get("timeout", 15.0))
            else:
                self.result = client.request(addr, message, **{"timeout": 15.0, **kw})
        except BaseException as exc:
            self.error = exc
        self.elapsed = time.monotonic() - self.started

    def join(self, timeout: float = 20.0) -> Call:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the request hung"
        return self


class Load:
    """Threads issuing requests back to back until stopped; every outcome is recorded.

    A thread stops by itself once its connection is refused (the server stopped listening).
    """

    def __init__(self, addr: str, message: bytes = b"0.02", threads: int = 4) -> None:
        self.addr, self.message = addr, message
        self.replies: list[bytes] = []
        self.errors: list[BaseException] = []
        self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = client.request(self.addr, self.message, timeout=15)
            except gaspar.ConnectFailed:
                with self._lock:
                    self.refused += 1
                return
            except Exception as exc:
                with self._lock:
                    self.errors.append(exc)
                continue
            with self._lock:
                self.replies.append(reply)

    def count(self) -> int:
        with self._lock:
            return len(self.replies)

    def wait_more(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` more replies have arrived."""
        target = self.count() + n
        assert wait_for(lambda: self.count() >= target or self.errors, timeout), "the load stalled"

    def stop(self) -> Load:
        self._stop.set()
        for t in self._threads:
            t.join(20)
        assert not any(t.is_alive() for t in self._threads), "a load thread hung"
        return self


def pool(tracked) -> list[dict]:
    """The ready, non-retiring workers, once nothing boots; [] while the pool is changing."""
    stats = tracked.producer.stats()
    return [w for w in stats["workers"] if not w["retiring"]] if stats["booting"] == 0 else []


def wait_full(tracked, size: int, timeout: float = 5.0) -> list[int]:
    """Wait for exactly ``size`` ready workers and nothing else; return their pids."""
    workers = wait_for(lambda: len(pool(tracked)) == size and len(tracked.producer.worker_pids()) == size, timeout)
    assert workers, f"the pool did not get back to {size} workers: {tracked.producer.stats()}"
    return sorted(tracked.pids())


def busy_pids(tracked, n: int, timeout: float = 5.0) -> set[int]:
    """Wait until ``n`` workers are busy; return their pids."""

    def busy():
        pids = {w["pid"] for w in tracked.producer.stats()["workers"] if w["busy"]}
        return pids if len(pids) >= n else None

    pids = wait_for(busy, timeout)
    assert pids, f"{n} workers never got busy: {tracked.producer.stats()}"
    return pids


def assert_no_leaks(tracked) -> None:
    stats = tracked.producer.stats()
    assert stats["pending"] == 0 and stats["queued"] == 0 and stats["running"] == 0, stats
    assert not tracked.producer.dispatcher.pending


def proctitle(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def cli_env(*extra: str) -> dict:
    return {"PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), *map(str, extra)])}


# -- a worker dies mid-request -----------------------------------------------------------------

# (how the worker dies, the request that makes it die or None for kill -9 from the test,
#  the exit code and the signal the client's WorkerDied must carry, words in its message)
DEATHS = [
    ("kill -9", None, None, signal.SIGKILL, "killed by SIGKILL. Perhaps out of memory?"),
    ("segfault", b"segfault", None, signal.SIGSEGV, "killed by SIGSEGV"),
    ("os._exit", b"exit", 7, None, "exited with code 7"),
    ("sys.exit", b"sys.exit", 5, None, "exited with code 5"),  # QA: it was reported as 1
    ("oom kill", b"sigkill", None, signal.SIGKILL, "Perhaps out of memory?"),
    ("abort", b"abort", None, signal.SIGABRT, "killed by SIGABRT"),
]


@pytest.mark.parametrize("how,message,exitcode,sig,words", DEATHS, ids=[d[0] for d in DEATHS])
def test_worker_death_fails_only_its_request(serve, how, message, exitcode, sig, words):
    server = serve(handlers.faulty, processes=2)
    before = wait_full(server, 2)
    other = Call(server.addr, b"1.5")
    (other_pid,) = busy_pids(server, 1)
    (victim,) = set(before) - {other_pid}

    if message is None:
        doomed = Call(server.addr, b"30")
        busy_pids(server, 2)
        os.kill(victim, signal.SIGKILL)
    else:
        doomed = Call(server.addr, message)
    doomed.join()

    err = doomed.error
    assert isinstance(err, gaspar.WorkerDied), repr(err)
    assert doomed.elapsed < 5.0, f"the error took {doomed.elapsed:.1f}s"
    assert (err.pid, err.exitcode, err.signal) == (victim, exitcode, sig)
    assert words in str(err) and str(victim) in str(err)

    assert other.join().error is None, repr(other.error)
    assert other.result == b"%d:1.5" % other_pid  # the request in flight elsewhere: unaffected

    after = wait_full(server, 2)
    assert other_pid in after and victim not in after
    assert not alive(victim)
    assert server.request(b"0").split(b":")[1] == b"0"  # the next request works
    assert_no_leaks(server)
    assert server.producer.stats()["restarts"] == 1


def test_a_handler_that_kills_its_worker_on_every_call_does_not_flood_the_log(serve, caplog):
    """Each death costs three lines (booting, ready, died): a client sending a request that
    kills its worker, again and again, made 600 lines a second (QA). They are limited to 120
    a minute, the rest counted and summed up once the minute is over."""
    server = serve(handlers.faulty, processes=2)
    wait_full(server, 2)
    caplog.set_level(logging.INFO, logger="gaspar")
    deadline = time.monotonic() + 20
    while server.producer.stats()["counters"]["worker_deaths"] < 60 and time.monotonic() < deadline:
        try:
            client.request(server.addr, b"exit", timeout=5, retry=False)
        except gaspar.GasparError:
            pass
    deaths = server.producer.stats()["counters"]["worker_deaths"]
    assert deaths >= 60, deaths
    line = re.compile(r"(Booting worker|Worker \d+ \(pid:\d+\) (ready|exited))")
    churn = [r for r in caplog.records if line.match(r.getMessage())]
    assert 100 <= len(churn) <= 120, (len(churn), deaths)  # not 3 x deaths
    assert server.request(b"0").endswith(b":0")


def test_an_exception_whose_str_raises_is_an_error_reply_not_a_dead_worker(serve):
    """QA: a handler raising an exception whose __str__ raises killed its worker, every call."""
    server = serve(handlers.unprintable, processes=1)
    pid = server.request(b"pid")
    for _ in range(3):
        with pytest.raises(gaspar.HandlerError, match="_Unprintable.*str\\(\\) of the exception failed"):
            server.request(b"x")
    assert server.request(b"pid") == pid
    assert server.producer.stats()["counters"]["worker_deaths"] == 0


def test_pool_is_full_again_within_a_second(serve):
    server = serve(handlers.faulty, processes=2)
    (victim, survivor) = wait_full(server, 2)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for(lambda: victim not in server.producer.worker_pids(), 5)
    after = wait_full(server, 2, timeout=5)
    took = time.monotonic() - t0
    assert took < 3.0, f"the pool took {took:.2f}s to get back to size"  # "within a second", with slack
    assert survivor in after and victim not in after


@pytest.mark.parametrize("how", ["kill -9", "os._exit"])
def test_worker_death_resets_a_plain_client(serve, how):
    """A gaspar 1.0 client sees a reset, never a clean empty reply."""
    server = serve(handlers.faulty, processes=1)
    (victim,) = wait_full(server, 1)
    if how == "kill -9":
        doomed = Call(server.addr, b"30", raw=True)
        busy_pids(server, 1)
        os.kill(victim, signal.SIGKILL)
    else:
        doomed = Call(server.addr, b"exit", raw=True)
    doomed.join()
    assert isinstance(doomed.error, ConnectionResetError), f"got {doomed.result!r} / {doomed.error!r}"
    assert doomed.elapsed < 5.0
    assert raw_request(server.addr, b"0").endswith(b":0")  # a plain request still works
    wait_full(server, 1)
    assert_no_leaks(server)


def test_queued_requests_survive_a_death(serve):
    server = serve(handlers.faulty, processes=1)
    (victim,) = wait_full(server, 1)
    doomed = Call(server.addr, b"30")
    busy_pids(server, 1)
    queued = [Call(server.addr, b"0.%d" % i) for i in range(4)]
    # waiting: in the queue, or prefetched by the busy worker (sent, not started)
    assert wait_for(lambda: (lambda st: st["queued"] + st["prefetched"] == 4)(server.producer.stats()), 5)
    os.kill(victim, signal.SIGKILL)

    assert isinstance(doomed.join().error, gaspar.WorkerDied)
    (replacement,) = wait_full(server, 1)
    assert replacement != victim
    for i, call in enumerate(queued):
        assert call.join().error is None, repr(call.error)
        assert call.result == b"%d:0.%d" % (replacement, i)
    assert_no_leaks(server)


def test_a_worker_ending_itself_with_work_handed_ahead_keeps_its_exit_code_and_traceback(cli):
    """QA: a handler raising KeyboardInterrupt with calls queued behind it was reported
    "killed by SIGKILL because its 0MQ pipe was gone" (15 of 20) and its traceback was lost:
    the front end found the pipe gone while sending it the next request and killed it at
    once. Now it is killed only if it has not exited within a second."""
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "1")
    server.wait_ready(1)
    for _ in range(8):
        doomed = Call(server.addr, b"kbint")
        behind = [Call(server.addr, b"0") for _ in range(3)]
        err = doomed.join().error
        assert isinstance(err, gaspar.WorkerDied) and (err.exitcode, err.signal) == (1, None), repr(err)
        assert all(c.join().error is None for c in behind), [repr(c.error) for c in behind]
        server.wait_ready(1)
    assert wait_for(lambda: server.log.count("KeyboardInterrupt: from the handler") == 8, 5), server.log[-3000:]
    assert "because its 0MQ pipe was gone" not in server.log


def test_a_request_handed_ahead_that_kills_its_worker_takes_only_itself(serve):
    """A worker replies to its request and at once starts the one handed ahead to it, which
    ends the process with os._exit: the reply just sent still reaches its client (the
    handler's os._exit lets the replies already sent leave first; the supervisor takes the
    worker's last replies before the news of its death), the killer alone is answered
    WorkerDied, and it is not run again on another worker. (A fatal signal right at the
    start gets no such promise: see README's fault table.)"""
    server = serve(handlers.faulty, processes=1)
    wait_full(server, 1)
    for _ in range(3):
        first = Call(server.addr, b"0.3")
        busy_pids(server, 1)
        killer = Call(server.addr, b"exit")
        third = Call(server.addr, b"0")  # two queued, one worker: the killer is handed ahead
        assert wait_for(lambda: server.producer.stats()["prefetched"] >= 1, 5)
        assert first.join().error is None, repr(first.error)  # its reply, not WorkerDied
        assert isinstance(killer.join().error, gaspar.WorkerDied), repr(killer.error)
        assert third.join().error is None, repr(third.error)
        wait_full(server, 1)
    assert server.producer.stats()["counters"]["worker_deaths"] == 3  # never a second victim


def test_deaths_after_boot_are_not_flapping(serve):
    """Workers that die once ready are replaced every time; only boot failures count."""
    server = serve(handlers.faulty, processes=2, flap_attempts=2, flap_max_retry=0)
    for _ in range(6):
        victim = wait_full(server, 2)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda v=victim: v not in server.producer.worker_pids(), 5)
    wait_full(server, 2)
    assert not server.producer.stopped.is_set() and server.producer.exit_code == 0
    assert server.producer.stats()["restarts"] == 6
    assert server.request(b"0").endswith(b":0")


# -- a handler hangs ------------------------------------------------------------------------------


def test_timeout_fails_the_request_and_replaces_the_worker(serve):
    server = serve(handlers.faulty, processes=2, timeout=1)
    before = wait_full(server, 2)
    hung = Call(server.addr, b"60").join()
    err = hung.error
    assert isinstance(err, gaspar.WorkerTimeout) and isinstance(err, TimeoutError), repr(err)
    assert 0.9 < hung.elapsed < 5.0, f"the timeout came after {hung.elapsed:.1f}s"
    victim = err.facts["pid"]
    assert victim in before and err.facts["timeout"] == 1
    assert wait_for(lambda: not alive(victim), 5), "the hung worker was not killed"
    after = wait_full(server, 2)
    assert victim not in after and len(set(after) & set(before)) == 1
    assert server.request(b"0.1").endswith(b":0.1")
    assert_no_leaks(server)
    assert server.producer.stats()["counters"]["timeouts"] == 1


def test_a_shorter_client_handler_timeout_answers_at_once_and_kills_nothing(serve):
    """The client may ask for less than the operator allows: its handler_timeout ends its
    wait and interrupts the handler in its worker (SoftTimeout), which lives on."""
    server = serve(handlers.faulty, processes=2, timeout=30)
    before = wait_full(server, 2)
    other = Call(server.addr, b"1.5")
    busy_pids(server, 1)
    hung = Call(server.addr, b"60", handler_timeout=0.5).join()
    assert isinstance(hung.error, gaspar.WorkerTimeout), repr(hung.error)
    assert hung.elapsed < 4.0
    facts = hung.error.facts
    assert facts["timeout"] == 0.5 and facts["limit"] == "handler_timeout" and facts["killed"] is False
    assert other.join().error is None and other.result.endswith(b":1.5")

    async def aio_calls() -> list[BaseException]:  # both asyncio clients say the same
        errors = []
        try:
            await aio.request(server.addr, b"60", handler_timeout=0.5, timeout=20)
        except gaspar.GasparError as exc:
            errors.append(exc)
        async with aio.Client(server.addr, timeout=20) as c:
            try:
                await c.request(b"60", handler_timeout=0.5)
            except gaspar.GasparError as exc:
                errors.append(exc)
        return errors

    t0 = time.monotonic()
    errors = asyncio.run(aio_calls())
    assert time.monotonic() - t0 < 6.0 and len(errors) == 2
    for err in errors:
        assert isinstance(err, gaspar.WorkerTimeout), repr(err)
        assert err.facts["limit"] == "handler_timeout" and err.facts["killed"] is False
    assert sorted(wait_full(server, 2)) == sorted(before)  # no worker was killed
    assert server.producer.stats()["restarts"] == 0
    assert_no_leaks(server)


def test_a_client_handler_timeout_is_capped_at_the_server_timeout(serve):
    """The operator outranks the client: a longer handler_timeout (or the wire's
    0xffffffff ms) still ends at the server's timeout, which kills the worker."""
    server = serve(handlers.faulty, processes=1, timeout=1)
    t0 = time.monotonic()
    with pytest.raises(gaspar.WorkerTimeout) as info:
        server.request(b"60", handler_timeout=30, timeout=20)
    assert 0.9 < time.monotonic() - t0 < 3.0
    assert info.value.facts["limit"] == "timeout" and info.value.facts["killed"] is True
    wait_full(server, 1)
    # the asyncio client gives the same error, not its own RequestTimeout (WorkerTimeout
    # is a TimeoutError too, as asyncio's own timeout is since Python 3.11)
    t0 = time.monotonic()
    with pytest.raises(gaspar.WorkerTimeout) as info:
        asyncio.run(aio.request(server.addr, b"60", handler_timeout=30, timeout=20))
    assert 0.9 < time.monotonic() - t0 < 3.0 and info.value.facts["limit"] == "timeout"
    wait_full(server, 1)
    sock = socket.create_connection(tuple(server.producer.server_addr), timeout=10)
    with sock:
        sock.sendall(extended_header(2, timeout=0xFFFFFFFF / 1000) + b"60")
        t0 = time.monotonic()
        assert sock.recv(9)[8] == 2  # status 2, WorkerTimeout
        assert time.monotonic() - t0 < 3.0
    wait_full(server, 1)
    assert_no_leaks(server)


def test_timeout_resets_a_plain_client(serve):
    server = serve(handlers.faulty, processes=1, timeout=0.5)
    hung = Call(server.addr, b"60", raw=True).join()
    assert isinstance(hung.error, ConnectionResetError), f"got {hung.result!r} / {hung.error!r}"
    assert hung.elapsed < 4.0
    wait_full(server, 1)
    assert_no_leaks(server)


# -- a worker leaks: max_requests ---------------------------------------------------------------


def test_max_requests_recycles_workers_without_failing_a_request(serve):
    server = serve(handlers.faulty, processes=2, max_requests=5, max_requests_jitter=3)
    first = wait_full(server, 2)
    load = Load(server.addr, b"0.005", threads=4)
    assert wait_for(lambda: load.count() >= 80 or load.errors, 30)
    load.stop()
    assert load.errors == [] and load.refused == 0

    served = collections.Counter(int(r.split(b":")[0]) for r in load.replies)
    current = wait_full(server, 2)
    retired = set(served) - set(current)
    assert set(first) <= retired, "the first workers were never recycled"
    for pid in retired:
        assert 5 <= served[pid] <= 8, f"worker {pid} handled {served[pid]} requests"
        assert not alive(pid)
    assert server.producer.stats()["restarts"] == 0  # recycling is not a crash
    assert_no_leaks(server)


# -- workers cannot start ------------------------------------------------------------------------


def record_fork(path) -> None:
    """In a worker: one line ``pid monotonic-time parent-pid`` (the parent: the fork server)."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {time.monotonic()} {os.getppid()}\n")


def _forks(path) -> list[tuple[int, float]]:
    """The workers recorded by ``record_fork``: (pid, time)."""
    if not path.exists():
        return []
    return [(int(pid), float(t)) for pid, t, _ in (line.split() for line in path.read_text().splitlines())]


def assert_all_gone(path) -> None:
    """Every recorded worker, and every fork server that forked one, has exited."""
    pids = set()
    for line in path.read_text().splitlines():
        pid, _, ppid = line.split()
        pids |= {int(pid), int(ppid)}
    assert not [p for p in pids if wait_for(lambda p=p: not alive(p), 5) is False]


def _start_hopeless(post_fork, **options) -> tuple[gaspar.Producer, BaseException | None, float]:
    producer = gaspar.Producer(gaspar.Consumer(handler=handlers.echo), 0, processes=2, post_fork=post_fork, **options)
    t0 = time.monotonic()
    error = None
    try:
        producer.start(blocking=False, timeout=40)
    except gaspar.GasparError as exc:
        error = exc
    finally:
        producer.stop(timeout=15)
    return producer, error, time.monotonic() - t0


def test_failing_post_fork_gives_up_with_exit_code_3(tmp_path, caplog):
    log = tmp_path / "forks"

    def post_fork(worker):
        record_fork(log)
        raise RuntimeError("no database")

    with caplog.at_level("INFO", logger="gaspar"):
        producer, error, took = _start_hopeless(
            post_fork, flap_attempts=3, flap_window=10, flap_retry_in=0.3, flap_max_retry=2
        )
    assert isinstance(error, gaspar.GasparError) and "gave up" in str(error)
    assert producer.exit_code == 3
    forks = _forks(log)
    assert 9 <= len(forks) <= 10, f"{len(forks)} forks"  # 3 attempts x 3 episodes, one more in flight
    assert took < 15
    # the retries came after a delay: two back-offs of 0.3 s
    times = sorted(t for _, t in forks)
    assert times[-1] - times[0] >= 0.55
    assert_all_gone(log)
    messages = [r.getMessage() for r in caplog.records]
    said = "died before it was ready: exited with code 3: its post_fork hook raised RuntimeError: no database"
    assert any(said in m for m in messages), messages  # the worker said why before it exited
    assert "no database" in str(error)  # and so does the error a library user gets
    assert any("giving up" in m for m in messages), messages
    assert sum("flapping" in m for m in messages) == 2


def test_default_policy_keeps_a_hopeless_start_to_a_few_dozen_forks(tmp_path):
    log = tmp_path / "forks"

    def post_fork(worker):  # the worker dies during boot, without a word
        record_fork(log)
        os._exit(1)

    producer, error, _ = _start_hopeless(post_fork)
    assert isinstance(error, gaspar.GasparError)
    assert producer.exit_code == 3
    forks = _forks(log)
    assert 20 <= len(forks) <= 36, f"{len(forks)} forks"
    assert_all_gone(log)


def test_flapping_backs_off_then_recovers(serve, tmp_path):
    log = tmp_path / "forks"

    def post_fork(worker):  # the first four forks fail, then the trouble is over
        record_fork(log)
        if len(log.read_text().splitlines()) <= 4:
            os._exit(1)

    server = serve(handlers.faulty, processes=1, post_fork=post_fork, flap_attempts=3, flap_retry_in=0.5)
    (pid,) = wait_full(server, 1)
    forks = _forks(log)
    assert len(forks) == 5 and forks[-1][0] == pid
    times = [t for _, t in forks]
    assert times[3] - times[2] >= 0.45, "no back-off after 3 failures"
    assert server.request(b"0").startswith(b"%d:" % pid)


def test_cli_gives_up_when_every_worker_dies_at_boot(cli, tmp_path):
    """A module that kills every worker it forks: bounded forks, a clear line, exit 3."""
    (tmp_path / "doomed.py").write_text(
        textwrap.dedent(
            f"""
            import os
            MAIN = os.getpid()

            def _in_child():
                if os.getppid() != MAIN:  # a worker (the fork server's parent is MAIN)
                    with open({str(tmp_path / "forks")!r}, "a") as f:
                        f.write("%d 0 %d\\n" % (os.getpid(), os.getppid()))
                    os._exit(9)

            os.register_at_fork(after_in_child=_in_child)

            def handle(message):
                return message
            """
        )
    )
    server = cli(
        "doomed:handle",
        "--bind",
        "127.0.0.1:0",
        "-w",
        "2",
        "--flap-attempts",
        "3",
        "--flap-retry-in",
        "0.2",
        "--flap-max-retry",
        "1",
        env=cli_env(tmp_path),
    )
    assert server.wait(20) == 3, server.log
    forks = _forks(tmp_path / "forks")
    assert 6 <= len(forks) <= 7, server.log
    assert "giving up" in server.log and "exited with code 9" in server.log
    assert_all_gone(tmp_path / "forks")


# -- the front end is killed ----------------------------------------------------------------------


def test_orphaned_workers_exit_by_themselves(cli):
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "2")
    workers = server.wait_ready(2)
    (fork_server,) = children_of(server.proc.pid)
    stuck = Call(server.addr, b"60")
    assert wait_for(lambda: server.stats()["running"] == 1, 5)
    family = descendants(server.proc.pid)
    assert set(workers) | {fork_server} <= set(family)

    os.kill(server.proc.pid, signal.SIGKILL)  # the producer only, not its group
    server.wait(10)
    gone = wait_for(lambda: not [p for p in family if alive(p)], 5)
    assert gone, f"left behind: {[p for p in family if alive(p)]}"
    assert isinstance(stuck.join().error, gaspar.ConnectionLost), repr(stuck.error)


def test_after_a_reload_a_killed_front_end_leaves_nothing_behind(cli, tmp_path):
    (tmp_path / "killable.py").write_text("def handle(m):\n    return b'v1:' + m\n")
    server = cli("killable:handle", "--bind", "127.0.0.1:0", "-w", "2", env=cli_env(tmp_path))
    old = server.wait_ready(2)
    (tmp_path / "killable.py").write_text("def handle(m):\n    return b'v2:' + m\n")
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: not set(old) & set(server.wait_ready(2)), 15), server.log
    # the old fork server and workers gone; the new fork server and its two workers left
    assert wait_for(lambda: len(children_of(server.proc.pid)) == 1 and len(descendants(server.proc.pid)) == 3, 10)
    family = descendants(server.proc.pid)
    os.kill(server.proc.pid, signal.SIGKILL)  # the producer only, not its group
    server.wait(10)
    gone = wait_for(lambda: not [p for p in family if alive(p)], 5)
    assert gone, f"left behind: {[p for p in family if alive(p)]}"


def test_the_fork_server_forks_alone_and_without_warnings(cli, tmp_path):
    """A child forked from a multi-threaded process may deadlock on a lock another thread
    held: the fork server runs no thread of its own (its parent watch is in its loop).
    Python 3.12+ warns at such a fork, and miscounts a process whose name has a space
    ("gaspar: fork server"); eventlet warns at any. With every warning shown, a start, a
    worker's re-fork and a reload's fresh fork server say none of them."""
    (tmp_path / "quiet.py").write_text("def handle(m):\n    return m\n")
    env = dict(cli_env(tmp_path), PYTHONWARNINGS="always::DeprecationWarning")
    server = cli("quiet:handle", "--bind", "127.0.0.1:0", "-w", "2", env=env)
    workers = server.wait_ready(2)
    (fork_server,) = children_of(server.proc.pid)
    assert os.listdir(f"/proc/{fork_server}/task") == [str(fork_server)]
    os.kill(workers[0], signal.SIGKILL)
    assert wait_for(lambda: workers[0] not in server.wait_ready(2), 10), server.log
    server.signal(signal.SIGHUP)  # a fresh interpreter's fork server forks the next generation
    assert wait_for(lambda: not set(workers) & set(server.wait_ready(2)), 15), server.log
    assert wait_for(lambda: len(children_of(server.proc.pid)) == 1, 10)  # the old one has gone
    (fork_server,) = children_of(server.proc.pid)
    assert os.listdir(f"/proc/{fork_server}/task") == [str(fork_server)]
    assert client.request(server.addr, b"hi", timeout=5) == b"hi"
    assert "multi-threaded" not in server.log and "fork() is a bad idea" not in server.log, server.log
    assert "threads" not in server.log


def test_an_application_thread_in_the_fork_server_is_logged_once(cli, tmp_path):
    """An application that starts a thread at import starts it in a reload's fork server
    (a fresh interpreter imports it): forking workers from there is the hazard above, so
    the log says so, once, and Python's own warning (3.12+) is left as it is."""
    (tmp_path / "threaded.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
        "def handle(m):\n    return m\n"
    )
    server = cli("threaded:handle", "--bind", "127.0.0.1:0", "-w", "2", env=cli_env(tmp_path))
    workers = server.wait_ready(2)
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: not set(workers) & set(server.wait_ready(2)), 15), server.log
    assert server.log.count("The fork server runs 2 threads") == 1, server.log
    assert client.request(server.addr, b"hi", timeout=5) == b"hi"


def test_a_killed_fork_server_takes_its_workers_and_a_fresh_one_takes_its_place(cli):
    """QA: a handler that killed its parent (the fork server) stopped the daemon (exit 1).
    Its workers die with it (PR_SET_PDEATHSIG) and their requests fail WorkerDied; a fresh
    fork server imports the application, as a reload's does, and forks their successors.
    A sixth death within a minute still stops the daemon: it cannot keep one."""
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "2")
    workers = server.wait_ready(2)
    (fork_server,) = children_of(server.proc.pid)
    stuck = Call(server.addr, b"60")
    assert wait_for(lambda: server.stats()["running"] == 1, 5)
    os.kill(fork_server, signal.SIGKILL)
    assert isinstance(stuck.join().error, gaspar.WorkerDied), repr(stuck.error)  # it was running
    assert "because its fork server" in str(stuck.error) and stuck.elapsed < 10
    assert not [p for p in workers if wait_for(lambda p=p: not alive(p), 5) is False]
    fresh = server.wait_ready(2)
    assert not set(fresh) & set(workers) and server.proc.poll() is None
    assert client.request(server.addr, b"0", timeout=5).endswith(b":0")
    assert f"The fork server (pid:{fork_server}) died, its workers with it; a fresh one" in server.log
    for _ in range(5):  # five more within the minute: the sixth stops it
        (fork_server,) = wait_for(lambda: children_of(server.proc.pid) or None, 10)
        server.wait_ready(2)
        os.kill(fork_server, signal.SIGKILL)
        if wait_for(lambda: server.proc.poll() is not None, 1):
            break
    assert server.wait(15) == 1, server.log[-3000:]
    assert "died; that is 6 deaths within a minute; stopping" in server.log
    assert "fork server unreachable" not in server.log  # QA: EBADF noise from the closed one


# -- signals to a real daemon, under load ----------------------------------------------------------


def test_sigterm_finishes_every_accepted_request(cli):
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "2")
    workers = server.wait_ready(2)
    family = descendants(server.proc.pid)
    load = Load(server.addr, b"0.05", threads=3)
    load.wait_more(10)
    accepted = [Call(server.addr, b"0.4") for _ in range(5)]  # 2 running, the rest queued behind
    accepted += [Call(server.addr, b"0.4", raw=True) for _ in range(2)]  # gaspar 1.0 clients
    # all 7 are in (and the load's 3, which now queue behind them): 2 running, 8 queued
    assert wait_for(lambda: server.stats()["pending"] == 10, 5), server.stats()

    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0, server.log
    load.stop()
    for call in accepted:
        assert call.join().error is None, repr(call.error)
        assert call.result.endswith(b":0.4")
    assert load.errors == [], load.errors
    assert load.refused == 3  # after the stop, connections are refused
    with pytest.raises(gaspar.ConnectFailed):
        client.request(server.addr, b"0", timeout=5)
    assert "Handling signal: term" in server.log and "Stopping (graceful)" in server.log
    for pid in workers:
        assert f"(pid:{pid}) exited" in server.log
    assert not [p for p in family if wait_for(lambda p=p: not alive(p), 5) is False]


def test_sigterm_gives_up_on_requests_past_graceful_timeout(cli):
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "1", "--graceful-timeout", "1")
    server.wait_ready(1)
    slow = Call(server.addr, b"30")
    assert wait_for(lambda: server.stats()["running"] == 1, 5)
    t0 = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0, server.log
    assert time.monotonic() - t0 < 8
    # it ran: not ServerUnavailable, which says it never did (a client may retry that)
    assert isinstance(slow.join().error, gaspar.WorkerDied) and "may have run" in str(slow.error), repr(slow.error)


def test_sigint_hurries_a_graceful_stop(cli):
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "1")
    server.wait_ready(1)
    slow = Call(server.addr, b"30")
    assert wait_for(lambda: server.stats()["running"] == 1, 5)
    server.signal(signal.SIGTERM)
    assert wait_for(lambda: "Stopping (graceful)" in server.log, 5)
    time.sleep(0.3)
    assert server.proc.poll() is None and slow.thread.is_alive()  # still waiting for the request
    server.signal(signal.SIGINT)
    assert server.wait(10) == 0, server.log
    assert isinstance(slow.join().error, gaspar.WorkerDied), repr(slow.error)  # it was running


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_fast_stop_fails_in_flight_requests_promptly(cli, sig):
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "2")
    server.wait_ready(2)
    family = descendants(server.proc.pid)
    framed = [Call(server.addr, b"30") for _ in range(2)]  # one running, one queued
    plain = [Call(server.addr, b"30", raw=True) for _ in range(2)]
    assert wait_for(lambda: server.stats()["pending"] == 4, 5), server.stats()

    t0 = time.monotonic()
    server.signal(sig)
    assert server.wait(15) == 0, server.log
    for call in framed:  # running: WorkerDied ("it may have run"); queued: ServerUnavailable (never ran)
        error = call.join().error
        assert isinstance(error, (gaspar.WorkerDied, gaspar.ServerUnavailable, gaspar.ConnectionLost)), repr(error)
        if isinstance(error, gaspar.ServerUnavailable):
            assert "before the request started" in str(error), repr(error)
    for call in plain:
        assert isinstance(call.join().error, ConnectionResetError), f"got {call.result!r} / {call.error!r}"
    assert max(c.elapsed - (t0 - c.started) for c in framed + plain) < 5.0
    assert "Stopping (fast)" in server.log
    assert not [p for p in family if wait_for(lambda p=p: not alive(p), 5) is False]


def test_sighup_reloads_the_code_under_load_with_no_error(cli, tmp_path):
    app = tmp_path / "reloadable.py"
    app.write_text("import time\n\ndef handle(m):\n    time.sleep(0.01)\n    return b'v1:' + m\n")
    server = cli("reloadable:handle", "--bind", "127.0.0.1:0", "-w", "2", env=cli_env(tmp_path))
    old = server.wait_ready(2)
    load = Load(server.addr, b"x", threads=4)
    load.wait_more(20)

    app.write_text("import time\n\ndef handle(m):\n    time.sleep(0.01)\n    return b'version2:' + m\n")
    server.signal(signal.SIGHUP)

    def replaced():
        workers = server.stats()["workers"]
        return (
            len(workers) == 2
            and all(w["generation"] == 2 for w in workers)
            and not set(old) & {w["pid"] for w in workers}
        )

    assert wait_for(replaced, 15), server.log
    load.wait_more(20)
    load.stop()
    assert load.errors == [], load.errors
    assert set(load.replies) == {b"v1:x", b"version2:x"}
    assert client.request(server.addr, b"y", timeout=5) == b"version2:y"
    assert "Reloading reloadable:handle" in server.log
    # rolling: one new worker boots at a time, and an old one leaves only once a
    # replacement is ready, so the pool is never short
    after = server.log.split("replacing the workers one by one", 1)[1].splitlines()
    booted = ready = exited = 0
    for line in after:
        booted += "Booting worker" in line
        ready += line.endswith(") ready")
        exited += any(f"(pid:{pid}) exited" in line for pid in old)
        assert exited <= ready and booted <= ready + 1, "\n".join(after)
    assert booted == ready == exited == 2
    assert server.stats()["restarts"] == 0
    assert not [p for p in old if wait_for(lambda p=p: not alive(p), 5) is False]
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0


def test_sighup_with_a_broken_module_keeps_the_workers(cli, tmp_path):
    app = tmp_path / "breakable.py"
    app.write_text("def handle(m):\n    return b'v1:' + m\n")
    server = cli("breakable:handle", "--bind", "127.0.0.1:0", "-w", "2", env=cli_env(tmp_path))
    old = server.wait_ready(2)
    load = Load(server.addr, b"x", threads=2)
    app.write_text("def handle(m):\n    return b'v2:' + m\nraise RuntimeError('half-written')\n")
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: "Reload failed" in server.log, 10), server.log
    load.wait_more(10)
    load.stop()
    assert load.errors == [] and set(load.replies) == {b"v1:x"}
    assert "RuntimeError: half-written" in server.log
    assert sorted(w["pid"] for w in server.stats()["workers"]) == sorted(old)


def test_sighup_reloads_the_modules_the_handler_imports(cli, tmp_path):
    (tmp_path / "helperlib.py").write_text("def tag():\n    return b'old'\n")
    (tmp_path / "usehelper.py").write_text("import helperlib\n\ndef handle(m):\n    return helperlib.tag() + m\n")
    server = cli("usehelper:handle", "--bind", "127.0.0.1:0", "-w", "2", env=cli_env(tmp_path))
    old = server.wait_ready(2)
    (fork_server,) = children_of(server.proc.pid)
    load = Load(server.addr, b"x", threads=3)
    load.wait_more(10)
    (tmp_path / "helperlib.py").write_text("def tag():\n    return b'new'\n")  # the handler's module unchanged
    server.signal(signal.SIGHUP)

    def replaced():
        workers = server.stats()["workers"]
        return len(workers) == 2 and all(w["generation"] == 2 for w in workers)

    assert wait_for(replaced, 15), server.log
    load.wait_more(10)
    load.stop()
    assert load.errors == [], load.errors
    assert set(load.replies) == {b"oldx", b"newx"}
    assert client.request(server.addr, b"y", timeout=5) == b"newy"
    # the old fork server retires with its last worker: one fork server, the new one, is left
    assert not [p for p in [*old, fork_server] if wait_for(lambda p=p: not alive(p), 5) is False]
    assert wait_for(lambda: len(children_of(server.proc.pid)) == 1, 5), server.log
    assert f"Fork server (pid:{fork_server}) exited" in server.log
    assert server.stats()["restarts"] == 0
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0


HOOK = "import os\n\ndef post_fork(worker):\n    open(os.path.join({where!r}, 'forked-%d' % worker.pid), 'w').close()\n"


@pytest.mark.parametrize("hook_in", ["a module", "the config file"])
def test_sighup_with_a_post_fork_hook(cli, tmp_path, hook_in):
    """A hook importable by name is imported afresh by the new fork server; one defined in
    the config file cannot be named there, so the reload re-imports the handler's module only."""
    hook = HOOK.format(where=str(tmp_path))
    if hook_in == "a module":
        (tmp_path / "myhooks.py").write_text(hook)
        hook = "from myhooks import post_fork\n"
    (tmp_path / "conf.py").write_text(hook)
    (tmp_path / "hooked.py").write_text("def handle(m):\n    return b'v1:' + m\n")
    args = ("hooked:handle", "--bind", "127.0.0.1:0", "-w", "2", "--config", str(tmp_path / "conf.py"))
    server = cli(*args, env=cli_env(tmp_path))
    old = server.wait_ready(2)
    (tmp_path / "hooked.py").write_text("def handle(m):\n    return b'v2:' + m\n")
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: not set(old) & set(server.wait_ready(2)), 15), server.log
    assert client.request(server.addr, b"y", timeout=5) == b"v2:y"
    forked = {int(p.name.split("-")[1]) for p in tmp_path.glob("forked-*")}
    assert set(old) | set(server.wait_ready(2)) <= forked  # the hook ran in every worker
    fell_back = "Cannot start a fresh fork server" in server.log
    assert fell_back == (hook_in == "the config file"), server.log
    assert wait_for(lambda: len(children_of(server.proc.pid)) == 1, 5), server.log


def test_sigttin_and_sigttou_scale_under_load(cli):
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "2")
    server.wait_ready(2)
    load = Load(server.addr, b"0.02", threads=3)

    def live():
        stats = server.stats()
        return len([w for w in stats["workers"] if not w["retiring"]]) if not stats["booting"] else -1

    server.signal(signal.SIGTTIN)
    assert wait_for(lambda: live() == 3 and len(server.stats()["workers"]) == 3, 5), server.stats()
    load.wait_more(10)
    for expected in (2, 1, 1):  # not below one
        server.signal(signal.SIGTTOU)
        assert wait_for(lambda e=expected: live() == e and len(server.stats()["workers"]) == e, 5), server.stats()
        load.wait_more(5)
    load.stop()
    assert load.errors == [], load.errors
    assert server.stats()["target_workers"] == 1
    assert server.log.count("Scaling to") == 4


def test_workers_min_max_sizes_a_bytes_handlers_pool_by_its_queue(cli):
    """``-w 1:3`` on a 1.0 bytes handler: its one pool sizes itself. Ten clients back to back
    on 20 ms requests queue behind one worker: it grows one worker at a time to 3; idle, it
    shrinks back to 1; no request fails (one shed while it grows is an Overloaded)."""
    server = cli(
        "handlers:spin_ms", "--bind", "127.0.0.1:0", "-w", "1:3", "--scale-up-after", "0.3", "--scale-down-idle", "1"
    )
    server.wait_ready(1)
    stats = server.stats()
    assert stats["autoscale"] == {"default": {"size": 1, "min": 1, "max": 3}}
    from gaspar.ops import statsd, top

    assert "default 1 in 1:3" in "\n".join(top.render(None, stats, 1.0, 120))  # seen by an operator
    assert {"gaspar.autoscale.default.size:1|g", "gaspar.autoscale.default.max:3|g"} <= set(
        statsd.format_metrics(None, stats, "gaspar")
    )
    sizes: list[int] = []

    def size() -> int:
        sizes.append(server.stats()["autoscale"]["default"]["size"])
        return sizes[-1]

    load = Load(server.addr, b"20", threads=10)
    assert wait_for(lambda: size() == 3, 15, 0.1), sizes
    assert len(server.wait_ready(3)) == 3
    load.wait_more(20)
    load.stop()
    assert wait_for(lambda: size() == 1, 15, 0.1), sizes
    assert len(server.wait_ready(1)) == 1 and len(server.stats()["workers"]) == 1
    changes = [b - a for a, b in zip(sizes, sizes[1:], strict=False) if b != a]
    assert changes == [1, 1, -1, -1], sizes  # one at a time, and never back and forth
    assert all(isinstance(e, gaspar.Overloaded) for e in load.errors), load.errors
    assert len(load.replies) >= 20
    assert server.log.count("Pool default: ") == 4, server.log


# -- the same from Python ---------------------------------------------------------------------------


def test_scale_from_python_under_load(serve):
    server = serve(handlers.faulty, processes=2)
    load = Load(server.addr, b"0.01", threads=3)
    server.producer.scale(4)
    assert len(wait_full(server, 4)) == 4
    load.wait_more(10)
    server.producer.scale(1)
    wait_full(server, 1)
    load.wait_more(10)
    load.stop()
    assert load.errors == []
    assert server.producer.stats()["restarts"] == 0
    assert_no_leaks(server)


def test_reload_from_python_under_load(serve, tmp_path, monkeypatch):
    app = tmp_path / "pyreloadable.py"
    app.write_text("def handle(m):\n    return b'one:' + m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import pyreloadable

    try:
        server = serve(pyreloadable.handle, processes=2)
        old = wait_full(server, 2)
        load = Load(server.addr, b"x", threads=3)
        load.wait_more(10)
        app.write_text("def handle(m):\n    return b'number two:' + m\n")
        server.producer.reload()
        assert wait_for(lambda: not set(old) & set(server.producer.worker_pids()), 10)
        wait_full(server, 2)
        load.wait_more(10)
        load.stop()
        assert load.errors == []
        assert set(load.replies) == {b"one:x", b"number two:x"}
        assert server.request(b"y") == b"number two:y"
        assert_no_leaks(server)
    finally:
        monkeypatch.delitem(__import__("sys").modules, "pyreloadable")


def test_graceful_stop_from_python_finishes_queued_requests(serve):
    server = serve(handlers.faulty, processes=2)
    pids = wait_full(server, 2)
    calls = [Call(server.addr, b"0.3") for _ in range(5)]
    assert wait_for(lambda: server.producer.stats()["pending"] == 5, 5)
    server.producer.stop(graceful=True, timeout=15)
    assert server.producer.stopped.is_set()
    for call in calls:
        assert call.join().error is None and call.result.endswith(b":0.3"), repr(call.error)
    assert not [p for p in pids if wait_for(lambda p=p: not alive(p), 5) is False]


def test_graceful_stop_answers_new_requests_on_persistent_connections_unavailable(serve):
    """Clients that keep sending on persistent connections do not hold a graceful stop
    for all of graceful_timeout (QA: 13-22 s): what they had sent before the stop is
    answered, and a request they send after it, never run, is answered ServerUnavailable
    (retry is safe), so the stop ends once the accepted work is done."""
    server = serve(handlers.faulty, processes=2, graceful_timeout=20)
    wait_full(server, 2)
    outcomes: list[str] = []
    stop = threading.Event()

    def closed_loop() -> None:
        with client.Client(server.addr, timeout=10) as c:
            while not stop.is_set():
                try:
                    c.request(b"0.05")
                    outcomes.append("ok")
                except gaspar.ServerUnavailable:
                    outcomes.append("unavailable")
                    return
                except gaspar.GasparError as exc:
                    outcomes.append(type(exc).__name__)
                    return

    threads = [threading.Thread(target=closed_loop, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(outcomes) >= 20, 10)
    t0 = time.monotonic()
    server.producer.stop(graceful=True, timeout=25)
    took = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(5)
    assert took < 3.0, took  # not graceful_timeout's 20 s
    assert outcomes.count("unavailable") == 4 and set(outcomes) == {"ok", "unavailable"}, outcomes


def test_graceful_stop_serves_connections_waiting_in_the_backlog(serve):
    """Connections the kernel accepted before the stop are served, not reset.

    The hub is held busy (a call run in its thread) while clients connect and send, so
    their connections wait in the listening socket's backlog when the stop begins.
    """
    server = serve(handlers.faulty, processes=2)
    producer = server.producer
    wait_full(server, 2)

    def stop_late():
        time.sleep(0.5)  # blocks the hub: new connections wait in the kernel's backlog
        producer.begin_stop(True)

    producer._control.call(stop_late, wait=False)
    time.sleep(0.1)
    calls = [Call(server.addr, b"0.1") for _ in range(4)] + [Call(server.addr, b"0.1", raw=True) for _ in range(2)]
    assert producer.stopped.wait(15)
    for call in calls:
        assert call.join().error is None, repr(call.error)
        assert call.result.endswith(b":0.1")


# -- hooks, broadcast, titles, logs -----------------------------------------------------------------


class Recorder(gaspar.Consumer):
    """Writes one line per broadcast received to a file: ``pid message``."""

    def __init__(self, path) -> None:
        super().__init__()
        self.path = path

    def handle(self, message: bytes) -> bytes:
        return b"%d" % os.getpid()

    def on_broadcast(self, message: bytes) -> None:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()} {message.decode()}\n")


def test_broadcast_reaches_each_live_worker_once(serve, tmp_path):
    path = tmp_path / "broadcasts"
    server = serve(Recorder(path), processes=3)
    pids = wait_full(server, 3)
    assert server.producer.broadcast(b"hello") == 3

    def lines():
        return path.read_text().splitlines() if path.exists() else []

    assert wait_for(lambda: len(lines()) >= 3, 5)
    time.sleep(0.3)  # a duplicate would show up by now
    assert sorted(lines()) == sorted(f"{pid} hello" for pid in pids)


def test_hooks(serve, tmp_path):
    events = tmp_path / "events"
    started, reloads = [], []

    def record(what, worker):
        with open(events, "a") as f:
            f.write(f"{what} {worker.number} {worker.pid}\n")

    server = serve(
        handlers.faulty,
        processes=2,
        on_starting=started.append,
        post_fork=lambda w: record("post_fork", w),
        worker_exit=lambda w: record("worker_exit", w),
        on_reload=reloads.append,
    )
    producer = server.producer
    pids = wait_full(server, 2)
    assert started == [producer]
    assert sorted(events.read_text().splitlines()) == [
        f"post_fork {n} {pid}" for n, pid in sorted((w["number"], w["pid"]) for w in producer.stats()["workers"])
    ]
    producer.reload()
    assert wait_for(lambda: reloads == [producer] and not set(pids) & set(producer.worker_pids()), 10)
    new = wait_full(server, 2)
    producer.stop(graceful=True, timeout=15)
    lines = events.read_text().splitlines()
    exited = {int(line.split()[2]) for line in lines if line.startswith("worker_exit")}
    forked = {int(line.split()[2]) for line in lines if line.startswith("post_fork")}
    assert forked == set(pids) | set(new)
    assert exited == forked  # every worker left cleanly: recycled by the reload, then stopped


def test_process_titles(serve):
    server = serve(handlers.faulty, processes=2)
    workers = {w["pid"]: w["number"] for w in server.producer.stats()["workers"]}
    for pid, number in workers.items():
        assert proctitle(pid) == f"gaspar: worker {number}"
    assert proctitle(server.fork_server) == "gaspar: fork server"


def test_lifecycle_log_lines(cli):
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "2")
    pids = server.wait_ready(2)
    numbers = {w["pid"]: w["number"] for w in server.stats()["workers"]}
    for pid, n in numbers.items():
        assert f"Booting worker {n} (pid:{pid})" in server.log
        assert f"Worker {n} (pid:{pid}) ready" in server.log
    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    line = f"Worker {numbers[victim]} (pid:{victim}) killed by SIGKILL. Perhaps out of memory?"
    assert wait_for(lambda: line in server.log, 5), server.log
    new = wait_for(lambda: [w for w in server.stats()["workers"] if w["pid"] not in pids], 5)
    assert new and f"Worker {numbers[victim]} (pid:{new[0]['pid']}) ready" in server.log
    assert sum(line in ln for ln in server.lines) == 1  # one line per event
    stats = json.loads(client.request(server.addr, b"", timeout=5, stats=True))
    assert stats["restarts"] == 1


def test_a_timeout_kill_is_logged_as_ours_not_as_out_of_memory(serve, caplog):
    caplog.set_level(logging.INFO, logger="gaspar")
    server = serve(handlers.sleepy, processes=1, timeout=0.5)
    with pytest.raises(gaspar.WorkerTimeout):
        server.request(b"5")
    assert wait_for(lambda: "because its handler ran past the timeout setting (0.5s)" in caplog.text, 5), caplog.text
    assert "Perhaps out of memory" not in caplog.text


def test_workers_run_below_the_front_end(serve):
    server = serve(handlers.pid, processes=1, worker_nice=7)
    (pid,) = server.pids()
    with open(f"/proc/{pid}/stat") as f:
        worker_nice = int(f.read().rsplit(")", 1)[1].split()[16])
    assert worker_nice == os.nice(0) + 7


def test_a_worker_that_crashes_leaves_its_stack_in_the_log(cli):
    """A handler that dies of a fatal signal (here a segfault in C) leaves its stack in the
    log (faulthandler in the worker, read by the fork server when it reaps the worker)."""
    server = cli("handlers:faulty", "--bind", "127.0.0.1:0", "-w", "1")
    server.wait_ready(1)
    with pytest.raises(gaspar.WorkerDied):
        client.request(server.addr, b"segfault-traced", timeout=10)
    assert wait_for(lambda: "crashed in:" in server.log, 5), server.log
    assert wait_for(lambda: "in faulty" in server.log, 5), server.log
    lines = server.log.splitlines()
    at = next(i for i, line in enumerate(lines) if "crashed in:" in line)
    stack = lines[at + 1 : at + 4]  # the stack's own lines, as the log's continuation lines
    assert len(stack) == 3 and all(line.startswith("    ") and "\\n" not in line for line in stack), stack
    assert wait_for(lambda: "killed by SIGSEGV" in server.log, 5), server.log
    assert server.log.index("crashed in:") < server.log.index("killed by SIGSEGV")  # stack, then the exit
    for _ in range(14):  # a crash loop: ten stacks a minute at most, not one each (QA: 12 MB in 30 s)
        server.wait_ready(1)
        with pytest.raises(gaspar.WorkerDied):
            client.request(server.addr, b"segfault-traced", timeout=10)
    time.sleep(0.5)
    assert server.log.count("crashed in:") == 10, server.log.count("crashed in:")
    server.wait_ready(1)


@pytest.mark.parametrize("how", ["sleep", "spin"])
def test_a_worker_killed_for_the_timeout_leaves_its_stack_in_the_log(cli, how):
    """Before the operator's timeout SIGKILLs a worker, its stack is logged (faulthandler,
    from C: a handler spinning in Python or blocked in a system call alike), so a hang
    leaves a traceback; the log names the limit that fired."""
    handler = "handlers:sleepy" if how == "sleep" else "handlers:spin_ms"
    payload = b"30" if how == "sleep" else b"30000"
    server = cli(handler, "--bind", "127.0.0.1:0", "-w", "1", "--timeout", "0.5")
    server.wait_ready(1)
    with pytest.raises(gaspar.WorkerTimeout):
        client.request(server.addr, payload, timeout=10)
    name = "sleepy" if how == "sleep" else "spin_ms"
    assert wait_for(lambda: "was running, before it was killed" in server.log, 5), server.log
    assert wait_for(lambda: f"in {name}" in server.log, 5), server.log
    assert "after 0.5s: the timeout setting" in server.log
    gone = "killed by SIGKILL because its handler ran past the timeout setting (0.5s)"
    assert wait_for(lambda: gone in server.log, 5), server.log  # the exit is logged once reaped
    dump = server.log.index("was running, before it was killed")
    killed = server.log.index(gone)
    assert dump < killed  # the stack first, then the kill
    server.wait_ready(1)
