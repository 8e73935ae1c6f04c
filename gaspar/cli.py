"""The ``gaspar`` command: ``gaspar serve MODULE:CALLABLE``, ``request``, ``stats``, ``top``, ``ctl``.

Options of ``serve`` are built from :class:`gaspar.config.Settings`, so the CLI, the Python
API and the docs name the same settings. The handler is imported before anything is forked:
a module that fails to import ends the command at once with a one-line reason (exit 2),
followed by the last frames of its traceback in the user's code (a SyntaxError's file, line
and caret), gaspar's and importlib's own frames left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from gaspar import apppath
from gaspar.config import Settings, fewest_workers, pool_size, workers_bounds, workers_option
from gaspar.errors import GasparError
from gaspar.loading import UsageError, load_config, load_consumer
from gaspar.ops.logs import FORMATS, configure
from gaspar.version import __version__

DEFAULT_BIND = "127.0.0.1:10123"


def load_app_config(args: argparse.Namespace) -> dict[str, Any]:
    """The application's directories on ``sys.path`` (after the standard library; see
    :mod:`gaspar.apppath`), then the config file's options: ``--chdir``/``--pythonpath``
    apply before the file is read (its imports see them), the file's own after it."""
    config = os.path.abspath(args.config) if args.config else None  # relative to where we started
    try:
        apppath.setup(args.chdir, args.pythonpath)
        options = load_config(config) if config else {}
        chdir, pythonpath = options.pop("chdir", None), options.pop("pythonpath", None)
        if (chdir and not args.chdir) or (pythonpath and not args.pythonpath):
            apppath.setup(None if args.chdir else chdir, None if args.pythonpath else pythonpath)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return options


def parse_bind(bind: str) -> tuple[str, int]:
    from gaspar.client import parse_address

    try:
        return parse_address(bind)
    except ValueError as exc:
        raise UsageError(f"--bind takes {exc}") from None


def _on_off(text: str) -> bool:
    """A yes/no setting's value on the command line: on/off, true/false, yes/no, 1/0."""
    value = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
    try:
        return value[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}") from None


SERVE_EXAMPLES = """\
examples:
  gaspar serve gaspar.demo:echo
  gaspar serve myapp.handlers:render --bind 0.0.0.0:10123 --workers 4 --timeout 10
  gaspar serve myapp:Renderer --config gaspar_conf.py     # a Consumer subclass; settings from a file
  GASPAR_CMD_ARGS="--workers 8" gaspar serve myapp:render # extra arguments; the command line wins
  gaspar serve myapp:render --chdir /srv/myapp --pythonpath lib  # imported after the standard library

A config file is Python: every top-level name is a setting (timeout = 5), bind, workers or a
hook (def post_fork(worker): ...); any other name is an error.
"""

WORKER_EXAMPLES = """\
examples:
  # on the front end's host: gaspar serve myapp:render --workers 2 --remote-bind tcp://10.0.0.1:10124 \\
  #     --curve-secret keys/server.key_secret --curve-allow keys/agents/
  gaspar worker myapp:render --connect tcp://10.0.0.1:10124 --workers 8 \\
      --curve-secret keys/gpu1.key_secret --curve-server keys/server.key
  gaspar worker myapp:render --connect tcp://127.0.0.1:10124 --workers 4 --name local-test
"""

KEYGEN_EXAMPLES = """\
examples:
  gaspar keygen server --dir keys/               # the front end's pair
  gaspar keygen gpu1 --dir keys/                 # an agent's; copy gpu1.key to the front end's
                                                 # --curve-allow directory
"""

REQUEST_EXAMPLES = """\
examples:
  gaspar request 127.0.0.1:10123 hello
  gaspar request 127.0.0.1:10123 - < payload.bin          # the body from standard input
  gaspar request 127.0.0.1:10123 hello --timeout 5
"""

STATS_EXAMPLES = """\
examples:
  gaspar stats 127.0.0.1:10123
  gaspar stats 127.0.0.1:10123 | jq .counters
"""

TOP_EXAMPLES = """\
examples:
  gaspar top 127.0.0.1:10123
  gaspar top 127.0.0.1:10123 --interval 0.5
  gaspar top 127.0.0.1:10123 --once                       # one frame, for scripts and logs
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gaspar", description="Take CPU-heavy work out of an event loop.")
    parser.add_argument("--version", action="version", version=f"gaspar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run a daemon serving MODULE:CALLABLE",
        description="Run a daemon: a front end listening at --bind, and --workers forked processes\n"
        "that each run MODULE:CALLABLE on the requests' bytes. SIGTERM stops it gracefully,\n"
        "Ctrl-C (SIGINT) at once; SIGHUP re-imports the handler and replaces the workers.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("app", metavar="MODULE:CALLABLE", help="a gaspar.App, a function bytes -> bytes, or a Consumer")
    serve.add_argument("--bind", "-b", default=None, help=f"HOST:PORT to listen at (default {DEFAULT_BIND})")
    add_pool_options(serve)
    add_settings(serve, Settings.cli_fields())

    req = sub.add_parser(
        "request",
        help="send one request and print the reply",
        description="Send one request to a running daemon and print the reply's bytes. An error\n"
        "(the handler raised, no server...) is printed as a one-line reason, exit status 1.",
        epilog=REQUEST_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    req.add_argument("address", metavar="HOST:PORT")
    req.add_argument("message", help="the request's bytes (UTF-8); '-' reads standard input")
    req.add_argument("--timeout", type=float, default=30.0)

    stats = sub.add_parser(
        "stats",
        help="print a running daemon's counters and workers as JSON",
        description="Print a running daemon's counters, overload state and workers as JSON\n"
        "(docs/monitoring.rst explains each field).",
        epilog=STATS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument("address", metavar="HOST:PORT")
    stats.add_argument("--timeout", type=float, default=10.0)

    top = sub.add_parser(
        "top",
        help="a live view of a running daemon's workers and counters (q quits)",
        description="A live view of a running daemon, in the manner of uwsgitop: each worker's state,\n"
        "the request and shed rates, latency quantiles; redrawn every --interval seconds. q quits.",
        epilog=TOP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("address", metavar="HOST:PORT")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between polls (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame (two polls --interval apart) and exit")
    worker = sub.add_parser(
        "worker",
        help="run an agent: workers on this host for a front end elsewhere",
        description="Run an agent: --workers forked processes on this host that run MODULE:CALLABLE\n"
        "for the front end at --connect (started with --remote-bind). Only the agent talks to\n"
        "the network. SIGTERM leaves gracefully (running requests finish), Ctrl-C at once.",
        epilog=WORKER_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument("app", metavar="MODULE:CALLABLE", help="the handler, as for gaspar serve")
    worker.add_argument(
        "--connect", required=True, metavar="tcp://HOST:PORT|ipc://PATH", help="the front end's --remote-bind"
    )
    worker.add_argument(
        "--name", default=None, help="this agent's name (default: the host name; with CURVE, its key's)"
    )
    worker.add_argument("--curve-secret", metavar="FILE", help="this agent's secret key file (gaspar keygen)")
    worker.add_argument("--curve-server", metavar="FILE", help="the front end's public key file")
    worker.add_argument(
        "--reconnect-max", type=float, default=5.0, metavar="SECONDS", help="longest wait between two joins (default 5)"
    )
    add_pool_options(worker)
    add_settings(worker, [f for f in Settings.cli_fields() if f.name in AGENT_SETTINGS])

    keygen = sub.add_parser(
        "keygen",
        help="make a CURVE key pair for a front end or an agent",
        description="Write DIR/NAME.key (the public key: give it to the other side) and\n"
        "DIR/NAME.key_secret (mode 0600: keep it). An agent's NAME is the name it joins as.",
        epilog=KEYGEN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keygen.add_argument("name", metavar="NAME")
    keygen.add_argument("--dir", default=".", help="where to write the two files (default: here)")
    from gaspar.ops import ctl

    ctl.add_parser(sub)  # gaspar ctl [--socket PATH | --port PORT] status | scale N | ...
    return parser


def add_pool_options(parser: argparse.ArgumentParser) -> None:
    """What ``serve`` and ``worker`` (an agent) both take: the pool's size, a config file,
    and how to log."""
    parser.add_argument(
        "--workers",
        "-w",
        type=workers_option,
        metavar="N|MIN:MAX",
        help="worker processes (default: the CPU count); MIN:MAX: as the queue asks",
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=None,
        metavar="NAME=N",
        type=pool_size,
        help="the size of an App's pool (repeat for each); the default pool's is --workers",
    )
    parser.add_argument(
        "--config", "-c", metavar="FILE.py", help="a Python file whose top-level names set options, hooks included"
    )
    parser.add_argument("--chdir", metavar="DIR", help="change to DIR before loading the application and its config")
    parser.add_argument(
        "--pythonpath",
        metavar="DIR[,DIR...]",
        help="directories to import the application from, searched after the standard library (as the current one)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"], help="default info"
    )
    parser.add_argument(
        "--log-format", default="text", choices=FORMATS, help="text (one line per record) or json (one object per line)"
    )


#: The settings that mean something to an agent (the rest are the front end's).
AGENT_SETTINGS = tuple(
    "graceful_timeout worker_nice transport flap_attempts flap_window flap_retry_in "
    "flap_max_retry proc_name capture_output heartbeat_interval agent_liveness max_worker_memory".split()
)


def add_settings(parser: argparse.ArgumentParser, fields: list[Any]) -> None:
    """A flag per setting; a boolean that is off by default may be given bare (``--insecure``)."""
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        kind = {bool: _on_off, int: int, float: float}.get(type(f.default), str)
        if f.default is None:  # the annotation says: "float | None" or "str | None"
            kind = {"str": str, "int": int}.get(str(f.type).partition(" ")[0], float)
        extra = {"nargs": "?", "const": True} if f.default is False else {}
        parser.add_argument(flag, type=kind, default=None, help=f"{f.metadata['help']} (default {f.default})", **extra)


def with_env_args(argv: list[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """``argv`` of ``gaspar serve`` with ``$GASPAR_CMD_ARGS`` (split as a shell would) put
    right after ``serve``, before the real arguments, so that those win (gunicorn's
    ``GUNICORN_CMD_ARGS``)."""
    import shlex

    extra = environ.get("GASPAR_CMD_ARGS", "").strip()
    # the command is the first word that is not an option (only --version, --help come before)
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if not extra or at is None or argv[at] != "serve":
        return argv
    try:
        words = shlex.split(extra)
    except ValueError as exc:
        raise UsageError(f"GASPAR_CMD_ARGS: {exc}") from None
    return [*argv[: at + 1], *words, *argv[at + 1 :]]


def raise_fd_limit(want: int = 65536) -> None:
    """A daemon holding thousands of connections needs more than the usual 1,024 fds:
    raise the soft limit towards the hard one (as nginx's worker_rlimit_nofile)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def workers_given(workers: Any) -> tuple[int, int]:
    """``--workers`` (or a config file's) as ``(MIN, MAX)``; UsageError unless N or MIN:MAX."""
    try:
        return workers_bounds(workers)
    except ValueError:
        raise UsageError(f"--workers takes N or MIN:MAX, not {workers!r}") from None


def serve(args: argparse.Namespace) -> int:
    configure(args.log_level, args.log_format, sys.stderr)
    raise_fd_limit()
    options = load_app_config(args)
    # a flag given on the command line wins over the file
    bind, workers = options.pop("bind", DEFAULT_BIND), options.pop("workers", None)
    bind = args.bind if args.bind is not None else bind
    workers = args.workers if args.workers is not None else workers
    if not isinstance(bind, str):
        raise UsageError(f"bind takes a HOST:PORT string, not {bind!r}")
    least = fewest_workers(args.remote_bind or options.get("remote_bind"))
    low = workers_given(workers)[0] if workers is not None else least
    if low < least:
        raise UsageError(f"--workers must be at least 1 (0 with --remote-bind), not {workers!r}")
    host, port = parse_bind(bind)
    consumer = load_consumer(args.app)  # before any fork: an import error ends us here
    options.update({f.name: getattr(args, f.name) for f in Settings.cli_fields() if getattr(args, f.name) is not None})
    if args.pool:
        options["pools"] = {**(options.get("pools") or {}), **dict(args.pool)}
    if options.get("metrics_bind"):
        from gaspar.ops.metrics import require_prometheus

        try:
            require_prometheus()
        except ImportError as exc:
            raise UsageError(f"--metrics-bind: {exc}") from None
    from gaspar.frontend.producer import Producer

    try:
        producer = Producer(consumer, port, processes=workers, host=host, **options)
        producer.app_spec = args.app  # a reload imports it afresh, in a new fork server
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    try:
        producer.start()
    except OSError as exc:  # what it was opening: the port, metrics_bind, remote_bind, the access log...
        where = producer.ports.step or f": cannot listen at {host}:{port}"
        print(f"gaspar{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except GasparError as exc:
        print(f"gaspar: {exc}", file=sys.stderr)
        return producer.exit_code or 1
    return producer.exit_code


def agent(args: argparse.Namespace) -> int:
    """``gaspar worker``: an agent on this host, joining the front end at ``--connect``."""
    configure(args.log_level, args.log_format, sys.stderr)
    options = load_app_config(args)
    options.pop("bind", None)
    workers = args.workers if args.workers is not None else options.pop("workers", None)
    options.pop("workers", None)
    if args.pool:
        options["pools"] = {**(options.get("pools") or {}), **dict(args.pool)}
    if workers is None:
        workers = 0 if options.get("pools") else os.cpu_count() or 1  # --pool alone: those pools only
    least = 0 if options.get("pools") else 1
    if workers_given(workers)[1] < least:
        raise UsageError(f"--workers must be at least 1 (0 with --pool), not {workers!r}")
    host, _, port = args.connect.removeprefix("tcp://").rpartition(":")
    ipc = args.connect.startswith("ipc://") and len(args.connect) > len("ipc://")
    if not ipc and (not args.connect.startswith("tcp://") or not host or not port.isdigit()):
        raise UsageError(
            f"--connect takes tcp://HOST:PORT or ipc://PATH (the front end's --remote-bind), not {args.connect!r}"
        )
    consumer = load_consumer(args.app)
    options.update({name: getattr(args, name) for name in AGENT_SETTINGS if getattr(args, name) is not None})
    from gaspar.process.agent import Agent

    try:
        settings = Settings(**options)
        runner = Agent(
            consumer,
            settings,
            args.connect,
            workers,
            name=args.name,
            spec=args.app,
            curve_secret=args.curve_secret,
            curve_server=args.curve_server,
            reconnect_max=args.reconnect_max,
        )
        if runner.curve is not None:
            from gaspar.ops.curve import load_public, load_secret

            load_secret(args.curve_secret)
            load_public(args.curve_server)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    return runner.run()


def keygen(args: argparse.Namespace) -> int:
    from gaspar.ops.curve import keygen as make_keys

    try:
        public, secret = make_keys(args.name, args.dir)
    except (ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {public} (public: give it to the other side)\nwrote {secret} (secret, mode 0600: keep it here)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    apppath.demote_cwd()  # the current directory is searched after the standard library, if at all
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = with_env_args(argv)
    except UsageError as exc:
        print(f"gaspar: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "worker":
            return agent(args)
        if args.command == "keygen":
            return keygen(args)
        if args.command == "ctl":
            from gaspar.ops import ctl

            return ctl.run(args, sys.stdout, sys.stderr, sys.stdin.buffer)
        from gaspar import client

        try:
            client.parse_address(args.address)
        except ValueError as exc:
            raise UsageError(f"{args.command} takes {exc}") from None
        if args.command == "request":
            message = sys.stdin.buffer.read() if args.message == "-" else args.message.encode()
            sys.stdout.buffer.write(client.request(args.address, message, timeout=args.timeout) + b"\n")
            return 0
        if args.command == "top":
            if not args.interval > 0:
                raise UsageError("--interval takes a number of seconds above 0")
            from gaspar.ops import top

            return top.run(args.address, args.interval, once_only=args.once)
        reply = client.request(args.address, b"", timeout=args.timeout, stats=True)
        print(json.dumps(json.loads(reply), indent=2))
        return 0
    except UsageError as exc:
        print(f"gaspar: error: {exc}", file=sys.stderr)
        if exc.detail:
            print(exc.detail, file=sys.stderr)
        return 2
    except GasparError as exc:
        text, kind = str(exc), type(exc).__name__  # "HandlerError: ValueError: boom", "WorkerLost: agent..."
        print(f"gaspar: {kind}: {text}" if text else f"gaspar: {kind}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `gaspar stats ... | head`
        sys.stderr.close()
        return 0
