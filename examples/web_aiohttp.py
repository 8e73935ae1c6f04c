"""aiohttp offloading CPU-heavy work to a gaspar daemon.

One :class:`gaspar.aio.Client` is opened in ``on_startup``, closed in ``on_cleanup`` and
shared by every handler (one pipelined connection for all concurrent requests). Run::

    pip install aiohttp   # and gaspar 2 itself: README.rst, Installation
    gaspar serve examples.hashing:Hasher --bind 127.0.0.1:10123
    GASPAR_ADDR=127.0.0.1:10123 python -m aiohttp.web -H 127.0.0.1 -P 8000 examples.web_aiohttp:make_app
    # or: PORT=8000 python examples/web_aiohttp.py
    curl 'http://127.0.0.1:8000/hash?data=hello'   # CPU-heavy: runs in a gaspar worker
    curl 'http://127.0.0.1:8000/ping'              # cheap: answered by the event loop
"""

from __future__ import annotations

import os

from aiohttp import web

import gaspar
from gaspar import aio

GASPAR_ADDR = os.environ.get("GASPAR_ADDR", "127.0.0.1:10123")
GASPAR = web.AppKey("gaspar", aio.Client)


async def open_gaspar(app: web.Application) -> None:
    app[GASPAR] = aio.Client(GASPAR_ADDR, timeout=10)


async def close_gaspar(app: web.Application) -> None:
    await app[GASPAR].close()


async def hash_(request: web.Request) -> web.Response:
    try:
        reply = await request.app[GASPAR].request(request.query.get("data", ""))
    except (gaspar.ServerUnavailable, gaspar.ConnectFailed) as exc:  # overloaded, stopping or down
        raise web.HTTPServiceUnavailable(text=str(exc)) from exc
    return web.Response(text=reply.decode())


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


def make_app(argv: list[str] | None = None) -> web.Application:
    app = web.Application()
    app.on_startup.append(open_gaspar)
    app.on_cleanup.append(close_gaspar)
    app.add_routes([web.get("/hash", hash_), web.get("/ping", ping)])
    return app


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
