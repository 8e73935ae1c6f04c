"""The agent's side of its session with the front end: join, keep alive, lose, rejoin.

A mixin of :class:`gaspar.process.agent.Agent` (the pool's side is there): one DEALER to the
front end's ``--remote-bind``, the session's state (``idle`` -> ``joining`` -> ``joined``
-> ``leaving``), the control messages (``gaspar.wire.envelope.Link``), and, while a JOIN waits,
libzmq's events on the connection, so a join that fails says why (:func:`join_trouble`).
The rules of a session (back-off, what the front end accepts) are ``gaspar.core.agents``'.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import zmq
import zmq.utils.monitor

from gaspar.core.agents import reconnect_delay
from gaspar.ops import sdnotify
from gaspar.ops.procstat import cpu_wait, proc_usage
from gaspar.version import __version__
from gaspar.wire.envelope import Link

log = logging.getLogger("gaspar")

#: The remote socket's high-water marks: far above what the front end keeps in flight to one
#: agent (its workers x (1 + prefetch) requests, and a few control messages), so a message
#: is never dropped at the mark; a send that still cannot go is a lost front end.
HWM = 100_000

#: What libzmq may say about the connection while a JOIN waits (see :func:`join_trouble`).
JOIN_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)

_FAILED = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_AUTH}


def join_trouble(seen: set[int], curve: bool, endpoint: str) -> str:
    """Why a JOIN got no answer, from the connection's events ``seen`` meanwhile (the most
    telling first): what an operator should check."""
    if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
        return "the front end refused this agent's CURVE key: is its NAME.key in the front end's --curve-allow?"
    if seen & {zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}:
        # libzmq says either for the same mistake, depending on timing: tell them apart by
        # what this agent is (a plain one only fails against a CURVE front end)
        if curve:
            return "the CURVE handshake failed: is --curve-server the front end's public key, and does it use CURVE?"
        return "the handshake failed: the front end uses CURVE (give --curve-secret and --curve-server)"
    if zmq.EVENT_HANDSHAKE_SUCCEEDED in seen:
        return "connected, but no WELCOME came: is the front end stopped (SIGSTOP) or overwhelmed?"
    if zmq.EVENT_CONNECTED in seen:
        return "connected, but the handshake never finished"
    return f"cannot reach {endpoint}: is the front end up, and is this its --remote-bind?"


class Uplink:
    """The session half of the agent; the attributes it uses are set by ``Agent.__init__``."""

    def keep_alive(self) -> None:
        """Join when it is time; lose the front end when it has been silent too long."""
        now = time.monotonic()
        if self.state == "idle" and now >= self.next_join and self.stop_mode is None:
            self.join()
        elif self.state == "joining" and self.read_monitor() & _FAILED:
            # at once, and the link closed: else libzmq retries the handshake every second or
            # so underneath this agent's back-off (QA: a wrong --curve-server, 0.6 a second)
            self.lose(join_trouble(self.seen, self.curve is not None, self.connect))
        elif self.state in ("joining", "joined", "leaving") and now - self.last_heard > self.liveness:
            silent = f"no word from the front end for {self.liveness}s"
            if self.state == "joining":
                silent += " after JOIN; " + join_trouble(self.read_monitor(), self.curve is not None, self.connect)
            self.lose(silent)

    def join(self) -> None:
        s = self.settings
        link = self.ctx.socket(zmq.DEALER)
        link.linger = 0
        link.sndhwm = link.rcvhwm = HWM
        link.ipv6 = "[" in self.connect  # tcp://[::1]:PORT
        link.heartbeat_ivl = max(1, int(s.heartbeat_interval * 1000))  # 0MQ's own, a backstop
        link.heartbeat_timeout = link.heartbeat_ttl = int(2 * self.liveness * 1000)
        link.reconnect_ivl, link.reconnect_ivl_max = 1000, int(self.reconnect_max * 1000)
        if self.curve is not None:
            from gaspar.ops.curve import secure_client

            secure_client(link, *self.curve)
        self.monitor, self.seen = link.get_monitor_socket(JOIN_EVENTS), set()
        link.connect(self.connect)
        self.link, self.state, self.last_heard = link, "joining", time.monotonic()
        self.attempt += 1
        hello = {"name": self.name, "host": self.host, "instance": self.instance, "pid": os.getpid()}
        # the most it may run (its pools of MIN:MAX workers at MAX), and those pools as they are
        most = self.target + sum(high - self.book.size(p) for p, (_, high) in self.ranges.items())
        ranges = {pool: list(bounds) for pool, bounds in self.ranges.items()}
        sizes = {pool: self.book.size(pool) for pool in self.ranges}
        self.send_control(Link.JOIN, workers=most, ranges=ranges, sizes=sizes, version=__version__, **hello)

    def lose(self, why: str) -> None:
        """The session is over: kill what was running, drop the connection, join again later."""
        killed = 0
        for w in self.by_pid.values():
            w.announced = False
            w.retiring = False  # a reload's RETIRE went to the old session: asked again later
            if w.requests:
                w.requests.clear()
                self.kill(w, signal.SIGKILL, why=f"its request's session ended ({why}); the front end answered it")
                killed += 1
        self.drop_link(linger=0)
        delay = reconnect_delay(self.attempt, cap=self.reconnect_max)
        self.next_join, self.state = time.monotonic() + delay, "idle"
        # a WARNING when it matters: a session or handlers lost, or a new reason to fail to join
        # (an agent that never joined said why at INFO only: silent at --log-level warning)
        fresh, self.last_lost = why != self.last_lost, why
        level = logging.WARNING if self.session or killed or fresh else logging.INFO
        log.log(
            level, "Lost the front end (%s); killed %s running handler(s); joining again in %.2fs", why, killed, delay
        )

    def read_monitor(self) -> set[int]:
        """The connection's events so far, while joining (libzmq's socket monitor)."""
        while self.monitor is not None:
            try:
                self.seen.add(zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"])
            except zmq.Again:
                break
        return self.seen

    def stop_monitor(self) -> None:
        if self.monitor is not None:
            self.link.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None

    def drop_link(self, linger: int | None = None) -> None:
        """Close the connection to the front end (and its monitor)."""
        self.stop_monitor()
        if self.link is not None:
            self.link.close(linger=linger)
            self.link = None

    def read_link(self) -> None:
        link = self.link
        while link is not None and link is self.link:
            try:
                frames = link.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
            try:
                first = frames[0].bytes
                if first:
                    self.to_worker(first, frames)
                elif len(frames) == 2:
                    self.on_control(frames[1].bytes)
            except Exception:  # one bad message must not end the agent and its workers
                log.exception("Dropped a malformed message from the front end")

    def on_control(self, message: bytes) -> None:
        kind, body = message[:1], json.loads(message[1:] or b"{}")
        if kind == Link.PING.value:
            usage, waits = self.figures()
            self.send_control(Link.PONG, t=body.get("t"), usage=usage, waits=waits)
        elif kind == Link.WELCOME.value and self.state == "joining":
            self.state, self.session, self.attempt = "joined", body["session"], 0
            self.stop_monitor()  # it only explains a join that fails
            self.liveness = float(body.get("liveness", self.liveness))
            self.max_reply = body.get("max_message_size")
            log.info("Joined %s as %s (session %s)", self.connect, self.name, self.session)
            sdnotify.notify(f"READY=1\nSTATUS=joined {self.connect} (session {self.session})\nMAINPID={os.getpid()}")
            for w in self.by_pid.values():
                self.announce(w)
            self.manage_workers()  # a reload that was under way goes on
        elif kind == Link.REFUSE.value:
            log.error("The front end refused this agent: %s", body.get("reason"))
            self.lose("refused")
        elif kind == Link.GONE.value:
            self.lose(f"the front end ended the session: {body.get('reason')}")
        elif kind == Link.LEAVE.value:
            self.leave_acked = True
        elif kind == Link.SIZE.value:
            self.resize(body.get("pool"), body.get("size"))
        elif kind == Link.KILL.value:
            w = self.by_wid.get(body.get("wid", "").encode())
            if w is not None:  # its exit is logged with the front end's reason (a timeout...)
                why = str(body.get("why") or "the front end asked")[:200]
                self.kill(w, int(body.get("sig", signal.SIGKILL)), dump=bool(body.get("dump")), why=why)

    def resize(self, pool: Any, size: Any) -> None:
        """SIZE from the front end, for a pool of MIN:MAX workers: kept within its range (the
        front end decides from the pool's queue, which it holds; the range is this agent's)."""
        if pool not in self.ranges or not isinstance(size, int) or isinstance(size, bool):
            return
        low, high = self.ranges[pool]
        size, now = min(max(size, low), high), self.book.size(pool)
        if size != now:
            log.info("Pool %s: %s -> %s workers (the front end's queue, MIN:MAX %s:%s)", pool, now, size, low, high)
            self.book.resize(pool, size)
            self.manage_workers()

    def figures(self) -> tuple[dict[str, list[float]], dict[str, float]]:
        """This agent's and each of its workers' CPU seconds and resident bytes, and the
        seconds its main thread was ready to run but had no CPU (Linux: the host's cores
        are oversubscribed when these grow), read from /proc now (a few small reads per
        ping): the front end shows them. The waits are a PONG field of their own, so a
        front end that does not know them ignores them."""
        usage, waits = {}, {}
        for pid in (os.getpid(), *self.by_pid, *self.book.pids()):
            found, wait = proc_usage(pid), cpu_wait(pid)
            if found is not None:
                usage[str(pid)] = [round(found[0], 3), found[1]]
            if wait is not None:
                waits[str(pid)] = round(wait, 3)
        return usage, waits

    def send_control(self, kind: Link, **body: Any) -> None:
        self.send_link([b"", kind.value + json.dumps(body).encode()])

    def send_link(self, frames: list[Any]) -> bool:
        if self.link is None:
            return False
        try:
            self.link.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:  # past the high-water mark: the front end is not reading
            self.lose(f"cannot send to the front end: {exc}")
            return False
