"""Baseline: N forked processes blocking in accept() on one shared listening socket.

Each process runs the handler inline, one connection at a time: the bound for a
process-per-core design, with no front end at all.

    python bench/baseline_prefork.py --port 9000 --workers 2 --handler bench.handlers:echo
"""

from __future__ import annotations

import os
import signal
import socket
import sys

try:
    from bench._common import BACKLOG, abort, body_length, load_handler, parse_args, recv_exact
except ImportError:  # run as a script: bench/ is sys.path[0]
    from _common import BACKLOG, abort, body_length, load_handler, parse_args, recv_exact


def serve_forever(listener: socket.socket, handler) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            body = recv_exact(conn, body_length(recv_exact(conn, 4)))
            reply = handler(body)
            conn.sendall(reply)
        except Exception:
            abort(conn)
        else:
            conn.close()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    handler = load_handler(args.handler)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(BACKLOG)

    children = []
    for _ in range(max(1, args.workers)):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us with SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                serve_forever(listener, handler)
            finally:
                os._exit(0)
        children.append(pid)
    listener.close()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"prefork: listening on {args.host}:{args.port}, {len(children)} processes", file=sys.stderr, flush=True)
    try:
        while children:
            pid, _ = os.wait()
            if pid in children:
                children.remove(pid)
    except KeyboardInterrupt:
        pass
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    main()
