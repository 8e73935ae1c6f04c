"""Overload: gaspar and the baselines past their capacity, side by side, in one run.

    python bench/overload.py            # full: about 5 minutes
    python bench/overload.py --quick    # about 2 minutes
    python bench/overload.py --scenarios closed --servers gaspar --quick   # one part
    python bench/run.py --overload [--quick]   # the same

Two scenarios, each on 2 workers and a fresh server, per server:

* **open loop**: ``bench.handlers:spin`` with 10000 (10 ms of busy CPU per request). A
  closed loop of 8 clients measures the capacity C (req/s); then open loops, one new
  connection per request, Poisson arrivals, each client giving up 1 s after it sent its
  request: 2x C, then 10x C followed at once by 0.3x C.
* **closed loop**: ``spin`` with 50000 (50 ms). C measured as above; then 200 clients, each
  with one request in flight on a new connection, that give up 1 s after sending and send
  the next request at once after a reply, a refusal (a reset or an error reply) or giving
  up: what a pool of impatient callers with no back-off does. The load is whatever the
  server lets through; refusals come straight back as new requests.

gaspar runs each twice: with plain (1.0) clients and with extended clients that send their
deadline. Servers, the C load generator (bench/loadgen.c) and the helpers are run.py's. The
tables go to stdout and bench/overload.txt, every figure to bench/overload.json;
bench/README.rst says how to read them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

try:
    from bench import harness as bench_run
except ImportError:  # run as a script: bench/ is sys.path[0]
    import harness as bench_run

BENCH, BUILD = bench_run.BENCH, bench_run.BUILD
Server, ServerFailed, log = bench_run.Server, bench_run.ServerFailed, bench_run.log

HANDLER = "spin"
SPIN_US = 10_000  # the open loop's request: 10 ms of busy CPU
PAYLOAD = str(SPIN_US)
CLOSED_SPIN_US = 50_000  # the closed loop's: 50 ms
CLOSED_PAYLOAD = str(CLOSED_SPIN_US)
CLOSED_CLIENTS = 200
WORKERS = 2
CAPACITY_CLIENTS = 8
STATS_EVERY = 0.5  # seconds between two samples of gaspar's stats during a closed loop
SCENARIOS = ("open", "closed")
GIVE_UP = 1.0  # seconds: every client's own timeout
DEADLINE_MS = int(GIVE_UP * 1000)  # what an extended client tells the server it has left
NORMAL_P90_MS = 50.0  # "back to normal" after the burst: a 0.5 s window whose p90 is below this
WINDOW = 0.5
IDLE_SHARE = 0.05  # workers below 5 % of a core over WINDOW: the server has drained
# clients connect from 127.0.0.1..8: a server that keeps the connections of clients that
# left (asyncio_ppe does, until its pool gets to them) holds their ports in FIN_WAIT_2 for
# a minute; the 10x burst alone needs ~20,000 of the ~28,000 ports one address has, and
# connect() slows to a crawl long before they run out
SOURCE_IPS = 8
DEFAULT_SERVERS = ("gaspar", "prefork", "asyncio_ppe", *(("asyncio_uvloop",) if bench_run.HAVE_UVLOOP else ()))
TARGETS = {
    "goodput_2x": 0.90,  # >=, share of C
    "goodput_10x": 0.75,  # >=
    "p99_ok_2x_ms": 250.0,  # <
    "p90_after_ms": NORMAL_P90_MS,  # <
    "rss_flat_mib": 5.0,  # peak and end within max(this, 10 % of the start) of the start
    "closed_goodput": 0.90,  # >=, share of C (the 50 ms C)
    "closed_ok_p50_ms": 250.0,  # <=
    "closed_killed": 0,  # workers killed during the closed loop: ==
}


@dataclass
class Params:
    capacity_seconds: float
    capacity_warmup: float
    step_seconds: float  # 2x C
    burst_seconds: float  # 10x C
    after_seconds: float  # 0.3x C, right after the burst
    settle_max: float  # after a run: wait at most this long for the workers to go idle, else restart
    closed_seconds: float  # the closed loop of CLOSED_CLIENTS


QUICK = Params(1.5, 0.5, 3.0, 3.0, 3.0, 3.0, 4.0)
FULL = Params(4.0, 1.0, 10.0, 10.0, 5.0, 8.0, 10.0)


@dataclass
class Rec:
    sched: int  # us from the load generator's start
    start: int  # -1: never sent
    end: int  # -1: unfinished
    outcome: str  # ok, reset, status, give_up, early_eof, connect, ...
    status: int  # extended replies: the status byte; else -1


@dataclass
class Phase:
    name: str  # "2x", "10x", "0.3x after"
    factor: float
    seconds: float


@dataclass
class RunResult:
    server: str
    clients: str  # plain | extended
    phases: list[dict] = field(default_factory=list)
    loadgen: dict = field(default_factory=dict)
    rss_mib: dict = field(default_factory=dict)
    busy_after_s: float | None = None  # None: still busy after settle_max (restarted)
    other_load: float | None = None  # share of the machine used by other processes meanwhile
    restarted: bool = False


# ---------------------------------------------------------------- measuring the server


def tree_cpu(server: Server) -> float:
    """CPU seconds of the server's whole process tree, front end included."""
    total = 0
    for pid in bench_run.descendants(server.pid):
        try:
            f = bench_run.proc_stat(pid)
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
    return total / bench_run.CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks) - idle) / bench_run.CLK_TCK, sum(ticks) / bench_run.CLK_TCK


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Sample:
    """The server's processes at one moment, from /proc. "Workers" are every process but the
    front end (for prefork, the accepting processes; for gaspar, its fork server too)."""

    t: float  # time.monotonic()
    cpu: float  # the workers' CPU seconds, and those of the children they reaped
    busy: float  # the workers' main threads on a CPU or waiting for one (schedstat), seconds
    run: float  # of which on a CPU
    front_cpu: float  # the front end's CPU seconds (prefork: every process, as run.py counts it)
    rss: float  # the front end's VmRSS, MiB
    pids: frozenset[int]  # the workers' pids


def sample(server: Server) -> Sample:
    """``busy`` is what "wasted" is computed from: for the wall-clock ``spin`` it is about
    the spin's length per run of the handler however contended the cores are (its CPU time
    is not); ``run`` / ``busy`` says how much of that time the workers actually had a core."""
    root, cpu, busy, run, pids = server.pid, 0, 0, 0, []
    for pid in bench_run.descendants(root):
        try:
            f = bench_run.proc_stat(pid)
        except OSError:
            continue
        cpu += int(f[13]) + int(f[14])  # cutime, cstime: children reaped (a replaced worker)
        if pid == root:
            continue
        pids.append(pid)
        cpu += int(f[11]) + int(f[12])  # utime, stime
        try:
            with open(f"/proc/{pid}/schedstat") as fh:
                run_ns, wait_ns = fh.read().split()[:2]
        except (OSError, ValueError):
            continue
        busy += int(run_ns) + int(wait_ns)
        run += int(run_ns)
    front = server.front_end_pids()
    return Sample(
        time.monotonic(),
        cpu / bench_run.CLK_TCK,
        busy / 1e9,
        run / 1e9,
        bench_run.cpu_seconds(front),
        bench_run.rss_kb(front) / 1024,
        frozenset(pids),
    )


def nearest(samples: list[Sample], t: float) -> Sample:
    return min(samples, key=lambda s: abs(s.t - t))


def settle(server: Server, samples: list[Sample], limit: float) -> float | None:
    """Sample until the workers are idle (busy under IDLE_SHARE of a core over WINDOW s); return
    when they went idle (monotonic), or None if they were still busy after ``limit`` s."""
    deadline = time.monotonic() + limit
    while True:
        now = samples[-1].t
        old = [s for s in samples if s.t <= now - WINDOW]
        if old and (samples[-1].busy - old[-1].busy) / (now - old[-1].t) < IDLE_SHARE:
            return old[-1].t
        if now >= deadline:
            return None
        time.sleep(0.1)
        samples.append(sample(server))


def gaspar_stats(server: Server) -> dict | None:
    """What ``gaspar stats`` says now that the closed loop's figures need, or None if it did
    not answer within a second."""
    try:
        from gaspar import client  # the repository is on sys.path (main)

        d = json.loads(client.request(("127.0.0.1", server.port), b"", timeout=1.0, stats=True, retry=False))
    except Exception:  # noqa: BLE001 - a sample missed is counted, not fatal
        return None
    keep = ("queued", "running", "prefetched", "pending", "connections", "restarts", "overload", "counters")
    return {"t": time.monotonic(), **{k: d.get(k) for k in keep}}


@dataclass
class Watched:
    """One load generator run with the server sampled meanwhile and until its workers went
    idle; gaspar's stats every STATS_EVERY s if asked."""

    lg: dict
    samples: list[Sample]
    stats: list[dict | None]  # one before the run, during it, one after
    t0: float  # the load generator's start, on time.monotonic()'s clock
    idle_at: float | None  # None: still busy after settle_max
    other_load: float | None  # share of the machine used by other processes meanwhile


def watch(server: Server, conns: int, opts: dict, budget: float, settle_max: float, stats: bool = False) -> Watched:
    ours0, machine0, own0 = tree_cpu(server), machine_cpu(), own_cpu()
    samples = [sample(server)]
    polled = [gaspar_stats(server)] if stats else []
    proc = bench_run.start_loadgen(server.port, conns, **opts)
    try:
        deadline = time.monotonic() + budget
        next_poll = time.monotonic() + STATS_EVERY
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            samples.append(sample(server))
            if stats and time.monotonic() >= next_poll:
                polled.append(gaspar_stats(server))
                next_poll += STATS_EVERY
        lg = bench_run.finish_loadgen(proc, budget)
    except BaseException:  # ^C or a failure: the load generator goes too
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        raise
    idle_at = settle(server, samples, settle_max)
    if stats:
        polled.append(gaspar_stats(server))
    # what else ran meanwhile: the machine's busy time but the server's, the load
    # generator's and this script's (tests, builds... make the figures noisy)
    machine1 = machine_cpu()
    ours = tree_cpu(server) - ours0 + lg["cpu_total_seconds"] + own_cpu() - own0
    span = machine1[1] - machine0[1]
    other = max(0.0, machine1[0] - machine0[0] - ours) / span if span > 0 else None
    # the load generator's clock is time.monotonic()'s
    return Watched(lg, samples, polled, lg["t_start_ns"] / 1e9, idle_at, other)


def rss_of(samples: list[Sample]) -> dict:
    return {"start": samples[0].rss, "peak": max(s.rss for s in samples), "end": samples[-1].rss}


# ---------------------------------------------------------------- one run of the load generator


def read_records(path: Path) -> list[Rec]:
    out = []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            a, b, c, o, st = line.split()
            out.append(Rec(int(a), int(b), int(c), o, int(st)))
    return out


def pct(xs: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of sorted xs."""
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))]


def failure_kind(r: Rec) -> str:
    return f"status {r.status}" if r.outcome == "status" else r.outcome


def open_loop(
    server: Server, phases: list[Phase], capacity: float, cost: float, clients: str, seed: int, p: Params
) -> RunResult:
    """One load generator run over consecutive phases; per-phase metrics from its records.
    ``cost``: the workers' busy seconds per OK reply at capacity (for "wasted")."""
    rates = [max(1.0, ph.factor * capacity) for ph in phases]
    total = sum(ph.seconds for ph in phases)
    # enough connection slots that no arrival waits for one: every request holds its slot
    # for at most GIVE_UP s
    conns = int(max(rates) * (GIVE_UP + 0.5)) + 256
    tag = f"{server.kind}-{clients}-{'-'.join(ph.name.split()[0] for ph in phases)}"
    records = BUILD / f"overload-{tag}.txt"
    opts = {
        "payload": PAYLOAD,
        "schedule": ",".join(f"{r:.1f}:{ph.seconds:g}" for r, ph in zip(rates, phases, strict=True)),
        "poisson": True,
        "seed": seed,
        "give_up": GIVE_UP,
        "timeout": 30,
        "drain": GIVE_UP + 2,
        "records": str(records),
        "extended": clients == "extended",
        "deadline_ms": DEADLINE_MS if clients == "extended" else None,
        "source_ips": SOURCE_IPS,
    }
    w = watch(server, conns, opts, total + GIVE_UP + 2 + 15, p.settle_max)
    lg, samples, t0, idle_at = w.lg, w.samples, w.t0, w.idle_at
    t_arrivals_end = t0 + total
    res = RunResult(server.kind, clients, loadgen=lg, rss_mib=rss_of(samples), other_load=w.other_load)
    res.busy_after_s = None if idle_at is None else max(0.0, idle_at - t_arrivals_end)
    recs = read_records(records)
    lo = 0.0
    for i, (ph, rate) in enumerate(zip(phases, rates, strict=True)):
        hi = lo + ph.seconds
        last = i == len(phases) - 1
        # the CPU window of a phase: its arrivals; the last one runs on until the workers are idle
        w_lo, w_hi = t0 + lo, (samples[-1].t if last else t0 + hi)
        a, b = nearest(samples, w_lo), nearest(samples, w_hi)
        cpu, busy = b.cpu - a.cpu, b.busy - a.busy
        seg = lg["segments"][i]
        m = phase_metrics(recs, ph, rate, capacity, lo, hi, t0, w_lo, w_hi)
        m["loadgen_cpu_share"] = seg["cpu_seconds"] / ph.seconds if seg["cpu_seconds"] >= 0 else None
        m["handler_cpu_s"] = cpu
        m["worker_busy_s"] = busy
        ok_done = m.pop("_ok_in_cpu_window")
        m["ok_done_in_window"] = ok_done
        m["wasted_cpu_share"] = wasted(busy, ok_done, cost)
        m["wasted_lower_bound"] = last and idle_at is None
        res.phases.append(m)
        lo = hi
    return res


def wasted(busy: float, ok_done: int, cost: float) -> float | None:
    """The share of the workers' busy time not accounted for by OK replies, each costing
    ``cost`` (the busy time per reply at capacity): requests run for clients that had left
    (and the little per-request overhead not seen at capacity)."""
    if not cost or busy <= 0.05:
        return None
    return max(0.0, busy - ok_done * cost) / busy


def phase_metrics(
    recs: list[Rec],
    ph: Phase,
    rate: float,
    capacity: float,
    lo: float,
    hi: float,
    t0: float,
    w_lo: float,
    w_hi: float,
) -> dict:
    lo_us, hi_us = lo * 1e6, hi * 1e6
    mine = [r for r in recs if lo_us <= r.sched < hi_us]
    ok = [r for r in mine if r.outcome == "ok"]
    ok_ms = sorted((r.end - r.sched) / 1000 for r in ok)
    # every request, a failed one as infinitely slow: "is latency normal?"
    all_ms = sorted(ok_ms + [math.inf] * (len(mine) - len(ok)))
    failed = [r for r in mine if r.outcome != "ok"]
    # how long a request that did not succeed waited to learn it: a reset or an error
    # reply, or nothing at all until the client's own timeout (about GIVE_UP)
    heard_ms = sorted((r.end - r.start) / 1000 for r in failed if r.start >= 0 and r.end >= 0)
    sent = [r for r in mine if r.start >= 0]
    lag_ms = sorted((r.start - r.sched) / 1000 for r in sent)
    w_lo_us, w_hi_us = (w_lo - t0) * 1e6, (w_hi - t0) * 1e6
    ok_in_window = sum(1 for r in recs if r.outcome == "ok" and w_lo_us <= r.end < w_hi_us)
    m = {
        "phase": ph.name,
        "factor": ph.factor,
        "seconds": ph.seconds,
        "intended_rate": rate,
        "scheduled": len(mine),
        "sent_rate": len(sent) / ph.seconds,
        "send_lag_p99_ms": pct(lag_ms, 0.99),
        "ok": len(ok),
        "goodput": len(ok) / ph.seconds / capacity,
        "ok_p50_ms": pct(ok_ms, 0.50),
        "ok_p99_ms": pct(ok_ms, 0.99),
        "all_p90_ms": pct(all_ms, 0.90),
        "failed": len(failed),
        "heard_p50_ms": pct(heard_ms, 0.50),
        "heard_p99_ms": pct(heard_ms, 0.99),
        "failures": dict(Counter(failure_kind(r) for r in failed).most_common()),
        "_ok_in_cpu_window": ok_in_window,
    }
    if ph.name.startswith("0.3x"):
        # seconds after the burst until a WINDOW-s window (by scheduled time) has p90 < NORMAL
        m["recovery_s"] = None
        k = 0
        while lo + k * WINDOW < hi - 1e-9:
            a, b = lo_us + k * WINDOW * 1e6, min(hi_us, lo_us + (k + 1) * WINDOW * 1e6)
            w = sorted((r.end - r.sched) / 1000 if r.outcome == "ok" else math.inf for r in mine if a <= r.sched < b)
            if w and pct(w, 0.90) < NORMAL_P90_MS:
                m["recovery_s"] = k * WINDOW
                break
            k += 1
    return m


# ---------------------------------------------------------------- the closed loop

REFUSALS = ("reset", "status", "early_eof")  # the server said no: a reset, an error reply, a close


@dataclass
class ClosedResult:
    server: str
    clients: str  # plain | extended
    metrics: dict = field(default_factory=dict)
    loadgen: dict = field(default_factory=dict)
    rss_mib: dict = field(default_factory=dict)
    busy_after_s: float | None = None  # None: still busy after settle_max (restarted)
    other_load: float | None = None
    gaspar: dict | None = None  # what its stats said during the run (gaspar only)
    restarted: bool = False


def closed_loop(server: Server, capacity: float, cost: float, clients: str, p: Params) -> ClosedResult:
    """CLOSED_CLIENTS clients for ``p.closed_seconds``, each sending its next request at once
    after a reply, a refusal or giving up (GIVE_UP s after sending)."""
    seconds = p.closed_seconds
    records = BUILD / f"overload-{server.kind}-{clients}-closed.txt"
    opts = {
        "payload": CLOSED_PAYLOAD,
        "duration": seconds,
        "give_up": GIVE_UP,
        "timeout": 30,
        "drain": GIVE_UP + 2,
        "records": str(records),
        "extended": clients == "extended",
        "deadline_ms": DEADLINE_MS if clients == "extended" else None,
        "source_ips": SOURCE_IPS,
    }
    is_gaspar = server.kind == "gaspar"
    w = watch(server, CLOSED_CLIENTS, opts, seconds + GIVE_UP + 2 + 15, p.settle_max, stats=is_gaspar)
    samples, t0 = w.samples, w.t0
    res = ClosedResult(server.kind, clients, loadgen=w.lg, rss_mib=rss_of(samples), other_load=w.other_load)
    res.busy_after_s = None if w.idle_at is None else max(0.0, w.idle_at - (t0 + seconds))
    recs = read_records(records)
    m = closed_metrics(recs, seconds, capacity)
    # the load's window for the front end; the workers' until they went idle
    a, b, end = nearest(samples, t0), nearest(samples, t0 + seconds), samples[-1]
    prefork = server.kind == "prefork"  # no front end: its processes run the handler
    m["front_end_cpu_share"] = None if prefork or b.t <= a.t else (b.front_cpu - a.front_cpu) / (b.t - a.t)
    m["loadgen_cpu_share"] = w.lg["cpu_share"]
    busy = end.busy - a.busy
    m["worker_busy_s"] = busy
    m["workers_on_cpu_share"] = (end.run - a.run) / busy if busy > 0.05 else None
    m["wasted_cpu_share"] = wasted(busy, sum(1 for r in recs if r.outcome == "ok"), cost)
    m["wasted_lower_bound"] = w.idle_at is None
    seen = frozenset().union(*(s.pids for s in samples))
    m["worker_pids_gone"] = len(seen - end.pids)  # died or killed during the run
    m["worker_pids_new"] = len(seen - samples[0].pids)  # started during it (replacements)
    if is_gaspar:
        res.gaspar = stats_summary(w.stats, t0, seconds)
        restarts = res.gaspar.get("restarts")
        m["workers_killed"] = m["worker_pids_gone"] if restarts is None else restarts
    else:
        m["workers_killed"] = m["worker_pids_gone"]
    res.metrics = m
    return res


def closed_metrics(recs: list[Rec], seconds: float, capacity: float) -> dict:
    """From the load generator's records (in a closed loop a request is scheduled when it is
    sent): goodput from the OK replies that arrived in the window (requests still in flight
    at its end, some handed ahead to a worker, would count up to a few more a second in a
    short run); the rest from the requests started in it."""
    mine = [r for r in recs if 0 <= r.sched < seconds * 1e6]
    ok = [r for r in mine if r.outcome == "ok"]
    ok_in_window = sum(1 for r in recs if r.outcome == "ok" and 0 <= r.end < seconds * 1e6)
    ok_ms = sorted((r.end - r.start) / 1000 for r in ok)
    failed = [r for r in mine if r.outcome != "ok"]
    gave_up = [r for r in failed if r.outcome == "give_up"]
    refused = [r for r in failed if r.outcome in REFUSALS]
    heard_ms = sorted((r.end - r.start) / 1000 for r in refused)
    return {
        "seconds": seconds,
        "requests": len(mine),
        "requests_per_s": len(mine) / seconds,
        "ok": len(ok),
        "ok_in_window": ok_in_window,
        "ok_per_s": ok_in_window / seconds,
        "goodput": ok_in_window / seconds / capacity,
        "ok_p50_ms": pct(ok_ms, 0.50),
        "ok_p99_ms": pct(ok_ms, 0.99),
        "gave_up": len(gave_up),
        "refused": len(refused),
        "refused_per_s": len(refused) / seconds,
        "refused_heard_p50_ms": pct(heard_ms, 0.50),
        "refused_heard_p99_ms": pct(heard_ms, 0.99),
        "failures": dict(Counter(failure_kind(r) for r in failed).most_common()),
    }


def stats_summary(polled: list[dict | None], t0: float, seconds: float) -> dict:
    """gaspar's stats over a closed loop: was it overloaded, its queue, and what its counters
    and restarts did between the sample before the run and the one after."""
    first, last = polled[0], polled[-1]
    during = [s for s in polled[1:-1] if s is not None and t0 <= s["t"] <= t0 + seconds]
    out: dict = {
        "samples": len(during),
        "missed": sum(1 for s in polled if s is None),
        "overloaded_samples": sum(1 for s in during if s["overload"]["overloaded"]),
        "standing_samples": sum(1 for s in during if s["overload"]["standing"]),
        "queued_max": max((s["queued"] for s in during), default=None),
        "queued_median": pct(sorted(s["queued"] for s in during), 0.5),
        "prefetched_median": pct(sorted(s["prefetched"] for s in during), 0.5),
        "handler_ms_last": during[-1]["overload"]["handler_ms"] if during else None,
        "restarts": None,
        "counters": None,
        # (s after the load generator's start, queued, prefetched, running, overloaded)
        "timeline": [
            [round(s["t"] - t0, 2), s["queued"], s["prefetched"], s["running"], s["overload"]["overloaded"]]
            for s in during
        ],
    }
    if first is not None and last is not None:
        out["restarts"] = last["restarts"] - first["restarts"]
        c0, c1 = first["counters"], last["counters"]
        out["counters"] = {k: c1[k] - c0.get(k, 0) for k in c1 if isinstance(c1[k], int)}
    return out


# ---------------------------------------------------------------- one server


def start_server(kind: str, live: list[Server]) -> Server:
    s = Server(kind, HANDLER, WORKERS)
    live.append(s)  # stopped at the end whatever happens
    s.start()
    s.wait_ready()
    return s


def restart(s: Server, live: list[Server]) -> Server:
    s.stop()
    live.remove(s)
    return start_server(s.kind, live)


def capacity_run(s: Server, p: Params, payload: str) -> dict:
    """C: a closed loop of CAPACITY_CLIENTS, and the workers' busy time per reply."""
    before = sample(s)
    d = bench_run.loadgen(s, CAPACITY_CLIENTS, payload=payload, duration=p.capacity_seconds, warmup=p.capacity_warmup)
    time.sleep(0.2)
    after = sample(s)
    done = d["issued"] - d["errors"] - d["unfinished"]
    d["handler_cpu_s"] = after.cpu - before.cpu
    d["handler_cpu_per_ok_ms"] = d["handler_cpu_s"] / max(1, done) * 1000
    d["worker_busy_s"] = after.busy - before.busy
    d["worker_busy_per_ok_ms"] = d["worker_busy_s"] / max(1, done) * 1000
    return d


def measure_capacity(s: Server, p: Params, payload: str, what: str, notes: list[str]) -> dict | None:
    """The capacity run, logged; None (and a note) if nothing was measured."""
    cap = capacity_run(s, p, payload)
    log(
        f"{s.kind}: {what}: capacity C = {cap['throughput']:.0f} req/s (p50 {cap['p50_us'] / 1000:.1f} ms),"
        f" per reply {cap['worker_busy_per_ok_ms']:.1f} ms worker busy, {cap['handler_cpu_per_ok_ms']:.1f} ms CPU"
    )
    if cap["throughput"] <= 0:
        notes.append(f"{s.kind}: no capacity measured for the {what} ({cap.get('errors')} errors); skipped")
    return cap


def measure_open(kind: str, p: Params, live: list[Server], notes: list[str]) -> dict:
    out: dict = {"server": kind, "runs": []}
    s = start_server(kind, live)
    log(f"{kind}: started on port {s.port}")
    cap = out["capacity"] = measure_capacity(s, p, PAYLOAD, "open loop", notes)
    capacity, cost = cap["throughput"], cap["worker_busy_per_ok_ms"] / 1000
    if capacity <= 0:
        return out
    modes = ["plain", "extended"] if kind == "gaspar" else ["plain"]
    runs = [
        [Phase("2x", 2.0, p.step_seconds)],
        [Phase("10x", 10.0, p.burst_seconds), Phase("0.3x after", 0.3, p.after_seconds)],
    ]
    plan = [(clients, seed, phases) for clients in modes for seed, phases in enumerate(runs, 1)]
    for i, (clients, seed, phases) in enumerate(plan):
        if s.proc is None or s.proc.poll() is not None:
            notes.append(f"{kind}: the server had exited ({s.log_tail(3)}); started again")
            s = start_server(kind, live)
        label = " + ".join(ph.name for ph in phases)
        log(f"{kind}: {clients} clients, {label} ({sum(ph.seconds for ph in phases):g} s)")
        r = open_loop(s, phases, capacity, cost, clients, seed, p)
        for m in r.phases:
            log(
                f"{kind} {clients} {m['phase']}: goodput {m['goodput']:.2f}x, sent {m['sent_rate']:.0f}/s"
                f" of {m['intended_rate']:.0f}, failures {m['failures']}"
            )
        out["runs"].append(r.__dict__)
        if r.busy_after_s is None:
            last = i == len(plan) - 1
            notes.append(
                f"{kind} ({clients}, {label}): workers still busy {p.settle_max:g} s after the last arrival"
                + ("" if last else "; restarted before the next run")
            )
            if not last:
                log(f"{kind}: still busy after {p.settle_max:g} s: restarting it")
                r.restarted = True
                s = restart(s, live)
    s.stop()
    live.remove(s)
    return out


def measure_closed(kind: str, p: Params, live: list[Server], notes: list[str]) -> dict:
    """The closed loop, on a fresh server with its own C for the 50 ms handler."""
    out: dict = {"runs": []}
    s = start_server(kind, live)
    log(f"{kind}: started on port {s.port} (closed loop)")
    cap = out["capacity"] = measure_capacity(s, p, CLOSED_PAYLOAD, "closed loop", notes)
    capacity, cost = cap["throughput"], cap["worker_busy_per_ok_ms"] / 1000
    if capacity <= 0:
        return out
    modes = ["plain", "extended"] if kind == "gaspar" else ["plain"]
    for i, clients in enumerate(modes):
        if s.proc is None or s.proc.poll() is not None:
            notes.append(f"{kind}: the server had exited ({s.log_tail(3)}); started again")
            s = start_server(kind, live)
        log(f"{kind}: closed loop, {CLOSED_CLIENTS} {clients} clients ({p.closed_seconds:g} s)")
        r = closed_loop(s, capacity, cost, clients, p)
        m, g = r.metrics, r.gaspar or {}
        log(
            f"{kind} {clients} closed: goodput {m['goodput']:.2f}x, OK p50 {ms(m['ok_p50_ms'])} ms,"
            f" refused {m['refused_per_s']:.0f}/s, gave up {m['gave_up']}, killed {m['workers_killed']},"
            f" front end {pct_text(m['front_end_cpu_share'])}"
            + (f", overloaded in {g['overloaded_samples']}/{g['samples']} samples" if g else "")
        )
        out["runs"].append(r.__dict__)
        if r.busy_after_s is None and i < len(modes) - 1:
            notes.append(f"{kind} ({clients}, closed loop): workers still busy {p.settle_max:g} s after; restarted")
            r.restarted = True
            s = restart(s, live)
    s.stop()
    live.remove(s)
    return out


# ---------------------------------------------------------------- the table


def ms(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"


def pct_text(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.0f}%"


def fail_text(f: dict) -> str:
    short = {"give_up": "timeout", "early_eof": "eof"}
    return " ".join(f"{short.get(k, k).replace('status ', 'st')}:{v}" for k, v in f.items()) or "-"


HEAD = [
    "server",
    "clients",
    "phase",
    "C req/s",
    "offered/s",
    "sent/s [gen CPU]",
    "gen lag p99 ms",
    "goodput",
    "OK p50 ms",
    "OK p99 ms",
    "p90 ms",
    "fail heard p50/p99 ms",
    "failures",
    "wasted",
    "RSS MiB start/peak/end",
    "busy after s",
    "recovery s",
    "other load",
]


def table(servers: list[dict], p: Params) -> str:
    rows = []
    for srv in servers:
        if "capacity" not in srv:  # the open loop was not run
            continue
        cap = srv["capacity"]["throughput"]
        if not srv["runs"]:
            rows.append([srv["server"], "-", "-", ms(cap), *["n/a"] * (len(HEAD) - 4)])
        for run in srv["runs"]:
            for i, m in enumerate(run["phases"]):
                last = i == len(run["phases"]) - 1
                gen = m["loadgen_cpu_share"]
                sent = f"{m['sent_rate']:,.0f}" + (f" [{gen * 100:.0f}%]" if gen is not None else "")
                w = m["wasted_cpu_share"]
                bound = ">=" if m["wasted_lower_bound"] and w is not None and w < 0.995 else ""
                wasted = "-" if w is None else f"{bound}{w * 100:.0f}%"
                rss = run["rss_mib"]
                busy = run["busy_after_s"]
                rec = m.get("recovery_s", "")
                if rec is None:
                    rec = f">{m['seconds']:g}"
                elif rec != "":
                    rec = f"{rec:.1f}"
                rows.append(
                    [
                        srv["server"],
                        run["clients"],
                        m["phase"],
                        ms(cap),
                        f"{m['intended_rate']:,.0f}",
                        sent,
                        ms(m["send_lag_p99_ms"]),
                        f"{m['goodput']:.2f}x",
                        ms(m["ok_p50_ms"]),
                        ms(m["ok_p99_ms"]),
                        ms(m["all_p90_ms"]),
                        f"{ms(m['heard_p50_ms'])}/{ms(m['heard_p99_ms'])}" if m["failed"] else "-",
                        fail_text(m["failures"]),
                        wasted,
                        f"{rss['start']:.1f}/{rss['peak']:.1f}/{rss['end']:.1f}" if last else "",
                        ("" if not last else (f">{p.settle_max:g}" if busy is None else f"{busy:.1f}")),
                        rec,
                        f"{run['other_load'] * 100:.0f}%" if last and run["other_load"] is not None else "",
                    ]
                )
        if srv["server"] != "gaspar" and srv["runs"]:
            rows.append([srv["server"], "extended", "all", ms(cap), *["n/a"] * (len(HEAD) - 4)])
    return render([HEAD, *rows], left=3)


def render(rows: list[list[str]], left: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


CLOSED_HEAD = [
    "server",
    "clients",
    "C req/s",
    "req/s",
    "goodput",
    "OK p50 ms",
    "OK p99 ms",
    "gave up",
    "refused [/s]",
    "refused heard p50 ms",
    "wasted",
    "killed",
    "front end CPU",
    "gen CPU",
    "workers on CPU",
    "overloaded",
    "RSS MiB start/peak/end",
    "busy after s",
    "other load",
]


def closed_table(servers: list[dict], p: Params) -> str:
    rows = []
    for srv in servers:
        closed = srv.get("closed")
        if closed is None:
            continue
        cap = closed["capacity"]["throughput"]
        if not closed["runs"]:
            rows.append([srv["server"], "-", ms(cap), *["n/a"] * (len(CLOSED_HEAD) - 3)])
        for run in closed["runs"]:
            m, g = run["metrics"], run["gaspar"]
            w = m["wasted_cpu_share"]
            bound = ">=" if m["wasted_lower_bound"] and w is not None and w < 0.995 else ""
            rss, busy = run["rss_mib"], run["busy_after_s"]
            over = "n/a" if g is None else f"{g['overloaded_samples']}/{g['samples']}"
            rows.append(
                [
                    srv["server"],
                    run["clients"],
                    ms(cap),
                    f"{m['requests_per_s']:,.0f}",
                    f"{m['goodput']:.2f}x",
                    ms(m["ok_p50_ms"]),
                    ms(m["ok_p99_ms"]),
                    f"{m['gave_up']:,}",
                    f"{m['refused']:,} [{m['refused_per_s']:,.0f}]",
                    ms(m["refused_heard_p50_ms"]) if m["refused"] else "-",
                    "-" if w is None else f"{bound}{w * 100:.0f}%",
                    str(m["workers_killed"]),
                    pct_text(m["front_end_cpu_share"]),
                    pct_text(m["loadgen_cpu_share"]),
                    pct_text(m["workers_on_cpu_share"]),
                    over,
                    f"{rss['start']:.1f}/{rss['peak']:.1f}/{rss['end']:.1f}",
                    f">{p.settle_max:g}" if busy is None else f"{busy:.1f}",
                    pct_text(run["other_load"]),
                ]
            )
        if srv["server"] != "gaspar" and closed["runs"]:
            rows.append([srv["server"], "extended", ms(cap), *["n/a"] * (len(CLOSED_HEAD) - 3)])
    return render([CLOSED_HEAD, *rows], left=2) if rows else ""


def phase_of(srv: dict, clients: str, name: str) -> dict | None:
    for run in srv["runs"]:
        if run["clients"] == clients:
            for m in run["phases"]:
                if m["phase"] == name:
                    return m
    return None


def rss_flat(srv: dict, clients: str) -> tuple[bool, str] | None:
    runs = [r for r in srv["runs"] if r["clients"] == clients]
    if not runs:
        return None
    ok, parts = True, []
    for r in runs:
        rss = r["rss_mib"]
        slack = max(TARGETS["rss_flat_mib"], 0.1 * rss["start"])
        ok &= rss["peak"] - rss["start"] <= slack and rss["end"] - rss["start"] <= slack
        parts.append(f"{rss['start']:.0f}->{rss['peak']:.0f}->{rss['end']:.0f}")
    return ok, ", ".join(parts)


def closed_run(srv: dict, clients: str) -> dict | None:
    for run in (srv.get("closed") or {}).get("runs", []):
        if run["clients"] == clients:
            return run["metrics"]
    return None


def target_value(srv: dict, clients: str, key: str) -> tuple[bool | None, str]:
    """One server's value for one target, and whether it meets it (None: not measured)."""
    if key == "rss":
        got = rss_flat(srv, clients)
        return (None, "-") if got is None else (got[0], got[1] + " MiB")
    if key == "ck":
        m = closed_run(srv, clients)
        if m is None:
            return None, "-"
        return m["workers_killed"] == TARGETS["closed_killed"], str(m["workers_killed"])
    m, field_, limit, higher, strict = {
        "g2": (phase_of(srv, clients, "2x"), "goodput", TARGETS["goodput_2x"], True, False),
        "g10": (phase_of(srv, clients, "10x"), "goodput", TARGETS["goodput_10x"], True, False),
        "p99": (phase_of(srv, clients, "2x"), "ok_p99_ms", TARGETS["p99_ok_2x_ms"], False, True),
        "p90": (phase_of(srv, clients, "0.3x after"), "all_p90_ms", TARGETS["p90_after_ms"], False, True),
        "cg": (closed_run(srv, clients), "goodput", TARGETS["closed_goodput"], True, False),
        "cp50": (closed_run(srv, clients), "ok_p50_ms", TARGETS["closed_ok_p50_ms"], False, False),
    }[key]
    v = None if m is None else m[field_]
    if v is None:
        return None, "-"
    met = v >= limit if higher else (v < limit if strict else v <= limit)
    return met, (f"{v:.2f}x" if field_ == "goodput" else f"{ms(v)} ms")


TARGET_LINES = [
    ("g2", "open: goodput at 2x C >= 0.90x"),
    ("g10", "open: goodput at 10x C >= 0.75x"),
    ("p99", "open: p99 of OK replies at 2x C < 250 ms"),
    ("p90", "open: p90 at 0.3x C after the burst < 50 ms"),
    ("rss", "open: front-end RSS flat (start->peak->end)"),
    ("cg", f"closed, {CLOSED_CLIENTS} clients: goodput >= 0.90x C"),
    ("cp50", f"closed, {CLOSED_CLIENTS} clients: OK p50 <= 250 ms"),
    ("ck", f"closed, {CLOSED_CLIENTS} clients: workers killed = 0"),
]


def targets(servers: list[dict]) -> str:
    """The issue's targets for gaspar (default settings), with each server's value beside
    them, and a verdict for gaspar."""
    cols = []
    for srv in servers:
        for clients in ("plain", "extended") if srv["server"] == "gaspar" else ("plain",):
            if any(r["clients"] == clients for r in srv["runs"]) or closed_run(srv, clients) is not None:
                cols.append((srv, clients))
    if not cols:
        return ""
    head = ["target (gaspar, default settings)", *[f"{s['server']} {c}" for s, c in cols]]
    rows, missed, measured = [head], [], 0
    for key, text in TARGET_LINES:
        row = [text]
        for srv, clients in cols:
            met, shown = target_value(srv, clients, key)
            if srv["server"] == "gaspar" and met is not None:
                shown += " met" if met else " NOT MET"
                measured += 1
                if not met:
                    missed.append(f"{text} ({clients}: {shown.removesuffix(' NOT MET')})")
            row.append(shown)
        if len(row) > 1 and any(c != "-" for c in row[1:]):
            rows.append(row)
    text = render(rows, left=1)
    if measured:
        verdict = "every target met" if not missed else f"NOT MET: {'; '.join(missed)}"
        text += f"\n\nverdict (gaspar): {measured - len(missed)} of {measured} measured targets met; {verdict}"
    return text


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases (about 2 minutes)")
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default both)",
    )
    ap.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help="comma-separated subset of " + ",".join(bench_run.SERVERS) + f" (default {','.join(DEFAULT_SERVERS)})",
    )
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    kinds = [k for k in bench_run.SERVERS if k in args.servers.split(",")]
    scenarios = [s for s in SCENARIOS if s in args.scenarios.split(",")]
    if unknown := set(args.scenarios.split(",")) - set(SCENARIOS):
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    command = bench_run.this_command()
    started = time.monotonic()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    bench_run.raise_nofile()
    bench_run.build_loadgen()
    if str(bench_run.ROOT) not in sys.path:
        sys.path.insert(0, str(bench_run.ROOT))  # gaspar.client, for gaspar's stats
    notes: list[str] = []
    busy_before = bench_run.busy_share()
    load_before = os.getloadavg()[0]
    if busy_before > 0.10:
        notes.append(f"the machine was {busy_before:.0%} busy before the run: expect noise")
    if "gaspar" in kinds and (why := bench_run.gaspar_runnable()):
        notes.append(f"gaspar unavailable: {why}")
        kinds.remove("gaspar")
    live: list[Server] = []
    results: list[dict] = []
    try:
        for kind in kinds:
            srv: dict = {"server": kind, "runs": []}  # runs: the open loop's; "closed": the closed loop's
            results.append(srv)
            for scenario in scenarios:
                try:
                    if scenario == "open":
                        srv.update(measure_open(kind, p, live, notes))
                    else:
                        srv["closed"] = measure_closed(kind, p, live, notes)
                except (ServerFailed, RuntimeError, OSError, ValueError, KeyError) as e:
                    notes.append(f"{kind} ({scenario} loop): failed: {e}")
                    log(f"{kind} ({scenario} loop): failed: {e}")
                finally:
                    bench_run.stop_all(live)
                    live.clear()
    except KeyboardInterrupt:
        notes.append("interrupted")
        log("interrupted: stopping the servers")
    finally:
        bench_run.stop_all(live)
        for sig, handler in old.items():
            signal.signal(sig, handler)

    elapsed = time.monotonic() - started
    m = bench_run.machine()
    mode = "quick" if args.quick else "full"
    lg_cpu = [
        ph["loadgen_cpu_share"] for srv in results for r in srv["runs"] for ph in r["phases"] if ph["loadgen_cpu_share"]
    ]
    header = [
        f"gaspar overload benchmark ({mode}), {datetime.datetime.now():%Y-%m-%d %H:%M}, {elapsed:.0f} s",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, Python {m['python']};"
        f" {busy_before:.0%} busy before, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}",
        f"command: {command}",
        f"handler spin {SPIN_US} us, {WORKERS} workers; C = closed loop of {CAPACITY_CLIENTS} clients"
        f" ({p.capacity_seconds:g} s); open loops: Poisson arrivals, a new connection per request, clients give up"
        f" after {GIVE_UP:g} s; 2x C for {p.step_seconds:g} s; 10x C for {p.burst_seconds:g} s then at once"
        f" 0.3x C for {p.after_seconds:g} s",
        "extended clients send flag 0x4 (FLAG_DEADLINE) with deadline_ms"
        f" {DEADLINE_MS}; the baselines speak plain only",
        "goodput: OK replies/s / C; p90: every request, a failed one counting as infinitely slow;"
        " fail heard: send -> reset or error reply, or the give-up (1 s) if nothing came",
        "wasted: share of the workers' busy time (schedstat) not accounted for by OK replies x the busy time"
        " per reply at capacity; recovery: first 0.5 s window after the burst with p90 < 50 ms",
        "other load: the machine's CPU (both cores) used meanwhile by anything but the server, the load generator"
        " and this script",
    ]
    closed_header = [
        f"closed loop: handler spin {CLOSED_SPIN_US} us, {WORKERS} workers, a fresh server; C = closed loop of"
        f" {CAPACITY_CLIENTS} clients; then {CLOSED_CLIENTS} clients for {p.closed_seconds:g} s, a new connection"
        f" per request, each giving up {GIVE_UP:g} s after sending and sending its next request at once after a"
        " reply, a refusal or giving up",
        "req/s: requests started; refused: reset, error reply or close without a reply ([/s]); heard: send ->"
        " refusal; killed: gaspar's restarts (stats), else worker pids gone",
        "front end CPU: its process's CPU over the load, % of one core (prefork has none); gen CPU: the load"
        " generator's; workers on CPU: share of the workers' busy time they had a core (spin runs on wall time);"
        f" overloaded: gaspar's stats said so in k of n samples (every {STATS_EVERY:g} s)",
    ]
    noisy = [
        f"{srv['server']} {r['clients']} {' + '.join(ph['phase'] for ph in r['phases'])}: {r['other_load']:.0%}"
        for srv in results
        for r in srv["runs"]
        if (r["other_load"] or 0) > 0.10
    ] + [
        f"{srv['server']} {r['clients']} closed loop: {r['other_load']:.0%}"
        for srv in results
        for r in (srv.get("closed") or {}).get("runs", [])
        if (r["other_load"] or 0) > 0.10
    ]
    if noisy:
        notes.append("other processes were busy during some runs, those figures are noisy: " + "; ".join(noisy))
    text = "\n".join(header[:3]) + "\n"
    if "open" in scenarios:
        text += "\n" + "\n".join(header[3:]) + "\n\n" + table(results, p) + "\n"
    if lg_cpu:
        text += (
            f"\nload generator: {min(lg_cpu) * 100:.0f}-{max(lg_cpu) * 100:.0f} % of one core per phase"
            " (kernel TCP work of both ends included); sent/s is what it achieved against offered/s\n"
        )
    if "closed" in scenarios:
        text += "\n" + "\n".join(closed_header) + "\n\n" + closed_table(results, p) + "\n"
    t = targets(results)
    if t:
        text += "\n" + t + "\n"
    doc = {
        **bench_run.run_record(mode, elapsed, m, command, p),
        "busy_before_run": round(busy_before, 3),
        "scenarios": scenarios,
        "handler": f"bench.handlers:{HANDLER} {SPIN_US}",
        "closed_loop": {
            "handler": f"bench.handlers:{HANDLER} {CLOSED_SPIN_US}",
            "clients": CLOSED_CLIENTS,
            "seconds": p.closed_seconds,
            "stats_every_s": STATS_EVERY,
        },
        "workers": WORKERS,
        "give_up_s": GIVE_UP,
        "targets": TARGETS,
        "notes": notes,
        "servers": results,
    }
    bench_run.publish("overload", text, notes, doc)
    return 1 if "interrupted" in notes else 0


if __name__ == "__main__":
    sys.exit(main())
