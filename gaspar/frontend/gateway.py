"""The front end's side of remote workers: one ROUTER socket that agents join.

::

    agent ══[wid, head, body]══▶ remote ROUTER ──[rid+wid, head, body]──▶ the front end's
          ◀═[wid, head, body]═══                                          usual handling
    agent ══["", J/U/E/L + json]══▶ Gateway (joins, pongs, exits, leaves)
          ◀═["", W/N/T/K/G + json]═

A worker on another host is a :class:`gaspar.core.records.WorkerSlot` whose routing key is
its agent's connection id followed by the worker's own routing id, with ``agent`` set;
the dispatcher treats it as any other worker. Its replies are handed to the front end's
usual reply handling (``relay``), so fairness, prefetch, cancels, deadlines and timeouts
work the same across hosts. What this module adds is what only a remote pool needs: the
sessions (:class:`gaspar.core.agents.Agents`), heartbeats, and the loss of an agent.

**What a fault costs.** An agent silent past ``agent_liveness``, one whose connection
refuses a send (``ROUTER_MANDATORY``: the peer is gone; or its high-water mark is reached),
or one that joins again as a new session is *lost*: each request running on it fails
with ``WorkerLost`` (it may have run), requests handed ahead to it go back to the queue,
and its workers leave the pool. A worker that dies on an agent is reported by the agent
(``EXITED``, with its wait status) and costs its one request, as locally. Messages from an
ended session are counted (``stale``) and dropped, and the agent is told GONE.

**Bounds.** The port (CURVE or ``ipc://``, ``ZMQ_MAXMSGSIZE``, the keys read again on a
reload) is ``remoteport.py``'s. Here: :data:`MAX_FRAMES` frames a message, control messages
and HELLOs parsed within caps (``gaspar.core.agents``), worker slots per agent, and
:attr:`Gateway.BATCH` messages read per round: a flooding agent cannot hold the hub.

No eventlet here: the front end's rounds call :meth:`read`, its main loop :meth:`tick`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq
import zmq.utils.monitor

from gaspar.core.agents import (
    LEAVING,
    LEFT,
    LOST,
    MAX_CONTROL,
    Agent,
    Agents,
    Refused,
    count,
    parse_control,
    parse_hello,
    seconds,
    send_failed,
)
from gaspar.core.pool import describe_exit
from gaspar.core.records import Pending, WorkerSlot, draw_limit
from gaspar.errors import WorkerDied, WorkerLost
from gaspar.frontend import zmqfast
from gaspar.frontend.remoteport import RemotePort, peer_address
from gaspar.frontend.remotescale import RemoteScaling
from gaspar.ops.telemetry import LogLimiter
from gaspar.wire.envelope import Kind, Link, pack_id

log = logging.getLogger("gaspar")

_HELLO = Kind.HELLO.value
#: A message from an agent has at most this many frames ([rid, wid, head, body]); the rest
#: of a longer one is read and dropped.
MAX_FRAMES = 6


class Gateway:
    """Agents joining over ``settings.remote_bind``.

    Handed what it needs, nothing more: the dispatcher (to add and remove workers), and
    three callables of the front end: ``send(assignments)`` queues requests for workers,
    ``fail(request, error_class, message, **facts)`` answers a request with an error, and
    ``relay(frames)`` handles a worker's message ``[key, head, body]`` as a local one's.
    """

    BATCH = 64  # messages read per round at most

    def __init__(
        self,
        ctx: zmq.Context,
        settings: Any,
        dispatcher: Any,
        telemetry: Any,
        send: Callable[[list[tuple[WorkerSlot, Pending]]], None],
        fail: Callable[..., None],
        relay: Callable[[list[Any]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx, self.settings, self.dispatcher, self.telemetry = ctx, settings, dispatcher, telemetry
        self._send_work, self._fail, self._relay = send, fail, relay
        self.clock = clock
        self.agents = Agents(settings.agent_liveness, clock, max_workers=settings.max_agent_workers)
        self.port = RemotePort(ctx, settings)
        self.sock: zmq.Socket | None = None  # the port's, once open
        self.lost_requests = self.restarts = 0  # restarts: agents' workers that ended unexpectedly
        self._next_ping = 0.0
        self._reading = False
        self.malformed = 0
        self.oversize = 0  # control messages or HELLOs past their caps, refused unread
        self.hellos_refused = 0  # past an agent's worker slots
        self._log_limit = LogLimiter(burst=10, period=60.0)  # refusals and bad messages
        self._suspects: list[tuple[Agent, str]] = []  # sends failed: lose them once read
        self.scaling = RemoteScaling(settings, dispatcher, self._control)  # agents' MIN:MAX pools

    def open(self) -> str:
        """Bind the remote port (see :class:`gaspar.frontend.remoteport.RemotePort`)."""
        endpoint = self.port.open()
        self.sock = self.port.sock
        return endpoint

    @property
    def endpoint(self) -> str:
        return self.port.endpoint

    def fds(self) -> list[tuple[int, Callable[[int], None]]]:
        """The fds to watch, with what to do when one is ready."""
        return [(self.sock.fd, lambda _events: None), *self.port.fds()]  # the socket: read in the front end's round

    # -- to the agents --------------------------------------------------------------------

    def send_request(self, worker: WorkerSlot, head: bytes, body: Any) -> str | None:
        """A request for a remote worker. Returns None once sent, else why it could not be
        (the caller puts the request back in the queue, then has the agent lost)."""
        if not worker.agent.live:
            return "it was lost"
        sock = self.sock
        try:
            zmqfast.send(sock, worker.agent.rid, zmqfast.MORE_NOW)
            zmqfast.send(sock, worker.wid, zmqfast.MORE_NOW)
            zmqfast.send(sock, head, zmqfast.MORE_NOW)
            zmqfast.send(sock, body, zmqfast.NOW, len(body) < zmqfast.LARGE)
            return None
        except zmq.ZMQError as exc:
            return f"a send failed: {exc}"

    def tell(self, worker: WorkerSlot, head: bytes, body: Any = None) -> bool:
        """A message for a remote worker: EXIT, CANCEL or BROADCAST."""
        agent = worker.agent
        if not agent.live:
            return False
        frames = [agent.rid, worker.wid, head] + ([body] if body is not None else [])
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            self.unreachable(agent, exc)
            return False

    # -- acting on a worker (the supervisor has the same three for local ones) -----------

    def kill(self, worker: WorkerSlot, sig: int, why: str = "", dump: bool = False) -> None:
        """Have the agent signal one of its workers (a request ran past its timeout); with
        ``dump``, the agent logs its stack first, on its host."""
        if worker.agent.live:
            worker.kill_reason = why  # for its exit's log line
            self._control(worker.agent, Link.KILL, wid=worker.wid.decode(), sig=int(sig), dump=dump, why=why)

    def tell_exit(self, worker: WorkerSlot) -> None:
        """Ask an idle remote worker to exit cleanly (its agent forks a replacement)."""
        if not worker.told_exit:
            worker.told_exit = True
            self.tell(worker, Kind.EXIT.value)

    def broadcast(self, worker: WorkerSlot, message: bytes) -> bool:
        return self.tell(worker, Kind.BROADCAST.value + pack_id(0), message)

    def manage(self) -> None:
        """Retiring remote workers with nothing in hand (``max_requests``): tell them to exit."""
        for w in self.dispatcher.retiring_idle():
            if w.agent is not None and w.agent.state == "joined":
                self.tell_exit(w)

    def _control(self, agent: Agent | bytes, kind: Link, **body: Any) -> bool:
        rid = agent if isinstance(agent, bytes) else agent.rid
        try:
            self.sock.send_multipart([rid, b"", kind.value + json.dumps(body).encode()], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if not isinstance(agent, bytes):
                self.unreachable(agent, exc)
            return False

    def unreachable(self, agent: Agent, exc: Exception | str) -> None:
        """A send to ``agent`` failed: its connection is gone (or past the high-water mark).
        What it sent before may still wait on the socket (a LEAVE, a last reply): read that
        first, then lose it if it is still live."""
        self._suspects.append((agent, exc if isinstance(exc, str) else send_failed(getattr(exc, "errno", None), exc)))
        if not self._reading:
            self.read()

    # -- from the agents --------------------------------------------------------------------

    def read(self) -> int:
        """Handle the messages waiting on the remote socket, :attr:`BATCH` at most; return
        how many there were (the caller reads again soon after a full batch)."""
        sock, n = self.sock, 0
        if sock is None or self._reading:
            return 0
        self._reading = True
        try:
            while n < self.BATCH:
                try:
                    frames = [zmqfast.recv(sock, zmqfast.NOW)]
                except zmq.Again:
                    break
                frame = zmqfast.recv(sock, zmqfast.NOW, False)  # a routing id is never alone
                frames.append(frame)
                while frame.more:  # (the socket's RCVMORE costs an enum lookup in pyzmq)
                    frame = zmqfast.recv(sock, zmqfast.NOW, False)
                    if len(frames) < MAX_FRAMES:
                        frames.append(frame)
                n += 1
                try:
                    self._on_message(frames)
                except Refused as exc:  # a rule an agent broke: counted, logged 10 times a minute
                    if exc.kind == "oversize":
                        self.oversize += 1
                    elif exc.kind == "malformed":
                        self.malformed += 1  # (past its slots: counted as hellos_refused)
                    self._refused(frames, str(exc))
                except Exception as exc:  # a peer's bad bytes: counted, logged 10 times a minute at most
                    self.malformed += 1
                    self._refused(frames, f"a malformed message ({type(exc).__name__}: {exc})")
        finally:
            self._reading = False
        while self._suspects:
            agent, why = self._suspects.pop(0)
            self.lose(agent, why)  # a no-op if it left meanwhile
        return n

    def _refused(self, frames: list[Any], why: str) -> None:
        agent = self.agents.get(frames[0]) if frames else None
        who = f"agent {agent.name}" if agent is not None else "a connection without a session"
        allowed, held = self._log_limit.allow()
        if allowed:
            log.warning("Refused a message from %s: %s (%s not logged)", who, why, held)

    def _on_message(self, frames: list[Any]) -> None:
        # ["", kind + json]: a control message; [wid, head, body]: a worker's, relayed
        if len(frames) < 3:
            raise Refused("malformed", f"a message of {len(frames)} frames")
        if len(frames[2]) > MAX_CONTROL:  # refused before a byte of it is copied or decoded
            raise Refused("oversize", f"a control message or head of {len(frames[2])} bytes (at most {MAX_CONTROL})")
        rid, wid, head = frames[0], frames[1].bytes, frames[2].bytes
        if not wid and head[:1] == Link.JOIN.value:
            return self._on_join(rid, parse_control(head)[1], frames[2])
        agent = self.agents.get(rid)
        if agent is None:  # from a session that ended (a late reply among them): never delivered
            if self.agents.note_stale(rid):
                self._control(rid, Link.GONE, reason="no such session (it ended); join again")
            return
        self.agents.heard(agent)  # any message renews its liveness
        if not wid:
            self._on_control(agent, *parse_control(head))
        elif head[:1] == _HELLO:
            if len(frames) < 4:
                raise Refused("malformed", "a worker HELLO without its payload")
            self._on_hello(agent, wid, frames[3].bytes)
        else:
            if head[:1] == Kind.REPLY.value:
                agent.done += 1
            self._relay([rid + wid, frames[2], *frames[3:]])

    def _on_join(self, rid: bytes, hello: dict[str, Any], frame: Any) -> None:
        user = ""
        if self.port.gatekeeper is not None:
            try:
                user = frame.get("User-Id")
            except zmq.ZMQError:
                user = ""
            if not user:  # cannot happen past the ZAP handler; refuse rather than guess
                self._control(rid, Link.REFUSE, reason="not authenticated")
                return
            if not self.port.gatekeeper.allows(user):  # removed by a reload, on a connection made before
                _, reason, _ = self.agents.refuse(f"the key {user!r} is no longer allowed")
                self._control(rid, Link.REFUSE, reason=reason)
                return
        agent, reason, replaced = self.agents.join(rid, hello, user)
        if replaced is not None:
            self._end(replaced, replaced.state, replaced.why)
        if agent is None:
            allowed, held = self._log_limit.allow()
            if allowed:
                log.warning("Refused an agent from %s: %s (%s not logged)", peer_address(frame), reason, held)
            self._control(rid, Link.REFUSE, reason=reason)
            return
        s = self.settings
        self._control(
            agent,
            Link.WELCOME,
            session=agent.session,
            heartbeat=s.heartbeat_interval,
            liveness=s.agent_liveness,
            max_message_size=s.max_message_size,  # a larger reply would cost the agent its connection
        )
        self._control(agent, Link.PING, t=self.clock())  # its round trip, known at once
        who = (agent.name, peer_address(frame), agent.host, agent.pid, agent.session)
        log.info("Agent %s joined from %s (%s, pid %s; session %s)", *who)

    def _on_hello(self, agent: Agent, wid: bytes, payload: bytes) -> None:
        if agent.state != "joined" or wid in agent.workers:
            return
        pid, number, generation, pool = parse_hello(payload)
        if len(wid) > 256:
            raise Refused("malformed", f"a worker routing id of {len(wid)} bytes")
        if not self.agents.may_add_worker(agent):
            self.hellos_refused += 1
            raise Refused(
                "slots",
                f"a worker HELLO past its slots ({len(agent.workers)} workers; its JOIN announced "
                f"{agent.announced}; max_agent_workers {self.agents.max_workers})",
            )
        s = self.settings
        limit = draw_limit(s.max_requests, s.max_requests_jitter)
        slot = WorkerSlot(pid, number, generation, agent.rid + wid, max_requests=limit, pool=pool)
        slot.agent, slot.wid = agent, wid
        agent.workers[wid] = slot
        log.info("Worker %s ready (pid:%s on %s)", slot.label, slot.pid, agent.host)
        self._send_work(self.dispatcher.add_worker(slot))

    def _on_control(self, agent: Agent, kind: bytes, body: dict[str, Any]) -> None:
        if kind == Link.PONG.value:
            t = seconds(body.get("t"))
            self.agents.pong(agent, -1.0 if t is None else t, body.get("usage"), body.get("waits"))
        elif kind == Link.EXITED.value:
            self._on_exited(agent, body)
        elif kind == Link.RETIRE.value:  # the agent reloads: this one goes once it is idle
            slot = agent.workers.get(str(body.get("wid", ""))[:256].encode())
            why = "memory" if body.get("why") == "memory" else "reload"
            if slot is not None and self.dispatcher.retire(slot.routing_id, why):
                self.tell_exit(slot)
        elif kind == Link.LEAVE.value:
            if body.get("final"):
                log.info("Agent %s left", agent.name)
                self._end(agent, LEFT, "it stopped")
                return
            log.info("Agent %s is leaving: no new requests go there", agent.name)
            agent.state = LEAVING
            for slot in agent.workers.values():
                self.dispatcher.retire(slot.routing_id, "scale")
            self._control(agent, Link.LEAVE)  # after every request sent to it: it may count now

    def _on_exited(self, agent: Agent, event: dict[str, Any]) -> None:
        slot = agent.workers.pop(str(event.get("wid", ""))[:256].encode(), None)
        if slot is None:
            return
        # why the agent killed it, if it says (its fork server died...): printable, 200 chars at most
        why = slot.kill_reason or "".join(c for c in str(event.get("why") or "")[:200] if c.isprintable())
        exitcode, sig, text = describe_exit(count(event.get("status"), 0, 0xFFFF) or 0, why)
        expected, reason = slot.exit_meaning(exitcode)
        req = self.dispatcher.remove_worker(slot.routing_id)
        if req is not None:
            msg = f"worker {slot.label} (pid {slot.pid} on {agent.host}) {text}"
            facts = {"pid": slot.pid, "exitcode": exitcode, "signal": sig, "agent": agent.name, "host": agent.host}
            self._fail(req, WorkerDied, msg, **facts)
        if agent.state == "joined":
            self.telemetry.restarted(slot.label, reason)
        if expected:
            log.info("Worker %s (pid:%s on %s) exited", slot.label, slot.pid, agent.host)
        else:
            self.restarts += 1
            log.error("Worker %s (pid:%s on %s) %s", slot.label, slot.pid, agent.host, text)
        self._send_work(self.dispatcher.dispatch())

    # -- liveness ---------------------------------------------------------------------------

    def tick(self) -> None:
        """Every 0.1 s: lose agents silent past the liveness limit; ping each one every
        ``heartbeat_interval``."""
        self.port.read_monitor()  # its fd wakes the hub only on a change: read it here too
        for agent in self.agents.overdue():
            silent = self.settings.agent_liveness
            self.lose(agent, f"silent {silent}s: host partitioned, frozen or crashed, or a big message on a slow link")
        now = self.clock()
        if now >= self._next_ping:
            self._next_ping = now + self.settings.heartbeat_interval
            for agent in self.agents.live():
                self._control(agent, Link.PING, t=now)  # a send that fails: unreachable()

    def lose(self, agent: Agent, why: str) -> None:
        """The agent is lost: fail what ran there (``WorkerLost``), requeue what waited."""
        if not agent.live:
            return
        log.error(
            "Agent %s on %s lost (%s); %s request(s) were running there", agent.name, agent.host, why, agent.busy()
        )
        self._end(agent, LOST, why)
        self._control(agent.rid, Link.GONE, reason=f"the front end lost this session: {why}")

    def _end(self, agent: Agent, state: str, why: str) -> None:
        if agent.live:
            self.agents.end(agent, state, why)
        lost = f"agent {agent.name} on {agent.host} was lost ({why}); the request may have run there"
        for slot in list(agent.workers.values()):
            req = self.dispatcher.remove_worker(slot.routing_id)
            if req is not None:
                agent.lost += 1
                self.lost_requests += 1
                facts = {"pid": slot.pid, "exitcode": None, "signal": None, "agent": agent.name, "host": agent.host}
                self._fail(req, WorkerLost, lost, **facts)
        agent.workers.clear()
        self._send_work(self.dispatcher.dispatch())

    def stop(self) -> None:
        """The front end is stopping: end every session (requests were failed already)."""
        for agent in self.agents.live():
            self._control(agent.rid, Link.GONE, reason="the front end is stopping")
            self._end(agent, LEFT, "the front end stopped")

    def close(self) -> None:
        self.port.close()
        self.sock = None

    def reload_keys(self) -> None:
        """Read ``curve_allow`` again (on the front end's reload): agents whose keys were
        added may join; a live agent whose key was removed or replaced is lost now (what
        ran there fails as ``WorkerLost``) and refused from then on."""
        revoked = self.port.reload_keys()
        for agent in self.agents.live():
            if agent.user in revoked:
                self.lose(agent, f"its key {agent.user!r} was removed from curve_allow")

    def snapshot(self) -> dict[str, Any]:
        a = self.agents
        return {
            **self.port.snapshot(),
            "agents_live": len(a.by_rid),
            "agents_lost": a.lost_total,
            "joins_refused": a.refused,
            "stale_messages": a.stale,
            "malformed_messages": self.malformed,
            "oversize_messages": self.oversize,
            "hellos_refused": self.hellos_refused,
            "requests_lost": self.lost_requests,
        }


__all__ = ["Gateway"]
