"""The web app's view: one HTTP app, its CPU-heavy endpoint offloaded four ways.

    python bench/webapp.py            # full: about 2 minutes
    python bench/webapp.py --quick    # about 30 seconds

One Starlette app (this module's ``app``) served by one HTTP server for every variant:
gunicorn's own ASGI worker (``-k asgi``, one worker process), because gunicorn's dirty
arbiter exists only inside gunicorn. ``GET /cpu?us=N`` runs ``bench.handlers.spin`` for
N µs of CPU; ``GET /ping`` answers ``pong`` from the event loop. ``WEBAPP_VARIANT`` picks
where ``/cpu`` runs:

``gaspar``
    a ``gaspar serve bench.handlers:spin --workers 2`` daemon, called through one shared
    :class:`gaspar.aio.Client` (one pipelined connection);
``dirty``
    gunicorn's dirty arbiter (``--dirty-app bench.webapp:SpinDirtyApp --dirty-workers 2``),
    called with ``DirtyClient.execute_async`` from a small pool of clients (a dirty client
    carries one request at a time on its connection);
``ppe``
    ``loop.run_in_executor`` on a ``ProcessPoolExecutor(2)`` made after the fork;
``inline``
    ``spin`` on the event loop itself: the bound, it blocks ``/ping`` too.

Load: Apache ``ab`` (``apt-get install apache2-utils``), two at once on 127.0.0.1: ``/cpu``
at concurrency 8 and ``/ping`` at concurrency 2, for the same seconds after a short
warm-up. Reported: ``/cpu`` requests/s and p99, ``/ping`` p99 while ``/cpu`` is saturated,
and each ``ab``'s own CPU share (its rusage over the wall time). The table goes to stdout
and ``bench/webapp.txt``, the raw numbers to ``bench/webapp.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.handlers import spin  # noqa: E402
from bench.harness import kill_group  # noqa: E402

VARIANTS = ("gaspar", "dirty", "ppe", "inline")
HANDLER_US = (1000, 20000)
CPU_CONC, PING_CONC = 8, 2
WORKERS = 2
DIRTY_APP = "bench.webapp:SpinDirtyApp"

# ---------------------------------------------------------------- the app (in the server)

try:
    from gunicorn.dirty import DirtyApp
except ImportError:  # gunicorn without dirty arbiters: the dirty variant reports n/a
    DirtyApp = object


class SpinDirtyApp(DirtyApp):
    """The dirty arbiter's side: ``spin`` as an action (arguments and result are JSON)."""

    def spin(self, us: int) -> int:
        return int(spin(str(us).encode()))


def _make_app():
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    variant = os.environ.get("WEBAPP_VARIANT", "inline")
    state: dict = {}

    async def startup() -> None:
        if variant == "gaspar":
            from gaspar import aio

            state["client"] = aio.Client(os.environ["GASPAR_ADDR"], timeout=30)
        elif variant == "ppe":
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(WORKERS)
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(pool, spin, b"0") for _ in range(WORKERS)))
            state["pool"] = pool
        elif variant == "dirty":
            state["dirty"] = asyncio.Queue()

    async def shutdown() -> None:
        if "client" in state:
            await state["client"].close()
        if "pool" in state:
            state["pool"].shutdown(wait=False, cancel_futures=True)
        q = state.get("dirty")
        while q is not None and not q.empty():
            await q.get_nowait().close_async()

    async def dirty_call(us: int) -> int:
        from gunicorn.dirty import DirtyClient
        from gunicorn.dirty.client import get_dirty_socket_path

        q: asyncio.Queue = state["dirty"]
        client = q.get_nowait() if not q.empty() else DirtyClient(get_dirty_socket_path(), timeout=30)
        try:
            result = await client.execute_async(DIRTY_APP, "spin", us)
        except BaseException:
            await client.close_async()
            raise
        q.put_nowait(client)
        return result

    async def cpu(request: Request) -> PlainTextResponse:
        us = int(request.query_params.get("us", "1000"))
        msg = str(us).encode()
        if variant == "gaspar":
            reply = (await state["client"].request(msg)).decode()
        elif variant == "ppe":
            reply = (await asyncio.get_running_loop().run_in_executor(state["pool"], spin, msg)).decode()
        elif variant == "dirty":
            reply = str(await dirty_call(us))
        else:
            reply = spin(msg).decode()
        return PlainTextResponse(reply)

    async def ping(request: Request) -> PlainTextResponse:
        return PlainTextResponse("pong")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await startup()
        try:
            yield
        finally:
            await shutdown()

    return Starlette(routes=[Route("/cpu", cpu), Route("/ping", ping)], lifespan=lifespan)


def __getattr__(name: str):  # ``bench.webapp:app``: built on first use, in the server only
    if name == "app":
        globals()["app"] = _make_app()
        return globals()["app"]
    raise AttributeError(name)


# ---------------------------------------------------------------- the runner


def _run_helpers():
    from bench import harness as r

    return r


class HttpServer:
    """gunicorn -k asgi (one worker) serving ``bench.webapp:app`` with one variant."""

    def __init__(self, variant: str, gaspar_port: int | None) -> None:
        r = _run_helpers()
        self.variant, self.port = variant, r.free_port()
        self.gaspar_port = gaspar_port
        self.proc: subprocess.Popen | None = None
        self.log = r.BUILD / f"webapp-{variant}.log"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "gunicorn", "bench.webapp:app", "-k", "asgi", "-w", "1"]
        argv += ["-b", f"127.0.0.1:{self.port}", "--timeout", "120", "--graceful-timeout", "3"]
        argv += ["--log-level", "warning", "--no-control-socket", "--backlog", "2048"]
        if self.variant == "dirty":
            argv += ["--dirty-app", DIRTY_APP, "--dirty-workers", str(WORKERS), "--dirty-timeout", "60"]
        return argv

    def start(self) -> None:
        r = _run_helpers()
        extra = {"WEBAPP_VARIANT": self.variant}
        if self.gaspar_port:
            extra["GASPAR_ADDR"] = f"127.0.0.1:{self.gaspar_port}"
        self.proc = r.spawn_logged(self.argv(), self.log, r.repo_env(**extra))

    def get(self, path: str, timeout: float = 5.0) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
                return resp.read().decode()
        except OSError:
            return None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with status {self.proc.returncode}: {self.log_tail()}")
            if self.get("/ping", 2) == "pong" and self.get("/cpu?us=1", 10) == "1":
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.variant} did not answer within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 6) -> str:
        return _run_helpers().log_tail(self.log, n)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)  # gunicorn: graceful stop, dirty arbiter too
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(8)
            except subprocess.TimeoutExpired:
                pass
        kill_group(self.proc)
        self.proc = None


ACTIVE: list[subprocess.Popen] = []  # running ab processes, killed on the way out


def start_ab(port: int, path: str, conc: int, seconds: float) -> subprocess.Popen:
    argv = ["ab", "-q", "-r", "-s", "30", "-c", str(conc), "-t", f"{seconds:g}", "-n", "100000000"]
    argv += [f"http://127.0.0.1:{port}{path}"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ACTIVE.append(p)
    return p


def finish_ab(p: subprocess.Popen, budget: float) -> dict:
    """Wait (bounded) for one ab; parse it; its CPU share from its rusage."""
    t_end = time.monotonic() + budget
    out = b""
    os.set_blocking(p.stdout.fileno(), False)
    while True:
        chunk = p.stdout.read()
        if chunk:
            out += chunk
        try:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status, ru = p.pid, 0, None
        if pid == p.pid:
            break
        if time.monotonic() > t_end:
            os.killpg(p.pid, signal.SIGKILL)
            pid, status, ru = os.wait4(p.pid, 0)
            out += b"\n(killed: over its time budget)"
            break
        time.sleep(0.05)
    rest = p.stdout.read()
    out += rest or b""
    p.returncode = os.waitstatus_to_exitcode(status)
    ACTIVE.remove(p)
    text = out.decode(errors="replace")

    def num(pattern: str) -> float | None:
        m = re.search(pattern, text, re.M)
        return float(m.group(1)) if m else None

    took = num(r"^Time taken for tests:\s+([\d.]+)")
    cpu = (ru.ru_utime + ru.ru_stime) if ru else None
    return {
        "rc": p.returncode,
        "complete": num(r"^Complete requests:\s+(\d+)"),
        "failed": num(r"^Failed requests:\s+(\d+)") or 0,
        "non_2xx": num(r"^Non-2xx responses:\s+(\d+)") or 0,
        "rps": num(r"^Requests per second:\s+([\d.]+)"),
        "p50_ms": num(r"^\s+50%\s+(\d+)"),
        "p99_ms": num(r"^\s+99%\s+(\d+)"),
        "max_ms": num(r"^\s+100%\s+(\d+)"),
        "seconds": took,
        "ab_cpu_s": cpu,
        "ab_cpu_share": round(cpu / took, 3) if cpu is not None and took else None,
        "output_tail": text.strip().splitlines()[-3:] if p.returncode else None,
    }


def measure(port: int, us: int, warmup: float, seconds: float) -> dict:
    r = _run_helpers()
    cpu_path = f"/cpu?us={us}"
    w = [start_ab(port, cpu_path, CPU_CONC, warmup), start_ab(port, "/ping", PING_CONC, warmup)]
    for p in w:
        finish_ab(p, warmup + 40)
    stat0 = _stat()
    a = start_ab(port, cpu_path, CPU_CONC, seconds)
    b = start_ab(port, "/ping", PING_CONC, seconds)
    cpu_res = finish_ab(a, seconds + 40)
    ping_res = finish_ab(b, seconds + 40)
    busy = _busy(stat0, _stat())
    r.log(
        f"  {us} µs: /cpu {cpu_res['rps']} req/s p99 {cpu_res['p99_ms']} ms; /ping p99 {ping_res['p99_ms']} ms;"
        f" ab CPU {cpu_res['ab_cpu_share']} + {ping_res['ab_cpu_share']}; machine {busy:.0%} busy"
    )
    return {"cpu": cpu_res, "ping": ping_res, "machine_busy": round(busy, 3)}


def _stat() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _busy(a: list[int], b: list[int]) -> float:
    d = [y - x for x, y in zip(a, b, strict=True)]
    total = sum(d[:8])
    return 1 - (d[3] + d[4]) / total if total else 0.0


def dirty_available() -> str | None:
    """None if the installed gunicorn has dirty arbiters, else why not."""
    try:
        import gunicorn
        from gunicorn.dirty import DirtyClient  # noqa: F401
    except ImportError as exc:
        return f"gunicorn without dirty arbiters ({exc})"
    return None if gunicorn.version_info >= (25,) else f"gunicorn {gunicorn.__version__} < 25"


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(results: dict, notes: dict) -> str:
    head = ["variant"]
    for us in HANDLER_US:
        ms = f"{us / 1000:g}ms"
        head += [f"{ms} cpu req/s", f"{ms} cpu p99", f"{ms} ping p99"]
    head += ["ab CPU share"]
    rows = [head]
    for v in VARIANTS:
        if v not in results and v not in notes:
            continue
        row = [v]
        shares = []
        for us in HANDLER_US:
            cell = results.get(v, {}).get(str(us))
            if not cell:
                row += ["n/a"] * 3
                continue
            c, p = cell["cpu"], cell["ping"]
            bad = c["failed"] + c["non_2xx"] + p["failed"] + p["non_2xx"]
            row += [fmt(c["rps"], ".0f") + ("*" if bad else ""), fmt(c["p99_ms"], ".0f"), fmt(p["p99_ms"], ".0f")]
            shares += [c["ab_cpu_share"] or 0, p["ab_cpu_share"] or 0]
        row += [f"<= {max(shares):.0%} each" if shares else "n/a"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = zip(r, widths, strict=True)
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
    lines.insert(1, "  ".join("-" * w for w in widths))
    for v, why in notes.items():
        lines.append(f"{v}: n/a: {why[:300]}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 30 s instead of about 2 minutes")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    r = _run_helpers()
    r.BUILD.mkdir(exist_ok=True)
    warmup, seconds = (1.0, 4.0) if args.quick else (2.0, 12.0)
    variants = [v for v in args.variants.split(",") if v]
    if shutil.which("ab") is None:
        print("needs ab: apt-get install -y apache2-utils", file=sys.stderr)
        return 2

    busy_before, load_before = r.busy_share(), os.getloadavg()[0]
    results: dict = {}
    notes: dict = {}
    why = dirty_available()
    if why and "dirty" in variants:
        notes["dirty"] = why
        variants.remove("dirty")

    live: list = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background with SIGINT ignored
    try:
        for v in variants:
            gaspar_srv = None
            if v == "gaspar":
                gaspar_srv = r.Server("gaspar", "spin", WORKERS)
                live.append(gaspar_srv)
                gaspar_srv.start()
                try:
                    gaspar_srv.wait_ready()
                except r.ServerFailed as exc:
                    notes[v] = f"gaspar serve did not start: {exc}"
                    continue
            srv = HttpServer(v, gaspar_srv.port if gaspar_srv else None)
            live.append(srv)
            srv.start()
            try:
                srv.wait_ready()
            except RuntimeError as exc:
                notes[v] = str(exc)
                r.log(f"{v}: {exc}")
                continue
            r.log(
                f"{v}: gunicorn -k asgi on port {srv.port}" + (f", gaspar on {gaspar_srv.port}" if gaspar_srv else "")
            )
            results[v] = {str(us): measure(srv.port, us, warmup, seconds) for us in HANDLER_US}
            for s in reversed(live):
                s.stop()
            live.clear()
    except KeyboardInterrupt:
        r.log("interrupted: stopping everything")
        return 130
    finally:
        for p in list(ACTIVE):
            kill_group(p)
        for s in reversed(live):
            s.stop()

    import gunicorn

    m = r.machine()
    load_after = os.getloadavg()[0]
    m["busy_before_run"] = round(busy_before, 3)
    m["load_average_before_after"] = [round(load_before, 2), round(load_after, 2)]
    header = [
        f"gaspar web app benchmark ({'quick' if args.quick else 'full'}), "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, Python {m['python']};"
        f" {busy_before:.0%} busy before the run, load average {load_before:.2f} -> {load_after:.2f}",
        f"HTTP: gunicorn {gunicorn.__version__} -k asgi, 1 worker, Starlette; {WORKERS} offload workers;"
        f" ab -c {CPU_CONC} on /cpu and ab -c {PING_CONC} on /ping at once, {seconds:g} s after {warmup:g} s warm-up",
        "req/s of /cpu; p99 in ms (ab's whole-ms percentiles); ping p99 = /ping while /cpu is saturated;"
        " * = some failed or non-2xx replies (see webapp.json)",
    ]
    if busy_before > 0.10:
        header.append(f"note: the machine was {busy_before:.0%} busy before the run: numbers are suspect")
    text = "\n".join(header) + "\n\n" + table(results, notes) + "\n"
    print(text)
    (BENCH / "webapp.txt").write_text(text)
    raw = {"machine": m, "quick": args.quick, "seconds": seconds, "warmup": warmup, "results": results, "notes": notes}
    (BENCH / "webapp.json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
