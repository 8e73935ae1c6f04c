"""Flask under gunicorn's threaded workers, offloading CPU-heavy work to a gaspar daemon.

:class:`gaspar.client.Client` is thread-safe (each request borrows a pooled connection of
its own), so one module-level client is shared by all of a worker's threads. It opens no
socket until the first request, so ``gunicorn --preload`` (which imports the app before
forking) is fine too. Run::

    pip install flask gunicorn   # and gaspar 2 itself: README.rst, Installation
    gaspar serve examples.hashing:Hasher --bind 127.0.0.1:10123
    GASPAR_ADDR=127.0.0.1:10123 gunicorn -k gthread --threads 4 -b 127.0.0.1:8000 examples.web_flask:app
    curl 'http://127.0.0.1:8000/hash?data=hello'   # CPU-heavy: runs in a gaspar worker
    curl 'http://127.0.0.1:8000/ping'              # cheap: a thread of the gunicorn worker

The thread waiting for gaspar holds no CPU, so a few threads per gunicorn worker serve many
heavy requests at once; size gaspar's ``--workers`` to the cores.
"""

from __future__ import annotations

import os

from flask import Flask, request

import gaspar
from gaspar.client import Client

GASPAR_ADDR = os.environ.get("GASPAR_ADDR", "127.0.0.1:10123")
client = Client(GASPAR_ADDR, timeout=10)
app = Flask(__name__)


@app.get("/hash")
def hash_():
    try:
        reply = client.request(request.args.get("data", ""))
    except (gaspar.ServerUnavailable, gaspar.ConnectFailed) as exc:  # overloaded, stopping or down
        return str(exc), 503, {"Content-Type": "text/plain"}
    return reply.decode(), 200, {"Content-Type": "text/plain"}


@app.get("/ping")
def ping():
    return "pong", 200, {"Content-Type": "text/plain"}
