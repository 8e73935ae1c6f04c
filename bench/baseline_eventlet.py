"""Baseline: one eventlet process, each connection in a green thread, the handler inline.

A CPU-bound handler blocks every other connection while it runs; ``--workers`` is
accepted and ignored.

    python bench/baseline_eventlet.py --port 9000 --handler bench.handlers:echo
"""

from __future__ import annotations

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

    listener = eventlet.listen((args.host, args.port), backlog=BACKLOG)
    pool = eventlet.GreenPool(size=1_000_000)
    print(f"eventlet: listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            pool.spawn_n(serve, conn)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
