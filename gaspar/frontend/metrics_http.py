"""The metrics port's HTTP server: ``/metrics``, ``/healthz``, ``/readyz``, off the request path.

A small HTTP/1.x server of gaspar's own, in green threads of the front end's hub (so a scrape
reads the front end's state in the thread that owns it), built so that no peer of the
metrics port can slow the main port or hide the daemon's health:

* **Slow clients are cut off.** A request's head must arrive whole within
  :data:`HEAD_TIMEOUT` seconds of the connection (nginx's ``client_header_timeout``,
  HAProxy's ``timeout http-request``), and be at most :data:`MAX_HEAD` bytes (431 past it,
  as nginx's ``large_client_header_buffers``); a response must be taken within the same
  time. One request per connection (``Connection: close``).
* **Connections are capped**: past :data:`MAX_CONNECTIONS` at once, a new one is closed at
  once (HAProxy's ``maxconn`` on a frontend): a flood of idle connections costs a green
  thread and a descriptor each, up to the cap, and nothing more.
* **Rendering is cached**: ``/metrics`` is rendered at most once a second
  (:class:`RenderCache`) and every scraper in that second gets the same bytes, so eight
  scrapers cost what one does.
* **Scrapes are paced**: at most :data:`SCRAPES_PER_SECOND` ``/metrics`` answers a second,
  all scrapers together; past that a scrape waits its turn (:class:`ScrapePace`), up to
  :data:`QUEUE_AT_MOST` seconds, then gets 503, so scrapers in a loop cannot take the hub.
* **Health needs no rendering**: ``/healthz`` and ``/readyz`` read two booleans, so they
  answer while scrapes and slow connections come and go.

Only ``GET`` and ``HEAD`` are served (405 otherwise; 400 for a head that is not HTTP/1.x).
The rules that need no socket (:func:`parse_head`, :class:`RenderCache`) are pure.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("gaspar")

HEAD_TIMEOUT = 5.0  # seconds for a request's head to arrive, and for its response to be taken
MAX_HEAD = 8192  # bytes of a request's head
MAX_CONNECTIONS = 256  # metrics connections at once
RENDER_EVERY = 1.0  # seconds: /metrics is rendered at most this often
SCRAPES_PER_SECOND = 20  # /metrics answers a second, all scrapers together (a burst of as many)
QUEUE_AT_MOST = 4.0  # seconds a scrape may wait for its turn; past that it gets 503, as late

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def parse_head(head: bytes) -> tuple[int, str, str]:
    """``(0, method, path)`` for a request head (up to its blank line), or ``(status, "",
    "")`` with the error status to answer."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400, "", ""
    method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1")
    if method not in ("GET", "HEAD"):
        return 405, method, ""
    return 0, method, target.split("?", 1)[0]


def response(
    status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", head_only: bool = False
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


@dataclass
class RenderCache:
    """The last rendering of ``/metrics`` and when it was made: made again only when it is
    older than ``every`` seconds. ``renders`` counts them."""

    render: Callable[[], bytes]
    every: float = RENDER_EVERY
    clock: Callable[[], float] = time.monotonic
    body: bytes | None = None
    at: float = 0.0
    renders: int = 0

    def get(self) -> bytes:
        now = self.clock()
        if self.body is None or now - self.at >= self.every:
            self.body, self.at = self.render(), now
            self.renders += 1
        return self.body


@dataclass
class ScrapePace:
    """Turns for ``/metrics`` answers: ``rate`` a second, a burst of as many at once (the
    generic cell rate algorithm). Cached bytes still cost the hub a response each, so
    scrapers in a loop would take it from the main port (QA: 50 of them took an echo
    server from 5,157 to 257 requests a second); past the rate, a scrape waits its turn."""

    rate: float = SCRAPES_PER_SECOND
    clock: Callable[[], float] = time.monotonic
    tat: float = 0.0  # when the next turn is due, theoretically

    def take(self, most: float = QUEUE_AT_MOST) -> float | None:
        """Seconds until this scrape's turn (0: now), the turn taken; None if that is past
        ``most`` (no turn taken)."""
        now, step = self.clock(), 1.0 / self.rate
        tat = max(self.tat, now)
        wait = max(0.0, round(tat - now - (1.0 - step), 9))  # not a float's dust
        if wait > most:
            return None
        self.tat = tat + step
        return wait


class MetricsServer:
    """Serves the metrics port's listening socket ``sock`` (green: call :meth:`serve` in a
    green thread of the front end's hub)."""

    def __init__(
        self,
        sock: socket.socket,
        render: Callable[[], bytes],
        content_type: str,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self.sock, self.content_type = sock, content_type
        self.cache = RenderCache(render)
        self.pace = ScrapePace()
        self.healthy, self.ready = healthy, ready
        self.max_connections, self.head_timeout = max_connections, head_timeout
        self.active = 0
        self.refused = 0  # connections closed at once: past max_connections
        self.timed_out = 0  # connections cut off: their head (or their reading) too slow
        self.served = 0
        self.paced = 0  # scrapes that waited for their turn (or got 503 after QUEUE_AT_MOST)

    def serve(self) -> None:
        """Accept for ever (until the green thread is killed)."""
        import eventlet
        from eventlet.greenio import GreenSocket

        listener = GreenSocket(self.sock)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as exc:  # EMFILE and the like: wait a little, go on
                log.warning("The metrics port could not accept: %s", exc)
                eventlet.sleep(0.1)
                continue
            if self.active >= self.max_connections:
                self.refused += 1
                _abort(conn)
                continue
            self.active += 1
            eventlet.spawn_n(self._handle, conn)

    def _handle(self, conn: socket.socket) -> None:
        import eventlet

        try:
            with eventlet.Timeout(self.head_timeout, False):
                status, method, path = self._read(conn)
                conn.sendall(self._answer(status, method, path))
                return
            self.timed_out += 1  # the head, or the response, took too long
        except OSError:
            pass
        finally:
            self.active -= 1
            _abort(conn)

    def _read(self, conn: socket.socket) -> tuple[int, str, str]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD:
                return 431, "", ""
            chunk = conn.recv(4096)
            if not chunk:
                raise ConnectionResetError("closed before its head ended")
            buf += chunk
        head = buf.split(b"\r\n\r\n", 1)[0]
        if len(head) > MAX_HEAD:
            return 431, "", ""
        return parse_head(head)

    def _answer(self, status: int, method: str, path: str) -> bytes:
        head_only = method == "HEAD"
        if status:
            return response(status, f"{_REASONS.get(status, 'error')}\n".encode())
        self.served += 1
        if path == "/metrics":
            if not self._turn():
                return response(503, b"too many scrapes; try again later\n", head_only=head_only)
            try:
                body = self.cache.get()
            except Exception:  # a scrape must never take the daemon down
                log.exception("Error building /metrics")
                return response(500, b"error building metrics\n", head_only=head_only)
            return response(200, body, self.content_type, head_only)
        if path in ("/healthz", "/readyz"):
            ok = self.healthy() if path == "/healthz" else self.ready()
            return response(200 if ok else 503, b"ok\n" if ok else b"unavailable\n", head_only=head_only)
        return response(404, b"not found: try /metrics, /healthz or /readyz\n", head_only=head_only)

    def _turn(self) -> bool:
        """Wait for this scrape's turn (:class:`ScrapePace`); False: none within QUEUE_AT_MOST
        (after waiting that long, so a refused scraper does not come straight back)."""
        import eventlet

        wait = self.pace.take()
        if wait:
            self.paced += 1
            eventlet.sleep(wait)
        elif wait is None:
            self.paced += 1
            eventlet.sleep(QUEUE_AT_MOST)
        return wait is not None

    def snapshot(self) -> dict[str, int]:
        return {
            "connections": self.active,
            "served": self.served,
            "paced": self.paced,
            "renders": self.cache.renders,
            "refused": self.refused,
            "timed_out": self.timed_out,
        }


def _abort(conn: socket.socket) -> None:
    """Close without lingering (a peer that does not read never holds our descriptor)."""
    try:
        conn.close()
    except OSError:
        pass


__all__ = ["MetricsServer", "RenderCache", "parse_head", "response"]
