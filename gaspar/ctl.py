"""The control socket and ``gaspar ctl``: operate a running daemon without signals.

A Unix stream socket (mode 0600, never the public TCP port), served from the front end's
own hub in green threads, as :mod:`gaspar.metrics` serves HTTP: a command runs in the
thread that owns the supervisor's state, with no lock. One JSON request per line, one
JSON reply per line, any number of them per connection::

    {"cmd": "status"}                      -> {"ok": true, "result": {...gaspar stats...}}
    {"cmd": "scale", "n": 3}               -> {"ok": true, "result": {"target_workers": 3}}
    {"cmd": "reload"}                      -> {"ok": true, "result": {"reloading": "mod:fn"}}
    {"cmd": "reload", "wait": 60}          -> ... "reload": {"ok": true|false|null, "reason": ...}}
        (waits up to 60 s for the outcome; null: still under way; see gaspar.reloads)
    {"cmd": "broadcast", "message": "hi"}  -> {"ok": true, "result": {"sent": 2}}
        (bytes as UTF-8 text, or base64 with "encoding": "base64")
    {"cmd": "stop", "graceful": true}      -> {"ok": true, "result": {"stopping": "graceful"}}
    anything wrong                         -> {"ok": false, "error": "..."}

:func:`parse` is pure (a line in, a command or :class:`CtlError` out); :class:`ControlServer`
owns the socket; :func:`call` is the client, plain blocking sockets, no eventlet.

**Where.** ``control_socket`` unset: ``$XDG_RUNTIME_DIR/gaspar/<port>.sock`` when
``XDG_RUNTIME_DIR`` is set (per user, 0700, emptied at logout: where sockets belong), else
``/tmp/gaspar-<uid>/<port>.sock`` in a directory created 0700 and refused if another user
owns it or it is open to others. ``off`` (or empty) turns it off. A socket file left by a
daemon that died is replaced; one that a live daemon answers on fails the start.

**Bounds.** A request line is at most :data:`MAX_LINE` (1 MiB): a longer one is answered
with an error and its connection closed, after its bytes are read and dropped (for a
second at most), never buffered. At most :data:`MAX_CONNECTIONS` connections are served at
once; one more is answered with an error and closed. ``scale`` stops at ``max_workers``.

**Honest limits.** Anyone who can connect can stop the daemon: the file's mode (0600) is
the only access control, so root and the daemon's user can. A scale, or a reload not asked
to wait, is begun, not finished, when the reply comes (``status`` shows progress and the
last reload's outcome). Two daemons on the same port but different addresses share
the default path: the second must be given its own ``--control-socket``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import reloads
from .errors import GasparError

log = logging.getLogger("gaspar")

MAX_LINE = 1024 * 1024  # a request line, a broadcast's message (base64'd or not) included
MAX_CONNECTIONS = 16  # control connections served at once
IDLE_TIMEOUT = 300.0  # seconds a control connection may stay silent
MAX_WAIT = 3600.0  # seconds a reload's outcome may be waited for
LINGER = 1.0  # seconds a refused connection's input is read and dropped before it is closed
RELOAD_WAIT = 60.0  # seconds gaspar ctl reload waits for the outcome, unless --timeout says
COMMANDS = ("status", "scale", "reload", "broadcast", "stop")


class CtlError(Exception):
    """A request the daemon refuses; its message is the reply's ``error``."""


# -- where the socket lives ---------------------------------------------------------------


def default_dir(env: dict[str, str] | None = None, uid: int | None = None) -> str:
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "gaspar")
    return f"/tmp/gaspar-{uid}"


def default_path(port: int, env: dict[str, str] | None = None, uid: int | None = None) -> str:
    """The control socket of a daemon bound to ``port``, when ``control_socket`` is unset."""
    return os.path.join(default_dir(env, uid), f"{port}.sock")


def resolve(setting: str | None, port: int) -> str | None:
    """The path a daemon on ``port`` uses, or None when the setting turns it off."""
    if setting is None:
        return default_path(port)
    if setting.strip().lower() in ("", "off"):
        return None
    return setting


def _private_dir(path: str) -> None:
    """Create the default directory 0700; refuse one another user could write into."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise GasparError(f"cannot create the control socket's directory {path}: {exc.strerror or exc}") from exc
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise GasparError(
            f"the control socket's directory {path} is not a private directory of this user "
            "(want mode 0700, owned by us); remove it or give --control-socket"
        )


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


def _stats_with_reloads(p: Any) -> dict[str, Any]:
    return {**p._stats(), "reloads": p.supervisor.reloads.snapshot()}


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
        least=lambda: 0 if p.gateway is not None else 1,
        most=lambda: p.settings.max_workers,
        wait_reload=lambda timeout: _wait_reload(p, timeout),
    )


def parse(line: bytes) -> tuple[str, dict[str, Any]]:
    """A request line -> (command, arguments), checked; raises CtlError."""
    try:
        req = json.loads(line)
    except ValueError as exc:
        raise CtlError(f"not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise CtlError('a request is a JSON object, e.g. {"cmd": "status"}')
    cmd = req.get("cmd")
    if cmd not in COMMANDS:
        raise CtlError(f"unknown command {cmd!r}; try one of {', '.join(COMMANDS)}")
    if cmd == "scale":
        n = req.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise CtlError(f"scale takes n, a number of workers (0 or more), not {n!r}")
        return cmd, {"n": n}
    if cmd == "broadcast":
        message, encoding = req.get("message"), req.get("encoding", "utf-8")
        if not isinstance(message, str):
            raise CtlError("broadcast takes message, a string")
        if encoding == "base64":
            try:
                return cmd, {"message": base64.b64decode(message, validate=True)}
            except (binascii.Error, ValueError) as exc:
                raise CtlError(f"message is not valid base64: {exc}") from None
        if encoding not in ("utf-8", "utf8", "text"):
            raise CtlError(f"encoding is utf-8 or base64, not {encoding!r}")
        return cmd, {"message": message.encode("utf-8", "surrogatepass")}
    if cmd == "reload":
        wait = req.get("wait") or 0
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_WAIT:
            raise CtlError(f"reload's wait is a number of seconds from 0 to {MAX_WAIT:g}, not {wait!r}")
        return cmd, {"wait": wait}
    if cmd == "stop":
        graceful = req.get("graceful", False)
        if not isinstance(graceful, bool):
            raise CtlError("stop's graceful is true or false")
        return cmd, {"graceful": graceful}
    return cmd, {}


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


def describe(cmd: str, args: dict[str, Any]) -> str:
    """The command as the log shows it (a broadcast's bytes are not logged, only counted)."""
    if cmd == "scale":
        return f"scale {args['n']}"
    if cmd == "broadcast":
        return f"broadcast ({len(args['message'])} bytes)"
    if cmd == "stop":
        return "stop (graceful)" if args["graceful"] else "stop (fast)"
    return cmd


def answer(line: bytes, commands: Commands, peer: str = "") -> dict[str, Any]:
    """One request line -> its reply object; never raises."""
    try:
        cmd, args = parse(line)
        (log.debug if cmd == "status" else log.info)("Control: %s%s", describe(cmd, args), peer)
        return {"ok": True, "result": execute(cmd, args, commands)}
    except CtlError as exc:
        log.warning("Control: refused%s: %s", peer, exc)
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
        self._conns: set[Any] = set()

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
            if len(self._conns) >= MAX_CONNECTIONS:
                log.warning("Control: refused a connection%s: %s are open already", _peer(conn), MAX_CONNECTIONS)
                error = f"too many control connections ({MAX_CONNECTIONS} are open); try again later"
                eventlet.spawn_n(_refuse, conn, error)
                continue
            self._conns.add(eventlet.spawn(self._client, conn, commands))

    def _client(self, conn: Any, commands: Commands) -> None:
        import eventlet

        conn.settimeout(IDLE_TIMEOUT)
        peer = _peer(conn)
        try:
            reader = conn.makefile("rb")
            while True:
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    log.warning("Control: refused%s: a request line longer than %s bytes", peer, MAX_LINE)
                    _refuse(conn, f"a request line is at most {MAX_LINE} bytes; closing the connection")
                    return
                if line.strip():
                    conn.sendall(_encode(answer(line, commands, peer)))
        except (OSError, TimeoutError):
            return
        finally:
            conn.close()
            self._conns.discard(eventlet.getcurrent())

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
    import time

    try:
        conn.settimeout(LINGER)
        conn.sendall(_encode({"ok": False, "error": error}))
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline and conn.recv(65536):
            pass
    except OSError:  # a timeout included
        pass
    finally:
        conn.close()


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


# -- the client: gaspar ctl ------------------------------------------------------------------


class Unreachable(GasparError):
    """No daemon answered on the control socket."""


def call(path: str, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the control socket at ``path``; its reply object. Raises
    ValueError for a request longer than the daemon reads (:data:`MAX_LINE`)."""
    line = _encode(request)
    if len(line) > MAX_LINE:
        raise ValueError(f"the request is {len(line)} bytes, more than the control socket's {MAX_LINE}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise Unreachable(f"no control socket at {path} (is the daemon running, with this port or path?)") from None
        except OSError as exc:
            raise Unreachable(f"cannot reach the control socket {path}: {exc.strerror or exc}") from exc
        try:
            sock.sendall(line)
            data = sock.makefile("rb").readline(MAX_LINE + 1)
        except TimeoutError:
            raise Unreachable(f"the daemon at {path} did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise Unreachable(f"the control socket {path} broke: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    if not data:
        raise Unreachable(f"the daemon at {path} closed the connection without a reply")
    try:
        return json.loads(data)
    except ValueError:
        raise Unreachable(f"{path} answered with something other than a gaspar control reply") from None


def summary(stats: dict[str, Any]) -> str:
    """``gaspar ctl status``'s few lines."""
    from .humanize import human_uptime

    states = stats.get("worker_states") or {}
    live = [w for w in stats.get("workers") or [] if w.get("state") != "retiring"]
    outcomes = stats.get("outcomes") or {}
    lines = [
        f"pid {stats.get('pid')}  gaspar {stats.get('version')}  up {human_uptime(stats.get('uptime'))}",
        f"workers {len(live)} of {stats.get('target_workers')}: "
        + (", ".join(f"{n} {state}" for state, n in states.items() if n) or "none here")
        + (f"; restarts {stats.get('restarts', 0)}" if stats.get("restarts") else ""),
        f"queued {stats.get('queued', 0)}  in flight {stats.get('pending', 0)}  "
        f"connections {stats.get('connections', 0)}",
        "outcomes " + (", ".join(f"{k} {v}" for k, v in outcomes.items() if v) or "none yet"),
    ]
    reload = reloads.status_line(stats.get("reloads"))
    if reload:
        lines.append(reload)
    for w in sorted(live, key=lambda w: w["number"]):
        lines.append(f"  worker {w['number']}  pid {w['pid']}  {w['state']:<8}  {w.get('requests', 0)} requests")
    for a in stats.get("agents") or []:
        rtt = "" if a.get("rtt_ms") is None else f"  rtt {a['rtt_ms']:.1f} ms"
        lines.append(
            f"  agent {a['name']} on {a['host']}  session {a['session']}  {a['state']}  "
            f"{a['slots']} workers, {a['busy']} busy  {a['done']} done, {a['lost']} lost{rtt}"
        )
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    ctl = sub.add_parser("ctl", help="operate a running daemon over its control socket")
    where = ctl.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="the daemon's control socket")
    where.add_argument(
        "--port", type=int, default=10123, help="find the socket of the daemon bound to PORT (default %(default)s)"
    )
    ctl.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    ctl.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for the reply (default 10; reload: 60)"
    )
    cmds = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    cmds.add_parser("status", help="pid, uptime, workers, queue, outcomes")
    scale = cmds.add_parser("scale", help="run N workers")
    scale.add_argument("n", type=int, metavar="N")
    reload = cmds.add_parser(
        "reload", help="re-import the handler, replace the workers one by one; wait for the outcome (exit 1: failed)"
    )
    reload.add_argument("--no-wait", action="store_true", help="return once the reload has begun")
    bc = cmds.add_parser("broadcast", help="send MESSAGE to every worker's on_broadcast")
    bc.add_argument("message", metavar="MESSAGE", help="UTF-8 text; '-' reads bytes from standard input")
    stop = cmds.add_parser("stop", help="stop the daemon (fast unless --graceful)")
    stop.add_argument("--graceful", action="store_true", help="let accepted requests finish first")


def request_of(args: Any, stdin: Any = None) -> dict[str, Any]:
    cmd = args.ctl_command
    if cmd == "scale":
        if args.n < 0:
            raise ValueError("scale takes a number of workers, 0 or more (0 with --remote-bind only)")
        return {"cmd": "scale", "n": args.n}
    if cmd == "broadcast":
        if args.message != "-":
            return {"cmd": "broadcast", "message": args.message}
        data = stdin.read()
        try:
            return {"cmd": "broadcast", "message": data.decode("utf-8")}
        except UnicodeDecodeError:
            return {"cmd": "broadcast", "message": base64.b64encode(data).decode(), "encoding": "base64"}
    if cmd == "stop":
        return {"cmd": "stop", "graceful": args.graceful}
    if cmd == "reload" and not args.no_wait:
        return {"cmd": "reload", "wait": min(args.timeout or RELOAD_WAIT, MAX_WAIT)}
    return {"cmd": cmd}


def run(args: Any, out: Any, err: Any, stdin: Any) -> int:
    """``gaspar ctl``: 0 done, 1 the daemon refused, 2 a usage error or no daemon."""
    path = args.socket or default_path(args.port)
    try:
        request = request_of(args, stdin)
        wait = request.get("wait", 0)
        reply = call(path, request, wait + 5.0 if wait else args.timeout or 10.0)
    except ValueError as exc:
        print(f"gaspar ctl: error: {exc}", file=err)
        return 2
    except Unreachable as exc:
        print(f"gaspar ctl: {exc}", file=err)
        return 2
    waited = reply.get("ok") and "reload" in (reply.get("result") or {})  # for the reload's outcome
    if args.json:
        print(json.dumps(reply, indent=2), file=out)
        if waited:
            return 0 if reloads.outcome_text(reply["result"]["reload"])[0] else 1
    elif not reply.get("ok"):
        print(f"gaspar ctl: the daemon refused: {reply.get('error')}", file=err)
    elif waited:
        ok, text = reloads.outcome_text(reply["result"]["reload"], wait)
        print(text if ok else f"gaspar ctl: {text}", file=out if ok else err)
        return 0 if ok else 1
    else:
        result = reply.get("result") or {}
        text = {
            "status": lambda: summary(result),
            "scale": lambda: f"scaling to {result.get('target_workers')} workers",
            "reload": lambda: f"reloading {result.get('reloading')}",
            "broadcast": lambda: f"sent to {result.get('sent')} workers",
            "stop": lambda: f"stopping ({result.get('stopping')})",
        }[request["cmd"]]()
        print(text, file=out)
    return 0 if reply.get("ok") else 1
