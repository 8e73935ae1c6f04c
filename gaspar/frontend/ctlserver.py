"""The control socket's server, in the front end's hub: green threads, one per connection, a
command run in the thread that owns the supervisor's state, with no lock. The protocol, where
the socket lives and its bounds are :mod:`gaspar.ops.ctl`'s (this module is its server side).

A new connection when :data:`MAX_CONNECTIONS` are open closes the one idle longest between
two requests; it is refused (answered with an error, then closed) when none is idle, when a
request line is too long, or when it is not whole in time
(:data:`REQUEST_TIMEOUT`: an ``eventlet.Timeout`` over the whole line, so a trickle does not
extend it). Each refusal is counted (``status``'s ``control``) and logged through
``Commands.log_refusal``: in a daemon, the data path's limiter (10 lines a minute, the rest
summed up by the ticker), so a connect/close loop cannot flood the log. Lines sent back to
back are served one at a time with the hub's other work between them (:data:`LINE_RATE`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gaspar.config import fewest_workers
from gaspar.errors import GasparError
from gaspar.ops.ctl import (
    IDLE_TIMEOUT,
    LINGER,
    MAX_CONNECTIONS,
    MAX_LINE,
    REQUEST_TIMEOUT,
    CtlError,
    _encode,
    _private_dir,
    describe,
    parse,
    resolve,
)

log = logging.getLogger("gaspar")

#: Bytes a second one control connection's request lines may take of the hub: after each
#: line, the connection waits as long as the line would take at this rate (16 ms for a line
#: of 1 MiB, nothing to notice for a command), so the data path is served between lines.
LINE_RATE = 64 * 1024 * 1024


# -- the server, in the front end's hub -----------------------------------------------------


def _answers(path: str) -> bool:
    """True if something accepts connections at ``path``; False if the socket is stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:  # a full backlog: alive, but busy
        return True
    finally:
        probe.close()
    return True


def bind(path: str) -> socket.socket:
    """The listening socket at ``path``, mode 0600; a stale file is replaced."""
    try:
        _clear(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise GasparError(f"cannot open the control socket {path}: {exc.strerror or exc}") from exc
    old = os.umask(0o177)  # created 0600: never a moment open to others
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise GasparError(f"cannot open the control socket {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old)
    return sock


def _clear(path: str) -> None:
    """Make way at ``path``: nothing there, or a stale socket (removed); else refuse."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise GasparError(f"the control socket path {path} exists and is not a socket")
    if _answers(path):
        raise GasparError(
            f"another gaspar daemon answers on the control socket {path}; "
            "stop it, or give this one another --control-socket (or off)"
        )
    log.info("Replacing a stale control socket at %s", path)
    os.unlink(path)


@dataclass
class Commands:
    """What the control socket may do, as hub-side callables (no Producer import)."""

    stats: Callable[[], dict[str, Any]]
    scale: Callable[[int], None]
    reload: Callable[[], None]
    broadcast: Callable[[bytes], int]
    stop: Callable[[bool], None]  # begins the stop; must return at once
    stopping: Callable[[], bool]
    target: Callable[[], int]
    consumer: Callable[[], str]
    least: Callable[[], int] = lambda: 1  # the fewest local workers: 0 with agents on other hosts
    most: Callable[[], int] = lambda: 1 << 30  # max_workers
    wait_reload: Callable[[float], Any] = lambda timeout: None  # the reload under way, once settled
    log_refusal: Callable[..., None] = log.warning  # a refused connection; a daemon rate-limits it


def _stats_with_reloads(p: Any) -> dict[str, Any]:
    control = p.control_server.snapshot() if p.control_server is not None else None
    return {**p._stats(), "reloads": p.supervisor.reloads.snapshot(), "control": control}


def _wait_reload(p: Any, timeout: float) -> dict[str, Any] | None:
    """The reload under way (just begun, or begun before), as a dict once it settles or
    ``timeout`` passes (then its ``ok`` is None); the last one if none is under way."""
    import eventlet
    from eventlet.event import Event

    book = p.supervisor.reloads
    mine = book.current
    if mine is None:
        return book.last.as_dict() if book.last else None
    done = Event()
    book.waiters.append(done.send)
    with eventlet.Timeout(timeout, False):
        done.wait()
    return mine.as_dict()


def producer_commands(producer: Any) -> Commands:
    import eventlet

    p = producer
    return Commands(
        stats=lambda: _stats_with_reloads(p),
        scale=p.do_scale,
        reload=p.do_reload,
        broadcast=p.do_broadcast,
        stop=lambda graceful: eventlet.spawn_n(p.begin_stop, graceful),
        stopping=lambda: p.draining or p.stopping,
        target=lambda: p.target,
        consumer=lambda: p.supervisor.consumer_name(),
        least=lambda: fewest_workers(p.settings.remote_bind),
        most=lambda: p.settings.max_workers,
        wait_reload=lambda timeout: _wait_reload(p, timeout),
        log_refusal=p.outcomes.log_refusal,
    )


def execute(cmd: str, args: dict[str, Any], commands: Commands) -> Any:
    """Run one parsed command in the hub; its ``result``."""
    if cmd == "status":
        return commands.stats()
    if commands.stopping():
        raise CtlError("the daemon is stopping")
    if cmd == "scale":
        if args["n"] < commands.least():
            raise CtlError("scale 0 needs --remote-bind: without agents a front end runs 1 worker or more")
        if args["n"] > commands.most():
            raise CtlError(f"cannot scale to {args['n']} workers: max_workers is {commands.most()}")
        commands.scale(args["n"])
        return {"target_workers": commands.target()}
    if cmd == "reload":
        commands.reload()
        result = {"reloading": commands.consumer()}
        if args["wait"]:
            result["reload"] = commands.wait_reload(args["wait"])
        return result
    if cmd == "broadcast":
        return {"sent": commands.broadcast(args["message"])}
    commands.stop(args["graceful"])
    return {"stopping": "graceful" if args["graceful"] else "fast"}


def answer(line: bytes, commands: Commands, peer: str = "") -> dict[str, Any]:
    """One request line -> its reply object; never raises."""
    try:
        cmd, args = parse(line)
        (log.debug if cmd == "status" else log.info)("Control: %s%s", describe(cmd, args), peer)
        return {"ok": True, "result": execute(cmd, args, commands)}
    except CtlError as exc:
        commands.log_refusal("Control: refused%s: %s", peer, exc)  # rate-limited in a daemon
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a command must never take the daemon down
        log.exception("Control: error running a command")
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


class ControlServer:
    """The control socket of one daemon; :meth:`serve` runs as a green thread of its hub."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock, self.path = sock, path
        st = os.stat(path)
        self._ident = (st.st_dev, st.st_ino)  # removed at close only if it is still ours
        self._conns: dict[Any, float | None] = {}  # green thread -> idle since (after a reply), or None
        self.closed_idle = 0  # idle connections closed to make room for a new one
        self.refused = {"too_many": 0, "line_too_long": 0, "too_slow": 0}  # connections, by why

    def snapshot(self) -> dict[str, Any]:
        """For ``status``: the connections open, and those refused since the start, by why."""
        return {"connections": len(self._conns), "refused": dict(self.refused), "closed_idle": self.closed_idle}

    def _refused(self, why: str, commands: Commands, message: str, *args: Any) -> None:
        self.refused[why] += 1
        commands.log_refusal(message, *args)

    @classmethod
    def open(cls, setting: str | None, port: int) -> ControlServer | None:
        path = resolve(setting, port)
        if path is None:
            return None
        if setting is None:
            _private_dir(os.path.dirname(path))
        return cls(bind(path), path)

    def serve(self, commands: Commands) -> None:
        import eventlet
        from eventlet.greenio import GreenSocket

        listener = GreenSocket(self.sock)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL):
                    return  # closed
                log.warning("Control socket: accept failed: %s", exc)
                eventlet.sleep(0.1)
                continue
            if len(self._conns) >= MAX_CONNECTIONS and not self._evict_idlest():
                message = "Control: refused a connection%s: %s are open already"
                self._refused("too_many", commands, message, _peer(conn), MAX_CONNECTIONS)
                error = f"too many control connections ({MAX_CONNECTIONS} are open); try again later"
                eventlet.spawn_n(_refuse, conn, error)
                continue
            self._conns[eventlet.spawn(self._client, conn, commands, time.monotonic() + REQUEST_TIMEOUT)] = None

    def _evict_idlest(self) -> bool:
        """All connections are taken: close the one idle longest between two requests (it
        is owed nothing), so connections kept open after a reply cannot lock ``gaspar ctl``
        out; False if every one is reading or running a command."""
        idle = [(since, g) for g, since in self._conns.items() if since is not None]
        if not idle:
            return False
        _, g = min(idle, key=lambda pair: pair[0])
        self._conns.pop(g, None)
        self.closed_idle += 1
        g.kill()  # its finally closes the connection
        return True

    def _client(self, conn: Any, commands: Commands, deadline: float) -> None:
        """Serve one connection: each request line whole by ``deadline`` (the first: from
        the accept; each later one: from its first byte), silence up to IDLE_TIMEOUT between."""
        import eventlet

        conn.settimeout(IDLE_TIMEOUT)
        peer = _peer(conn)
        reader = conn.makefile("rb")
        try:
            while True:
                line = _read_line(reader, deadline)
                if line is None:
                    message = "Control: refused%s: no whole request line within %ss"
                    self._refused("too_slow", commands, message, peer, f"{REQUEST_TIMEOUT:g}")
                    _refuse(conn, f"no whole request line within {REQUEST_TIMEOUT:g}s; closing the connection")
                    return
                if not line:
                    return
                if len(line) > MAX_LINE:
                    message = "Control: refused%s: a request line longer than %s bytes"
                    self._refused("line_too_long", commands, message, peer, MAX_LINE)
                    _refuse(conn, f"a request line is at most {MAX_LINE} bytes; closing the connection")
                    return
                if not line.strip():
                    continue  # a blank line: the same deadline
                conn.sendall(_encode(answer(line, commands, peer)))
                me = eventlet.getcurrent()
                # The hub's turn: lines sent back to back never make a recv wait, and a big
                # one (a broadcast's message, or junk) waits as long as 64 MiB/s would take.
                eventlet.sleep(len(line) / LINE_RATE)
                self._conns[me] = time.monotonic()  # idle: the first to go when all are taken
                if not reader.peek(1):  # silent up to IDLE_TIMEOUT, then the next line's first byte
                    return
                self._conns[me] = None
                deadline = time.monotonic() + REQUEST_TIMEOUT
        except (OSError, TimeoutError):
            return
        finally:
            reader.close()  # else the socket stays open while the file lives (a killed thread's)
            conn.close()
            self._conns.pop(eventlet.getcurrent(), None)

    def close(self) -> None:
        for g in list(self._conns):
            g.kill()
        self.sock.close()
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass


def _read_line(reader: Any, deadline: float) -> bytes | None:
    """The next line, at most MAX_LINE + 1 bytes (b"" at the end); None if it is not whole
    by ``deadline`` (monotonic), however its bytes trickle in."""
    import eventlet

    timer = eventlet.Timeout(max(deadline - time.monotonic(), 0.0))
    try:
        return reader.readline(MAX_LINE + 1)
    except eventlet.Timeout as exc:
        if exc is not timer:
            raise
        return None
    finally:
        timer.cancel()


def _peer(conn: Any) -> str:
    """`` (pid N, uid U)``: who connected, for the log (Linux's SO_PEERCRED)."""
    try:
        import struct

        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f" (pid {pid}, uid {uid})"
    except (AttributeError, OSError):
        return ""


def _refuse(conn: Any, error: str) -> None:
    """Answer ``error`` and close, reading (and dropping) what the peer still sends for up
    to :data:`LINGER` seconds first, so that it reads the answer rather than a reset."""
    import eventlet

    try:
        conn.settimeout(LINGER)
        conn.sendall(_encode({"ok": False, "error": error}))
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline and conn.recv(65536):
            eventlet.sleep(0)  # a peer that keeps sending would otherwise hold the hub
    except OSError:  # a timeout included
        pass
    finally:
        conn.close()
