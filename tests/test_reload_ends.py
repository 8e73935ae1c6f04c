"""Every reload ends, as ``gaspar ctl reload`` promises: one whose new code hangs at import
fails once its fork server is past the import bound (killed; the old workers serve; the
next reload is taken), and one of a front end with no worker of its own (``--workers 0``)
is done as soon as the new code has imported; an agent's hung import is bounded alike.
Real daemons, real fork servers."""

from __future__ import annotations

import os
import re
import signal

import pytest
from conftest import alive, wait_for
from test_ctl_limits import APP, gaspar_ctl
from test_remote import AGENT_FAST, front, joined
from test_supervision import Call

import gaspar
from gaspar import client
from gaspar.process.forks import IMPORT_BOUND_MIN, IMPORT_BOUND_NEVER, import_bound

HANGS = "import time\ntime.sleep(10**6)  # a network call that never answers\n" + APP


def start(cli, tmp_path, *args: str):
    """``app:handle`` from ``tmp_path`` with a control socket; the server and its path."""
    (tmp_path / "app.py").write_text(APP.format(version="v1"))
    path = str(tmp_path / "ctl.sock")
    server = cli("app:handle", "--bind", "127.0.0.1:0", "--control-socket", path, *args, cwd=tmp_path)
    return server, path


def test_a_reload_whose_import_hangs_fails_at_the_bound_and_the_next_one_is_taken(cli, tmp_path):
    server, path = start(cli, tmp_path, "-w", "1", "--timeout", "1")  # the bound: 10 s, its floor
    server.wait_ready(1)
    (tmp_path / "app.py").write_text(HANGS.format(version="v2"))
    done = gaspar_ctl(path, "--timeout", "15", "reload", timeout=20)
    assert done.returncode == 1, (done.stdout, done.stderr, server.log[-2000:])
    m = re.match(r"gaspar ctl: reload failed, the old workers stay: the new fork server \(pid:(\d+)\)", done.stderr)
    assert m and "had not imported app:handle after 10s" in done.stderr, done.stderr
    assert wait_for(lambda: not alive(int(m.group(1))), 5)  # killed, and reaped
    assert "Reload failed; keeping the current workers: the new fork server" in server.log
    status = gaspar_ctl(path, "status").stdout
    assert "under way" not in status and ": failed: the new fork server" in status, status
    assert client.request(server.addr, b"x", timeout=5) == b"v1:x"  # the old worker serves

    (tmp_path / "app.py").write_text(APP.format(version="v3"))  # fixed: the next reload is taken
    done = gaspar_ctl(path, "--timeout", "15", "reload", timeout=20)
    assert done.returncode == 0, (done.stderr, server.log[-2000:])
    assert "generation 2" in done.stdout and "already under way" not in server.log
    assert client.request(server.addr, b"x", timeout=5) == b"v3:x"


def test_a_reload_with_no_worker_here_ends_once_the_new_code_imports(cli, tmp_path):
    agents = tmp_path / "agents"
    agents.mkdir(mode=0o700)
    server, path = start(cli, tmp_path, "-w", "0", "--remote-bind", f"ipc://{agents}/a.sock")
    server.wait_listening()
    assert wait_for(lambda: os.path.exists(path), 10)
    (tmp_path / "app.py").write_text(APP.format(version="v2"))
    done = gaspar_ctl(path, "--timeout", "10", "reload", timeout=15)
    assert done.returncode == 0, (done.stderr, server.log[-2000:])
    assert done.stdout.startswith("reloaded app:handle: every worker runs the new code (generation 2"), done.stdout
    status = gaspar_ctl(path, "status").stdout
    assert "under way" not in status and "last reload " in status and ": ok" in status, status
    done = gaspar_ctl(path, "--timeout", "10", "reload", timeout=15)  # and the next one
    assert done.returncode == 0 and "generation 3" in done.stdout, (done.stdout, done.stderr)


def test_the_import_bound_is_the_timeout_setting_within_limits():
    class S:
        timeout: float | None = 30.0

    assert import_bound(S()) == 30.0
    S.timeout = 1.0
    assert import_bound(S()) == IMPORT_BOUND_MIN == 10.0
    for never in (0, None):
        S.timeout = never
        assert import_bound(S()) == IMPORT_BOUND_NEVER == 60.0


def test_an_agent_whose_reload_hangs_at_import_gives_it_up_and_takes_the_next(serve, agent, tmp_path):
    """The agent's pool shares the fork servers' hand-over (ForkServers), so the same bound."""
    app = tmp_path / "agentapp.py"
    app.write_text(APP.format(version="v1"))
    (tmp_path / "conf.py").write_text("timeout = 1\n")  # the bound: 10 s, its floor
    s = front(serve)
    args = ("--connect", s.remote, "--workers", "1", "--name", "a1", "--config", str(tmp_path / "conf.py"))
    a = agent("agentapp:handle", *args, *AGENT_FAST, path=(str(tmp_path),))
    assert joined(s, "a1", 1), a.log
    assert s.request(b"x") == b"v1:x"
    app.write_text(HANGS.format(version="v2"))
    a.signal(signal.SIGHUP)
    assert wait_for(lambda: "Reload failed" in a.log, 15), a.log[-2000:]
    assert "had not imported agentapp:handle after 10s (an import that hangs?); killed it" in a.log
    assert s.request(b"x") == b"v1:x"  # the old worker serves
    app.write_text(APP.format(version="v3"))
    a.signal(signal.SIGHUP)
    assert wait_for(lambda: s.request(b"x") == b"v3:x", 15), a.log[-2000:]
    assert "already under way" not in a.log


BOOT_FAILS = (
    "import gaspar\n\n"
    "def echo(m):\n    return b'{version}:' + m\n\n"
    "handle = gaspar.App(default=echo)\n\n"
    "@handle.setup()\n"
    "def connect():\n    raise RuntimeError('the database is down')  # in every new worker\n"
)


def test_a_reload_whose_workers_cannot_boot_fails_and_the_old_workers_serve_on(cli, tmp_path):
    """QA: such a reload flapped, gave up, and stopped a daemon that was serving (exit 3).
    Its new workers' failures now fail the reload: back to the old fork server, nothing lost."""
    server, path = start(cli, tmp_path, "-w", "2")
    server.wait_ready(2)
    pids = {w["pid"] for w in server.stats()["workers"]}
    (tmp_path / "app.py").write_text(BOOT_FAILS.format(version="v2"))
    done = gaspar_ctl(path, "--timeout", "30", "reload", timeout=40)
    assert done.returncode == 1, (done.stdout, done.stderr, server.log[-3000:])
    assert "reload failed, the old workers stay: the new code's workers failed to boot 5 times" in done.stderr
    assert "back to the old code" in done.stderr, done.stderr
    # the verdict names the error, not only the exit code (each worker said it before exiting)
    assert "(the last exited with code 3: its setup raised RuntimeError: the database is down)" in done.stderr
    assert "died before it was ready: exited with code 3: its setup raised RuntimeError" in server.log
    assert server.proc.poll() is None and "giving up" not in server.log
    assert {w["pid"] for w in server.stats()["workers"]} == pids  # the same old workers
    assert [client.request(server.addr, b"x", timeout=5) for _ in range(4)] == [b"v1:x"] * 4
    status = gaspar_ctl(path, "status").stdout
    assert ": failed: the new code's workers failed to boot" in status and "the database is down" in status, status
    killed = sorted(pids)[0]
    os.kill(killed, signal.SIGKILL)  # a replacement comes from the old code
    # Wait for its death to be seen, not only for two workers: until it is reaped, the dead
    # one is still counted, and a request handed to it fails WorkerDied (CI saw that race).
    seen = lambda: [w["pid"] for w in server.stats()["workers"] if w["state"] != "retiring"]  # noqa: E731
    assert wait_for(lambda: killed not in seen() and len(seen()) == 2, 10), server.log[-2000:]
    assert client.request(server.addr, b"y", timeout=5) == b"v1:y"

    (tmp_path / "app.py").write_text(APP.format(version="v3"))  # fixed: the next reload works
    done = gaspar_ctl(path, "--timeout", "30", "reload", timeout=40)
    assert done.returncode == 0, (done.stderr, server.log[-3000:])
    assert client.request(server.addr, b"x", timeout=5) == b"v3:x"
    assert server.proc.poll() is None


def test_an_agent_whose_reload_cannot_boot_goes_back_and_serves_on(serve, agent, tmp_path):
    app = tmp_path / "agentboot.py"
    app.write_text(APP.format(version="v1"))
    s = front(serve)
    args = ("--connect", s.remote, "--workers", "1", "--name", "a1")
    a = agent("agentboot:handle", *args, *AGENT_FAST, path=(str(tmp_path),))
    assert joined(s, "a1", 1), a.log
    app.write_text(BOOT_FAILS.format(version="v2"))
    a.signal(signal.SIGHUP)
    assert wait_for(lambda: "Reload failed" in a.log, 20), a.log[-2000:]
    assert "the new code's workers failed to boot 5 times" in a.log and "back to the old code" in a.log
    assert "code 3: its setup raised RuntimeError: the database is down)" in a.log  # said to the agent
    assert a.proc.poll() is None and "giving up" not in a.log
    assert [s.request(b"x") for _ in range(3)] == [b"v1:x"] * 3


def test_an_agent_whose_fork_server_dies_starts_a_fresh_one_and_serves_on(serve, agent, tmp_path, caplog):
    """The agent shares ForkServers.replace with the front end: its workers died with the
    fork server, each is reported to the front end (EXITED), and a fresh fork server forks
    their successors; the agent and its session live on."""
    from conftest import children_of

    app = tmp_path / "agentfs.py"
    app.write_text(APP.format(version="v1"))
    s = front(serve)
    a = agent(
        "agentfs:handle", "--connect", s.remote, "--workers", "2", "--name", "a1", *AGENT_FAST, path=(str(tmp_path),)
    )
    before = joined(s, "a1", 2)
    assert before, a.log
    old = {w["pid"] for w in before["workers"]}
    (fork_server,) = children_of(a.proc.pid)
    os.kill(fork_server, signal.SIGKILL)
    assert wait_for(lambda: "a fresh one" in a.log, 10), a.log[-2000:]

    def fresh():
        got = joined(s, "a1", 2)
        return got if got and not {w["pid"] for w in got["workers"]} & old else None

    assert wait_for(fresh, 20), a.log[-2000:]
    assert a.proc.poll() is None and s.request(b"x") == b"v1:x"
    assert f"its fork server (pid:{fork_server}) died" in a.log
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Worker a1/")]  # the front end's
    assert said and all(f"because its fork server (pid:{fork_server}) died" in m for m in said), said  # not "OOM?"


SLOW_BOOT = (
    "import time\n\nimport gaspar\n\n"
    "def echo(m):\n    time.sleep(float(m or b'0'))\n    return b'{version}:' + m\n\n"
    "handle = gaspar.App(default=echo)\n\n"
    "@handle.setup()\n"
    "def warm():\n    time.sleep(3)  # a slow start: the reload is under way meanwhile\n"
)


def test_the_old_fork_server_dying_during_a_reload_takes_its_workers_and_says_so(cli, tmp_path):
    """QA: the old fork server (the standby, during a reload) killed with its workers: their
    deaths went unnoticed, a running request hung to the 30 s timeout, and dead workers
    stayed in stats as retiring. They are now reported as killed because of it."""
    from conftest import children_of

    (tmp_path / "app.py").write_text(SLOW_BOOT.format(version="v1").replace("time.sleep(3)", "pass"))
    path = str(tmp_path / "ctl.sock")
    server = cli("app:handle", "--bind", "127.0.0.1:0", "--control-socket", path, "-w", "2", cwd=tmp_path)
    old = set(server.wait_ready(2))
    (old_fs,) = children_of(server.proc.pid)
    running = Call(server.addr, b"20")
    assert wait_for(lambda: server.stats()["running"] == 1, 5)
    (tmp_path / "app.py").write_text(SLOW_BOOT.format(version="v2"))
    assert gaspar_ctl(path, "reload", "--no-wait").returncode == 0
    assert wait_for(lambda: "Reloaded; replacing the workers" in server.log, 10)  # the new one imported
    os.kill(old_fs, signal.SIGKILL)  # the standby now, its workers booting the new code for 3 s
    err = running.join(10).error
    assert isinstance(err, gaspar.WorkerDied) and f"its fork server (pid:{old_fs}) died" in str(err), repr(err)
    assert running.elapsed < 8, running.elapsed

    def settled():
        pids = {w["pid"] for w in server.stats()["workers"]}
        return pids if len(pids) == 2 and not pids & old else None

    assert wait_for(settled, 20), server.stats()["workers"]
    assert client.request(server.addr, b"0", timeout=5) == b"v2:0"
    assert f"Fork server (pid:{old_fs}) exited, its workers with it" in server.log


def test_while_a_reload_tries_its_code_workers_that_leave_are_replaced_with_the_old(cli, tmp_path):
    """QA: during a reload whose workers boot slowly and then fail, old workers that died
    (or were recycled by max_requests) were not replaced: one worker for 98 s, or none for
    60 s. Until the new code is seen booting, the old fork server replaces them."""
    server, path = start(cli, tmp_path, "-w", "2")
    old = set(server.wait_ready(2))
    slow_fail = BOOT_FAILS.replace("def connect():\n", "def connect():\n    import time; time.sleep(2.5)\n")
    (tmp_path / "app.py").write_text(slow_fail.format(version="v2"))
    assert gaspar_ctl(path, "reload", "--no-wait").returncode == 0
    assert wait_for(lambda: "Reloaded; replacing the workers" in server.log, 10)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    replaced = wait_for(lambda: (p := set(server.wait_ready(2, 5))) and not p & old and p, 5)
    assert replaced and "Reload failed" not in server.log, server.log[-3000:]  # while it still tries
    assert [client.request(server.addr, b"x", timeout=5) for _ in range(3)] == [b"v1:x"] * 3  # the old code
    assert wait_for(lambda: "Reload failed" in server.log, 30), server.log[-3000:]
    assert "failed to boot 5 times" in server.log and server.proc.poll() is None
    assert client.request(server.addr, b"y", timeout=5) == b"v1:y"


GPU_APP = (
    "import os\n\nimport gaspar\n\napp = gaspar.App()\n\n"
    "@app.handler(pool='gpu', workers=1)\ndef infer():\n    return os.getpid()\n\n"
    "@app.handler(pool='gpu')\ndef crash():\n    os._exit(1)\n\n"
    "@app.setup('gpu')\ndef load():\n"
    "    if not os.path.exists({model!r}):\n        raise RuntimeError('the model file is missing')\n\n"
    "@app.handler\ndef ping():\n    return 'pong'\n"
)


def test_a_pool_whose_replacements_cannot_boot_backs_off_and_the_daemon_serves_on(cli, tmp_path):
    """QA: a pool's worker died, its model file had gone, its replacements failed setup, and
    flapping gave up: the serving daemon exited 3 ("did not start"), its healthy pool with
    it. A pool that has served now backs off and tries again; the others serve on, its
    calls get ServerUnavailable naming the failure, and it comes back with its file."""
    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    (tmp_path / "gpuapp.py").write_text(GPU_APP.format(model=str(model)))
    flaps = ("--flap-attempts", "2", "--flap-retry-in", "0.2", "--flap-max-retry", "1", "--queue-timeout", "0.5")
    server = cli("gpuapp:app", "--bind", "127.0.0.1:0", "-w", "1", *flaps, cwd=tmp_path)
    server.wait_ready(2)
    with client.Client(server.addr, timeout=10) as c:
        first = c.call("infer")
        model.unlink()
        with pytest.raises(gaspar.WorkerDied):
            c.call("crash")
        # its replacements fail setup, episode after episode, past flap_max_retry (1)
        assert wait_for(lambda: server.log.count("gpu are flapping") >= 3, 20), server.log[-3000:]
        assert server.proc.poll() is None, server.log[-3000:]
        assert "does not give up" in server.log and "giving up" not in server.log
        assert [c.call("ping") for _ in range(3)] == ["pong"] * 3  # the default pool serves on
        with pytest.raises(gaspar.ServerUnavailable) as info:
            c.call("infer")
        assert "keep failing to boot" in str(info.value) and "the model file is missing" in str(info.value)
        model.write_bytes(b"weights")  # back: the next try boots (the wait doubles, up to a minute)
        assert wait_for(lambda: "Worker" in server.log and _calls_ok(c), 20), server.log[-2000:]
        assert c.call("infer") != first  # a new worker
    assert server.proc.poll() is None


def _calls_ok(c) -> bool:
    try:
        c.call("infer")
        return True
    except gaspar.ServerUnavailable:
        return False


POOLS_APP = (
    "import os\n\nimport gaspar\n\napp = gaspar.App()\n\n"
    "@app.handler\ndef version():\n    return {version!r}\n\n"
    "@app.handler(pool='big', workers=1)\ndef big_version():\n    return {version!r}\n"
)
BIG_SETUP_FAILS = "\n@app.setup('big')\ndef load():\n    raise RuntimeError('the big model is missing')\n"


def test_a_reload_whose_setup_fails_in_one_pool_fails_and_every_pool_goes_back(cli, tmp_path):
    """QA: the new code booted in the default pool, its setup failed in another: the reload
    counted as proven, the failures as flapping, and the daemon gave up (exit 3). A reload
    is now proven once it boots in every pool; until then it may fail, and then every pool
    goes back to the old code, the new workers that did boot included."""
    (tmp_path / "pools.py").write_text(POOLS_APP.format(version="v1"))
    path = str(tmp_path / "ctl.sock")
    server = cli("pools:app", "--bind", "127.0.0.1:0", "-w", "1", "--control-socket", path, cwd=tmp_path)
    server.wait_ready(2)
    (tmp_path / "pools.py").write_text(POOLS_APP.format(version="v2") + BIG_SETUP_FAILS)
    done = gaspar_ctl(path, "--timeout", "30", "reload", timeout=40)
    assert done.returncode == 1, (done.stdout, done.stderr, server.log[-3000:])
    assert "failed to boot 5 times, none was ready in pool big" in done.stderr, done.stderr
    assert "the big model is missing" in done.stderr and "back to the old code" in done.stderr
    assert server.proc.poll() is None and "giving up" not in server.log
    with client.Client(server.addr, timeout=10) as c:
        assert c.call("big_version") == "v1"
        # the default pool's new worker, which booted, is replaced with the old code again
        assert wait_for(lambda: c.call("version") == "v1" and len(server.stats()["workers"]) == 2, 20)
        assert all(w["generation"] == 1 for w in server.stats()["workers"]), server.stats()["workers"]


def test_a_reload_that_changes_the_apps_handlers_or_pools_is_refused_and_says_restart(cli, tmp_path):
    """QA: a reload that added a handler said "every worker runs the new code", yet the new
    name got NoSuchHandler (the front end routes by the handlers it started with), and a
    handler moved to a new pool stayed in the old one. Such a reload now fails, saying
    what changed; one that keeps the handlers and their pools is taken."""
    (tmp_path / "pools.py").write_text(POOLS_APP.format(version="v1"))
    path = str(tmp_path / "ctl.sock")
    server = cli("pools:app", "--bind", "127.0.0.1:0", "-w", "1", "--control-socket", path, cwd=tmp_path)
    server.wait_ready(2)
    added = "\n@app.handler(pool='fresh', workers=1)\ndef newone():\n    return 1\n"
    (tmp_path / "pools.py").write_text(POOLS_APP.format(version="v2") + added)
    done = gaspar_ctl(path, "--timeout", "30", "reload", timeout=40)
    assert done.returncode == 1, (done.stdout, done.stderr, server.log[-3000:])
    assert "changes the App's handlers or pools (added newone)" in done.stderr, done.stderr
    assert "restart gaspar" in done.stderr
    moved = POOLS_APP.format(version="v2").replace("pool='big'", "pool='other'")
    (tmp_path / "pools.py").write_text(moved)
    done = gaspar_ctl(path, "--timeout", "30", "reload", timeout=40)
    assert done.returncode == 1 and "moved big_version (big -> other)" in done.stderr, done.stderr
    with client.Client(server.addr, timeout=10) as c:
        assert (c.call("version"), c.call("big_version")) == ("v1", "v1")  # the old code serves on
        (tmp_path / "pools.py").write_text(POOLS_APP.format(version="v3"))  # the same shape
        done = gaspar_ctl(path, "--timeout", "30", "reload", timeout=40)
        assert done.returncode == 0, (done.stderr, server.log[-3000:])
        assert (c.call("version"), c.call("big_version")) == ("v3", "v3")
    assert server.proc.poll() is None
