"""What the front end opens at start and closes at the end, in that order.

The 0MQ context (and, with ``transport = ipc``, a private directory for the workers'
socket), the clients' port, the metrics port, the control socket, the statsd address and
the access log. Each step records what it was doing, so a start that fails says where
("cannot listen at 127.0.0.1:8000: Address already in use"), and :meth:`Ports.close`
undoes whatever was opened, whichever step failed.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from typing import Any

import zmq

from gaspar.ops.ipcdir import make_ipc_dir
from gaspar.ops.logs import close_access_log, open_access_log

log = logging.getLogger("gaspar")


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket. No SO_REUSEPORT: a second daemon on a taken port must fail."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class Ports:
    """The front end's ports and files, opened in two steps around the 0MQ sockets'
    binding: :meth:`open_context` (the context and the workers' endpoint), then
    :meth:`open` (everything a client or an operator connects to)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.step = ""  # what was being opened, for the log line if it fails
        self.ipc_dir: str | None = None
        self.ctx: zmq.Context | None = None
        self.listener: socket.socket | None = None
        self.server_addr: tuple[str, int] | None = None
        self.metrics_listener: socket.socket | None = None
        self.metrics_addr: tuple[str, int] | None = None
        self.control_server: Any = None
        self.statsd_addr: tuple[str, int] | None = None
        self.access_log: logging.Logger | None = None

    def open_context(self) -> str:
        """The 0MQ context; returns the endpoint the workers connect to."""
        if self.settings.transport == "ipc":
            self.ipc_dir = make_ipc_dir()  # mode 0700; stale ones removed first
            endpoint = f"ipc://{self.ipc_dir}/workers"
        else:
            endpoint = "tcp://127.0.0.1:*"
        self.ctx = zmq.Context(1)
        return endpoint

    def open(self, host: str, port: int) -> None:
        """The clients' port, then what operators use."""
        from gaspar.client import parse_address
        from gaspar.frontend.ctlserver import ControlServer

        s = self.settings
        self.step = f": cannot listen at {host}:{port}"
        self.listener = listen(host, port, s.backlog)
        self.server_addr = self.listener.getsockname()[:2]
        if s.metrics_bind:
            from gaspar.ops import metrics

            metrics.require_prometheus()
            self.step = f": cannot listen at {s.metrics_bind} (metrics_bind)"
            self.metrics_listener = listen(*parse_address(s.metrics_bind))
            self.metrics_addr = self.metrics_listener.getsockname()[:2]
        self.step = ": cannot open the control socket (control_socket)"
        self.control_server = ControlServer.open(s.control_socket, self.server_addr[1])  # None if off
        if s.statsd_host:
            self.statsd_addr = parse_address(s.statsd_host)
        if s.access_log:
            self.step = f": cannot open the access log {s.access_log}"
            self.access_log = open_access_log(s.access_log)
        self.step = ""

    def announce(self, workers: int, gateway: Any) -> None:
        """The start's log lines: where each port is."""
        log.info("Listening at: tcp://%s:%s (%s)", *self.server_addr, os.getpid())
        if self.metrics_addr is not None:
            log.info("Metrics at: http://%s:%s/metrics", *self.metrics_addr)
        if self.control_server is not None:
            log.info("Control socket at: %s", self.control_server.path)
        log.info("Using %s workers over %s", workers, self.settings.transport)
        if gateway is not None:
            curve = "CURVE" if gateway.port.gatekeeper is not None else "no authentication"
            log.info("Agents join at: %s (%s)", gateway.endpoint, curve)

    def close_listeners(self, listener_closed: bool) -> None:
        """What clients and operators connect to (the clients' port unless the acceptor
        has closed it: ``listener_closed``)."""
        if self.listener is not None and not listener_closed:
            self.listener.close()
        if self.metrics_listener is not None:
            self.metrics_listener.close()
        if self.control_server is not None:
            self.control_server.close()
        if self.access_log is not None:
            close_access_log(self.access_log)
            self.access_log = None

    def close_context(self) -> None:
        """The 0MQ context, once every socket on it is closed, and the ipc directory."""
        if self.ctx is not None:
            self.ctx.term()
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)
