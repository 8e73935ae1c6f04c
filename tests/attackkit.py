"""What every attack test measures: is everyone else still served, is memory bounded, and
does the daemon come back to where it was once the attack ends.

* :class:`Probe` sends an ordinary request every ``interval`` seconds from a thread of its
  own while an attack runs (a new connection each time, as a plain client would) and keeps
  each one's latency or failure: "a normal request is answered within 1 s meanwhile".
* :func:`rss` and :func:`fds` read a process's resident memory and open descriptors from
  /proc; :func:`back_to` waits, bounded, until both are back near a baseline.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from conftest import wait_for


def rss(pid: int) -> int:
    """Resident bytes of ``pid``."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def back_to(
    pid: int, base_fds: int, base_rss: int, rss_slack: int = 32 << 20, timeout: float = 15.0
) -> tuple[int, int]:
    """Wait until ``pid``'s fds are at most ``base_fds`` (+2) and its RSS at most
    ``base_rss + rss_slack``; return what they were at the end (the caller asserts)."""
    wait_for(lambda: fds(pid) <= base_fds + 2 and rss(pid) <= base_rss + rss_slack, timeout, 0.1)
    return fds(pid), rss(pid)


def plain_request(addr: str, message: bytes, timeout: float) -> bytes:
    """A gaspar 1.0 request on a new connection: the reply is everything until the close."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("!I", len(message)) + message)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


class Probe:
    """An ordinary client beside an attack: one request every ``interval`` s, each on a new
    connection, each with ``timeout``; ``latencies`` holds the answered ones' seconds and
    ``failures`` what went wrong with the others."""

    def __init__(self, addr: str, message: bytes = b"probe", interval: float = 0.1, timeout: float = 5.0) -> None:
        self.addr, self.message, self.interval, self.timeout = addr, message, interval, timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                reply = plain_request(self.addr, self.message, self.timeout)
                took = time.monotonic() - start
                if reply == self.message:
                    self.latencies.append(took)
                else:
                    self.failures.append(f"wrong reply {reply[:40]!r} after {took:.3f}s")
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc} after {time.monotonic() - start:.3f}s")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the latencies, failures counted as infinitely slow."""
        values = sorted(self.latencies) + [float("inf")] * len(self.failures)
        if not values:
            return float("inf")
        return values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> str:
        return (
            f"{len(self.latencies)} answered, {len(self.failures)} failed, p50 {self.quantile(0.5):.3f}s, "
            f"p99 {self.quantile(0.99):.3f}s, max {max(self.latencies, default=0):.3f}s; failures: {self.failures[:5]}"
        )
