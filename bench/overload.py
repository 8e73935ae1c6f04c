"""Overload: gaspar and the baselines past their capacity, side by side, in one run.

    python bench/overload.py            # full: about 3 minutes
    python bench/overload.py --quick    # about a minute
    python bench/run.py --overload [--quick]   # the same

Every server runs ``bench.handlers:spin`` with 10000 (10 ms of busy CPU per request) on 2
workers. Per server: a closed loop of 8 clients measures its capacity C (req/s); then open
loops, one new connection per request, Poisson arrivals, each client giving up 1 s after
it sent its request: 2x C, then 10x C followed at once by 0.3x C. gaspar runs the open
loops twice: with plain (1.0) clients and with extended clients that send their deadline.
Servers, the C load generator (bench/loadgen.c) and the helpers are run.py's. The table
goes to stdout and bench/overload.txt, every figure to bench/overload.json; bench/README.rst
says how to read it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

try:
    from bench import run as bench_run
except ImportError:  # run as a script: bench/ is sys.path[0]
    import run as bench_run

BENCH, BUILD = bench_run.BENCH, bench_run.BUILD
Server, ServerFailed, log = bench_run.Server, bench_run.ServerFailed, bench_run.log

HANDLER = "spin"
SPIN_US = 10_000  # the request: 10 ms of busy CPU
PAYLOAD = str(SPIN_US)
WORKERS = 2
CAPACITY_CLIENTS = 8
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
}


# worker busy seconds per OK reply, per server, from its capacity run (for "wasted")
server_cost: dict[str, float] = {}


@dataclass
class Params:
    capacity_seconds: float
    capacity_warmup: float
    step_seconds: float  # 2x C
    burst_seconds: float  # 10x C
    after_seconds: float  # 0.3x C, right after the burst
    settle_max: float  # after a run: wait at most this long for the workers to go idle, else restart


QUICK = Params(1.5, 0.5, 3.0, 3.0, 3.0, 3.0)
FULL = Params(4.0, 1.0, 10.0, 10.0, 5.0, 8.0)


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


def handler_cpu(server: Server) -> float:
    """CPU seconds of the server's processes but its front end's own: the workers (and
    whatever they reaped), from /proc. For prefork, the accepting processes."""
    root, total = server.pid, 0
    for pid in bench_run.descendants(root):
        try:
            f = bench_run.proc_stat(pid)
        except OSError:
            continue
        total += int(f[13]) + int(f[14])  # cutime, cstime: children reaped (a replaced worker)
        if pid != root:
            total += int(f[11]) + int(f[12])  # utime, stime
    return total / bench_run.CLK_TCK


def worker_busy(server: Server) -> float:
    """Seconds the workers' main threads (where the handler runs) were on a CPU or waiting
    for one, from /proc/PID/schedstat: for the wall-clock ``spin`` this is about 10 ms per
    run of the handler however contended the cores are (its CPU time is not)."""
    root, total = server.pid, 0
    for pid in bench_run.descendants(root):
        if pid == root:
            continue
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                run_ns, wait_ns = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        total += int(run_ns) + int(wait_ns)
    return total / 1e9


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


def rss_mib(server: Server) -> float:
    return bench_run.rss_kb(server.front_end_pids()) / 1024


@dataclass
class Sample:
    t: float  # time.monotonic()
    cpu: float  # handler_cpu
    busy: float  # worker_busy
    rss: float  # front-end MiB


def sample(server: Server) -> Sample:
    return Sample(time.monotonic(), handler_cpu(server), worker_busy(server), rss_mib(server))


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


def open_loop(server: Server, phases: list[Phase], capacity: float, clients: str, seed: int, p: Params) -> RunResult:
    """One load generator run over consecutive phases; per-phase metrics from its records."""
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
    budget = total + GIVE_UP + 2 + 15
    res = RunResult(server.kind, clients)
    ours0, machine0, own0 = tree_cpu(server), machine_cpu(), own_cpu()
    samples = [sample(server)]
    proc = bench_run.start_loadgen(server.port, conns, **opts)
    try:
        deadline = time.monotonic() + budget
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            samples.append(sample(server))
        lg = bench_run.finish_loadgen(proc, budget)
    except BaseException:  # ^C or a failure: the load generator goes too
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        raise
    t0 = lg["t_start_ns"] / 1e9  # the load generator's clock is time.monotonic()'s
    t_arrivals_end = t0 + total
    idle_at = settle(server, samples, p.settle_max)
    # what else ran meanwhile: the machine's busy time but the server's, the load
    # generator's and this script's (tests, builds... make the figures noisy)
    machine1 = machine_cpu()
    ours = tree_cpu(server) - ours0 + lg["cpu_total_seconds"] + own_cpu() - own0
    span = machine1[1] - machine0[1]
    res.other_load = max(0.0, machine1[0] - machine0[0] - ours) / span if span > 0 else None
    res.busy_after_s = None if idle_at is None else max(0.0, idle_at - t_arrivals_end)
    res.loadgen = lg
    res.rss_mib = {
        "start": samples[0].rss,
        "peak": max(s.rss for s in samples),
        "end": samples[-1].rss,
    }
    recs = read_records(records)
    cost = server_cost.get(server.kind)  # worker busy seconds per OK reply, from the capacity run
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
        # the share of the workers' time not accounted for by OK replies: requests run for
        # clients that had left (and the little per-request overhead not seen at capacity)
        if cost and busy > 0.05:
            m["wasted_cpu_share"] = max(0.0, busy - ok_done * cost) / busy
        else:
            m["wasted_cpu_share"] = None
        m["wasted_lower_bound"] = last and idle_at is None
        res.phases.append(m)
        lo = hi
    return res


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


# ---------------------------------------------------------------- one server


def start_server(kind: str, live: list[Server]) -> Server:
    s = Server(kind, HANDLER, WORKERS)
    live.append(s)  # stopped at the end whatever happens
    s.start()
    s.wait_ready()
    return s


def capacity_run(s: Server, p: Params) -> dict:
    before = sample(s)
    d = bench_run.loadgen(s, CAPACITY_CLIENTS, payload=PAYLOAD, duration=p.capacity_seconds, warmup=p.capacity_warmup)
    time.sleep(0.2)
    after = sample(s)
    done = d["issued"] - d["errors"] - d["unfinished"]
    d["handler_cpu_s"] = after.cpu - before.cpu
    d["handler_cpu_per_ok_ms"] = d["handler_cpu_s"] / max(1, done) * 1000
    d["worker_busy_s"] = after.busy - before.busy
    d["worker_busy_per_ok_ms"] = d["worker_busy_s"] / max(1, done) * 1000
    return d


def measure_server(kind: str, p: Params, live: list[Server], notes: list[str]) -> dict:
    out: dict = {"server": kind, "runs": []}
    s = start_server(kind, live)
    log(f"{kind}: started on port {s.port}")
    cap = capacity_run(s, p)
    capacity = cap["throughput"]
    server_cost[kind] = cap["worker_busy_per_ok_ms"] / 1000
    out["capacity"] = cap
    log(
        f"{kind}: capacity C = {capacity:.0f} req/s (p50 {cap['p50_us'] / 1000:.1f} ms),"
        f" per reply {cap['worker_busy_per_ok_ms']:.1f} ms worker busy, {cap['handler_cpu_per_ok_ms']:.1f} ms CPU"
    )
    if capacity <= 0:
        notes.append(f"{kind}: no capacity measured ({cap.get('errors')} errors); open loops skipped")
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
        r = open_loop(s, phases, capacity, clients, seed, p)
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
                s.stop()
                live.remove(s)
                s = start_server(kind, live)
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
        cap = srv.get("capacity", {}).get("throughput")
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


def targets(servers: list[dict]) -> str:
    """The issue's targets for gaspar (default settings), with each server's value beside them."""
    cols = []
    for srv in servers:
        for clients in ("plain", "extended") if srv["server"] == "gaspar" else ("plain",):
            if any(r["clients"] == clients for r in srv["runs"]):
                cols.append((srv, clients))
    if not cols:
        return ""

    def value(srv, clients, key) -> tuple[bool | None, str]:
        if key == "rss":
            got = rss_flat(srv, clients)
            return (None, "-") if got is None else (got[0], got[1] + " MiB")
        phase, field_, limit, higher = {
            "g2": ("2x", "goodput", TARGETS["goodput_2x"], True),
            "g10": ("10x", "goodput", TARGETS["goodput_10x"], True),
            "p99": ("2x", "ok_p99_ms", TARGETS["p99_ok_2x_ms"], False),
            "p90": ("0.3x after", "all_p90_ms", TARGETS["p90_after_ms"], False),
        }[key]
        m = phase_of(srv, clients, phase)
        v = None if m is None else m[field_]
        if v is None:
            return None, "-"
        met = v >= limit if higher else v < limit
        return met, (f"{v:.2f}x" if field_ == "goodput" else f"{ms(v)} ms")

    lines = [
        ("g2", "goodput at 2x C >= 0.90x"),
        ("g10", "goodput at 10x C >= 0.75x"),
        ("p99", "p99 of OK replies at 2x C < 250 ms"),
        ("p90", "p90 at 0.3x C after the burst < 50 ms"),
        ("rss", "front-end RSS flat (start->peak->end)"),
    ]
    head = ["target (gaspar, default settings)", *[f"{s['server']} {c}" for s, c in cols]]
    rows = [head]
    for key, text in lines:
        row = [text]
        for srv, clients in cols:
            met, shown = value(srv, clients, key)
            if srv["server"] == "gaspar" and met is not None:
                shown += " met" if met else " NOT MET"
            row.append(shown)
        rows.append(row)
    return render(rows, left=1)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases (under 2 minutes)")
    ap.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help="comma-separated subset of " + ",".join(bench_run.SERVERS) + f" (default {','.join(DEFAULT_SERVERS)})",
    )
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    kinds = [k for k in bench_run.SERVERS if k in args.servers.split(",")]
    command = bench_run.this_command()
    started = time.monotonic()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGHUP)}
    bench_run.raise_nofile()
    bench_run.build_loadgen()
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
            try:
                results.append(measure_server(kind, p, live, notes))
            except (ServerFailed, RuntimeError, OSError, ValueError, KeyError) as e:
                notes.append(f"{kind}: failed: {e}")
                log(f"{kind}: failed: {e}")
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
    noisy = [
        f"{srv['server']} {r['clients']} {' + '.join(ph['phase'] for ph in r['phases'])}: {r['other_load']:.0%}"
        for srv in results
        for r in srv["runs"]
        if (r["other_load"] or 0) > 0.10
    ]
    if noisy:
        notes.append("other processes were busy during some runs, those figures are noisy: " + "; ".join(noisy))
    text = "\n".join(header) + "\n\n" + table(results, p) + "\n"
    if lg_cpu:
        text += (
            f"\nload generator: {min(lg_cpu) * 100:.0f}-{max(lg_cpu) * 100:.0f} % of one core per phase"
            " (kernel TCP work of both ends included); sent/s is what it achieved against offered/s\n"
        )
    t = targets(results)
    if t:
        text += "\n" + t + "\n"
    doc = {
        **bench_run.run_record(mode, elapsed, m, command, p),
        "busy_before_run": round(busy_before, 3),
        "handler": f"bench.handlers:{HANDLER} {SPIN_US}",
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
