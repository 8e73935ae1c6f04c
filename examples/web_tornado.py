"""Tornado offloading CPU-heavy work to a gaspar daemon.

Tornado 6 runs on asyncio, so :class:`gaspar.aio.Client` works on its loop: open one in
``main`` (inside the running loop), hand it to the handlers, close it on the way out. Run::

    pip install tornado   # and gaspar 2 itself: README.rst, Installation
    gaspar serve examples.hashing:Hasher --bind 127.0.0.1:10123
    GASPAR_ADDR=127.0.0.1:10123 PORT=8000 python examples/web_tornado.py
    curl 'http://127.0.0.1:8000/hash?data=hello'   # CPU-heavy: runs in a gaspar worker
    curl 'http://127.0.0.1:8000/ping'              # cheap: answered by the event loop
"""

from __future__ import annotations

import asyncio
import os
import signal

import tornado.web

import gaspar
from gaspar import aio

GASPAR_ADDR = os.environ.get("GASPAR_ADDR", "127.0.0.1:10123")


class HashHandler(tornado.web.RequestHandler):
    def initialize(self, gaspar_client: aio.Client) -> None:
        self.gaspar = gaspar_client

    async def get(self) -> None:
        try:
            reply = await self.gaspar.request(self.get_query_argument("data", ""))
        except (gaspar.ServerUnavailable, gaspar.ConnectFailed) as exc:  # overloaded, stopping or down
            raise tornado.web.HTTPError(503, str(exc)) from exc
        self.set_header("Content-Type", "text/plain")
        self.write(reply)


class PingHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        self.write("pong")


def make_app(gaspar_client: aio.Client) -> tornado.web.Application:
    return tornado.web.Application([(r"/hash", HashHandler, {"gaspar_client": gaspar_client}), (r"/ping", PingHandler)])


async def main() -> None:
    client = aio.Client(GASPAR_ADDR, timeout=10)
    server = make_app(client).listen(int(os.environ.get("PORT", "8000")), "127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
