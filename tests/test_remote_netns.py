"""Two hosts on one machine: the front end here, an agent in a network namespace of its own
joined by a veth pair. Faults a local ``waitpid`` never sees: the link taken down (a
partition, no FIN), the agent SIGKILLed, the agent frozen with SIGSTOP. Needs root (CI runs
as root); skipped elsewhere, saying why."""

from __future__ import annotations

import random
import signal
import threading
import time

import handlers
import netns
import pytest
from conftest import wait_for
from test_remote import AGENT_FAST, FAST, LIVENESS, joined, reply_pid

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
    """Clients send unique requests for 12 s while agents are SIGKILLed (and restarted) and
    the link to one is cut and restored at random. Every reply must be its own request's;
    the only failures allowed are the typed ones of a lost or dying worker, or shedding."""
    s = serve(handlers.where, processes=1, remote_bind=f"tcp://{veth.host_ip}:*", insecure=True, **FAST)
    endpoint = s.producer.gateway.endpoint

    def start(name: str):
        args = ("handlers:where", "--connect", endpoint, "--workers", "2", "--name", name, *AGENT_FAST)
        return agent(*args, popen=veth.popen)

    agents = {"c1": start("c1"), "c2": start("c2")}
    assert joined(s, "c1", 2) and joined(s, "c2", 2)
    rng = random.Random(7)
    stop = time.monotonic() + 12
    tally = {"ok": 0, "lost": 0, "died": 0, "shed": 0, "wrong": 0}
    errors: list[str] = []
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
                    errors.append(f"{body!r} got {reply!r}")
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
    down = False
    while time.monotonic() < stop - 2:
        time.sleep(rng.uniform(0.5, 1.5))
        move = rng.choice(["kill", "partition", "heal"])
        if move == "kill":
            name = rng.choice(sorted(agents))
            agents[name].signal(signal.SIGKILL)
            agents[name].proc.wait(10)
            agents[name] = start(name)  # a fresh agent under the same name
        elif move == "partition" and not down:
            veth.down()
            down = True
        elif down:
            veth.up()
            down = False
    if down:
        veth.up()
    for t in threads:
        t.join(30)
    print("chaos tally:", tally)
    assert not errors, errors[:5]
    assert tally["wrong"] == 0 and tally["ok"] > 50, tally
    # after the storm: both agents back, nothing left in flight, every request accounted for
    assert joined(s, "c1", 2) and joined(s, "c2", 2), s.producer.stats()["agents"]
    assert wait_for(lambda: s.producer.stats()["pending"] == 0, 5)
    assert reply_pid(s.request(b"calm")) > 0
