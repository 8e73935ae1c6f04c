"""The 0MQ envelope between the front end and its workers: one layout, written once.

A message is a small *head* frame and, for most kinds, a *body* frame: the payload is never
glued onto the id, so a large one is sent and received without a copy::

    front end -> worker   [Q|P  id(8)  limits(8)?  call(1)?]  [payload]   a request (P: ahead)
                          [C  id(8)]                               cancel a handed-ahead one,
                                                                   or end a running stream
                          [G  id(8)  n(4)]                         a stream may send n more items
                          [B  id(8)]  [message]                    a broadcast
                          [X]                                      finish, then exit
    worker -> front end   [R  id(8)  status(1)  timing(16)]  [body]  a reply
                          [S  id(8)]                               a cancelled one, not run
                          [I  id(8)  status(1)]  [item]            one item of a stream
                          [A  id(8)  status(1)]  [body]            a broadcast's ack
                          [H]  [json]                              ready (HELLO)

Over an agent's link a worker's message travels whole behind the worker's routing id, and
control messages are ``[b"", Link kind + json]``. The hot paths read a head by the offsets
named here (:data:`ID`, :data:`STATUS`, :data:`TIMES`) rather than through calls: these are
the only places the layout is spelled out.
"""

from __future__ import annotations

import enum
import struct

#: The request id's bytes in a head (after the kind's byte).
ID = slice(1, 9)
#: The status byte's offset in a reply's or an ack's head.
STATUS = 9
#: Where a reply's :data:`TIMING` starts.
TIMES = 10
#: A typed call's byte in a request's head, after the limits (zeros when the client set
#: none): :data:`CALL` or :data:`STREAM`. A head without it carries plain bytes.
CALL_AT = 17
CALL = ord("c")
STREAM = ord("s")
#: A stream's credits in a CREDIT head, after the id.
CREDITS = struct.Struct("!I")

REQUEST_ID = struct.Struct("!Q")
#: After a request's id in its head (front end -> worker): the client's own limits in ms,
#: 0 for none: its handler_timeout (from the handler's start) and what is left of its
#: deadline (from the moment the worker receives the request).
LIMITS = struct.Struct("!II")
#: After a reply's status byte: the handler's wall time and CPU time (this thread's), seconds;
#: CPU time -1 when it was not measured (a handler under 1 ms: see ``gaspar.process.worker``).
TIMING = struct.Struct("!dd")


class Kind(bytes, enum.Enum):
    """The first byte of a message's head frame, between the front end and a worker.

    A message is a head frame (kind, then an 8-byte request id, then for replies a status
    byte) and a body frame: two frames, so the id is never glued onto the payload.
    """

    REQUEST = b"Q"  # front end -> worker: [Q id limits, payload] to an idle worker: never cancelled
    AHEAD = b"P"  # front end -> worker: [P id limits, payload] handed ahead to a busy one: may be cancelled
    BROADCAST = b"B"  # front end -> worker: [B id, payload]
    EXIT = b"X"  # front end -> worker: [X] finish what is in hand, then exit
    CANCEL = b"C"  # front end -> worker: [C id] do not start this handed-ahead request
    HELLO = b"H"  # worker -> front end: [H, json {pid, number, generation, token}]
    FAILED = b"F"  # worker -> front end: [F, json {pid, token, error}] its boot failed; it exits (code 3)
    REPLY = b"R"  # worker -> front end: [R id status, body]
    ACK = b"A"  # worker -> front end: [A id status, body] for a broadcast
    SKIPPED = b"S"  # worker -> front end: [S id] a cancelled request, not run
    ITEM = b"I"  # worker -> front end: [I id status, item] one item of a stream; more follow
    CREDIT = b"G"  # front end -> worker: [G id n] the stream's client took n items: send n more


class Link(bytes, enum.Enum):
    """The first byte of a control message between the front end and a remote agent.

    Over the remote link a message is either a worker's own message relayed whole, with the
    worker's routing id in front (``[wid, head, body]``), or a control message: an empty
    frame, then the kind's byte and a JSON object (``[b"", kind + json]``).
    """

    JOIN = b"J"  # agent -> front end: {name, host, instance, pid, workers, version, ranges, sizes}
    WELCOME = b"W"  # front end -> agent: {session, heartbeat, liveness}
    REFUSE = b"N"  # front end -> agent: {reason}; the agent backs off and tries again later
    PING = b"T"  # front end -> agent: {t}; answered at once with PONG {t}
    PONG = b"U"  # agent -> front end: {t}, the PING's own value (the round trip)
    EXITED = b"E"  # agent -> front end: {wid, pid, number, status}: a worker's wait status
    KILL = b"K"  # front end -> agent: {wid, sig}: signal a worker (a timeout)
    GONE = b"G"  # front end -> agent: {reason}: no such session (any more); join again
    LEAVE = b"L"  # agent -> front end: {final}: stopping; retire my workers (front end -> agent: ack)
    RETIRE = b"R"  # agent -> front end: {wid}: retire this worker once idle (the agent reloads)
    SIZE = b"Z"  # front end -> agent: {pool, size}: a pool of MIN:MAX workers, sized by its queue


def pack_id(request_id: int) -> bytes:
    """A request id as it travels in a head."""
    return REQUEST_ID.pack(request_id)


def head_id(head: bytes) -> int:
    """The request id of a head that carries one."""
    return int.from_bytes(head[ID], "big")


def timing(head: bytes) -> tuple[float, float]:
    """A reply's handler wall and CPU seconds, (0, 0) when its head has none."""
    if len(head) >= TIMES + TIMING.size:
        return TIMING.unpack_from(head, TIMES)
    return 0.0, 0.0


def limits(head: bytes) -> tuple[int, int] | None:
    """A request's client limits in ms ``(handler_timeout, deadline left)``, or None."""
    if len(head) < ID.stop + LIMITS.size:
        return None
    return LIMITS.unpack_from(head, ID.stop)
