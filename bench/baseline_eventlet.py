"""Baseline: one eventlet process, each connection in a green thread, the handler inline.

A CPU-bound handler blocks every other connection while it runs; ``--workers`` is
accepted and ignored.

    python bench/baseline_eventlet.py --port 9000 --handler bench.handlers:echo
"""

from __future__ import annotations

import os
import signal
import sys

import eventlet

try:
    from bench._common import BACKLOG, abort, body_length, load_handler, parse_args, recv_exact
except ImportError:  # run as a script: bench/ is sys.path[0]
    from _common import BACKLOG, abort, body_length, load_handler, parse_args, recv_exact


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    handler = load_handler(args.handler)

    def serve(conn) -> None:
        try:
            body = recv_exact(conn, body_length(recv_exact(conn, 4)))
            conn.sendall(handler(body))
        except Exception:
            abort(conn)
        else:
            conn.close()

    # eventlet's hub does not reliably turn SIGINT into KeyboardInterrupt: exit at once
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: os._exit(0))
    listener = eventlet.listen((args.host, args.port), backlog=BACKLOG)
    pool = eventlet.GreenPool(size=1_000_000)
    print(f"eventlet: listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    while True:
        conn, _ = listener.accept()
        pool.spawn_n(serve, conn)


if __name__ == "__main__":
    main()
