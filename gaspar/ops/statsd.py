"""Push the front end's figures to a statsd daemon over UDP (``statsd_host``).

No dependency: the ``statsd`` package would add one for some thirty lines of UDP, and it
sends a datagram per metric from a blocking socket, while gaspar wants the lines batched
into a few packets and every send non-blocking inside the front end's eventlet hub.

Two parts, as in the rest of gaspar::

    _stats() snapshots --format_metrics--> lines --packets--> datagrams --sendto--> statsd
       (prev, now)          pure                   pure                   StatsdPusher

* :func:`format_metrics` and :func:`packets` are pure: two consecutive snapshots in, statsd
  lines and UDP payloads out. They import neither eventlet nor sockets.
* :class:`StatsdPusher` is a loop for a green thread of the front end's own hub, so each
  snapshot is taken in the thread that owns the dispatcher (no lock, as for ``/metrics``).
  Every ``interval`` it takes a snapshot, formats it against the previous one and sends
  the packets with a non-blocking ``sendto``. The host is resolved once, when the loop
  starts (an IPv4 address first when a name has both, since statsd listens on udp4 by
  default); a name that does not resolve is tried again each interval. That one lookup
  blocks the hub for its duration, as any ``getaddrinfo`` without a green resolver.

What statsd receives (``P`` is the sanitized prefix, ``gaspar`` by default):

* counters, as the increase since the previous push: ``P.requests.<outcome>``,
  ``P.shed.<reason>``, ``P.worker_restarts.<reason>``, ``P.<timing>.count``. A counter
  that did not move is left out (statsd counts an absent counter as 0). The first push
  counts from the daemon's start. When the figures go down (a daemon restarted behind
  the ``stats`` callable), the new figures are taken as the increase: never a negative.
* gauges: ``P.queue_length``, ``P.in_flight``, ``P.connections``, ``P.workers.<state>``,
  ``P.workers_desired``, ``P.buffered_bytes``, ``P.overloaded`` (0 or 1),
  ``P.worker.<n>.rss_bytes``, ``P.worker.<n>.cpu_percent``, ``P.front_end.rss_bytes``,
  ``P.front_end.cpu_percent``, ``P.front_end.cpu_wait_percent`` (Linux: the time its
  threads were ready to run but had no CPU); with agents on other hosts, ``P.agents.live``
  and ``P.agent.<name>.workers`` / ``.busy`` / ``.rss_bytes`` (the agent's and its
  workers' resident memory, as reported with its last pong; and counters
  ``P.agents.<event>``: agents_lost, requests_lost, joins_refused, handshakes_failed,
  stale_messages). CPU percent is of one core, over the interval (a worker born during it:
  over its life); the front end's needs two snapshots of the same pid.
* timings of the interval, as gauges in milliseconds, for ``queue_wait_ms``,
  ``handler_ms`` and ``request_ms``: ``.mean`` (from the sums and counts) and ``.p50``,
  ``.p99`` (estimated from the histogram's bucket increases, linear within a bucket, as
  ``telemetry.Histogram.quantile``: a precision of one bucket, not one request). An
  interval with no request sends no timing gauge: statsd repeats the last value.

Honest limits: this is UDP. A packet lost, or refused while statsd is down, loses that
interval's counts (they are not sent again); send errors are counted in ``errors`` and
logged at most once a minute, never raised. A round that raises is logged the same way
and the loop goes on with the next one.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from gaspar.ops.telemetry import Histogram

log = logging.getLogger("gaspar")

#: Histograms of the snapshot -> the name of their timings.
TIMINGS = {
    "queue_wait_seconds": "queue_wait_ms",
    "handler_duration_seconds": "handler_ms",
    "request_duration_seconds": "request_ms",
}
#: The largest payload: statsd's own default for a 1,500-byte MTU.
PACKET_SIZE = 1432
WARN_EVERY = 60.0  # seconds between two warnings about failed pushes


def sanitize(name: str) -> str:
    """A metric name of ``[a-z0-9_.]`` only: lowercase, other characters as ``_``, no
    empty part between dots."""
    name = re.sub(r"[^a-z0-9_.]", "_", name.lower())
    return re.sub(r"\.{2,}", ".", name).strip(".")


def format_metrics(prev: dict[str, Any] | None, stats: dict[str, Any], prefix: str) -> list[str]:
    """statsd lines for the interval between two ``Producer._stats()`` snapshots
    (``prev`` None: since the daemon started)."""
    p = sanitize(prefix)
    p = p + "." if p else ""
    if prev is not None and (prev.get("pid") != stats.get("pid") or prev.get("uptime", 0) > stats.get("uptime", 0)):
        prev = None  # another daemon, or a restarted one: count from its start
    before = prev or {}
    elapsed = stats["time"] - before["time"] if prev is not None else None
    if elapsed is not None and elapsed <= 0:
        elapsed = None  # the same instant, or the wall clock stepped back: no CPU percent
    lines: list[str] = []

    def counter(name: str, now: float, then: float) -> None:
        delta = now - then if now >= then else now  # gone down: a reset
        if delta:
            lines.append(f"{p}{sanitize(name)}:{_num(delta)}|c")

    def gauge(name: str, value: float | None) -> None:
        if value is not None:
            lines.append(f"{p}{sanitize(name)}:{_num(value)}|g")

    for outcome, n in stats["outcomes"].items():
        counter(f"requests.{outcome}", n, before.get("outcomes", {}).get(outcome, 0))
    for key, n in stats["counters"].items():
        if key.startswith("shed_"):
            counter(f"shed.{key[5:]}", n, before.get("counters", {}).get(key, 0))
    for reason, n in stats["restarts_by_reason"].items():
        counter(f"worker_restarts.{reason}", n, before.get("restarts_by_reason", {}).get(reason, 0))

    for name, h in (stats.get("handlers") or {}).items():
        then = before.get("handlers", {}).get(name, {}).get("outcomes", {})
        for outcome, n in h["outcomes"].items():
            counter(f"handler.{name}.{outcome}", n, then.get(outcome, 0))
    for name, figures in (stats.get("autoscale") or {}).items():
        for bound in ("size", "min", "max"):
            gauge(f"autoscale.{name}.{bound}", figures[bound])
    for name, figures in (stats.get("pools") or {}).items():
        for key in ("workers", "queued", "running"):
            gauge(f"pool.{name}.{key}", figures[key])
    gauge("queue_length", stats["queued"])
    gauge("in_flight", stats["pending"])
    gauge("connections", stats["connections"])
    for state, n in stats["worker_states"].items():
        gauge(f"workers.{state}", n)
    gauge("workers_desired", stats["target_workers"])
    gauge("buffered_bytes", stats["overload"]["buffered_bytes"])
    gauge("overloaded", int(bool(stats["overload"]["overloaded"])))
    gauge("accept_backlog", stats["overload"].get("accept_backlog", 0))
    was = {w["number"]: w for w in before.get("workers", ())}
    for w in stats["workers"]:
        if w.get("cpu_seconds") is None:
            continue  # gone between the listing and the /proc read
        gauge(f"worker.{w['number']}.rss_bytes", w["rss_bytes"])
        gauge(f"worker.{w['number']}.cpu_percent", _worker_cpu(was.get(w["number"]), w, elapsed))
    remote, remote_was = stats.get("remote"), before.get("remote") or {}
    if remote:  # agents on other hosts (remote_bind)
        gauge("agents.live", remote["agents_live"])
        for event in ("agents_lost", "requests_lost", "joins_refused", "handshakes_failed", "stale_messages"):
            counter(f"agents.{event}", remote[event], remote_was.get(event, 0))
        for a in stats.get("agents") or []:
            if a["state"] in ("joined", "leaving"):
                name = sanitize(a["name"]).replace(".", "_")  # one part of the metric name
                gauge(f"agent.{name}.workers", a["slots"])
                gauge(f"agent.{name}.busy", a["busy"])
                sizes = [a.get("rss_bytes"), *(w.get("rss_bytes") for w in a.get("workers") or [])]
                if any(n is not None for n in sizes):  # the agent's and its workers', at its last pong
                    gauge(f"agent.{name}.rss_bytes", sum(n for n in sizes if n is not None))
    front, front_was = stats.get("front_end"), before.get("front_end")
    if front:
        gauge("front_end.rss_bytes", front["rss_bytes"])
        if front_was and elapsed:
            gauge("front_end.cpu_percent", _percent(front["cpu_seconds"] - front_was["cpu_seconds"], elapsed))
            wait, wait_was = front.get("cpu_wait_seconds"), front_was.get("cpu_wait_seconds")
            if wait is not None and wait_was is not None:  # Linux: time it was ready but had no CPU
                gauge("front_end.cpu_wait_percent", _percent(wait - wait_was, elapsed))

    for hist, name in TIMINGS.items():
        h = interval_histogram(before.get("histograms", {}).get(hist), stats["histograms"][hist])
        counter(f"{name}.count", h.count, 0)
        if h.count:
            gauge(f"{name}.mean", max(0.0, h.sum) / h.count * 1000)
            gauge(f"{name}.p50", h.quantile(0.5) * 1000)
            gauge(f"{name}.p99", h.quantile(0.99) * 1000)
    return lines


def interval_histogram(prev: dict[str, Any] | None, now: dict[str, Any]) -> Histogram:
    """A :class:`Histogram` of what was observed between two of its snapshots (the whole
    of ``now`` when there is no ``prev`` or a count went down)."""
    h = Histogram.from_snapshot(now)
    since = h.minus(Histogram.from_snapshot(prev)) if prev is not None else None
    return h if since is None else since


def _worker_cpu(was: dict[str, Any] | None, w: dict[str, Any], elapsed: float | None) -> float | None:
    """A worker's CPU percent over the interval; over its life if it was born in it."""
    if was is not None and was["pid"] == w["pid"] and was.get("cpu_seconds") is not None and elapsed:
        return _percent(w["cpu_seconds"] - was["cpu_seconds"], elapsed)
    if w.get("age_seconds"):
        return _percent(w["cpu_seconds"], w["age_seconds"])
    return None


def _percent(cpu: float, seconds: float) -> float:
    return max(0.0, cpu) / seconds * 100


def _num(value: float) -> str:
    """A statsd value: an integer as is, a float with at most 3 decimals, never exponents."""
    if isinstance(value, int):
        return str(value)
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def packets(lines: Iterable[str], size: int = PACKET_SIZE) -> list[bytes]:
    """``lines`` joined with newlines into payloads of at most ``size`` bytes; a line is
    never split (one longer than ``size`` goes alone in its own payload)."""
    out: list[bytes] = []
    current = b""
    for line in lines:
        data = line.encode("ascii")
        if current and len(current) + 1 + len(data) <= size:
            current += b"\n" + data
            continue
        if current:
            out.append(current)
        current = data
    if current:
        out.append(current)
    return out


class _Stop(Protocol):
    def is_set(self) -> bool: ...


class StatsdPusher:
    """Every ``interval`` seconds, ``stats()`` formatted and sent to ``address`` over UDP.

    ``run()`` is the loop, for a green thread of the front end's hub; ``push()`` is one
    round. ``sent`` counts the packets sent, ``errors`` the packets and rounds that failed.
    """

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        address: tuple[str, int],
        prefix: str = "gaspar",
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.address = address
        self.prefix = prefix
        self.interval = interval
        self.clock = clock
        self.sock: socket.socket | None = None
        self.target: Any = None  # the resolved socket address
        self.prev: dict[str, Any] | None = None
        self.sent = 0
        self.errors = 0
        self._warned_at: float | None = None
        self._failures = 0  # since the last warning

    def run(self, sleep: Callable[[float], Any], stop: _Stop | None = None) -> None:
        """Push every ``interval`` until killed (a green thread: ``sleep`` is the front end's
        ``eventlet.sleep``) or ``stop.is_set()``."""
        host, port = self.address
        log.info("Statsd: pushing to %s:%s every %gs, prefix %r", host, port, self.interval, sanitize(self.prefix))
        next_at = self.clock()
        try:
            while stop is None or not stop.is_set():
                next_at = max(next_at + self.interval, self.clock())  # a late round: no catching up
                sleep(max(0.0, next_at - self.clock()))
                if stop is not None and stop.is_set():
                    break
                try:
                    if self.sock is None:
                        self.open()
                    self.push()
                except Exception as exc:  # one bad round must not end the pushes
                    self._failed(exc, trace=True)
        finally:
            self.close()

    def open(self) -> None:
        """Resolve the address and make the non-blocking UDP socket."""
        host, port = self.address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, proto, _, target = min(infos, key=lambda info: info[0] != socket.AF_INET)
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        sock.setblocking(False)
        self.sock, self.target = sock, target

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def push(self) -> int:
        """One round: a snapshot, its lines, their packets sent. Returns how many were sent."""
        stats = self.stats()
        lines = format_metrics(self.prev, stats, self.prefix)
        self.prev = stats
        sent = 0
        for payload in packets(lines):
            try:
                self.sock.sendto(payload, self.target)
            except OSError as exc:  # ECONNREFUSED, EAGAIN (buffer full), EMSGSIZE...
                self._failed(exc)
            else:
                sent += 1
        self.sent += sent
        return sent

    def _failed(self, exc: BaseException, trace: bool = False) -> None:
        """Count a failure; warn about it unless a warning was given less than a minute ago."""
        self.errors += 1
        self._failures += 1
        now = self.clock()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        log.warning(
            "Statsd push to %s:%s failed: %s (%d failure(s) since the last warning; next warning in a minute at most)",
            *self.address,
            exc,
            self._failures,
            exc_info=trace,
        )
        self._warned_at, self._failures = now, 0


__all__ = ["format_metrics", "packets", "sanitize", "interval_histogram", "StatsdPusher", "TIMINGS", "PACKET_SIZE"]
