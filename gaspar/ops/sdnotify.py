"""systemd's readiness protocol (``Type=notify``), without libsystemd.

``notify("READY=1")`` sends one datagram to the Unix socket named by ``$NOTIFY_SOCKET``: a
path, or an abstract socket when the name starts with ``@``. That is the whole of
``sd_notify(3)`` that gaspar needs. The front end sends:

* ``READY=1`` (with ``STATUS=`` and ``MAINPID=``) once every worker is ready, and again when a
  reload has finished replacing the workers, or has failed and the old workers stay;
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` (systemd >= 253 wants both) when a reload starts;
* ``STOPPING=1`` when a stop begins.

**Limits.** The send is non-blocking and never raises: a full or missing socket loses the
message (systemd's own ``sd_notify`` gives the same guarantee, no more). The first failure
is logged at debug level, later ones are not. ``$NOTIFY_SOCKET`` is left in the
environment, so the workers inherit it; with ``NotifyAccess=main`` systemd ignores anything
but the front end. Other address forms (``vsock:``) are not supported: they count as a
failure.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("gaspar")

_failed_once = False


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1\\nSTATUS=..."``) to ``$NOTIFY_SOCKET``. Returns True if it
    was sent, False if the variable is unset or empty, or the send failed (never raises)."""
    global _failed_once
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    try:
        if name[0] == "@":
            address = "\0" + name[1:]  # Linux's abstract namespace
        elif name[0] == "/":
            address = name
        else:
            raise ValueError(f"unsupported NOTIFY_SOCKET address {name!r}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a full queue loses the message rather than stall the hub
            sock.sendto(state.encode("utf-8"), address)
        return True
    except Exception as exc:
        if not _failed_once:
            _failed_once = True
            log.debug("systemd notification %r to %s failed: %s (not logged again)", state, name, exc)
        return False


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``MONOTONIC_USEC=`` wants."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
