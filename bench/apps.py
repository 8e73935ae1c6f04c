"""Typed calls, streams and self-sizing pools, measured (issue 16's bench rows).

    python bench/apps.py            # about 2 minutes
    python bench/apps.py --quick    # about 40 seconds

One daemon, ``gaspar serve bench.app_handlers:app --workers 2``, serves both sides of each
comparison, from an asyncio caller (``gaspar.aio.Client``, one pipelined connection):

* **call overhead**: ``call("echo", data)`` (msgpack, a no-op typed handler) against a raw
  bytes request of the same ``data`` to the same daemon (``App(default=...)``), at 64 B and
  1 MiB; rounds alternate, medians of requests/s;
* **against ProcessPoolExecutor**: a dict in, a dict out, 1 ms of CPU, 16 calls in flight:
  ``call("score", doc)`` against ``loop.run_in_executor(ProcessPoolExecutor(2), score, doc)``;
* **streaming**: 10,000 items of 1 KiB from one generator, items/s; and a client that reads
  an item every 2 ms: the front end's peak RSS meanwhile, against its RSS before;
* **autoscaling**: pool ``work`` (1:3 workers) at 0.2x of one worker's capacity, then 1.5x:
  seconds until it has grown, p99 and shed calls during the step.

* **against gunicorn's dirty arbiter**: the same ``score`` as a dirty app's action, 2 dirty
  workers of a ``gunicorn --dirty-app`` (found by its socket), called with
  ``DirtyClient.execute_async`` from 16 clients (one carries one request at a time).
The table goes to stdout and bench/apps.txt, the numbers to bench/apps.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gaspar  # noqa: E402
from bench.app_handlers import score  # noqa: E402
from bench.harness import free_port, kill_group, log, machine, publish, repo_env, rss_kb  # noqa: E402
from gaspar import aio  # noqa: E402

DOC = {"id": 7, "text": "the quick brown fox jumps over the lazy dog " * 4}


def start_daemon(port: int, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gaspar", "serve", "bench.app_handlers:app", "--bind", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [*argv, "--workers", "2", "--log-level", "warning", *extra],
        cwd=ROOT,
        env=repo_env(PYTHONWARNINGS="ignore"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with gaspar.client.Client(f"127.0.0.1:{port}", timeout=2) as c:
                c.call("echo", b"ready")
            return proc
        except gaspar.GasparError:
            time.sleep(0.1)
    kill_group(proc)
    raise RuntimeError("the daemon did not start")


async def rate(fn, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """Calls of ``fn()`` a second, ``concurrency`` in flight, and their latencies."""
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < end:
            t = time.perf_counter()
            await fn()
            latencies.append(time.perf_counter() - t)

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return len(latencies) / (time.monotonic() - start), latencies


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("nan")


async def overhead(addr: str, rounds: int, seconds: float) -> list[dict]:
    rows = []
    async with aio.Client(addr, timeout=60) as c:
        for size, conc in ((64, 16), (1 << 20, 4)):
            data = b"x" * size
            raw, typed = [], []
            for r in range(rounds):
                pair = [("raw", lambda d=data: c.request(d)), ("call", lambda d=data: c.call("echo", d))]
                for name, fn in pair if r % 2 == 0 else pair[::-1]:
                    per_s, _ = await rate(fn, conc, seconds)
                    (raw if name == "raw" else typed).append(per_s)
            rows.append(
                {
                    "row": f"call overhead, {size:,} B, {conc} in flight",
                    "raw": statistics.median(raw),
                    "call": statistics.median(typed),
                    "ratio": statistics.median(typed) / statistics.median(raw),
                }
            )
    return rows


async def against_ppe(addr: str, seconds: float) -> dict:
    async with aio.Client(addr, timeout=60) as c:
        g, g_lat = await rate(lambda: c.call("score", DOC), 16, seconds)
    loop = asyncio.get_running_loop()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        await loop.run_in_executor(pool, score, DOC)  # the workers start
        p, p_lat = await rate(lambda: loop.run_in_executor(pool, score, DOC), 16, seconds)
    return {
        "row": "dict in/out, 1 ms CPU, 16 in flight",
        "gaspar": g,
        "ppe": p,
        "ratio": g / p,
        "gaspar_p99_ms": p99(g_lat) * 1000,
        "ppe_p99_ms": p99(p_lat) * 1000,
    }


async def against_dirty(seconds: float) -> dict:
    """gunicorn's dirty arbiter with 2 dirty workers, the same ``score``, 16 in flight from
    this asyncio caller (16 DirtyClients: one carries one request at a time)."""
    import glob

    try:
        from gunicorn.dirty import DirtyClient
    except ImportError as exc:
        return {"row": "dirty arbiter", "error": f"gunicorn without dirty arbiters ({exc})"}
    before = set(glob.glob("/tmp/gunicorn-dirty-*/arbiter.sock"))
    pidfiles = set(glob.glob("/tmp/gunicorn-dirty-*.pid"))
    argv = [sys.executable, "-m", "gunicorn", "bench.app_handlers:wsgi", "-b", f"127.0.0.1:{free_port()}", "-w", "1"]
    argv += ["--dirty-app", "bench.app_handlers:ScoreDirtyApp", "--dirty-workers", "2", "--dirty-timeout", "60"]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=repo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        sock = None
        deadline = time.monotonic() + 30
        while sock is None and time.monotonic() < deadline:
            found = set(glob.glob("/tmp/gunicorn-dirty-*/arbiter.sock")) - before
            sock = next(iter(found), None)
            await asyncio.sleep(0.1)
        if sock is None:
            return {"row": "dirty arbiter", "error": "its socket did not appear"}
        await asyncio.sleep(1.0)  # its workers start
        clients: asyncio.Queue = asyncio.Queue()
        for _ in range(16):
            clients.put_nowait(DirtyClient(sock, timeout=30))

        async def call() -> None:
            c = await clients.get()
            try:
                await c.execute_async("bench.app_handlers:ScoreDirtyApp", "score", DOC)
            finally:
                clients.put_nowait(c)

        await call()
        per_s, lat = await rate(call, 16, seconds)
        while not clients.empty():
            await clients.get_nowait().close_async()
        return {"row": "dirty arbiter", "dirty": per_s, "dirty_p99_ms": p99(lat) * 1000}
    finally:
        kill_group(proc)
        for made in set(glob.glob("/tmp/gunicorn-dirty-*/arbiter.sock")) - before:  # SIGKILL left them
            shutil.rmtree(os.path.dirname(made), ignore_errors=True)
        for made in set(glob.glob("/tmp/gunicorn-dirty-*.pid")) - pidfiles:
            os.unlink(made)


async def streaming(addr: str, daemon_pid: int) -> dict:
    async with aio.Client(addr, timeout=60) as c:
        t = time.perf_counter()
        n = 0
        async for _ in c.stream("items", 10_000, size=1024):
            n += 1
        per_s = n / (time.perf_counter() - t)
        before = rss_kb([daemon_pid])
        peak = before
        got = 0
        async for _ in c.stream("items", 1_000_000, size=1024):
            got += 1
            if got % 50 == 0:
                peak = max(peak, rss_kb([daemon_pid]))
            await asyncio.sleep(0.002)  # a slow reader
            if got >= 1000:
                break
    return {"row": "stream 10,000 x 1 KiB", "items_per_s": per_s, "rss_before_kb": before, "rss_peak_slow_kb": peak}


async def autoscaling(port: int) -> dict:
    proc = start_daemon(port, "--scale-up-after", "0.5", "--scale-down-idle", "5")
    addr = f"127.0.0.1:{port}"
    try:
        async with aio.Client(addr, timeout=30, retry=False) as c:

            async def open_loop(per_s: float, seconds: float, lat: list, shed: list) -> None:
                tasks = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:

                    async def one() -> None:
                        t = time.perf_counter()
                        try:
                            await c.call("work", 0.01)
                            lat.append(time.perf_counter() - t)
                        except gaspar.Overloaded:
                            shed.append(1)

                    tasks.append(asyncio.ensure_future(one()))
                    await asyncio.sleep(1 / per_s)
                await asyncio.gather(*tasks)

            lat0: list = []
            await open_loop(20, 3, lat0, [])  # 0.2x of one worker (10 ms a call)
            lat, shed = [], []
            step = time.monotonic()
            grown_at = None

            async def watch() -> None:
                nonlocal grown_at
                while grown_at is None and time.monotonic() - step < 15:
                    st = await asyncio.get_running_loop().run_in_executor(None, stats, addr)
                    if sum(1 for w in st["workers"] if w["pool"] == "work") >= 2:
                        grown_at = time.monotonic() - step
                    await asyncio.sleep(0.1)

            watcher = asyncio.ensure_future(watch())
            await open_loop(150, 6, lat, shed)  # 1.5x
            await watcher
        return {
            "row": "autoscale 1:3, 0.2x -> 1.5x",
            "grown_after_s": grown_at,
            "p99_ms_before": p99(lat0) * 1000,
            "p99_ms_step": p99(lat) * 1000,
            "shed": len(shed),
            "answered": len(lat),
        }
    finally:
        kill_group(proc)


def stats(addr: str) -> dict:
    import json

    host, port = addr.rsplit(":", 1)
    return json.loads(gaspar.client.request((host, int(port)), b"", timeout=5, stats=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rounds, seconds = (2, 1.0) if args.quick else (5, 2.0)
    port = free_port()
    proc = start_daemon(port)
    addr = f"127.0.0.1:{port}"
    try:
        log("call overhead")
        rows = asyncio.run(overhead(addr, rounds, seconds))
        log("against ProcessPoolExecutor")
        ppe = asyncio.run(against_ppe(addr, seconds * 2))
        log("against gunicorn's dirty arbiter")
        dirty = asyncio.run(against_dirty(seconds * 2))
        log("streaming")
        stream = asyncio.run(streaming(addr, proc.pid))
    finally:
        kill_group(proc)
    log("autoscaling")
    scale = asyncio.run(autoscaling(free_port()))
    lines = [f"gaspar apps bench ({'quick' if args.quick else 'full'}): {machine()}"]
    for r in rows:
        lines.append(f"{r['row']:42} raw {r['raw']:9.0f}/s   call {r['call']:9.0f}/s   call/raw {r['ratio']:.3f}")
    lines.append(
        f"{ppe['row']:42} gaspar {ppe['gaspar']:6.0f}/s  ProcessPoolExecutor {ppe['ppe']:6.0f}/s  "
        f"ratio {ppe['ratio']:.2f}  p99 {ppe['gaspar_p99_ms']:.1f} / {ppe['ppe_p99_ms']:.1f} ms"
    )
    if "dirty" in dirty:
        lines.append(
            f"{'  the same, gunicorn 27 dirty arbiter (2)':42} {dirty['dirty']:6.0f}/s  gaspar/dirty "
            f"{ppe['gaspar'] / dirty['dirty']:.2f}  p99 {dirty['dirty_p99_ms']:.1f} ms"
        )
    else:
        lines.append(f"{'  the same, gunicorn dirty arbiter':42} n/a: {dirty['error']}")
    lines.append(
        f"{stream['row']:42} {stream['items_per_s']:9.0f} items/s; slow reader: front end RSS "
        f"{stream['rss_before_kb'] / 1024:.1f} -> peak {stream['rss_peak_slow_kb'] / 1024:.1f} MiB"
    )
    grown = "never" if scale["grown_after_s"] is None else f"after {scale['grown_after_s']:.2f} s"
    lines.append(
        f"{scale['row']:42} grown {grown}; p99 {scale['p99_ms_before']:.1f} ms "
        f"before, {scale['p99_ms_step']:.1f} ms in the step; {scale['shed']} shed of "
        f"{scale['shed'] + scale['answered']}"
    )
    doc = {"overhead": rows, "ppe": ppe, "dirty": dirty, "stream": stream, "autoscale": scale}
    publish("apps", "\n".join(lines) + "\n", [], doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
