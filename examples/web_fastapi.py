"""FastAPI (or plain Starlette) offloading CPU-heavy work to a gaspar daemon.

One :class:`gaspar.aio.Client` is opened by the lifespan and shared by every request: it
keeps one pipelined connection that carries all concurrent requests at once. Run::

    pip install fastapi uvicorn   # and gaspar 2 itself: README.rst, Installation
    gaspar serve examples.hashing:Hasher --bind 127.0.0.1:10123
    GASPAR_ADDR=127.0.0.1:10123 uvicorn examples.web_fastapi:app --port 8000
    curl 'http://127.0.0.1:8000/hash?data=hello'   # CPU-heavy: runs in a gaspar worker
    curl 'http://127.0.0.1:8000/ping'              # cheap: answered by the event loop
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse

import gaspar
from gaspar import aio

GASPAR_ADDR = os.environ.get("GASPAR_ADDR", "127.0.0.1:10123")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.gaspar = aio.Client(GASPAR_ADDR, timeout=10)
    try:
        yield
    finally:
        await app.state.gaspar.close()


app = FastAPI(lifespan=lifespan)


@app.get("/hash", response_class=PlainTextResponse)
async def hash_(request: Request, data: str = "") -> str:
    try:
        reply = await request.app.state.gaspar.request(data)
    except (gaspar.ServerUnavailable, gaspar.ConnectFailed) as exc:  # overloaded, stopping or down
        raise HTTPException(503, str(exc)) from exc
    return reply.decode()


@app.get("/ping", response_class=PlainTextResponse)
async def ping() -> str:
    return "pong"
