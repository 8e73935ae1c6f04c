"""The remote port: the ROUTER socket agents join, bound and bounded, and what libzmq says
about its connections.

TCP with CURVE (pyzmq's ``zmq.auth``: :class:`gaspar.ops.curve.Gatekeeper`, run in the front
end's hub), or ``ipc://PATH`` in a private directory (:func:`bind_private`). Whatever a peer
sends is bounded by ``ZMQ_MAXMSGSIZE`` (``max_message_size`` plus :data:`FRAME_SLACK`; libzmq
drops the connection of a peer that sends a larger frame). libzmq's socket monitor counts
the handshakes that fail (no CURVE, a wrong key, a refused key) and the connections closed,
and the failures are logged, rate-limited: an operator sees who knocks and fails.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

import zmq
import zmq.utils.monitor

from gaspar.ops.telemetry import LogLimiter

log = logging.getLogger("gaspar")

#: High-water marks of the remote socket: far above the requests the front end keeps in
#: flight to one agent (workers x (1 + prefetch)), so a message never meets the mark; a send
#: that still cannot go (EAGAIN) means the agent stopped reading: it is lost.
HWM = 100_000
#: The head and routing frames around a body: ZMQ_MAXMSGSIZE is max_message_size plus this.
FRAME_SLACK = 1024

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_WHY = {  # an AUTH failure is the ZAP handler's refusal: it logs that itself
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "broke the protocol (error 0x%x)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed (a wrong server key, or it left)",
}
#: libzmq's protocol errors that say what the peer got wrong (the event's value).
_PROTOCOL_WHY = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "failed: its CURVE hello does not open with this front end's key "
    "(is the agent's --curve-server this front end's public key?)",
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "failed: it does not use CURVE, as this front end does",
}


class RemotePort:
    """The remote ROUTER socket and its watchers: :meth:`open` binds it."""

    def __init__(self, ctx: zmq.Context, settings: Any) -> None:
        self.ctx, self.settings = ctx, settings
        self.sock: zmq.Socket | None = None
        self.gatekeeper: Any = None
        self.monitor: zmq.Socket | None = None
        self.endpoint = ""
        self.handshakes_failed = 0
        self.disconnects = 0  # connections libzmq closed (an agent left, or sent past ZMQ_MAXMSGSIZE)
        self._log_limit = LogLimiter(burst=10, period=60.0)

    def open(self) -> str:
        """Bind the remote socket (and start the ZAP handler first, with CURVE)."""
        s = self.settings
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1
        sock.sndhwm = sock.rcvhwm = HWM
        sock.maxmsgsize = max(s.max_message_size, 256 * 1024) + FRAME_SLACK
        sock.ipv6 = "[" in s.remote_bind  # tcp://[::1]:PORT
        # 0MQ's own heartbeats tear down a dead TCP connection, but later than this module
        # loses a silent agent: a connection that comes back in between carries the GONE
        # that tells the agent its session ended (and its late replies, to be dropped).
        sock.heartbeat_ivl = max(1, int(s.heartbeat_interval * 1000))
        sock.heartbeat_timeout = sock.heartbeat_ttl = int(2 * s.agent_liveness * 1000)
        try:
            if s.curve_secret:
                from gaspar.ops.curve import Gatekeeper, secure_server

                self.gatekeeper = Gatekeeper(self.ctx, s.curve_allow)
                self.gatekeeper.start()
                secure_server(sock, s.curve_secret)
            try:
                if s.remote_bind.startswith("ipc://"):
                    bind_private(sock, s.remote_bind)
                else:
                    sock.bind(s.remote_bind)
            except zmq.ZMQError as exc:  # in the words of a socket's bind, for the CLI and the log
                raise OSError(exc.errno, zmq.strerror(exc.errno), s.remote_bind) from None
        except BaseException:
            sock.close(linger=0)
            self.close()
            raise
        self.sock = sock
        self.endpoint = sock.last_endpoint.decode()
        # handshakes that fail (a client without CURVE, a wrong server key, a refused key):
        # counted from libzmq's socket monitor, so an operator sees who knocks and fails
        self.monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED)
        return self.endpoint

    def fds(self) -> list[tuple[int, Callable[[int], None]]]:
        """The watchers' fds (the monitor's, the ZAP handler's), with what to do when one is ready."""
        fds = [(self.monitor.fd, lambda _events: self.read_monitor())]
        if self.gatekeeper is not None:
            fds.append((self.gatekeeper.zap_socket.fd, lambda _events: self.gatekeeper.handle_ready()))
        return fds

    def read_monitor(self) -> None:
        """Count the failed handshakes libzmq reports (a ZAP refusal is counted there too)."""
        while self.monitor is not None and self.monitor.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
                continue
            if event["event"] & _HANDSHAKE_FAILED:
                self.handshakes_failed += 1
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    continue  # the ZAP handler logged this refusal, with its reason
                allowed, held = self._log_limit.allow()
                if allowed:
                    why = _PROTOCOL_WHY.get(event["value"]) or _HANDSHAKE_WHY.get(event["event"], "failed")
                    why = why % event["value"] if "%x" in why else why
                    log.warning("A peer's handshake on %s %s (%s not logged)", self.endpoint, why, held)

    def reload_keys(self) -> set[str]:
        """Read ``curve_allow`` again; the names whose keys were removed (or replaced)."""
        if self.gatekeeper is None:
            return set()
        try:
            added, revoked = self.gatekeeper.reload()
        except ValueError as exc:  # curve.KeyError_: a file that cannot be read
            log.error("Kept the allowed agent keys as they were: %s", exc)
            return set()
        log.info(
            "Read the allowed agent keys again: %s in all; added %s, removed %s",
            len(self.gatekeeper.names),
            ", ".join(sorted(added)) or "none",
            ", ".join(sorted(revoked)) or "none",
        )
        return set(revoked)

    def snapshot(self) -> dict[str, Any]:
        keeper = self.gatekeeper
        return {
            "endpoint": self.endpoint,
            "curve": keeper is not None,
            "handshakes_refused": keeper.denied if keeper is not None else 0,
            "keys_allowed": len(keeper.names) if keeper is not None else 0,
            "handshakes_failed": self.handshakes_failed,
            "connections_closed": self.disconnects,
        }

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None


def bind_private(sock: zmq.Socket, endpoint: str) -> None:
    """Bind ``ipc://PATH`` so that only this user can connect: the socket inside a
    directory of mode 0700 owned by this user (made if missing; refused if anyone else may
    enter it), and the socket itself 0600. The directory is the boundary, so the instant
    between bind and chmod exposes nothing."""
    path = endpoint[len("ipc://") :]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise OSError(
            errno.EPERM,
            f"{directory} must be a directory of this user's with mode 0700 (it is "
            f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}): any user who may enter it could join",
            endpoint,
        )
    old = os.umask(0o177)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)


def peer_address(frame: Any) -> str:
    """The address a message's connection came from, as libzmq knows it."""
    try:
        return frame.get("Peer-Address")
    except zmq.ZMQError:
        return "?"


__all__ = ["RemotePort", "bind_private", "peer_address", "HWM", "FRAME_SLACK"]
