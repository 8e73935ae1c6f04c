"""Baseline: an asyncio server handing each request to a ProcessPoolExecutor.

``asyncio.start_server`` reads the request, ``loop.run_in_executor(pool, handler, msg)``
runs it in one of ``--workers`` processes, and the reply is written back. ``--uvloop``
uses uvloop when it is installed (plain asyncio otherwise).

    python bench/baseline_asyncio_ppe.py --port 9000 --workers 2 --handler bench.handlers:echo
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

try:
    from bench._common import BACKLOG, EXTENDED, HEADER, load_handler, parse_args
except ImportError:  # run as a script: bench/ is sys.path[0]
    from _common import BACKLOG, EXTENDED, HEADER, load_handler, parse_args


def _noop() -> None:
    pass


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool is shut down by the parent


async def serve(args, handler, pool: ProcessPoolExecutor) -> None:
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            (word,) = HEADER.unpack(await reader.readexactly(4))
            if word & EXTENDED:
                raise ValueError("extended requests are not supported")
            body = await reader.readexactly(word)
            reply = await loop.run_in_executor(pool, handler, body)
            writer.write(reply)
            await writer.drain()
        except Exception:
            writer.transport.abort()  # a reset: how the plain protocol reports an error
        else:
            writer.close()

    server = await asyncio.start_server(handle, args.host, args.port, backlog=BACKLOG)
    print(f"asyncio_ppe: listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    handler = load_handler(args.handler)
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("asyncio_ppe: uvloop is not installed; using asyncio's own loop", file=sys.stderr)
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_ignore_sigint) as pool:
        # start every worker now, not on the first requests
        for f in [pool.submit(_noop) for _ in range(args.workers * 2)]:
            f.result()
        asyncio.run(serve(args, handler, pool))


if __name__ == "__main__":
    main()
