"""Workers on other hosts, over loopback: real agents (``gaspar worker``) joining a real
front end, real faults (kill -9, SIGSTOP), real CURVE handshakes. The same faults across a
veth pair between network namespaces are in test_remote_netns.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import handlers
import pytest
import zmq
from conftest import ROOT, wait_for

import gaspar
from gaspar.wire.envelope import Kind, Link

LIVENESS = 2.0
FAST = {"heartbeat_interval": 0.25, "agent_liveness": LIVENESS}
AGENT_FAST = ("--heartbeat-interval", "0.25", "--agent-liveness", str(LIVENESS), "--reconnect-max", "1")


def front(serve, processes: int = 0, **options):
    options = {"remote_bind": "tcp://127.0.0.1:*", "insecure": "curve_secret" not in options, **FAST, **options}
    s = serve(handlers.where, processes=processes, **options)
    s.remote = s.producer.gateway.endpoint
    return s


def joined(s, name: str | None = None, workers: int = 1, session_above: int = 0):
    """The agent ``name`` (any, if None) once it has joined with ``workers`` ready workers."""

    def ready():
        for a in s.producer.stats()["agents"]:
            if a["state"] == "joined" and (name is None or a["name"] == name) and a["session"] > session_above:
                if len([w for w in a["workers"] if w["state"] != "retiring"]) >= workers:
                    return a
        return None

    return wait_for(ready, 20, 0.05)


def start_agent(agent, s, name: str, workers: int = 2, *extra: str):
    return agent(
        "handlers:where", "--connect", s.remote, "--workers", str(workers), "--name", name, *AGENT_FAST, *extra
    )


def reply_pid(reply: bytes) -> int:
    return int(reply.split(b":", 1)[0])


def test_an_agent_on_this_host_joins_over_ipc_a_socket_only_this_user_can_reach(serve, agent, tmp_path):
    """--remote-bind ipc://PATH: a Unix socket 0600 in a directory 0700 (made if missing), no
    keys needed; an agent joins with --connect ipc://PATH. A directory others may enter is
    refused at start."""
    import stat

    path = tmp_path / "run" / "agents.sock"
    s = front(serve, remote_bind=f"ipc://{path}", insecure=False)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
    a = start_agent(agent, s, "local", 1)
    info = joined(s, "local", 1)
    assert info, a.log
    assert reply_pid(s.request(b"over ipc")) in {w["pid"] for w in info["workers"]}
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(OSError, match="mode 0700"):
        front(serve, remote_bind=f"ipc://{open_dir}/agents.sock")


def test_requests_are_answered_by_the_remote_pool(serve, agent):
    s = front(serve)
    a = start_agent(agent, s, "a1")
    info = joined(s, "a1", 2)
    assert info, a.log
    remote_pids = {w["pid"] for w in info["workers"]}
    assert info["host"] and info["rtt_ms"] is None or info["rtt_ms"] >= 0
    pids = {reply_pid(s.request(b"x%d" % i)) for i in range(20)}
    assert pids <= remote_pids and pids
    assert s.producer.worker_pids() == []  # no local workers
    stats = s.producer.stats()
    assert stats["agents"][0]["done"] == 20
    assert stats["remote"]["agents_live"] == 1
    big = os.urandom(5 * 1024 * 1024) + b"end"  # relayed by the agent as frames, not copied
    reply = s.request(big, timeout=30)
    assert reply.split(b":", 1)[1] == big and reply_pid(reply) in remote_pids


def test_an_agents_workers_min_max_grow_with_the_front_ends_queue_and_shrink_when_idle(serve, agent):
    """gaspar worker handlers:where --workers 1:2 (a 1.0 bytes handler): the front end,
    which holds the queue, tells the agent to grow under a closed loop, and to shrink after."""
    import threading

    s = front(serve, scale_up_after=0.3, scale_down_idle=1.0, queue_timeout=10)
    a = start_agent(agent, s, "a1", "1:2")
    info = joined(s, "a1", 1)
    assert info and info["autoscale"] == {"default": {"size": 1, "min": 1, "max": 2}}, a.log
    replies: list[bytes] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                replies.append(s.request(b"sleep:0.05"))
            except gaspar.Overloaded:
                pass

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        assert joined(s, "a1", 2), (s.producer.stats()["agents"], a.log)
        assert wait_for(lambda: len({reply_pid(r) for r in list(replies)}) == 2, 10, 0.05), "both workers serve"
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert wait_for(lambda: joined(s, "a1", 1)["autoscale"]["default"]["size"] == 1, 15), a.log
    # the front end shows the size it sent; the agent logs it once it has the SIZE
    assert wait_for(lambda: "Pool default: 2 -> 1 workers" in a.log, 5), a.log


def test_local_and_remote_workers_both_serve_at_once(serve, agent):
    s = front(serve, processes=1)
    start_agent(agent, s, "a1", 2)
    info = joined(s, "a1", 2)
    remote_pids = {w["pid"] for w in info["workers"]}
    local_pids = set(s.pids())
    out: list[bytes] = []

    def one(i):
        out.append(s.request(b"sleep:0.5:%d" % i))

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    took = time.monotonic() - t0
    pids = {reply_pid(r) for r in out}
    assert len(out) == 3
    assert pids & local_pids and pids & remote_pids, (pids, local_pids, remote_pids)
    assert took < 1.4, f"3 requests of 0.5 s on 3 workers took {took:.2f}s: one waited while a worker was idle"


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_lost_agent_costs_only_its_running_request(serve, agent, fault):
    s = front(serve, processes=1)
    a = start_agent(agent, s, "a1", 1)
    assert joined(s, "a1", 1), a.log
    result: dict = {}

    def long_request():
        t0 = time.monotonic()
        try:
            result["reply"] = s.request(b"sleep:10:long", timeout=30)
        except gaspar.GasparError as exc:
            result["error"] = exc
        result["took"] = time.monotonic() - t0

    # the agent's worker is the last to have become idle: the long request goes there
    t = threading.Thread(target=long_request)
    t.start()
    assert wait_for(lambda: s.producer.stats()["agents"][0]["busy"] == 1, 5)
    local = threading.Thread(target=lambda: result.setdefault("local", s.request(b"sleep:1:local")))
    local.start()
    assert wait_for(lambda: s.producer.stats()["running"] == 2, 5)
    hit = time.monotonic()
    a.signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    t.join(LIVENESS + 5)
    local.join(5)
    error = result.get("error")
    assert isinstance(error, gaspar.WorkerLost), result
    assert isinstance(error, gaspar.WorkerDied) and error.agent == "a1"
    assert "may have run" in str(error)
    lost_after = time.monotonic() - hit
    assert lost_after < LIVENESS + 1.0, f"WorkerLost after {lost_after:.2f}s"
    assert reply_pid(result["local"]) in s.pids()  # the local request was not touched
    assert reply_pid(s.request(b"after")) in s.pids()  # and the pool serves on, locally
    stats = s.producer.stats()
    assert stats["agents"][0]["state"] == "lost" and stats["agents"][0]["lost"] == 1
    assert stats["remote"]["requests_lost"] == 1
    if fault == "stop":  # thawed, it notices, kills its running handler, and joins again
        a.signal(signal.SIGCONT)
        info = joined(s, "a1", 1, session_above=1)
        assert info, a.log
        assert "because its request's session ended" in a.log and "Perhaps out of memory" not in a.log, a.log
        pids = {reply_pid(s.request(b"again%d" % i)) for i in range(10)}
        assert pids & {w["pid"] for w in info["workers"]} or pids <= set(s.pids())


def test_a_late_reply_from_an_ended_session_is_counted_and_dropped(serve):
    """A test-owned DEALER plays an agent whose session the front end ended while it ran a
    request: its reply, arriving late, must reach nobody."""
    s = front(serve, processes=1)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(s.remote)
        join = {"name": "fake", "host": "test", "instance": "i1", "pid": 1, "workers": 1}
        sock.send_multipart([b"", Link.JOIN.value + json.dumps(join).encode()])
        frames = _recv_until(sock, lambda f: f[0] == b"" and f[1][:1] == Link.WELCOME.value)
        hello = {"pid": 4242, "number": 1, "generation": 1, "token": 0}
        sock.send_multipart([b"w1", Kind.HELLO.value, json.dumps(hello).encode()])
        assert joined(s, "fake", 1)  # its worker is in the pool, the last to become idle
        result: dict = {}

        def ask():
            try:
                result["reply"] = s.request(b"to-fake", timeout=20)
            except gaspar.GasparError as exc:
                result["error"] = exc

        # the fake agent's worker is the last to have become idle: the request goes there
        t = threading.Thread(target=ask)
        t.start()
        frames = _recv_until(sock, lambda f: f[0] == b"w1" and f[1][:1] == Kind.REQUEST.value)
        request_head = frames[1]
        # now silent (no PONG): the front end loses the session within the liveness limit
        t.join(LIVENESS + 3)
        assert isinstance(result.get("error"), gaspar.WorkerLost), result
        stale = s.producer.stats()["remote"]["stale_messages"]
        sock.send_multipart([b"w1", Kind.REPLY.value + request_head[1:9] + b"\x00", b"late reply"])
        assert wait_for(lambda: s.producer.stats()["remote"]["stale_messages"] > stale, 5)
        gone = _recv_until(sock, lambda f: f[0] == b"" and f[1][:1] == Link.GONE.value)
        assert b"lost this session" in gone[1] or b"join again" in gone[1]
        assert reply_pid(s.request(b"next")) in s.pids()  # nobody got "late reply"
        assert s.producer.stats()["counters"]["unknown_replies"] == 0
    finally:
        sock.close(0)
        ctx.term()


def _recv_until(sock, match, timeout: float = 10.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if frames[0] == b"" and frames[1][:1] == Link.PING.value:
                continue
            if match(frames):
                return frames
    raise AssertionError("no such message from the front end")


def test_a_remote_worker_that_dies_costs_one_request_and_is_replaced(serve, agent):
    s = front(serve)
    start_agent(agent, s, "a1", 1)
    first = joined(s, "a1", 1)["workers"][0]["pid"]
    with pytest.raises(gaspar.WorkerDied) as err:
        s.request(b"die")
    assert not isinstance(err.value, gaspar.WorkerLost)
    assert err.value.pid == first and err.value.exitcode == 7
    assert wait_for(lambda: (joined(s, "a1", 1) or {}).get("workers", [{}])[0].get("pid") not in (None, first), 10)
    assert reply_pid(s.request(b"fine")) != first
    stats = s.producer.stats()
    assert stats["agents"][0]["session"] == 1  # the agent itself was not lost
    assert stats["restarts"] == 1  # QA: the top-level count missed agents' workers


def test_a_remote_handler_past_its_timeout_is_killed_and_replaced(serve, agent):
    s = front(serve, timeout=1)
    a = start_agent(agent, s, "a1", 1)
    first = joined(s, "a1", 1)["workers"][0]["pid"]
    with pytest.raises(gaspar.WorkerTimeout):
        s.request(b"sleep:5:slow")
    again = joined(s, "a1", 1)
    assert wait_for(lambda: (joined(s, "a1", 1) or {}).get("workers", [{}])[0].get("pid") not in (None, first), 10)
    assert reply_pid(s.request(b"fine")) != first
    assert s.producer.stats()["agents"][0]["state"] == "joined" and again
    # the agent's log says why its worker was killed: the front end's reason, not a guess
    assert wait_for(lambda: f"(pid:{first}) killed by SIGKILL because" in a.log, 5), a.log
    assert "Perhaps out of memory" not in a.log


def test_an_agent_leaves_gracefully_on_sigterm(serve, agent):
    s = front(serve, processes=1)
    a = start_agent(agent, s, "a1", 1)
    assert joined(s, "a1", 1)
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("reply", s.request(b"sleep:1:remote", timeout=10)))
    t.start()
    assert wait_for(lambda: s.producer.stats()["agents"][0]["busy"] == 1, 5)
    a.signal(signal.SIGTERM)
    t.join(10)
    assert result.get("reply", b"").endswith(b"sleep:1:remote"), a.log  # it finished its request
    assert a.proc.wait(10) == 0
    assert wait_for(lambda: s.producer.stats()["agents"][0]["state"] == "left", 5)
    assert s.producer.stats()["remote"]["requests_lost"] == 0


def test_a_name_claimed_twice_is_refused(serve, agent):
    s = front(serve)
    first = start_agent(agent, s, "same", 1)
    info = joined(s, "same", 1)
    assert info, first.log
    second = start_agent(agent, s, "same", 1)
    assert wait_for(lambda: s.producer.stats()["remote"]["joins_refused"] >= 1, 10), second.log
    assert wait_for(lambda: "refused this agent" in second.log, 5), second.log
    stats = s.producer.stats()
    assert [a["name"] for a in stats["agents"] if a["state"] == "joined"] == ["same"]
    pids = {reply_pid(s.request(b"r%d" % i)) for i in range(10)}
    assert pids == {info["workers"][0]["pid"]}  # nothing ran on the second one


@pytest.fixture
def keys(tmp_path):
    """A front end's key pair, the allowed agents' public keys (a1, a2), and an unlisted
    agent's pair (rogue), all made with ``gaspar keygen``."""
    allow = tmp_path / "allow"
    for name, where in [("server", tmp_path), ("a1", tmp_path), ("a2", tmp_path), ("rogue", tmp_path)]:
        out = subprocess.run(
            [sys.executable, "-m", "gaspar", "keygen", name, "--dir", str(where)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
    assert os.stat(tmp_path / "a1.key_secret").st_mode & 0o777 == 0o600
    allow.mkdir()
    for name in ("a1", "a2"):
        (allow / f"{name}.key").write_bytes((tmp_path / f"{name}.key").read_bytes())
    return tmp_path


def curve_front(serve, keys, **options):
    return front(serve, curve_secret=str(keys / "server.key_secret"), curve_allow=str(keys / "allow"), **options)


def curve_args(keys, name: str) -> tuple[str, ...]:
    return ("--curve-secret", str(keys / f"{name}.key_secret"), "--curve-server", str(keys / "server.key"))


def test_curve_lets_a_listed_agent_in(serve, agent, keys):
    s = curve_front(serve, keys)
    a = start_agent(agent, s, "a1", 1, *curve_args(keys, "a1"))
    info = joined(s, "a1", 1)
    assert info, a.log
    assert info["user"] == "a1"
    assert reply_pid(s.request(b"secret")) == info["workers"][0]["pid"]
    assert s.producer.stats()["remote"]["curve"] is True
    big = os.urandom(3 * 1024 * 1024)  # crosses encrypted both ways, whole
    assert s.request(big, timeout=30).split(b":", 1)[1] == big
    # without --name, an agent joins as its key's NAME (the README's set-up)
    b = agent("handlers:where", "--connect", s.remote, "--workers", "1", *AGENT_FAST, *curve_args(keys, "a2"))
    assert joined(s, "a2", 1), b.log


def test_curve_refuses_unlisted_keys_plain_clients_and_borrowed_names(serve, agent, keys):
    s = curve_front(serve, keys, processes=1)
    rogue = start_agent(agent, s, "rogue", 1, *curve_args(keys, "rogue"))
    plain = start_agent(agent, s, "plain", 1)  # no CURVE at all
    liar = start_agent(agent, s, "a1", 1, *curve_args(keys, "a2"))  # a2's key, a1's name
    wrong = [*curve_args(keys, "a2")[:2], "--curve-server", str(keys / "a1.key")]  # not the server's key
    lost = start_agent(agent, s, "a2", 1, *wrong)
    t0 = time.monotonic()
    time.sleep(6)
    stats = s.producer.stats()
    assert stats["agents"] == [], stats["agents"]  # nobody joined
    refused = stats["remote"]["handshakes_refused"]
    assert refused >= 1, rogue.log
    # the refused agent knocks again, but boundedly: its back-off is capped at 1 s here
    # (--reconnect-max 1) and libzmq's own reconnects at 1 s
    assert refused <= 4 * (time.monotonic() - t0), f"{refused} refused handshakes in 6 s: a reconnect storm"
    assert stats["remote"]["joins_refused"] >= 1, liar.log
    # the plain agent's failed handshakes are seen too (libzmq's socket monitor)
    assert stats["remote"]["handshakes_failed"] > refused, stats["remote"]
    assert "is not the one this key was issued for" in liar.log or "refused" in liar.log, liar.log
    for a in (rogue, plain, liar, lost):
        assert "Joined" not in a.log, a.log
    # each agent's log says what to check (from libzmq's events on its connection)
    assert "refused this agent's CURVE key: is its NAME.key in the front end's --curve-allow?" in rogue.log
    assert "the front end uses CURVE (give --curve-secret and --curve-server)" in plain.log, plain.log
    assert "is --curve-server the front end's public key" in lost.log, lost.log
    pids = {reply_pid(s.request(b"r%d" % i)) for i in range(5)}
    assert pids <= set(s.pids())  # every request ran locally
    assert plain.proc.poll() is None  # it keeps trying, without a storm


def test_an_agent_with_a_wrong_server_key_knocks_at_its_own_pace_and_says_why_at_once(serve, agent, keys, caplog):
    """QA: such an agent's libzmq retried the handshake every second or so underneath the
    agent's back-off (0.6 failed handshakes a second against a cap of 5 s), and the front end
    said "no CURVE, or another mechanism". The agent now drops the link at the failure."""
    s = curve_front(serve, keys, processes=1)
    wrong = [*curve_args(keys, "a2")[:2], "--curve-server", str(keys / "a1.key")]  # not the server's key
    lost = start_agent(agent, s, "a2", 1, *wrong, "--reconnect-max", "4")
    assert wait_for(lambda: "joining again in" in lost.log, 2), lost.log  # at once, not after liveness
    time.sleep(8)
    failed, knocks = s.producer.stats()["remote"]["handshakes_failed"], lost.log.count("joining again in")
    assert 3 <= knocks and failed <= knocks + 1, (failed, knocks, lost.log)
    assert "is --curve-server the front end's public key" in lost.log, lost.log
    assert "its CURVE hello does not open with this front end's key" in caplog.text, caplog.text[-2000:]


def test_a_reload_reads_the_allowed_keys_again(serve, agent, keys):
    """A key added to --curve-allow lets its agent in at the front end's reload, with no
    restart; a removed key's live agent is lost at once and refused from then on; a
    directory that cannot be read at a reload keeps the keys in force."""
    allow = keys / "allow"
    (allow / "a2.key").unlink()
    s = curve_front(serve, keys, processes=1)
    a1 = start_agent(agent, s, "a1", 1, *curve_args(keys, "a1"))
    a2 = start_agent(agent, s, "a2", 1, *curve_args(keys, "a2"))
    assert joined(s, "a1", 1), a1.log
    assert wait_for(lambda: s.producer.stats()["remote"]["handshakes_refused"] >= 1, 10), a2.log
    assert s.producer.stats()["remote"]["keys_allowed"] == 1

    (allow / "a2.key").write_bytes((keys / "a2.key").read_bytes())
    (allow / "a1.key").unlink()
    s.producer.reload()
    info = joined(s, "a2", 1)
    assert info, a2.log

    def a1_state():
        return [(a["state"], a["why"]) for a in s.producer.stats()["agents"] if a["name"] == "a1"]

    assert wait_for(lambda: ("lost", "its key 'a1' was removed from curve_allow") in a1_state(), 5), a1_state()
    assert wait_for(lambda: "Lost the front end" in a1.log, 10), a1.log
    time.sleep(2.5)  # a1 knocks again (--reconnect-max 1) and is refused each time
    assert [state for state, _ in a1_state()].count("joined") == 0, a1_state()
    assert a1.proc.poll() is None and "Joined" in a1.log and a1.log.count("Joined") == 1, a1.log
    remote = {w["pid"] for w in info["workers"]}
    assert {reply_pid(s.request(b"k%d" % i)) for i in range(8)} <= remote | set(s.pids())
    assert s.producer.stats()["remote"]["keys_allowed"] == 1

    allow.rename(keys / "elsewhere")  # a reload now cannot read the directory
    s.producer.reload()
    time.sleep(1)
    assert s.producer.stats()["remote"]["keys_allowed"] == 1
    assert joined(s, "a2", 1)["session"] == info["session"]  # a2 is untouched


def test_an_agent_that_cannot_reach_the_front_end_says_so(agent):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = agent("handlers:where", "--connect", f"tcp://127.0.0.1:{port}", "--workers", "1", *AGENT_FAST)
    assert wait_for(lambda: "Lost the front end" in a.log, 10), a.log
    assert f"cannot reach tcp://127.0.0.1:{port}: is the front end up, and is this its --remote-bind?" in a.log
    assert a.proc.poll() is None  # it keeps trying


def test_settings_refuse_a_tcp_remote_bind_without_curve_loopback_included():
    for bind in ("tcp://0.0.0.0:10124", "tcp://127.0.0.1:10124", "tcp://[::1]:10124", "tcp://localhost:1"):
        with pytest.raises(ValueError, match="without CURVE: anyone who can connect to it, loopback included"):
            gaspar.Settings(remote_bind=bind)
        gaspar.Settings(remote_bind=bind, insecure=True)
    gaspar.Settings(remote_bind="ipc:///run/gaspar/agents.sock")  # a Unix socket: no CURVE needed
    for bad in ("ipc://", "udp://1.2.3.4:5", "127.0.0.1:5"):
        with pytest.raises(ValueError, match="remote_bind"):
            gaspar.Settings(remote_bind=bad)
    with pytest.raises(ValueError, match="go together"):
        gaspar.Settings(remote_bind="tcp://127.0.0.1:1", curve_secret="x")
    with pytest.raises(ValueError, match="at least 1"):
        gaspar.Producer(handlers.echo, 0, processes=0)


def test_agents_show_in_metrics_top_and_stats(serve, agent):
    from test_metrics import scrape, value

    from gaspar.ops import top

    s = front(serve, processes=1, metrics_bind="127.0.0.1:0")
    start_agent(agent, s, "a1", 2)
    assert joined(s, "a1", 2)
    for i in range(6):
        s.request(b"m%d" % i)
    assert wait_for(lambda: s.producer.stats()["agents"][0]["rtt_ms"] is not None, 5)

    # CPU and memory of the agent and its workers, read on its host, come with each pong
    def reported(a):  # a pong since each of its workers said HELLO
        return a["rss_bytes"] and all(w["rss_bytes"] for w in a["workers"])

    a1 = wait_for(lambda: next((a for a in s.producer.stats()["agents"] if reported(a)), None), 5)
    assert a1 and a1["rss_bytes"] > 1_000_000 and a1["cpu_seconds"] > 0, a1
    assert all(w["rss_bytes"] > 1_000_000 and w["cpu_seconds"] >= 0 for w in a1["workers"]), a1["workers"]
    assert a1["cpu_wait_seconds"] >= 0 and all(w["cpu_wait_seconds"] >= 0 for w in a1["workers"]), a1
    m = scrape(s.producer.metrics_addr)  # parsed by prometheus_client's own parser
    for w in a1["workers"]:
        number = str(w["number"])
        assert value(m, "gaspar_agent_worker_resident_memory_bytes", agent="a1", worker=number) > 1_000_000
        assert value(m, "gaspar_agent_worker_cpu_seconds_total", agent="a1", worker=number) >= 0
        assert value(m, "gaspar_agent_worker_cpu_wait_seconds_total", agent="a1", worker=number) >= 0
    assert value(m, "gaspar_agent_resident_memory_bytes", agent="a1") > 1_000_000
    assert value(m, "gaspar_agents", state="joined") == 1
    assert value(m, "gaspar_agents", state="lost") == 0
    assert value(m, "gaspar_agent_workers", agent="a1") == 2
    assert value(m, "gaspar_agent_busy", agent="a1") == 0
    assert value(m, "gaspar_agent_rtt_seconds", agent="a1") > 0
    assert value(m, "gaspar_agent_events_total", event="agents_lost") == 0
    out = subprocess.run(
        [sys.executable, "-m", "gaspar", "top", s.addr, "--once", "--interval", "0.2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("a1@"))
    assert "session 1" in line and "joined" in line and "workers 2" in line, out.stdout
    assert "rss " in line and "rss -" not in line, out.stdout
    assert "agents on other hosts (1 live)" in out.stdout
    frame = top.render(None, s.producer.stats(), 1.0, width=40)
    assert all(len(line) <= 40 for line in frame)
    stats = json.loads(
        subprocess.run(
            [sys.executable, "-m", "gaspar", "stats", s.addr], cwd=ROOT, capture_output=True, timeout=30
        ).stdout
    )
    assert stats["agents"][0]["name"] == "a1" and stats["remote"]["agents_live"] == 1
    port = s.addr.rsplit(":", 1)[1]
    out = subprocess.run(
        [sys.executable, "-m", "gaspar", "ctl", "--port", port, "status"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "agent a1 on" in out.stdout and "2 workers, 0 busy" in out.stdout, out.stdout
    # with agents, `gaspar ctl scale 0` leaves the work to them
    out = subprocess.run(
        [sys.executable, "-m", "gaspar", "ctl", "--port", port, "scale", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "scaling to 0 workers" in out.stdout, (out.stdout, out.stderr)
    assert wait_for(lambda: not s.pids(), 10), s.producer.stats()["workers"]
    remote = {w["pid"] for w in joined(s, "a1", 2)["workers"]}
    assert {reply_pid(s.request(b"z%d" % i)) for i in range(6)} <= remote


def test_an_agent_ignores_sigttin_and_sigttou_and_says_so(serve, agent):
    """QA: they did nothing, silently; and their default action stops the process (in a
    process group that is not orphaned), which would have made a frozen, lost agent."""
    s = front(serve)
    a1 = start_agent(agent, s, "a1", 1)
    assert joined(s, "a1", 1), a1.log
    for sig in (signal.SIGTTIN, signal.SIGTTOU):
        a1.proc.send_signal(sig)
    assert wait_for(lambda: "SIGTTOU ignored: an agent runs --workers" in a1.log, 5), a1.log
    assert "SIGTTIN ignored" in a1.log
    assert reply_pid(s.request(b"still")) in {w["pid"] for w in joined(s, "a1", 1)["workers"]}


def test_gaspar_agents_lost_counts_agents_not_back(serve, agent):
    """QA: gaspar_agents{state="lost"} counted the ended sessions kept (the last 16), so an
    alert on it never cleared once the host was back. It counts the agents not back."""
    from test_metrics import scrape, value

    from gaspar.frontend.metrics_http import RENDER_EVERY

    s = front(serve, processes=1, metrics_bind="127.0.0.1:0")

    def states():
        time.sleep(RENDER_EVERY)  # a fresh render
        m = scrape(s.producer.metrics_addr)
        return {state: value(m, "gaspar_agents", state=state) for state in ("joined", "lost")}, m

    for _ in range(2):  # lost twice, back each time
        a1 = start_agent(agent, s, "a1", 1)
        assert joined(s, "a1", 1), a1.log
        a1.proc.kill()
        assert wait_for(lambda: s.producer.stats()["remote"]["agents_live"] == 0, 10)
        assert states()[0] == {"joined": 0, "lost": 1}
    a1 = start_agent(agent, s, "a1", 1)
    assert joined(s, "a1", 1), a1.log
    now, m = states()
    assert now == {"joined": 1, "lost": 0}, now
    assert value(m, "gaspar_agent_events_total", event="agents_lost") == 2


def test_an_agents_config_file_sets_its_hooks(serve, agent, tmp_path):
    """post_fork from the agent's --config runs in each of its workers (on its host)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    config = tmp_path / "agent_conf.py"
    config.write_text(
        "import os\n"
        "worker_nice = 0\n"
        "def post_fork(worker):\n"
        f"    open(os.path.join({str(marks)!r}, str(worker.pid)), 'w').write(str(worker.number))\n"
    )
    s = front(serve)
    a = start_agent(agent, s, "a1", 2, "--config", str(config))
    info = joined(s, "a1", 2)
    assert info, a.log
    assert {int(p) for p in os.listdir(marks)} >= {w["pid"] for w in info["workers"]}


def test_a_taken_remote_port_and_bad_agent_arguments_are_one_line_errors():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "gaspar", "serve", "handlers:echo", "--bind", "127.0.0.1:0", "-w", "1"]
            + ["--remote-bind", f"tcp://127.0.0.1:{port}", "--insecure", "--control-socket", "off"],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests")),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 1
    assert (
        out.stderr.splitlines()[-1] == f"gaspar: cannot bind remote_bind tcp://127.0.0.1:{port}: Address already in use"
    )
    for args, message in [
        (["--connect", "127.0.0.1:1"], "--connect takes tcp://HOST:PORT"),
        (["--connect", "tcp://127.0.0.1:1", "--curve-secret", "x"], "go together"),
        (["--connect", "tcp://127.0.0.1:1", "--curve-secret", "/nope", "--curve-server", "/nope"], "cannot read"),
        (["--connect", "tcp://127.0.0.1:1", "--workers", "0"], "--workers must be at least 1"),
        (["--connect", "tcp://127.0.0.1:1", "--workers", "3:1"], "--workers takes N or MIN:MAX, not '3:1'"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "gaspar", "worker", "gaspar.demo:echo", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    for bind in ("tcp://0.0.0.0:1", "tcp://127.0.0.1:1"):  # loopback is no trust boundary on a shared host
        out = subprocess.run(
            [sys.executable, "-m", "gaspar", "serve", "gaspar.demo:echo", "--remote-bind", bind],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 2 and "without CURVE" in out.stderr, out.stderr
        for fix in ("gaspar keygen", "ipc://PATH", "--insecure"):  # it says how to fix it
            assert fix in out.stderr


def kill_one(agents, rng):
    """A chaos move: SIGKILL an agent, and start a fresh one under its name."""
    name = rng.choice(sorted(agents))
    agents[name].signal(signal.SIGKILL)
    agents[name].proc.wait(10)
    agents[name] = agents.start(name)


class Agents(dict):
    """name -> AgentProcess, and how to start one (for chaos moves)."""

    def __init__(self, start):
        super().__init__()
        self.start = start


def run_chaos(s, start, moves, seconds: float = 10.0, calm=None) -> dict:
    """Six clients send unique requests for ``seconds`` while a move from ``moves``
    (name -> callable(agents, rng)), each in turn in a shuffled order, hits two agents
    every 0.5-1.5 s. Every reply must be
    its own request's; the only failures allowed are a lost agent's, a dying worker's and
    shedding. Afterwards (``calm`` undoes a lasting fault) both agents are back, nothing
    is left in flight, and the pool serves. Returns the tally of outcomes."""
    import random

    agents = Agents(start)
    for name in ("c1", "c2"):
        agents[name] = start(name)
    assert joined(s, "c1", 2) and joined(s, "c2", 2), s.producer.stats()["agents"]
    rng = random.Random(7)
    stop = time.monotonic() + seconds
    tally = {"ok": 0, "lost": 0, "died": 0, "shed": 0, "wrong": 0}
    wrong: list[str] = []
    lock = threading.Lock()

    def client(k: int):
        i = 0
        while time.monotonic() < stop:
            i += 1
            body = b"sleep:%.3f:%d-%d" % (rng.random() * 0.05, k, i)
            try:
                reply = s.request(body, timeout=15)
                outcome = "ok" if reply.split(b":", 1)[1] == body else "wrong"
                if outcome == "wrong":
                    wrong.append(f"{body!r} got {reply!r}")
            except gaspar.WorkerLost:
                outcome = "lost"
            except gaspar.WorkerDied:
                outcome = "died"
            except gaspar.ServerUnavailable:
                outcome = "shed"
            with lock:
                tally[outcome] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    # The moves come in shuffled rounds from their own generator (the clients' draws
    # interleave by timing): every move happens in every round, so a run can never
    # draw only harmless ones (a partition healed inside the liveness limit, say).
    plan = random.Random(11)
    rounds: list[str] = []
    while time.monotonic() < stop - 2:
        time.sleep(plan.uniform(0.5, 1.5))
        if not rounds:
            rounds = sorted(moves)
            plan.shuffle(rounds)
        moves[rounds.pop()](agents, plan)
    if calm is not None:
        calm(agents, plan)
    for t in threads:
        t.join(30)
    print("chaos tally:", tally, "handler_ms:", s.producer.stats()["overload"]["handler_ms"])
    assert not wrong, wrong[:5]
    assert tally["ok"] > 50, tally
    back = joined(s, "c1", 2) and joined(s, "c2", 2)
    assert back, json.dumps(s.producer.stats()["agents"]) + "".join(f"\n--- {n}\n{a.log}" for n, a in agents.items())
    assert wait_for(lambda: s.producer.stats()["pending"] == 0, 5)
    # no worker is left busy with a request that ended elsewhere, and the handler-time
    # estimate (which judges deadlines) is sane: both once went wrong after a lost agent
    assert wait_for(lambda: s.producer.stats()["running"] == 0, 5), s.producer.stats()
    assert s.producer.stats()["overload"]["handler_ms"] < 1000, s.producer.stats()["overload"]
    assert reply_pid(s.request(b"calm")) > 0
    return tally


def test_chaos_agents_killed_and_frozen_under_load(serve, agent):
    """Over loopback, everywhere: agents SIGKILLed and started again, or frozen (SIGSTOP)
    and thawed, at random under load; across a veth pair with partitions: test_remote_netns."""
    s = front(serve, processes=1)

    def start(name: str):
        return start_agent(agent, s, name, 2)

    frozen: list = []

    def freeze(agents, rng):
        if not frozen:
            victim = agents[rng.choice(sorted(agents))]
            victim.signal(signal.SIGSTOP)
            frozen.append(victim)

    def thaw(agents, rng):
        while frozen:
            victim = frozen.pop()
            if victim.proc.poll() is None:  # not killed meanwhile
                victim.signal(signal.SIGCONT)

    tally = run_chaos(s, start, {"kill": kill_one, "freeze": freeze, "thaw": thaw}, calm=thaw)
    assert tally["lost"] > 0, tally


def test_remote_workers_recycle_after_max_requests_and_take_broadcasts(serve, agent):
    s = front(serve, max_requests=3)
    a = agent("handlers:Stateful", "--connect", s.remote, "--workers", "1", "--name", "a1", *AGENT_FAST)
    first = joined(s, "a1", 1)
    assert first, a.log
    assert s.producer.broadcast(b"table2") == 1
    assert wait_for(lambda: s.request(b"x") == b"table2:x", 5)
    replies = [s.request(b"r%d" % i) for i in range(7)]  # past max_requests: recycled, none lost
    assert all(r.endswith(b":r%d" % i) for i, r in enumerate(replies))
    again = joined(s, "a1", 1)
    assert again["workers"][0]["pid"] != first["workers"][0]["pid"]
    assert s.producer.stats()["agents"][0]["session"] == 1 and s.producer.stats()["remote"]["requests_lost"] == 0


def test_agents_join_a_restarted_front_end_by_themselves(cli, agent):
    from conftest import free_port

    remote = f"tcp://127.0.0.1:{free_port()}"
    args = [
        "handlers:where",
        "--bind",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "0",
        "--remote-bind",
        remote,
        "--insecure",
    ]
    args += ["--heartbeat-interval", "0.25", "--agent-liveness", str(LIVENESS), "--control-socket", "off"]
    first = cli(*args)
    addr = first.wait_listening()
    a = agent("handlers:where", "--connect", remote, "--workers", "1", "--name", "a1", *AGENT_FAST)
    assert wait_for(lambda: any(x["state"] == "joined" for x in first.stats()["agents"]), 20), a.log
    pid = reply_pid(client_request(addr, b"one"))
    first.signal(signal.SIGTERM)
    assert first.wait(20) == 0
    second = cli(*args)
    second.wait_listening()
    t0 = time.monotonic()
    assert wait_for(lambda: any(x["state"] == "joined" for x in second.stats()["agents"]), 20), a.log
    rejoined = time.monotonic() - t0
    assert reply_pid(client_request(addr, b"two")) == pid  # the same worker: idle ones are kept
    assert rejoined < LIVENESS + 3, f"rejoined after {rejoined:.1f}s"
    assert a.proc.poll() is None


def client_request(addr: str, body: bytes) -> bytes:
    from gaspar import client

    return client.request(addr, body, timeout=10)


def test_agents_join_over_ipv6(serve, agent):
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    s = front(serve, remote_bind="tcp://[::1]:*")
    assert s.remote.startswith("tcp://[::1]:")
    a = start_agent(agent, s, "v6", 1)
    info = joined(s, "v6", 1)
    assert info, a.log
    assert reply_pid(s.request(b"six")) == info["workers"][0]["pid"]


def test_garbage_on_the_remote_socket_is_counted_and_the_pool_serves_on(serve, agent):
    s = front(serve, processes=1)
    a = start_agent(agent, s, "a1", 1)
    assert joined(s, "a1", 1), a.log
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(s.remote)
        bad = [
            [b"", b"Jnot json"],
            [b"", b"Jnull"],
            [b"", b"J[1, 2]"],
            [b"", b"J" + json.dumps({"name": "x" * 500, "instance": "i"}).encode()],  # refused
            [b"", b"U{}"],  # a pong from nobody: stale
            [b"w1", b"R"],  # a reply from nobody: stale
            [b""],  # too few frames
        ]
        for frames in bad * 20:
            sock.send_multipart(frames)
        good = {"name": "ok", "host": "h", "instance": "i9", "pid": 1, "workers": 1}
        sock.send_multipart([b"", Link.JOIN.value + json.dumps(good).encode()])
        sock.send_multipart([b"w1", Kind.HELLO.value, b"{not json"])  # a bad HELLO after a good JOIN
        assert _recv_until(sock, lambda f: f[0] == b"" and f[1][:1] == Link.WELCOME.value)
        remote = s.producer.stats()["remote"]
        assert wait_for(lambda: s.producer.stats()["remote"]["malformed_messages"] >= 60, 5), remote
        remote = s.producer.stats()["remote"]
        assert remote["joins_refused"] >= 20 and remote["stale_messages"] >= 40, remote
        assert reply_pid(s.request(b"still")) > 0
        assert [x["name"] for x in s.producer.stats()["agents"] if x["state"] == "joined"] == ["a1", "ok"]
    finally:
        sock.close(0)
        ctx.term()


def test_an_agent_tells_systemd_it_is_ready_once_joined_and_when_it_stops(serve, agent, tmp_path, monkeypatch):
    from test_sdnotify import Notifications

    s = front(serve)
    path = str(tmp_path / "notify.sock")
    notes = Notifications(path)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", path)  # for the agent started below
        a = start_agent(agent, s, "a1", 1)
        ready = notes.next(20)
        assert ready.get("READY") == "1" and ready["MAINPID"] == str(a.proc.pid), notes.seen
        assert "session 1" in ready["STATUS"]
        a.signal(signal.SIGTERM)
        stopping = notes.next(20)
        assert stopping.get("STOPPING") == "1" and "graceful" in stopping["STATUS"], notes.seen
        assert a.proc.wait(20) == 0
    finally:
        notes.close()


def test_an_agent_reloads_its_code_on_sighup_one_worker_at_a_time(serve, agent, tmp_path):
    """SIGHUP to an agent: a fresh fork server imports the new code, and each old worker is
    retired by the front end once idle, then replaced: requests keep flowing, none fails."""
    app = tmp_path / "agentapp.py"
    app.write_text("def handle(message):\n    return b'v1:' + message\n")
    s = front(serve)
    a = agent(
        "agentapp:handle", "--connect", s.remote, "--workers", "2", "--name", "a1", *AGENT_FAST, path=(str(tmp_path),)
    )
    before = joined(s, "a1", 2)
    assert before, a.log
    assert s.request(b"x") == b"v1:x"
    replies: list[bytes] = []
    errors: list[Exception] = []
    done = threading.Event()

    def load():
        while not done.is_set():
            try:
                replies.append(s.request(b"y"))
            except gaspar.GasparError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    app.write_text("def handle(message):\n    return b'v2:' + message\n")
    a.signal(signal.SIGHUP)

    def replaced():
        info = joined(s, "a1", 2) or {}
        pids = {w["pid"] for w in info.get("workers", [])}
        return len(pids) == 2 and not pids & {w["pid"] for w in before["workers"]} and s.request(b"z") == b"v2:z"

    ok = wait_for(replaced, 20, 0.1)
    done.set()
    for t in threads:
        t.join(10)
    assert ok, a.log
    assert not errors, errors[:3]
    assert set(replies) <= {b"v1:y", b"v2:y"} and b"v2:y" in replies
    assert s.producer.stats()["agents"][0]["session"] == 1  # the same session throughout
    assert "Reloaded; replacing the workers one by one (generation 2)" in a.log
    from conftest import descendants

    # the old fork server exits once its last worker is gone: one fork server, two workers
    assert wait_for(lambda: len(descendants(a.proc.pid)) == 3, 10), descendants(a.proc.pid)
    # a broken version is refused; the workers of the last good one serve on
    pids = {w["pid"] for w in joined(s, "a1", 2)["workers"]}
    app.write_text("def handle(message):\n    return b'v3:' + message\nthis is not python\n")
    a.signal(signal.SIGHUP)
    assert wait_for(lambda: "Reload failed; keeping the current workers" in a.log, 20), a.log
    assert s.request(b"w") == b"v2:w"
    assert {w["pid"] for w in joined(s, "a1", 2)["workers"]} == pids
    assert wait_for(lambda: len(descendants(a.proc.pid)) == 3, 10), descendants(a.proc.pid)


def test_requests_handed_ahead_to_a_lost_agent_go_to_other_workers(serve, agent):
    """Under load a busy remote worker is handed its next requests ahead (prefetch). When
    its agent is lost, only the running one fails; those handed ahead run elsewhere."""
    s = front(serve, processes=1)
    a = start_agent(agent, s, "a1", 1)
    assert joined(s, "a1", 1), a.log
    results: list = []
    lock = threading.Lock()

    def one(i):
        try:
            r = s.request(b"sleep:0.3:%d" % i, timeout=30)
        except gaspar.GasparError as exc:
            r = exc
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    assert wait_for(lambda: s.producer.stats()["agents"][0]["workers"][0]["prefetched"] >= 1, 5)
    a.signal(signal.SIGKILL)
    for t in threads:
        t.join(30)
    lost = [r for r in results if isinstance(r, gaspar.WorkerLost)]
    ok = [r for r in results if isinstance(r, bytes)]
    assert len(lost) == 1 and len(ok) == 9, results
    assert {reply_pid(r) for r in ok} & set(s.pids())


def test_a_handler_holding_the_gil_past_the_liveness_limit_does_not_look_like_a_dead_host(serve, agent):
    """Only the agent speaks to the network, and it runs no handler: a worker computing for
    longer than agent_liveness leaves the session alive and its reply comes back."""
    s = front(serve)
    start_agent(agent, s, "a1", 1)
    assert joined(s, "a1", 1)
    reply = s.request(b"spin:%.1f:busy" % (LIVENESS + 1.0), timeout=30)
    assert reply.endswith(b":spin:%.1f:busy" % (LIVENESS + 1.0))
    info = s.producer.stats()["agents"][0]
    assert info["state"] == "joined" and info["session"] == 1 and info["lost"] == 0
