"""gaspar: take CPU-heavy work out of an event loop.

An application sends bytes over TCP; gaspar's eventlet front end (the :class:`Producer`)
hands each request over 0MQ to a forked worker process running the user's handler (the
:class:`Consumer`), on every core, and sends the reply back to the connection that asked::

    import gaspar

    def echo(message):
        return message

    consumer = gaspar.Consumer(handler=echo)
    producer = gaspar.Producer(consumer, 10123)
    producer.start()

The public surface is what this module exports (``__all__``) plus ``gaspar.client``
(``request``, ``pack``, ``Client``) and ``gaspar.aio`` (asyncio). Importing ``gaspar``
does not import eventlet; only the producer needs it.
"""

# ruff: noqa: E402  (the first statements must run before anything else is imported)
import sys

if sys.argv[:1] == ["-m"]:  # `python -m gaspar`: the current directory must not shadow the standard library
    from gaspar import apppath

    if apppath.runs_gaspar(getattr(sys, "orig_argv", [])):
        apppath.demote_cwd()

from typing import TYPE_CHECKING, Any

from gaspar.app import App
from gaspar.config import Settings
from gaspar.errors import (
    BadRequest,
    ClientClosed,
    ConnectFailed,
    ConnectionLost,
    GasparError,
    HandlerError,
    NoSuchHandler,
    Overloaded,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    ServerUnavailable,
    WorkerDied,
    WorkerLost,
    WorkerTimeout,
)
from gaspar.executor import Executor
from gaspar.process.worker import Consumer, Worker
from gaspar.version import __version__

__all__ = [
    "__version__",
    "App",
    "Executor",
    "Consumer",
    "Producer",
    "Settings",
    "Worker",
    "GasparError",
    "RemoteError",
    "HandlerError",
    "WorkerDied",
    "WorkerLost",
    "WorkerTimeout",
    "BadRequest",
    "NoSuchHandler",
    "Overloaded",
    "ServerUnavailable",
    "ConnectFailed",
    "ConnectionLost",
    "RequestTimeout",
    "ProtocolError",
    "ClientClosed",
]

if TYPE_CHECKING:
    from gaspar.frontend.producer import Producer


def __getattr__(name: str) -> Any:
    # The producer (and eventlet with it) is imported on first use, so clients and workers
    # that only need gaspar.client or the errors never import eventlet.
    if name == "Producer":
        from gaspar.frontend.producer import Producer

        return Producer
    raise AttributeError(f"module 'gaspar' has no attribute {name!r}")
