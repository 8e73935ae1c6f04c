"""Run gaspar and the baselines side by side and print one table.

    python bench/run.py            # full: a few minutes
    python bench/run.py --quick    # under a minute
    python bench/run.py --overload [--quick]   # the overload scenario instead (bench/overload.py)

Every server runs the same handlers (bench/handlers.py) and is driven by the same C load
generator (bench/loadgen.c, built here into bench/.build/). Servers that share a
configuration (handler, workers) run at the same time on different ports and their
measurements are interleaved, rep by rep, so slow drift of the machine hits them all
alike. The results go to stdout, bench/results.txt and bench/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable

try:
    from bench.harness import (
        CORES,
        FRONT_END,
        FULL,
        QUICK,
        SERVERS,
        Params,
        Results,
        Row,
        Server,
        ServerFailed,
        build_loadgen,
        busy_share,
        cpu_seconds,
        finish_loadgen,
        gaspar_runnable,
        loadgen,
        loadgen_budget,
        log,
        machine,
        publish,
        raise_nofile,
        run_record,
        start_loadgen,
        stop_all,
        summarize,
        this_command,
    )
except ImportError:  # run as a script: bench/ is sys.path[0]
    from harness import (
        CORES,
        FRONT_END,
        FULL,
        QUICK,
        SERVERS,
        Params,
        Results,
        Row,
        Server,
        ServerFailed,
        build_loadgen,
        busy_share,
        cpu_seconds,
        finish_loadgen,
        gaspar_runnable,
        loadgen,
        loadgen_budget,
        log,
        machine,
        publish,
        raise_nofile,
        run_record,
        start_loadgen,
        stop_all,
        summarize,
        this_command,
    )


class Bench:
    def __init__(self, p: Params, kinds: list[str], results: Results) -> None:
        self.p, self.kinds, self.res = p, kinds, results
        self.live: list[Server] = []

    def interleaved(self, servers: dict[str, Server], fn: Callable[[Server], dict], reps: int) -> dict[str, list]:
        runs: dict[str, list] = {name: [] for name in servers}
        names = list(servers)
        for rep in range(reps):
            k = rep % len(names) if names else 0
            for name in names[k:] + names[:k]:  # a different server goes first each rep
                try:
                    runs[name].append(fn(servers[name]))
                except Exception as e:  # noqa: BLE001 - a failed run is reported, not fatal
                    self.res.notes.append(f"{name}: a run failed: {e}")
        return {k: v for k, v in runs.items() if v}

    def start_all(self, handler: str, workers: int, kinds: list[str]) -> dict[str, Server]:
        servers = {k: Server(k, handler, workers) for k in kinds}
        for s in servers.values():
            self.live.append(s)  # stopped at the end whatever happens
            s.start()
        ready = {}
        for name, s in servers.items():
            try:
                s.wait_ready()
                ready[name] = s
            except ServerFailed as e:
                self.res.notes.append(f"{name} ({handler}, {workers} workers) did not start: {e}")
                s.stop()
        log(f"started {', '.join(ready)}: handler {handler}, {workers} workers")
        return ready

    def short(self, **extra) -> dict:
        return {"duration": self.p.duration, "warmup": self.p.warmup, **extra}

    # scenario 1, 3, 5 (connections), 6, 7: echo with workers = cores
    def echo_phase(self, servers: dict[str, Server]) -> dict[str, list]:
        """Scenarios 1, 3, 5 (connections), 6 and 7; returns the 64-client echo runs."""
        p, res = self.p, self.res

        def run(c, **o):
            return lambda s: loadgen(s, c, **self.short(**o))

        r1 = self.interleaved(servers, run(1, size=64), p.reps)
        res.add(summarize(Row("1 echo 64 B, 1 client", "p50 latency us", "lower", "int"), r1, "p50_us"))
        res.add(summarize(Row("1 echo 64 B, 1 client", "p99 latency us", "lower", "int"), r1, "p99_us"))
        r64 = self.interleaved(servers, run(64, size=64), p.reps)
        res.add(summarize(Row("1 echo 64 B, 64 clients", "req/s", "higher", "int"), r64, "throughput"))
        res.add(summarize(Row("1 echo 64 B, 64 clients", "p99 latency us", "lower", "int"), r64, "p99_us"))
        ro = self.interleaved(servers, run(64, size=64, rate=p.open_rate), p.reps)
        label = f"1 echo 64 B, open loop {p.open_rate:.0f}/s"
        res.add(summarize(Row(label, "p99 latency us", "lower", "int"), ro, "p99_us"))

        rm = self.interleaved(servers, run(4, size=1 << 20), p.reps)
        res.add(summarize(Row("3 echo 1 MiB, 4 clients", "MB/s", "higher", "int"), rm, "mb_per_s"))

        for n in p.scale:
            # a closed loop of n clients turns over once every n / throughput seconds: the
            # warm-up must cover that, or the count catches the start-up transient
            warm, dur = p.scale_warmup.get(n, 1.0), p.scale_duration.get(n, 1.0)

            def scale(s, n=n, warm=warm, dur=dur):
                return loadgen(s, n, sample=True, size=64, duration=dur, warmup=warm, ramp=warm / 2, drain=30)

            rs = self.interleaved(servers, scale, 1)
            label = f"5 echo 64 B, {n:,} connections"
            res.add(summarize(Row(label, "req/s", "higher", "int"), rs, "throughput"))
            rss = Row(label, "front-end RSS MiB", "lower", "f1")
            res.add(summarize(rss, rs, lambda d: d["rss_front_end_kb"] / 1024))
        self.cpu_per_request(servers, "6 echo 64 B, 64 clients", {})

        g = servers.get("gaspar")
        if g is None:
            return r64
        plain = next(r for r in res.rows if r.scenario == "1 echo 64 B, 64 clients" and r.metric == "req/s")
        one = self.interleaved({"gaspar": g}, run(1, size=64, persistent=True), p.reps)
        row = Row("7 persistent, 1 client", "p50 latency us", "lower", "int", gaspar_only=True)
        res.add(summarize(row, one, "p50_us"))
        for k in (1, 8):
            rk = self.interleaved({"gaspar": g}, run(64, size=64, persistent=True, pipeline=k), p.reps)
            label = "7 persistent, 64 clients" + (f", pipeline {k}" if k > 1 else "")
            row = res.add(summarize(Row(label, "req/s", "higher", "int", gaspar_only=True), rk, "throughput"))
            if plain.values.get("gaspar") and row.values.get("gaspar"):
                ratio = Row(label, "vs 1 req/connection", "higher", "x", gaspar_only=True)
                ratio.values["gaspar"] = row.values["gaspar"] / plain.values["gaspar"]
                res.add(ratio)
        self.cpu_per_request({"gaspar": g}, "7 persistent, 64 clients, pipeline 8", {"persistent": True, "pipeline": 8})
        return r64

    def cpu_per_request(self, servers: dict[str, Server], label: str, extra: dict) -> None:
        """Scenario 6: the front end's own CPU time per request, over a fixed number of requests."""
        n = self.p.cpu_requests

        def run(s: Server) -> dict:
            loadgen(s, 64, size=64, requests=max(200, n // 10), **extra)  # warm up
            pids = s.front_end_pids()
            before = cpu_seconds(pids)
            d = loadgen(s, 64, size=64, requests=n, max_seconds=120, **extra)
            time.sleep(0.1)
            d["front_end_cpu_s"] = cpu_seconds(pids) - before
            d["front_end_us_per_req"] = d["front_end_cpu_s"] / max(1, d["requests"]) * 1e6
            return d

        runs = self.interleaved(servers, run, 1)
        row = Row(label, "front-end CPU us/req", "lower", "f1", gaspar_only=len(servers) == 1)
        self.res.add(summarize(row, runs, "front_end_us_per_req"))

    # scenario 2 (workers = cores) and 4 (2 workers)
    def spin_phase(self, servers: dict[str, Server], workers: int) -> None:
        p, res = self.p, self.res
        if workers == CORES:
            r = self.interleaved(servers, lambda s: loadgen(s, 8, **self.short(payload="1000")), p.reps)
            label = f"2 spin 1 ms, 8 clients, {workers} workers"
            res.add(summarize(Row(label, "req/s", "higher", "int"), r, "throughput"))
            eff = Row(label, "efficiency", "higher", "f2")
            res.add(summarize(eff, r, lambda d: d["throughput"] / (workers * 1000)))
        if workers == 2:
            runs = self.interleaved(servers, self.fairness, 1)
            label = "4 fairness: 200 us beside 50 ms, 2 workers"
            res.add(summarize(Row(label, "short p50 us", "lower", "int"), runs, "p50_us"))
            res.add(summarize(Row(label, "short p99 us", "lower", "int"), runs, "p99_us"))

    def fairness(self, s: Server) -> dict:
        """One client sends 50 ms requests back to back while another sends 200 us ones."""
        opts = {"duration": self.p.fair_duration, "warmup": 0.3, "drain": 15, "timeout": 30}
        long = start_loadgen(s.port, 1, payload="50000", **opts)
        short = start_loadgen(s.port, 1, payload="200", **opts)
        budget = loadgen_budget(opts)
        d_short = finish_loadgen(short, budget)
        d_long = finish_loadgen(long, budget)
        d = dict(d_short)
        d["long"] = d_long
        d["cpu_share"] = d_short["cpu_share"] + d_long["cpu_share"]
        d["errors"] = d_short["errors"] + d_long["errors"]
        return d

    # scenario 5: throughput against workers
    def workers_phase(self, servers: dict[str, Server], workers: int) -> dict[str, list]:
        return self.interleaved(servers, lambda s: loadgen(s, 64, **self.short(size=64)), self.p.reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, no repeats, no 10,000 connections")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset of " + ",".join(SERVERS))
    ap.add_argument("--overload", action="store_true", help="run the overload scenario instead (bench/overload.py)")
    args = ap.parse_args()
    if args.overload:
        try:
            from bench import overload
        except ImportError:  # run as a script: bench/ is sys.path[0]
            import overload
        given = args.servers != ",".join(SERVERS)  # else overload.py's own default set
        return overload.main(["--quick"] * args.quick + ["--servers", args.servers] * given)
    p = QUICK if args.quick else FULL
    kinds = [k for k in SERVERS if k in args.servers.split(",")]
    command = this_command()
    started = time.monotonic()

    raise_nofile()
    build_loadgen()
    res = Results()
    busy_before = busy_share()
    load_before = os.getloadavg()[0]
    if busy_before > 0.10:
        res.notes.append(
            f"the machine was {busy_before:.0%} busy before the run (load average {load_before:.2f}):"
            " other work competes with the servers, expect noise"
        )
    gaspar_why = gaspar_runnable() if "gaspar" in kinds else "not selected"
    if gaspar_why and "gaspar" in kinds:
        res.notes.append(f"gaspar unavailable: {gaspar_why}")
        kinds.remove("gaspar")
    bench = Bench(p, kinds, res)

    def phase(handler: str, workers: int, kinds_here: list[str]) -> dict[str, Server]:
        return bench.start_all(handler, workers, kinds_here)

    def end(servers: dict[str, Server]) -> None:
        stop_all(servers.values())

    worker_counts = (1, 2, 4)
    per_workers: dict[int, dict[str, list]] = {}
    try:
        servers = phase("echo", CORES, kinds)
        try:
            # row 1's 64-client runs double as the workers = cores point of row 5
            per_workers[CORES] = bench.echo_phase(servers)
        finally:
            end(servers)
        for w in sorted({CORES, 2}):
            servers = phase("spin", w, kinds)
            try:
                bench.spin_phase(servers, w)
            finally:
                end(servers)
        for w in worker_counts:
            if w in per_workers:
                continue
            servers = phase("echo", w, [k for k in kinds if k != "eventlet"])  # eventlet has no workers
            try:
                per_workers[w] = bench.workers_phase(servers, w)
            finally:
                end(servers)
    except KeyboardInterrupt:
        res.notes.append("interrupted")
    finally:
        stop_all(bench.live)
    for w in worker_counts:
        label = f"req/s, {w} worker{'s' * (w > 1)}"
        res.add(summarize(Row("5 echo 64 B, 64 clients", label, "higher", "int"), per_workers.get(w, {}), "throughput"))

    elapsed = time.monotonic() - started
    m = machine()
    m["busy_before_run"] = round(busy_before, 3)
    m["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    shown = tuple(k for k in SERVERS if k in args.servers.split(","))
    mode = "quick" if args.quick else "full"
    header = [
        f"gaspar benchmark ({mode}), {datetime.datetime.now():%Y-%m-%d %H:%M}, {elapsed:.0f} s",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, Python {m['python']};"
        f" {busy_before:.0%} busy before the run, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}",
        f"command: {command}",
        (
            f"cells: rows 1, 2, 3, 5 (workers) and 7 are the median of {p.reps} runs, the others one run;"
            if p.reps > 1
            else "cells: one run each;"
        )
        + " [n%] = the load generator's CPU time, % of one core",
        "g/X: gaspar's value divided by X's (read with the `better` column); !N err: failed requests",
        "workers = cores unless the row says otherwise; eventlet is one process whatever --workers says",
    ]
    text = "\n".join(header) + "\n\n" + res.table(shown) + "\n"
    doc = {
        **run_record(mode, elapsed, m, command, p),
        "servers": list(shown),
        "gaspar_available": gaspar_why is None,
        "front_end": FRONT_END,
        "notes": res.notes,
        "rows": [r.__dict__ for r in res.rows],
    }
    publish("results", text, res.notes, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
