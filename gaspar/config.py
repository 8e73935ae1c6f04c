"""Every setting of the daemon, defined once.

The Python API (``Producer(..., **options)``), the CLI (``gaspar serve --option``) and the
README's table are all built from :class:`Settings`: a field's ``metadata`` holds its help
text and, when it has one, its command-line flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .framing import DEFAULT_MAX_MESSAGE_SIZE


def _opt(default: Any, help: str, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class Settings:
    """The daemon's settings; ``Settings(**options)`` rejects unknown names."""

    timeout: float | None = _opt(
        30.0, "seconds a handler may run; past it the request fails and the worker is killed (0: never)"
    )
    graceful_timeout: float = _opt(30.0, "seconds a graceful stop waits for accepted requests to finish")
    idle_timeout: float | None = _opt(
        60.0, "seconds a connection may stay silent while the server waits for (the rest of) a request"
    )
    max_message_size: int = _opt(DEFAULT_MAX_MESSAGE_SIZE, "largest request body, in bytes; larger ones are refused")
    max_requests: int = _opt(0, "recycle a worker after it has handled this many requests (0: never)")
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
    max_queued: int = _opt(10000, "requests waiting at most; past it the oldest is shed (0: no limit)")
    max_buffered_bytes: int = _opt(
        512 * 1024 * 1024,
        "request and reply bytes the front end holds at once; past it, it stops reading bodies (TCP pushes back)",
    )
    max_connections: int = _opt(10000, "open client connections at most; past it, new ones are reset at once")
    prefetch: int = _opt(
        4,
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
    flap_max_retry: int = _opt(3, "flapping episodes after which the daemon gives up and exits non-zero")
    proc_name: str = _opt("gaspar", "the name in process titles (when setproctitle is installed)")
    metrics_bind: str | None = _opt(
        None, "HOST:PORT for /metrics (Prometheus), /healthz and /readyz; needs gaspar[metrics] (default: off)"
    )
    statsd_host: str | None = _opt(None, "HOST:PORT of a statsd daemon to push the figures to, over UDP (default: off)")
    statsd_prefix: str = _opt("gaspar", "the prefix of every statsd metric name")
    statsd_interval: float = _opt(10.0, "seconds between two statsd pushes")
    access_log: str | None = _opt(None, "a file to log one line per request to, or - for standard error (default: off)")
    capture_output: bool = _opt(False, "write what workers print (stdout, stderr) to the daemon's log, per worker")
    on_starting: Callable[[Any], None] | None = _opt(None, "hook(producer), before the workers are forked", cli=False)
    post_fork: Callable[[Any], None] | None = _opt(None, "hook(worker), in each worker after the fork", cli=False)
    worker_exit: Callable[[Any], None] | None = _opt(None, "hook(worker), in a worker that exits cleanly", cli=False)
    on_reload: Callable[[Any], None] | None = _opt(None, "hook(producer), when a reload starts", cli=False)

    def __post_init__(self) -> None:
        if self.transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', not {self.transport!r}")
        if not self.timeout:
            self.timeout = None
        if not self.idle_timeout:
            self.idle_timeout = None
        if not self.queue_timeout:
            self.queue_timeout = None
        if self.statsd_interval <= 0:
            raise ValueError("statsd_interval must be positive")
        for name in ("max_message_size", "max_pipeline", "flap_attempts", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("queue_target", "queue_interval", "max_queued"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_buffered_bytes < self.max_message_size:
            raise ValueError("max_buffered_bytes must be at least max_message_size (one request must fit)")

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]
