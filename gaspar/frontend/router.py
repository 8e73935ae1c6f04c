"""The front end's 0MQ rounds: requests out to the workers, replies in, on one ROUTER socket.

::

    Dispatcher ──assignments──▶ outbox ──(end of the round)──▶ ROUTER ──▶ workers
    workers ──[id, head, body]──▶ ROUTER ──▶ round() ──▶ Dispatcher.complete ──▶ Outcomes

A *round* sends everything queued (requests, then cancels, so a worker sees both in order),
then takes every message waiting on the ROUTER (replies, SKIPPED, HELLOs, broadcast acks)
and, with agents, a bounded batch of theirs; until neither is left. The I/O loop runs one
after each batch of client events, so one wake-up of 0MQ's I/O thread carries many
messages. A worker on another host is reached through the gateway; this host's directly.

**Pipelining clients' replies are taken in runs.** A reply to a persistent connection's
request that only frees requests to hand ahead to busy local workers (each still has one to
run) leaves them queued for up to :data:`HOLD_REPLIES` more such replies; then they go out
together, each worker's as one multipart message (its worker reads the frames two by two
either way): one wake-up of the 0MQ I/O threads at both ends for all of them, not one each.
Anything else sends at once: a request for an idle worker, a one-shot client's reply (taking
those in runs sheds more under a standing queue of one-shot connections: docs/performance.rst),
and the end of what is waiting.

0MQ's fd signals only changes: a send processes 0MQ's pending events and may consume the
signal of a reply that is waiting, so *whoever sends must make sure someone reads*.
:meth:`Router.send` does (it schedules a round when outside one); code that sends on the
socket itself must call :meth:`Router.read_soon`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import zmq

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation notice; see README
    import eventlet.hubs

from gaspar.core.records import Pending, WorkerSlot
from gaspar.frontend.zmqfast import EVENTS, LARGE, MORE_NOW, NOW, POLLIN, get
from gaspar.frontend.zmqfast import recv as _raw_recv
from gaspar.frontend.zmqfast import send as _raw_send
from gaspar.wire.envelope import CREDITS, ID, LIMITS, STATUS, Kind, pack_id
from gaspar.wire.framing import Status

log = logging.getLogger("gaspar")

_REQUEST = Kind.REQUEST.value
_AHEAD = Kind.AHEAD.value
_REPLY = Kind.REPLY.value
_CANCEL = Kind.CANCEL.value
_SKIPPED = Kind.SKIPPED.value
_HELLO = Kind.HELLO.value
_FAILED = Kind.FAILED.value
_ACK = Kind.ACK.value
_ITEM = Kind.ITEM.value
_CREDIT = Kind.CREDIT.value
_NO_LIMITS = LIMITS.pack(0, 0)
#: At most this many replies in a row may leave the requests they freed for the next ones.
HOLD_REPLIES = 8


def limits(req: Pending) -> bytes:
    """The client's own limits in a request's head (see ``gaspar.wire.envelope.LIMITS``), so its
    worker can interrupt the handler softly when they pass."""
    soft = 0 if req.soft_timeout is None else max(1, round(req.soft_timeout * 1000))
    left = 0
    if req.client_deadline is not None:
        left = max(1, min(0xFFFFFFFF, round((req.client_deadline - time.monotonic()) * 1000)))
    return LIMITS.pack(min(soft, 0xFFFFFFFF), left)


class Router:
    """The ROUTER socket and the rounds over it.

    ``outcomes`` ends requests (``gaspar.frontend.outcomes``); ``supervisor`` owns this
    host's workers (HELLOs, a worker whose pipe is gone); ``manage_workers`` retires idle
    workers and sizes the pool. ``gateway`` (agents on other hosts) and ``loop`` (the I/O
    loop, whose rounds end with ours) are set once they exist.
    """

    def __init__(self, dispatcher: Any, outcomes: Any, supervisor: Any, manage_workers: Callable[[], None]) -> None:
        self.dispatcher = dispatcher
        self.outcomes = outcomes
        self.supervisor = supervisor
        self.manage_workers = manage_workers
        self.gateway: Any = None
        self.loop: Any = None
        self.socket: Any = None
        self._outbox: list[tuple[WorkerSlot, Pending]] = []
        self._cancel_box: list[tuple[WorkerSlot, Pending]] = []
        self._credit_box: dict[Pending, int] = {}  # streams' items taken by their clients
        self._to_write: list[Any] = []  # connections with replies delivered in this round
        self._in_round = False
        self._scheduled: Any = None

    def open(self, ctx: zmq.Context, endpoint: str) -> None:
        """Bind the ROUTER the workers connect to."""
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.router_mandatory = 1
        self.socket.bind(endpoint)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)

    # -- out --------------------------------------------------------------------------------

    def send(self, assignments: list[tuple[WorkerSlot, Pending]]) -> None:
        """Queue requests for their workers; they go out in a batch at the end of the round
        (one wake-up of 0MQ's I/O thread can then carry several)."""
        self._outbox.extend(assignments)
        self.read_soon()
        self.settle()

    def settle(self) -> None:
        """Act on what the dispatcher decided: answer shed requests (``Overloaded``), and
        queue cancels for requests handed ahead whose client left or whose deadline passed."""
        d = self.dispatcher
        if not d.unsettled:  # the usual case, on the hot path: nothing to do
            return
        cancels = d.take_cancels()
        if cancels:
            self._cancel_box.extend(cancels)
            self.read_soon()
        shed = d.take_shed()
        if shed:
            now = time.monotonic()
            for req, reason in shed:
                self.outcomes.shed(req, reason, now)

    def read_soon(self) -> None:
        """Make sure a round runs soon, after a send made outside a round (inside one, the
        round's end reads)."""
        if self._scheduled is None and not self._in_round and not self.loop.busy:
            self._scheduled = eventlet.hubs.get_hub().schedule_call_global(0, self.round)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        sock, send, pending = self.socket, _raw_send, self.dispatcher.pending
        first: tuple[WorkerSlot, Pending, bytes, Any] | None = None  # the only local one so far
        groups: dict[WorkerSlot, list[tuple[Pending, bytes, Any]]] | None = None
        for worker, req in outbox:
            if req.worker is not worker or pending.get(req.id) is not req:
                continue  # since assigned: its worker was lost or died, or it ended (failed, shed)
            body, head = req.body, (_REQUEST if worker.current is req else _AHEAD) + pack_id(req.id)
            if req.soft_timeout is not None or req.client_deadline is not None:
                head += limits(req)
                if req.call:
                    head += req.call
            elif req.call:  # a typed call: its byte after the limits (none here)
                head += _NO_LIMITS + req.call
            if worker.agent is not None:
                self._send_remote(worker, req, head, body)
            elif first is None and groups is None:
                first = (worker, req, head, body)
            else:
                if groups is None:
                    groups = {first[0]: [first[1:]]}
                groups.setdefault(worker, []).append((req, head, body))
        if groups is not None:
            for worker, group in groups.items():
                self._send_local(worker, group)
        elif first is not None:  # the usual case outside pipelining: one request
            worker, req, head, body = first
            try:
                send(sock, worker.routing_id, MORE_NOW)
                send(sock, head, MORE_NOW)
                send(sock, body, NOW, len(body) < LARGE)
            except zmq.ZMQError as exc:
                self._unreachable(worker, [req], exc)
        if not (self._cancel_box or self._credit_box):
            return
        cancels, self._cancel_box = self._cancel_box, []
        heads = [(worker, _CANCEL + pack_id(req.id)) for worker, req in cancels]
        if self._credit_box:  # streams' workers may send as many more items as were taken
            credits, self._credit_box = self._credit_box, {}
            for req, n in credits.items():
                if req.worker is not None and req.worker.current is req:
                    heads.append((req.worker, _CREDIT + pack_id(req.id) + CREDITS.pack(n)))
        for worker, head in heads:  # after the requests themselves: the worker sees them in order
            if worker.routing_id not in self.dispatcher.workers:
                continue  # it died: its handed-ahead requests came back already
            if worker.agent is not None:
                self.gateway.tell(worker, head)
                continue
            try:
                send(sock, worker.routing_id, MORE_NOW)
                send(sock, head, NOW)
            except zmq.ZMQError:
                pass  # its pipe is gone: it is dying, and its requests come back then

    def _send_local(self, worker: WorkerSlot, group: list[tuple[Pending, bytes, Any]]) -> None:
        """Requests to one of this host's workers as one multipart message: one wake-up of
        the 0MQ I/O threads for all of them (the worker reads its frames two by two)."""
        sock, send, last = self.socket, _raw_send, len(group) - 1
        try:
            send(sock, worker.routing_id, MORE_NOW)
            for i, (_, head, body) in enumerate(group):
                send(sock, head, MORE_NOW)
                send(sock, body, NOW if i == last else MORE_NOW, len(body) < LARGE)
        except zmq.ZMQError as exc:
            self._unreachable(worker, [req for req, _, _ in group], exc)

    def _unreachable(self, worker: WorkerSlot, reqs: list[Pending], exc: Exception) -> None:
        """A local worker's pipe is gone: it is dying. Its requests just sent go back to the
        head of the queue, in their order."""
        why = "its 0MQ pipe is gone: it is dying (%s); its requests go to another worker"
        self.supervisor.log(logging.WARNING, "Worker %s (pid:%s): " + why, worker.number, worker.pid, exc)
        self.dispatcher.retire(worker.routing_id, "died")
        self.supervisor.kill_soon(worker, "its 0MQ pipe was gone")
        for req in reversed(reqs):
            self._outbox.extend(self.dispatcher.requeue(req))

    def _sending(self) -> bool:
        """Requests, cancels or credits wait to go out to the workers."""
        return bool(self._outbox or self._cancel_box or self._credit_box)

    def write_soon(self, conn: Any) -> None:
        """A connection has replies to write: at the end of this round, all of them in one
        system call; outside a round (a shed, a stats reply), at once."""
        if self._in_round:
            self._to_write.append(conn)
        else:
            conn.write()

    def _write(self) -> None:
        conns, self._to_write = self._to_write, []
        for conn in conns:
            conn.write()

    def credit(self, streams: list[Pending]) -> None:
        """Items of these streams were written to their clients: one credit each, sent in
        the round (``CREDIT``), so each worker may send that many more."""
        box = self._credit_box
        for req in streams:
            box[req] = box.get(req, 0) + 1
            req.unread = 0
        self.read_soon()

    def hold(self, conn: Any, on: bool) -> None:
        """``conn`` stopped (``on``) or resumed reading its replies: its held requests wait,
        or join the queue again and go to workers (``FairQueue.pause``)."""
        if self.dispatcher.hold(conn, on):
            self.send(self.dispatcher.dispatch())

    def _send_remote(self, worker: WorkerSlot, req: Pending, head: bytes, body: Any) -> None:
        """A request to a worker on another host; if its agent cannot be reached, the
        request goes back to the head of the queue (it never left) and the agent is lost."""
        why = self.gateway.send_request(worker, head, body)
        if why is not None:
            self._outbox.extend(self.dispatcher.requeue(req))
            self.gateway.unreachable(worker.agent, why)

    # -- the round --------------------------------------------------------------------------

    def round(self) -> None:
        """One round of 0MQ work: send what is queued for the workers, then take every
        message waiting on the ROUTER (replies, HELLOs, broadcast acks), until neither is left.
        Runs after every round of the I/O loop, when scheduled, and every 0.1 s."""
        if self._in_round:
            return
        self._scheduled = None
        self._in_round = True
        sock, recv, d = self.socket, _raw_recv, self.dispatcher
        more_remote = False
        hold = 0  # replies taken since the last send whose freed requests may wait for more
        try:
            while True:
                if self._sending() and not hold:
                    self._flush()
                try:
                    rid = recv(sock, NOW)
                except zmq.Again:
                    hold = 0
                    if self.gateway is not None and not more_remote:
                        n = self.gateway.read()
                        if n:
                            # a batch of the agents' messages (it may have queued more to
                            # send); past a full batch, the rest waits for the next round,
                            # so a flooding agent cannot hold the hub from the clients
                            more_remote = n >= self.gateway.BATCH
                            continue
                    if self._to_write:  # writing may read more requests: the loop goes on
                        self._write()
                        # nothing to send: only a message that came meanwhile would need
                        # another recv, and EVENTS says so for less than a zmq.Again
                        if not self._sending() and not get(sock, EVENTS) & POLLIN:
                            return
                    elif not self._sending():
                        return
                    continue
                # a multipart message arrives whole: its other frames are there already. A
                # frame says whether more follow (``more``); asking the socket (RCVMORE) would
                # cost pyzmq's SocketOption enum lookup, about a microsecond, each time
                frame = recv(sock, NOW, False)  # a routing id is never alone
                frames = [rid, frame]
                while frame.more:
                    frame = recv(sock, NOW, False)
                    frames.append(frame)
                may_wait = False
                try:
                    may_wait = self.on_message(frames)
                except Exception:
                    log.exception("Dropped a malformed message from a worker")
                hold = hold + 1 if may_wait and hold < HOLD_REPLIES else 0
                if d.unsettled:
                    self.settle()
        finally:
            self._in_round = False
            if self._to_write:  # left by an exception: written now, not lost
                self._write()
            if more_remote and self._scheduled is None:
                self._scheduled = eventlet.hubs.get_hub().schedule_call_global(0, self.round)

    def on_message(self, frames: list[Any]) -> bool:
        """A worker's message, from this host or relayed by an agent: the routing id (bytes),
        then Frames: a head and a body. True: the requests it freed may wait for the next
        replies (see :meth:`round`)."""
        rid, head = frames[0], frames[1].bytes
        kind = head[:1]
        d = self.dispatcher
        may_wait = False
        if kind == _REPLY or kind == _SKIPPED:
            req_id = int.from_bytes(head[ID], "big")
            if kind == _REPLY:
                req = d.pending.get(req_id)
                answered, assignments = d.complete(rid, req_id)
                mine = req if req is not None and req_id not in d.pending else None  # it was this worker's
                self.outcomes.replied(mine, answered, head, frames[2])
            else:  # a revoked request, never started
                answered, assignments = d.complete(rid, req_id, ran=False)
                if answered is not None:  # shed while handed ahead (its deadline): answer it now
                    self.outcomes.shed(answered, answered.revoked or "deadline", time.monotonic())
            if assignments:
                self._outbox.extend(assignments)
                # a pipelining client's reply freed requests handed ahead to busy local
                # workers: they may wait for the next replies, and go out together
                may_wait = (
                    kind == _REPLY
                    and req is not None
                    and req.owner is not None
                    and all(w.current is not r and w.agent is None for w, r in assignments)
                )
            worker = d.workers.get(rid)
            if worker is not None and worker.retiring:
                self.manage_workers()
        elif kind == _ITEM:  # one item of a running stream
            req = d.pending.get(int.from_bytes(head[ID], "big"))
            if req is not None and req.worker is d.workers.get(rid) and req.worker.current is req:
                if req.timeout is not None:  # the operator's timeout bounds the time between items
                    req.deadline = time.monotonic() + req.timeout
                if not req.cancelled:
                    self.outcomes.item(req, frames[2])
        elif kind == _HELLO:
            self.supervisor.on_hello(rid, frames[2].bytes)
        elif kind == _FAILED:  # a booting worker's last words: why it cannot boot
            self.supervisor.book.failed_message(frames[2].bytes)
        elif kind == _ACK:
            if head[STATUS] != Status.OK:
                log.error("A worker's on_broadcast failed: %s", frames[2].bytes.decode("utf-8", "replace"))
        return may_wait
