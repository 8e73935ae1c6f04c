"""The control socket and ``gaspar ctl``: operate a running daemon without signals.

A Unix stream socket (mode 0600, never the public TCP port), served from the front end's
own hub in green threads, as :mod:`gaspar.ops.metrics` serves HTTP: a command runs in the
thread that owns the supervisor's state, with no lock. One JSON request per line, one
JSON reply per line, any number of them per connection::

    {"cmd": "status"}                      -> {"ok": true, "result": {...gaspar stats...}}
    {"cmd": "scale", "n": 3}               -> {"ok": true, "result": {"target_workers": 3}}
    {"cmd": "reload"}                      -> {"ok": true, "result": {"reloading": "mod:fn"}}
    {"cmd": "reload", "wait": 60}          -> ... "reload": {"ok": true|false|null, "reason": ...}}
        (waits up to 60 s for the outcome; null: still under way; see gaspar.ops.reloads)
    {"cmd": "broadcast", "message": "hi"}  -> {"ok": true, "result": {"sent": 2}}
        (bytes as UTF-8 text, or base64 with "encoding": "base64")
    {"cmd": "stop", "graceful": true}      -> {"ok": true, "result": {"stopping": "graceful"}}
    anything wrong                         -> {"ok": false, "error": "..."}

:func:`parse` is pure (a line in, a command or :class:`CtlError` out); the server, in the
front end's hub, is :mod:`gaspar.frontend.ctlserver`; :func:`call` is the client, plain blocking
sockets, no eventlet.

**Where.** ``control_socket`` unset: ``$XDG_RUNTIME_DIR/gaspar/<port>.sock`` when
``XDG_RUNTIME_DIR`` is set (per user, 0700, emptied at logout: where sockets belong), else
``/tmp/gaspar-<uid>/<port>.sock`` in a directory created 0700 and refused if another user
owns it or it is open to others. ``off`` (or empty) turns it off. A socket file left by a
daemon that died is replaced; one that a live daemon answers on fails the start.

**Bounds.** A request line is at most :data:`MAX_LINE` (1 MiB): a longer one is answered
with an error and its connection closed, after its bytes are read and dropped (for a
second at most), never buffered. At most :data:`MAX_CONNECTIONS` connections are served at
once; one more is answered with an error and closed. A connection must send its first
request line whole within :data:`REQUEST_TIMEOUT` (5 s) of connecting, and each later one
within 5 s of its first byte (a byte at a time does not extend it; blank lines do not
count); else it is answered with an error and closed. Between requests, after a reply, it may
stay silent for :data:`IDLE_TIMEOUT`. These refusals are logged at most 10 a minute (the
data path's limiter; the rest are summed up) and counted in ``status``'s ``control``.
``scale`` stops at ``max_workers``.

**Honest limits.** Anyone who can connect can stop the daemon: the file's mode (0600) is
the only access control, so root and the daemon's user can. A scale, or a reload not asked
to wait, is begun, not finished, when the reply comes (``status`` shows progress and the
last reload's outcome). A client answered once may keep its connection silent for
:data:`IDLE_TIMEOUT`, so 16 such clients (the daemon's own user or root) still lock ``gaspar
ctl`` out for that long. Two daemons on the same port but different addresses share
the default path: the second must be given its own ``--control-socket``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import socket
import stat
from typing import Any

from gaspar.errors import GasparError
from gaspar.ops import reloads

log = logging.getLogger("gaspar")

MAX_LINE = 1024 * 1024  # a request line, a broadcast's message (base64'd or not) included
MAX_CONNECTIONS = 16  # control connections served at once
IDLE_TIMEOUT = 300.0  # seconds a control connection may stay silent after a reply
REQUEST_TIMEOUT = 5.0  # seconds for a whole request line: from connect, or from its first byte
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


# -- the protocol: pure ---------------------------------------------------------------------


def parse(line: bytes) -> tuple[str, dict[str, Any]]:
    """A request line -> (command, arguments), checked; raises CtlError."""
    try:
        req = json.loads(line)
    except ValueError as exc:
        raise CtlError(f"not JSON: {exc}") from None
    except RecursionError:  # thousands of nested brackets
        raise CtlError("not a request: JSON nested too deeply") from None
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


def describe(cmd: str, args: dict[str, Any]) -> str:
    """The command as the log shows it (a broadcast's bytes are not logged, only counted)."""
    if cmd == "scale":
        return f"scale {args['n']}"
    if cmd == "broadcast":
        return f"broadcast ({len(args['message'])} bytes)"
    if cmd == "stop":
        return "stop (graceful)" if args["graceful"] else "stop (fast)"
    return cmd


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
    from gaspar.ops.humanize import human_uptime

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
