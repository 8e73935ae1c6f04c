"""gaspar.core.agents, pure: sessions, refusals, liveness and the reconnect back-off, on an
injected clock, as a table of cases."""

from __future__ import annotations

import json
import time

import pytest
import zmq

from gaspar.core.agents import (
    JOINED,
    LEFT,
    LOST,
    MAX_CONTROL,
    MAX_HELLO,
    REPLACED,
    Agents,
    Refused,
    parse_control,
    parse_hello,
    reconnect_delay,
)
from gaspar.core.records import WorkerSlot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hello(name="a1", instance="i1", **kw):
    return {"name": name, "instance": instance, "host": "h", "pid": 7, "workers": 2, **kw}


@pytest.fixture
def book():
    clock = Clock()
    return Agents(liveness=3.0, clock=clock), clock


@pytest.mark.parametrize(
    "message, user, refused",
    [
        (hello(), "", None),
        (hello(), "a1", None),  # CURVE: the key's name is the JOIN's
        (hello(name="a2"), "a1", "is not the one this key was issued for"),
        ({"instance": "i1"}, "", "needs a name"),
        (hello(name=""), "", "needs a name"),
        (hello(name="x" * 65), "", "needs a name"),
        (hello(instance=None), "", "needs a name"),
        (hello(workers=None), "", "announces its workers"),
        (hello(workers=0), "", "announces its workers"),
        (hello(workers=True), "", "announces its workers"),
        (hello(workers=1025), "", "max_agent_workers"),
        (hello(workers=1024), "", None),
        (hello(ranges={"work": [1, 2]}, sizes={"work": 1}), "", None),
        (hello(ranges={"work": [0, 3]}), "", "ranges"),  # MAX past the workers it announced
        (hello(ranges={"work": [2, 1]}), "", "ranges"),
        (hello(ranges={"work": [1]}), "", "ranges"),
        (hello(ranges={"work": "1:2"}), "", "ranges"),
        (hello(ranges={"": [1, 2]}), "", "ranges"),
        (hello(ranges=[["work", 1, 2]]), "", "ranges"),
        (hello(ranges={f"p{i}": [0, 1] for i in range(17)}), "", "ranges"),
    ],
)
def test_join_accepts_or_refuses_with_a_reason(book, message, user, refused):
    agents, _ = book
    agent, reason, replaced = agents.join(b"r1", message, user)
    assert replaced is None
    if refused is None:
        assert agent is not None and agent.state == JOINED and agent.session == 1 and reason == ""
        assert agent.user == user
    else:
        assert agent is None and refused in reason and agents.refused == 1


@pytest.mark.parametrize(
    "sizes, expected", [({"work": 2}, 2), ({}, 1), ({"work": 9}, 1), ({"work": "2"}, 1), ({"work": 0}, 1)]
)
def test_a_joins_pool_sizes_start_where_the_agent_is_and_stay_in_its_range(book, sizes, expected):
    agents, _ = book
    agent, _, _ = agents.join(b"r1", hello(workers=3, ranges={"work": [1, 3]}, sizes=sizes))
    assert agent.ranges == {"work": (1, 3)} and agent.sizes == {"work": expected}
    [row] = agents.snapshot()
    assert row["autoscale"] == {"work": {"size": expected, "min": 1, "max": 3}}


def test_a_name_held_by_another_live_agent_is_refused(book):
    agents, _ = book
    first, _, _ = agents.join(b"r1", hello(instance="i1"))
    agent, reason, _ = agents.join(b"r2", hello(instance="i2"))
    assert agent is None and "held by another live agent" in reason
    assert agents.get(b"r1") is first and first.state == JOINED


def test_the_same_process_joining_again_replaces_its_old_session(book):
    agents, _ = book
    first, _, _ = agents.join(b"r1", hello(instance="i1"))
    second, _, replaced = agents.join(b"r2", hello(instance="i1"))
    assert replaced is first and first.state == REPLACED and second.session == 2
    assert agents.get(b"r1") is None and agents.note_stale(b"r1") and agents.stale == 1
    assert agents.lost_total == 1


def test_a_peer_without_a_session_is_told_gone_once_a_second_however_much_it_sends(book):
    """Each message from a peer with no session is counted; it is answered GONE once a
    second at most, so a flood costs a count each, not an answer each."""
    agents, clock = book
    told = [agents.note_stale(b"flood") for _ in range(1000)]
    assert told[0] and not any(told[1:]) and agents.stale == 1000
    assert agents.note_stale(b"other")  # each peer its own second
    clock.now += 1.0
    assert agents.note_stale(b"flood") and not agents.note_stale(b"flood")


def test_a_join_on_the_same_connection_is_a_new_session(book):
    agents, _ = book
    first, _, _ = agents.join(b"r1", hello())
    second, _, replaced = agents.join(b"r1", hello())
    assert replaced is first and second.session == 2 and agents.get(b"r1") is second


def test_an_ended_name_may_join_again_from_another_process(book):
    agents, _ = book
    first, _, _ = agents.join(b"r1", hello(instance="i1"))
    agents.end(first, LOST, "silent")
    again, reason, _ = agents.join(b"r2", hello(instance="i2"))
    assert again is not None and reason == ""


def test_overdue_after_liveness_and_heard_renews(book):
    agents, clock = book
    a, _, _ = agents.join(b"r1", hello())
    clock.now += 3.0
    assert agents.overdue() == []  # exactly at the limit: not yet
    clock.now += 0.01
    assert agents.overdue() == [a]
    agents.heard(a)
    assert agents.overdue() == []
    agents.pong(a, clock.now - 0.004)
    assert a.rtt == pytest.approx(0.004)
    agents.pong(a, -1.0)  # a nonsense timestamp does not become a round trip
    assert a.rtt == pytest.approx(0.004)


def test_ended_sessions_are_kept_a_few_and_snapshot_shows_workers(book):
    agents, clock = book
    for i in range(20):
        a, _, _ = agents.join(b"r%d" % i, hello(name=f"n{i}", instance=f"i{i}"))
        agents.end(a, LEFT, "stopped")
    live, _, _ = agents.join(b"live", hello(name="live"))
    slot = WorkerSlot(4242, 1, 1, b"live" + b"w1")
    live.workers[b"w1"] = slot
    rows = agents.snapshot()
    assert len(rows) == 1 + 16
    assert rows[0]["name"] == "live" and rows[0]["slots"] == 1 and rows[0]["workers"][0]["pid"] == 4242
    assert rows[1]["name"] == "n19" and rows[1]["state"] == LEFT  # newest ended first
    assert agents.lost_total == 0  # leaving is not being lost


def test_a_pong_carries_the_usage_of_the_agent_and_its_known_workers_only(book):
    agents, clock = book
    a, _, _ = agents.join(b"r1", hello())  # pid 7
    a.workers[b"w1"] = WorkerSlot(4242, 1, 1, b"r1w1")
    usage = {
        "7": [0.5, 30_000_000],  # the agent itself
        "4242": [12.25, 50_000_000],  # its worker
        "999": [1.0, 1],  # not one of its processes: dropped
        "x": [1.0, 1],  # not a pid
        "4243": [True, 1],  # not figures
        "9" * 5000: [1.0, 1],  # not a pid either (and too long to parse)
    }
    agents.pong(a, clock.now, usage)
    assert a.usage == {7: (0.5, 30_000_000), 4242: (12.25, 50_000_000)}
    (row,) = agents.snapshot()
    assert row["cpu_seconds"] == 0.5 and row["rss_bytes"] == 30_000_000
    assert row["workers"][0]["cpu_seconds"] == 12.25 and row["workers"][0]["rss_bytes"] == 50_000_000
    for not_a_map in ([], "x", 5):
        agents.pong(a, clock.now, not_a_map)
        assert a.usage[4242] == (12.25, 50_000_000)  # ignored: the last figures stay
    for insane in ([1.0], [-1, 5], "12", [1.0, 2.0, 3.0], [float("inf"), 1]):
        agents.pong(a, clock.now, {"4242": insane})
        assert a.usage == {}, insane  # a pong replaces the figures: none sane, none shown
    (row,) = agents.snapshot()
    assert row["cpu_seconds"] is None and row["workers"][0]["rss_bytes"] is None
    agents.pong(a, clock.now)  # an older agent's pong, without usage: the figures stay
    assert a.usage == {}


def test_a_pong_carries_the_cpu_waits_of_the_agent_and_its_known_workers_only(book):
    agents, clock = book
    a, _, _ = agents.join(b"r1", hello())  # pid 7
    a.workers[b"w1"] = WorkerSlot(4242, 1, 1, b"r1w1")
    agents.pong(a, clock.now, None, {"7": 0.25, "4242": 3.5, "999": 1.0, "4243": True, "x": 1.0})
    assert a.waits == {7: 0.25, 4242: 3.5}
    (row,) = agents.snapshot()
    assert row["cpu_wait_seconds"] == 0.25 and row["workers"][0]["cpu_wait_seconds"] == 3.5
    for insane in (-1, "1", float("nan"), float("inf"), [1.0], None):
        agents.pong(a, clock.now, None, {"4242": insane})
        assert a.waits == {}, insane  # a pong replaces the figures: none sane, none shown
    agents.pong(a, clock.now, None, {"4242": 1.0})
    agents.pong(a, clock.now, {"4242": [1.0, 2]})  # an older agent's pong, or not Linux: they stay
    assert a.waits == {4242: 1.0}


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 4, 5, 10, 100])
@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999])
def test_reconnect_delay_doubles_jitters_and_is_capped(attempt, draw):
    delay = reconnect_delay(attempt, base=0.25, cap=5.0, rng=lambda: draw)
    step = min(5.0, 0.25 * 2 ** max(0, attempt - 1))
    assert step / 2 <= delay <= step
    assert delay <= 5.0
    if attempt >= 10:
        assert delay >= 2.5  # capped: a refused agent knocks at most once per 2.5 s


class _Events:
    """A fork server's handle as the agent reads it: the events it has to report."""

    def __init__(self, *events):
        self.events = list(events)

    def read_events(self):
        events, self.events = self.events, []
        return events


@pytest.mark.parametrize("hello_first", [True, False])
def test_an_agent_keeps_a_worker_whose_hello_outran_its_spawned_event(hello_first):
    """On a busy host a new worker can say HELLO before the agent has read its fork
    server's "spawned" event. It was once dropped as "reaped already": the worker sat
    unannounced for ever and the pool stayed one short (seen in a loaded test run)."""
    from gaspar.config import Settings
    from gaspar.core.pool import Booting
    from gaspar.process.agent import Agent

    agent = Agent(None, Settings(), "tcp://127.0.0.1:1", workers=1)
    agent.book.booting[1] = Booting(1, 1, 1)  # the fork it asked for, token 1
    spawned = _Events({"ev": "spawned", "pid": 4242, "token": 1, "number": 1, "generation": 1})
    hello = b'{"pid": 4242, "token": 1, "number": 1, "generation": 1}'
    if hello_first:
        agent.on_hello(b"4242:1", hello)
        agent.on_fork_server_events(spawned)
    else:
        agent.on_fork_server_events(spawned)
        agent.on_hello(b"4242:1", hello)
    w = agent.by_pid[4242]
    assert w.hello == hello and w.wid == b"4242:1" and agent.by_wid[b"4242:1"] is w
    assert agent.book.booting == {} and len(agent.by_pid) == 1  # nothing more to fork
    # a HELLO from a worker already reaped (its token long gone) is still dropped
    agent.on_hello(b"77:1", b'{"pid": 77, "token": 9, "number": 2, "generation": 1}')
    assert 77 not in agent.by_pid


@pytest.mark.parametrize(
    "seen, curve, says",
    [
        (set(), False, "cannot reach tcp://fe:1: is the front end up"),
        ({zmq.EVENT_CONNECT_RETRIED}, True, "cannot reach tcp://fe:1"),
        ({zmq.EVENT_CONNECTED}, False, "the handshake never finished"),
        ({zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED}, False, "no WELCOME came"),
        ({zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_FAILED_AUTH}, True, "refused this agent's CURVE key"),
        # libzmq reports a plain agent at a CURVE front end (and a wrong server key) as
        # either failure, depending on timing (both seen): what the agent is decides
        ({zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL}, False, "the front end uses CURVE"),
        ({zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}, False, "the front end uses CURVE"),
        ({zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL}, True, "is --curve-server the front end's public key, and does it use"),
        ({zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_CONNECT_RETRIED}, True, "is --curve-server the front end's"),
        # a refusal outranks what came after it (libzmq retries, and connects again)
        ({zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_SUCCEEDED}, True, "refused this agent's CURVE key"),
    ],
)
def test_an_agent_says_why_its_join_got_no_answer(seen, curve, says):
    from gaspar.process.uplink import join_trouble

    assert says in join_trouble(seen, curve, "tcp://fe:1")


# -- what an authenticated agent may send -----------------------------------------------------


@pytest.mark.parametrize(
    "message, parsed, refused",
    [
        (b"U" + json.dumps({"t": 1.5}).encode(), (b"U", {"t": 1.5}), None),
        (b"L", (b"L", {}), None),
        (b"Unot json", None, "malformed"),
        (b"Unull", None, "malformed"),
        (b"U[1, 2]", None, "malformed"),
        (b"U" + b" " * MAX_CONTROL, None, "oversize"),  # refused before it is decoded
    ],
)
def test_a_control_message_is_capped_then_parsed(message, parsed, refused):
    if refused is None:
        assert parse_control(message) == parsed
    else:
        with pytest.raises(Refused) as exc:
            parse_control(message)
        assert exc.value.kind == refused


@pytest.mark.parametrize(
    "payload, refused",
    [
        (b'{"pid": 5, "number": 1, "generation": 1, "token": 3}', None),
        (b'{"pid": 5, "number": 1}', "malformed"),
        (b'{"pid": -5, "number": 1, "generation": 1}', "malformed"),
        (b'{"pid": true, "number": 1, "generation": 1}', "malformed"),
        (b'{"pid": 5, "number": 1, "generation": 99999999999}', "malformed"),
        (b"[]", "malformed"),
        (b'{"pid": 5, "number": 1, "generation": 1, "pool": 7}', "malformed"),
        (b'{"pid": 5, "number": 1, "generation": 1, "pool": ""}', "malformed"),
        (b"{", "malformed"),
        (b'{"pid": 5, "number": 1, "generation": 1, "x": "' + b"y" * MAX_HELLO + b'"}', "oversize"),
    ],
)
def test_a_worker_hello_is_capped_then_checked(payload, refused):
    if refused is None:
        assert parse_hello(payload) == (5, 1, 1, "default")
    else:
        with pytest.raises(Refused) as exc:
            parse_hello(payload)
        assert exc.value.kind == refused


class Slot:
    def __init__(self, pid, retiring=False):
        self.pid, self.retiring = pid, retiring


def test_an_agent_holds_no_more_worker_slots_than_it_announced_plus_a_reloads_one():
    agents = Agents(liveness=3.0, clock=Clock(), max_workers=5)
    agent, _, _ = agents.join(b"r1", hello(workers=2))
    for i in range(3):  # two, and one more: a reload forks the new worker before an old one goes
        assert agents.may_add_worker(agent)
        agent.workers[b"w%d" % i] = Slot(100 + i)
    assert not agents.may_add_worker(agent)  # a fourth HELLO is refused
    agent.workers[b"w0"].retiring = True  # a retired one no longer counts against the announced
    assert agents.may_add_worker(agent)
    for i in range(3, 5):
        agent.workers[b"w%d" % i] = Slot(100 + i, retiring=True)
    assert len(agent.workers) == 5 and not agents.may_add_worker(agent)  # and never past max_agent_workers


def test_a_huge_pong_usage_is_read_for_the_agents_own_pids_only():
    clock = Clock()
    agents = Agents(liveness=3.0, clock=clock)
    agent, _, _ = agents.join(b"r1", hello(workers=1))
    agent.workers[b"w"] = Slot(8)
    usage = {str(i): [1.0, 2] for i in range(300_000)}
    usage["7"], usage["8"] = [3.5, 4096], [1.25, 1 << 20]
    start = time.monotonic()
    agents.pong(agent, clock.now, usage)
    assert time.monotonic() - start < 0.01  # two lookups, not 300,000
    assert agent.usage == {7: (3.5, 4096), 8: (1.25, 1 << 20)}
