"""Two hosts on one machine: the front end here, an agent in a network namespace of its own
joined by a veth pair. Faults a local ``waitpid`` never sees: the link taken down (a
partition, no FIN), the agent SIGKILLed, the agent frozen with SIGSTOP. Needs root (CI runs
as root); skipped elsewhere, saying why."""

from __future__ import annotations

import signal
import threading
import time

import handlers
import netns
import pytest
from conftest import wait_for
from test_remote import AGENT_FAST, FAST, LIVENESS, joined, kill_one, reply_pid, run_chaos

import gaspar

REASON = netns.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def veth():
    with netns.Veth() as v:
        yield v


def two_hosts(serve, agent, veth, processes: int = 1, workers: int = 2, name: str = "far"):
    s = serve(handlers.where, processes=processes, remote_bind=f"tcp://{veth.host_ip}:*", insecure=True, **FAST)
    endpoint = s.producer.gateway.endpoint
    a = agent(
        "handlers:where",
        "--connect",
        endpoint,
        "--workers",
        str(workers),
        "--name",
        name,
        *AGENT_FAST,
        popen=veth.popen,
    )
    info = joined(s, name, workers)
    assert info, a.log
    return s, a, info


def test_two_hosts_serve_one_front_end(serve, agent, veth):
    s, a, info = two_hosts(serve, agent, veth)
    remote_pids = {w["pid"] for w in info["workers"]}
    local_pids = set(s.pids())
    assert not remote_pids & local_pids
    out: list[bytes] = []
    threads = [threading.Thread(target=lambda i=i: out.append(s.request(b"sleep:0.4:%d" % i))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    pids = {reply_pid(r) for r in out}
    assert pids & local_pids and pids & remote_pids
    stats = s.producer.stats()
    assert stats["agents"][0]["rtt_ms"] is not None


@pytest.mark.parametrize("fault", ["partition", "kill", "stop"])
def test_a_lost_host_costs_only_its_running_request(serve, agent, veth, fault):
    s, a, info = two_hosts(serve, agent, veth, workers=1)
    result: dict = {}

    def long_request():
        try:
            result["reply"] = s.request(b"sleep:10:long", timeout=30)
        except gaspar.GasparError as exc:
            result["error"] = exc

    t = threading.Thread(target=long_request)
    t.start()  # the agent's worker became idle last: the long request goes there
    assert wait_for(lambda: s.producer.stats()["agents"][0]["busy"] == 1, 5)
    hit = time.monotonic()
    if fault == "partition":
        veth.down()
    else:
        a.signal(signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
    local = [s.request(b"local%d" % i) for i in range(5)]  # the local worker serves meanwhile
    assert all(reply_pid(r) in s.pids() for r in local)
    t.join(LIVENESS + 5)
    assert isinstance(result.get("error"), gaspar.WorkerLost), result
    took = time.monotonic() - hit
    assert took < LIVENESS + 1.0, f"WorkerLost after {took:.2f}s"
    assert result["error"].agent == "far"
    stats = s.producer.stats()
    assert stats["agents"][0]["state"] == "lost" and stats["remote"]["requests_lost"] == 1
    if fault == "kill":
        return
    if fault == "partition":
        veth.up()
    else:
        a.signal(signal.SIGCONT)
    again = joined(s, "far", 1, session_above=info["session"])
    assert again, a.log
    pids = {reply_pid(s.request(b"again%d" % i, timeout=10)) for i in range(6)}
    assert pids & {w["pid"] for w in again["workers"]}, (pids, again)
    assert "long" not in str(s.producer.stats()["counters"])


def test_chaos_agents_killed_and_partitioned_under_load(serve, agent, veth):
    """Agents SIGKILLed (and started again) and the link to them cut and restored at
    random, under load: every reply is its own request's (see test_remote.run_chaos)."""
    s = serve(handlers.where, processes=1, remote_bind=f"tcp://{veth.host_ip}:*", insecure=True, **FAST)
    endpoint = s.producer.gateway.endpoint

    def start(name: str):
        args = ("handlers:where", "--connect", endpoint, "--workers", "2", "--name", name, *AGENT_FAST)
        return agent(*args, popen=veth.popen)

    state = {"down": False}

    def partition(_agents, _rng):
        if not state["down"]:
            veth.down()
            state["down"] = True

    def heal(_agents, _rng):
        if state["down"]:
            veth.up()
            state["down"] = False

    tally = run_chaos(s, start, {"kill": kill_one, "partition": partition, "heal": heal}, calm=heal)
    assert tally["lost"] > 0, tally
