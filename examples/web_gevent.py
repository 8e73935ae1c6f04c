"""A gevent WSGI server offloading CPU-heavy work to a gaspar daemon.

``monkey.patch_all()`` comes first; after it :class:`gaspar.client.Client` (plain sockets)
is green: a greenlet waiting for gaspar yields to the others. One client, shared by every
greenlet, keeps a pool of persistent connections. Run::

    pip install gevent   # and gaspar 2 itself: README.rst, Installation
    gaspar serve examples.hashing:Hasher --bind 127.0.0.1:10123
    GASPAR_ADDR=127.0.0.1:10123 PORT=8000 python examples/web_gevent.py
    curl 'http://127.0.0.1:8000/hash?data=hello'   # CPU-heavy: runs in a gaspar worker
    curl 'http://127.0.0.1:8000/ping'              # cheap: answered by another greenlet
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import signal  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import gaspar  # noqa: E402
from gaspar.client import Client  # noqa: E402

GASPAR_ADDR = os.environ.get("GASPAR_ADDR", "127.0.0.1:10123")
client = Client(GASPAR_ADDR, timeout=10)


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/hash":
        data = parse_qs(environ.get("QUERY_STRING", "")).get("data", [""])[0]
        try:
            status, body = "200 OK", client.request(data)
        except (gaspar.ServerUnavailable, gaspar.ConnectFailed) as exc:  # overloaded, stopping or down
            status, body = "503 Service Unavailable", str(exc).encode()
    elif path == "/ping":
        status, body = "200 OK", b"pong"
    else:
        status, body = "404 Not Found", b"not found"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def main() -> None:
    server = WSGIServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), app, log=None)
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, server.stop)
    server.serve_forever()
    client.close()


if __name__ == "__main__":
    main()
