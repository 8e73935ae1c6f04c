"""Every setting of the daemon, defined once.

The Python API (``Producer(..., **options)``), the CLI (``gaspar serve --option``) and the
settings reference (docs/settings.rst) are all built from :class:`Settings`: a field's ``metadata`` holds its help
text and, when it has one, its command-line flag.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gaspar.core.autoscale import parse_range
from gaspar.wire.framing import DEFAULT_MAX_MESSAGE_SIZE, ERROR_DETAILS


def _opt(default: Any, help: str, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "cli": cli})


#: Every numeric setting's range, (lowest, highest), None for unbounded. 0 is allowed
#: wherever the settings reference says 0 means "never" or "no limit".
_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "timeout": (0, None),  # 0: never
    "graceful_timeout": (0, None),
    "idle_timeout": (0, None),  # 0: never
    "body_timeout": (0.1, None),
    "body_min_rate": (0, None),  # 0: off
    "max_message_size": (1, None),
    "max_requests": (0, None),  # 0: never
    "max_worker_memory": (0, None),  # 0: never
    "scale_up_wait": (0, None),
    "scale_up_after": (0, None),
    "scale_down_idle": (0, None),
    "max_requests_jitter": (0, None),
    "max_pipeline": (1, None),
    "queue_timeout": (0, None),  # 0: no limit
    "queue_target": (0, None),
    "queue_interval": (0, None),
    "max_queued": (0, None),  # 0: no limit
    "max_buffered_bytes": (1, None),
    "max_connections": (1, None),
    "max_workers": (1, None),
    "prefetch": (0, None),  # 0: never
    "backlog": (1, None),
    "worker_nice": (-20, 19),
    "flap_attempts": (1, None),
    "flap_window": (0, None),
    "flap_retry_in": (0, None),
    "flap_max_retry": (0, None),
    "statsd_interval": (0.001, None),
    "heartbeat_interval": (0.01, None),
    "agent_liveness": (0.05, None),
    "max_agent_workers": (1, None),
}


def _check_number(name: str, value: Any, low: float | None, high: float | None) -> None:
    """A one-line ValueError unless ``value`` is a number within [low, high] (None: unbounded)."""
    if value is None and name in ("timeout", "idle_timeout", "queue_timeout"):
        return  # None is 0: never / no limit
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, not {value!r}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, not {value!r}")
    if low is not None and value < low:
        what = "positive" if 0 < low < 1 else f"at least {low}" if low else "0 or more"
        raise ValueError(f"{name} must be {what}, not {value!r}")


def fewest_workers(remote_bind: str | None) -> int:
    """The fewest workers a front end may run itself: 0 only when agents on other hosts
    may serve (``remote_bind``), else 1. The one rule for ``--workers``, ``Producer``,
    ``gaspar ctl scale`` and SIGTTOU."""
    return 0 if remote_bind else 1


def check_workers(processes: Any, settings: Settings) -> tuple[int, int]:
    """``processes`` as the Producer takes it, as ``(MIN, MAX)``: None (one per CPU), N, or
    ``"MIN:MAX"`` (the default pool sizes itself, as an App's pools can), each from
    :func:`fewest_workers` to ``max_workers``."""
    least = fewest_workers(settings.remote_bind)
    if processes is None:
        n = min(os.cpu_count() or 1, settings.max_workers)
        return n, n
    try:
        low, high = workers_bounds(processes)
    except ValueError:
        low = high = -1
    if low < least:
        more = " (0 only with remote_bind)" if least else ""
        raise ValueError(f"workers must be at least {least}{more}, N or MIN:MAX (None: one per CPU), not {processes!r}")
    if high > settings.max_workers:
        raise ValueError(f"workers ({processes}) must be at most max_workers ({settings.max_workers})")
    return low, high


def workers_bounds(workers: Any) -> tuple[int, int]:
    """``workers``, N or ``"MIN:MAX"``, as ``(MIN, MAX)``; any whole number passes as it
    is (a negative one too: the caller's "at least" says what is wrong); ValueError else."""
    return (workers, workers) if type(workers) is int else parse_range(workers)


def workers_option(text: str) -> int | str:
    """``--workers N`` or ``--workers MIN:MAX``, as the Producer takes it."""
    return int(text) if text.lstrip("-").isdigit() else text


def pool_size(text: str) -> tuple[str, int | str]:
    """``NAME=N`` or ``NAME=MIN:MAX`` of ``--pool``."""
    name, sep, size = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--pool takes NAME=N or NAME=MIN:MAX (0: agents on other hosts only), not {text!r}")
    parse_range(size if ":" in size else int(size) if size.isdigit() else size)
    return name, int(size) if size.isdigit() else size


def default_max_workers() -> int:
    """``max_workers`` when unset: room to scale well past the CPU count, not to fork-bomb."""
    return max(32, 4 * (os.cpu_count() or 1))


@dataclass
class Settings:
    """The daemon's settings; ``Settings(**options)`` rejects unknown names."""

    timeout: float | None = _opt(
        30.0,
        "seconds a handler may run; past it the request fails and the worker is killed, its stack logged first "
        "(0: never); a client may ask for less (handler_timeout), never more. It also bounds a reload's import "
        "of the new code (at least 10 s; 60 s with 0)",
    )
    graceful_timeout: float = _opt(30.0, "seconds a graceful stop waits for accepted requests to finish")
    idle_timeout: float | None = _opt(
        60.0,
        "seconds a connection may stay silent while the server waits for (the rest of) a request, for memory "
        "to read it, or for its client to read replies",
    )
    body_timeout: float = _opt(
        10.0,
        "seconds a request that has begun to arrive may fall behind body_min_rate (it starts with this much time, "
        "earns a second per body_min_rate bytes, banks at most this much) before its connection is reset",
    )
    body_min_rate: int = _opt(
        1024, "bytes a second a request that has begun to arrive must keep up (see body_timeout; 0: off)"
    )
    max_message_size: int = _opt(DEFAULT_MAX_MESSAGE_SIZE, "largest request body, in bytes; larger ones are refused")
    max_requests: int = _opt(0, "recycle a worker after it has handled this many requests (0: never)")
    max_worker_memory: int = _opt(
        0,
        "bytes of resident memory past which a worker is recycled, after its current request (0: never; "
        "Celery's max_memory_per_child)",
    )
    max_requests_jitter: int = _opt(
        0, "add a random 0..N to max_requests per worker, so workers do not all recycle at once"
    )
    max_pipeline: int = _opt(64, "requests in flight at once on one persistent connection")
    abort_on_close: bool = _opt(
        True,
        "drop a request whose client closed or reset its connection before the request started "
        "(off: answer clients that half-close and still read)",
    )
    queue_timeout: float | None = _opt(
        2.0, "seconds a request may wait in the queue at most, overloaded or not; past it, it is shed (0: no limit)"
    )
    queue_target: float = _opt(
        0.005,
        "while overloaded, requests that waited longer than this are shed (at least two handler runs per worker)",
    )
    queue_interval: float = _opt(
        0.1,
        "seconds a queue must stand and keep growing to count as overload: then newest first, shed past "
        "queue_target (at least ten handler runs per worker)",
    )
    scale_up_wait: float = _opt(
        0.05, "a pool of MIN:MAX workers grows while its oldest queued call has waited longer than this (seconds)"
    )
    scale_up_after: float = _opt(0.5, "...for this many seconds running; then one worker more, up to MAX")
    scale_down_idle: float = _opt(
        30.0, "a pool of MIN:MAX workers shrinks by one after some of its workers were idle this long, down to MIN"
    )
    max_queued: int = _opt(10000, "requests waiting at most; past it the oldest is shed (0: no limit)")
    max_buffered_bytes: int = _opt(
        512 * 1024 * 1024,
        "request and reply bytes the front end holds at once, counted as they arrive; past it, it stops reading "
        "(TCP pushes back)",
    )
    max_connections: int = _opt(10000, "open client connections at most; past it, new ones are reset at once")
    max_workers: int | None = _opt(
        None,
        "local worker processes at most, at start and after any scale (gaspar ctl scale, SIGTTIN, "
        "Producer.scale); unset: 4 x the CPU count, at least 32",
    )
    prefetch: int = _opt(
        8,
        "requests handed ahead to a busy worker, only while more than workers x depth are queued (0: never)",
    )
    backlog: int = _opt(2048, "the listening socket's accept queue")
    worker_nice: int = _opt(
        5, "niceness added to the workers, so the front end's dispatch never waits behind handlers for a CPU"
    )
    transport: str = _opt("ipc", "how workers reach the front end: ipc (a private 0700 directory) or tcp (loopback)")
    flap_attempts: int = _opt(5, "worker boot failures within flap_window that count as flapping")
    flap_window: float = _opt(10.0, "seconds over which boot failures are counted")
    flap_retry_in: float = _opt(1.0, "seconds to wait before spawning again after flapping")
    flap_max_retry: int = _opt(
        3,
        "flapping episodes after which the daemon gives up and exits non-zero (a pool that has served backs off)",
    )
    proc_name: str = _opt("gaspar", "the name in process titles (when setproctitle is installed)")
    metrics_bind: str | None = _opt(
        None,
        "HOST:PORT for /metrics (Prometheus), /healthz and /readyz; needs prometheus_client, the metrics extra "
        "(default: off)",
    )
    statsd_host: str | None = _opt(None, "HOST:PORT of a statsd daemon to push the figures to, over UDP (default: off)")
    statsd_prefix: str = _opt("gaspar", "the prefix of every statsd metric name")
    statsd_interval: float = _opt(10.0, "seconds between two statsd pushes")
    access_log: str | None = _opt(None, "a file to log one line per request to, or - for standard error (default: off)")
    capture_output: bool = _opt(False, "write what workers print (stdout, stderr) to the daemon's log, per worker")
    error_detail: str = _opt(
        "message",
        "what an extended client learns of a handler's exception: message (its type and message) or traceback "
        "(its traceback too: file paths and source lines, for development); the log has the traceback either way",
    )
    control_socket: str | None = _opt(
        None,
        "a Unix socket (0600) for gaspar ctl; unset: $XDG_RUNTIME_DIR/gaspar/PORT.sock, else "
        "/tmp/gaspar-UID/PORT.sock; off: none",
    )
    remote_bind: str | None = _opt(
        None,
        "tcp://IP:PORT where agents on other hosts (gaspar worker --connect) join the pool, with CURVE; or "
        "ipc://PATH for agents on this host (a socket 0600 in a directory 0700) (default: off)",
    )
    curve_secret: str | None = _opt(
        None, "this front end's CURVE secret key file (gaspar keygen); with curve_allow, agents must authenticate"
    )
    curve_allow: str | None = _opt(
        None, "a directory of the agents' public key files (NAME.key) allowed to join; read again on reload"
    )
    insecure: bool = _opt(
        False, "allow a tcp:// remote_bind without CURVE (loopback included): anyone who can connect joins"
    )
    max_agent_workers: int = _opt(1024, "worker slots one agent may hold (it may not exceed what its JOIN announced)")
    heartbeat_interval: float = _opt(1.0, "seconds between heartbeats to each agent (and 0MQ's own pings)")
    agent_liveness: float = _opt(
        3.0, "seconds an agent may stay silent; past it, it is lost: its running requests fail as WorkerLost"
    )
    pools: dict[str, int] | None = _opt(
        None,
        "the sizes of an App's pools, {NAME: N} (--pool NAME=N, repeated); they override the App's workers= "
        "(default: as the App says)",
        cli=False,
    )
    on_starting: Callable[[Any], None] | None = _opt(None, "hook(producer), before the workers are forked", cli=False)
    post_fork: Callable[[Any], None] | None = _opt(None, "hook(worker), in each worker after the fork", cli=False)
    worker_exit: Callable[[Any], None] | None = _opt(None, "hook(worker), in a worker that exits cleanly", cli=False)
    on_reload: Callable[[Any], None] | None = _opt(None, "hook(producer), when a reload starts", cli=False)

    def __post_init__(self) -> None:
        if self.max_workers is None:
            self.max_workers = default_max_workers()
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {self.transport!r}")
        if self.error_detail not in ERROR_DETAILS:
            raise ValueError(f"error_detail must be 'message' or 'traceback', not {self.error_detail!r}")
        for name, (low, high) in _LIMITS.items():
            _check_number(name, getattr(self, name), low, high)
        if self.max_buffered_bytes < self.max_message_size:
            raise ValueError("max_buffered_bytes must be at least max_message_size (one request must fit)")
        self._check_remote()
        for name, size in (self.pools or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"pools maps a pool's name to its size, not {name!r}")
            parse_range(size)  # N or "MIN:MAX"
        if not self.timeout:
            self.timeout = None
        if not self.idle_timeout:
            self.idle_timeout = None
        if not self.queue_timeout:
            self.queue_timeout = None

    def _check_remote(self) -> None:
        """A remote bind that anyone could reach must be authenticated, or say it need not be."""
        if (self.curve_secret is None) != (self.curve_allow is None):
            raise ValueError("curve_secret and curve_allow go together (the server's key, the agents' keys)")
        if self.agent_liveness <= self.heartbeat_interval:
            raise ValueError("agent_liveness must be longer than heartbeat_interval")
        if self.remote_bind is None:
            return
        if self.remote_bind.startswith("ipc://"):
            if len(self.remote_bind) <= len("ipc://"):
                raise ValueError("remote_bind ipc:// needs a path (ipc:///run/gaspar/agents.sock)")
            return
        if not self.remote_bind.startswith("tcp://"):
            raise ValueError(f"remote_bind takes tcp://IP:PORT or ipc://PATH, not {self.remote_bind!r}")
        if self.curve_secret is None and not self.insecure:
            raise ValueError(
                f"remote_bind {self.remote_bind} without CURVE: anyone who can connect to it, loopback included "
                "(any user of this host), could join as an agent and read and forge every request. Give "
                "curve_secret and curve_allow (gaspar keygen), use ipc://PATH for agents on this host, or say "
                "insecure (--insecure) on a network you trust"
            )

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]
