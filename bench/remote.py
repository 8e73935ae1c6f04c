"""Remote workers against local ones, side by side, in one run.

    python bench/remote.py            # full: a few minutes
    python bench/remote.py --quick    # under a minute
    python bench/remote.py --scenarios local,remote   # a subset

Every scenario runs the same handler on 2 workers behind a ``gaspar serve`` front end on
127.0.0.1, and is driven by the same C load generator (bench/loadgen.c) at that front end:

- local:  ``gaspar serve --workers 2``
- remote: ``gaspar serve --workers 0 --remote-bind tcp://127.0.0.1:P`` and an agent,
  ``gaspar worker --connect tcp://127.0.0.1:P --workers 2``, over loopback
- curve:  the same with CURVE (keys from ``gaspar keygen`` in a temporary directory)
- veth:   the agent inside a network namespace (tests/netns.py), across a veth pair: the
  front end's remote bind is on the veth's address here, ``--insecure``. Root only: skipped
  (with the reason) where network namespaces are not available.

The scenarios of one handler run at the same time, each on its own ports, and their
measurements are interleaved rep by rep (a different one first each rep). A remote
scenario is measured only once its agent has joined with its 2 workers (``stats``). The
table goes to stdout and bench/remote.txt; every figure, with the load generator's raw
results, to bench/remote.json. Servers, the load generator and the helpers are run.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

try:
    from bench import harness as bench_run
except ImportError:  # run as a script: bench/ is sys.path[0]
    import harness as bench_run

BENCH, BUILD, ROOT = bench_run.BENCH, bench_run.BUILD, bench_run.ROOT
Server, ServerFailed, log = bench_run.Server, bench_run.ServerFailed, bench_run.log
loadgen, median, fmt_value = bench_run.loadgen, bench_run.median, bench_run.fmt_value

SCENARIOS = ("local", "remote", "curve", "veth")
REMOTES = SCENARIOS[1:]
WORKERS = 2
SPIN_US = 1000  # the CPU handler's request: 1 ms of busy CPU
MIB = 1 << 20
JOIN_TIMEOUT = 20.0  # seconds for an agent to join with its workers (it takes well under 1 s)
STOP_GRACE = 5.0  # seconds after SIGINT before SIGKILL


@dataclass
class Params:
    duration: float  # seconds measured per run
    warmup: float  # seconds before that, not measured
    reps: int  # runs per measurement, interleaved; the median is reported
    cpu_requests: int  # requests over which the front end's and the agent's CPU time is measured


QUICK = Params(duration=0.5, warmup=0.2, reps=1, cpu_requests=3000)
FULL = Params(duration=2.0, warmup=0.5, reps=5, cpu_requests=10000)


def load_netns():
    """tests/netns.py, by path (bench/ and tests/ both have a handlers.py: no sys.path games)."""
    spec = importlib.util.spec_from_file_location("gaspar_tests_netns", ROOT / "tests" / "netns.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


env = bench_run.repo_env


def gaspar_run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gaspar", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def remote_cli() -> tuple[str | None, list[str]]:
    """(None, how to say --insecure) if ``gaspar worker`` and ``keygen`` exist; else (why not, [])."""
    for sub in ("worker", "keygen"):
        try:
            r = gaspar_run(sub, "--help")
        except subprocess.TimeoutExpired:
            return f"`python -m gaspar {sub} --help` did not finish in 30 s", []
        if r.returncode != 0:
            tail = " | ".join(r.stderr.strip().splitlines()[-2:])
            return f"`python -m gaspar {sub} --help` failed: {tail}", []
    r = gaspar_run("serve", "--help")
    # a yes/no setting takes a value on gaspar's command line (--insecure on); a flag does not
    insecure = ["--insecure", "on"] if "--insecure INSECURE" in r.stdout else ["--insecure"]
    return None, insecure


def keygen(root: str) -> dict[str, str]:
    """Keys for one front end and one agent, with ``gaspar keygen``, under ``root``."""
    server_dir, agent_dir, allow = (os.path.join(root, d) for d in ("server", "agent", "allow"))
    for d in (server_dir, agent_dir, allow):
        os.makedirs(d, exist_ok=True)
    for name, d in (("server", server_dir), ("bench-curve", agent_dir)):
        r = gaspar_run("keygen", name, "--dir", d)
        if r.returncode != 0:
            raise ServerFailed(f"`gaspar keygen {name} --dir {d}` failed ({r.returncode}): {r.stderr.strip()}")
    shutil.copy(os.path.join(agent_dir, "bench-curve.key"), allow)  # the allow directory: public keys only
    return {
        "server_secret": os.path.join(server_dir, "server.key_secret"),
        "server_public": os.path.join(server_dir, "server.key"),
        "agent_secret": os.path.join(agent_dir, "bench-curve.key_secret"),
        "allow": allow,
    }


# ---------------------------------------------------------------- one scenario: a front end and maybe an agent


class Setup(Server):
    """One scenario's ``gaspar serve`` on its own port (bench_run.Server's start, probe,
    stop), plus, for the remote ones, its agent (``gaspar worker``) here or in the netns."""

    def __init__(self, kind: str, handler: str, ctx: Context) -> None:
        super().__init__(kind, handler, WORKERS)
        self.ctx = ctx
        self.remote_host = ctx.veth.host_ip if kind == "veth" else "127.0.0.1"
        self.remote_port = free_port(self.remote_host) if kind in REMOTES else None
        self.agent: subprocess.Popen | None = None
        self.agent_log = BUILD / f"remote-agent-{kind}-{handler}.log"
        self.log = BUILD / f"remote-{kind}-{handler}.log"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "gaspar", "serve", f"bench.handlers:{self.handler}"]
        argv += ["--bind", f"127.0.0.1:{self.port}", "--log-level", "warning", "--control-socket", "off"]
        if self.kind == "local":
            argv += ["--workers", str(WORKERS)]
        else:
            argv += ["--workers", "0", "--remote-bind", f"tcp://{self.remote_host}:{self.remote_port}"]
        if self.kind == "curve":
            argv += ["--curve-secret", self.ctx.keys["server_secret"], "--curve-allow", self.ctx.keys["allow"]]
        if self.kind == "veth":
            argv += self.ctx.insecure
        return argv + shlex.split(os.environ.get("GASPAR_BENCH_ARGS", ""))

    def agent_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "gaspar", "worker", f"bench.handlers:{self.handler}"]
        argv += ["--connect", f"tcp://{self.remote_host}:{self.remote_port}", "--workers", str(WORKERS)]
        argv += ["--name", f"bench-{self.kind}"]
        if self.kind == "curve":
            argv += ["--curve-secret", self.ctx.keys["agent_secret"], "--curve-server", self.ctx.keys["server_public"]]
        return argv

    def start(self) -> None:
        super().start()
        if self.kind not in REMOTES:
            return
        with open(self.agent_log, "wb") as out:
            kw = {"cwd": ROOT, "env": env(), "stdout": out, "stderr": subprocess.STDOUT}
            if self.kind == "veth":
                self.agent = self.ctx.veth.popen(self.agent_argv(), **kw)  # its own session
            else:
                self.agent = subprocess.Popen(self.agent_argv(), stdin=subprocess.DEVNULL, start_new_session=True, **kw)

    def agent_tail(self, n: int = 8) -> str:
        return bench_run.log_tail(self.agent_log, n)

    def stats(self) -> dict:
        from gaspar import client  # ROOT is on sys.path (main)

        return json.loads(client.request(("127.0.0.1", self.port), b"", timeout=2, stats=True))

    def joined(self) -> dict | None:
        """The agent's entry in stats once it has joined with all its workers, else None."""
        try:
            agents = self.stats().get("agents") or []
        except Exception:  # noqa: BLE001 - not up yet, or stats without agents
            return None
        for a in agents:
            if a.get("state") == "joined" and len(a.get("workers") or []) >= WORKERS:
                return a
        return None

    def wait_ready(self, timeout: float = JOIN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        if self.kind in REMOTES:
            while not self.joined():
                if self.proc.poll() is not None:
                    raise ServerFailed(f"the front end exited with status {self.proc.returncode}: {self.log_tail()}")
                if self.agent.poll() is not None:
                    raise ServerFailed(f"the agent exited with status {self.agent.returncode}: {self.agent_tail()}")
                if time.monotonic() > deadline:
                    raise ServerFailed(
                        f"the agent did not join with {WORKERS} workers within {timeout:.0f} s;"
                        f" front end: {self.log_tail(4) or '(no output)'}; agent: {self.agent_tail(4) or '(no output)'}"
                    )
                time.sleep(0.1)
        super().wait_ready(max(1.0, deadline - time.monotonic()))

    def interrupt(self) -> None:
        super().interrupt()
        if self.agent is not None and self.agent.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.agent.pid, signal.SIGINT)

    def stop(self, deadline: float | None = None) -> str:
        """SIGINT to the agent and the front end; SIGKILL to their process groups after 5 s."""
        deadline = deadline or time.monotonic() + STOP_GRACE
        how = ""
        # every process of the scenario, in case one left its process group: SIGKILLed at the end
        tree = [pid for p in (self.proc, self.agent) if p is not None for pid in bench_run.descendants(p.pid)[1:]]
        if self.agent is not None:
            self.interrupt()
            try:
                self.agent.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                how = ", agent killed: SIGINT did not stop it"
            bench_run.kill_group(self.agent)
            self.agent = None
        how = super().stop(deadline) + how
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return how


@dataclass
class Context:
    veth: object | None = None  # a netns.Veth, entered
    keys: dict = field(default_factory=dict)
    insecure: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- results


@dataclass
class Row:
    scenario: str
    metric: str
    better: str  # higher | lower
    fmt: str  # int, f1, f2, x
    values: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    lg_share: dict[str, float | None] = field(default_factory=dict)
    runs: dict[str, list] = field(default_factory=dict)
    ratios: bool = True  # show x/local


class Results(bench_run.Results):
    """run.py's results, with this benchmark's table (each scenario against local)."""

    def summarize(self, row: Row, runs: dict[str, list[dict]], key: str | Callable[[dict], float]) -> Row:
        return self.add(bench_run.summarize(row, runs, key))

    def table(self, shown: list[str]) -> str:
        others = [s for s in shown if s != "local"]
        head = ["scenario", "metric", "better", *shown, *[f"{s}/local" for s in others]]
        body = []
        for r in self.rows:
            cells = [r.scenario, r.metric, r.better]
            for s in shown:
                v = r.values.get(s)
                cell = fmt_value(v, r.fmt) if s in r.values else "-"
                if r.lg_share.get(s) is not None and v is not None:
                    cell += f" [{r.lg_share[s] * 100:.0f}%]"
                if r.errors.get(s):
                    cell += f" !{r.errors[s]}err"
                cells.append(cell)
            for s in others:
                base, v = r.values.get("local"), r.values.get(s)
                cells.append(f"{v / base:.2f}" if r.ratios and base and v is not None else "-")
            body.append(cells)
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(cells)).rstrip()

        return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(c) for c in body)])


# ---------------------------------------------------------------- measuring


class Interrupted:
    """Set by ^C, SIGTERM or SIGHUP. run.py's finish_loadgen can turn the KeyboardInterrupt
    into an OSError (killpg on a load generator that just exited); this flag makes sure an
    interrupt still ends the run."""

    flag = False

    @classmethod
    def handler(cls, signum, frame):
        if cls.flag:  # a second ^C: the cleanup under way goes on (every step of it is bounded)
            return
        cls.flag = True
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.flag:
            raise KeyboardInterrupt


def interleaved(setups: dict[str, Setup], fn: Callable[[Setup], dict], reps: int, res: Results) -> dict[str, list]:
    runs: dict[str, list] = {name: [] for name in setups}
    names = list(setups)
    for rep in range(reps):
        k = rep % len(names) if names else 0
        for name in names[k:] + names[:k]:  # a different scenario goes first each rep
            Interrupted.check()
            try:
                runs[name].append(fn(setups[name]))
            except (RuntimeError, OSError, ValueError) as e:  # a failed run is reported, not fatal
                Interrupted.check()
                res.notes.append(f"{name}: a run failed: {e}")
                log(f"{name}: a run failed: {e}")
    return {k: v for k, v in runs.items() if v}


def start_all(kinds: list[str], handler: str, ctx: Context, live: list[Setup], res: Results) -> dict[str, Setup]:
    setups = {k: Setup(k, handler, ctx) for k in kinds}
    for s in setups.values():
        live.append(s)  # stopped at the end whatever happens
        s.start()
    ready = {}
    for name, s in setups.items():
        try:
            s.wait_ready()
            ready[name] = s
        except ServerFailed as e:
            res.notes.append(f"{name} ({handler}) did not start: {e}")
            log(f"{name} ({handler}) did not start: {e}")
            s.stop()
    log(f"ready: {', '.join(ready) or 'none'} (handler {handler}, {WORKERS} workers)")
    return ready


def echo_phase(setups: dict[str, Setup], p: Params, res: Results) -> None:
    def run(c: int, **o):
        return lambda s: loadgen(s, c, duration=p.duration, warmup=p.warmup, **o)

    r1 = interleaved(setups, run(1, size=64), p.reps, res)
    res.summarize(Row("echo 64 B, 1 client", "p50 latency us", "lower", "int"), r1, "p50_us")
    res.summarize(Row("echo 64 B, 1 client", "p99 latency us", "lower", "int"), r1, "p99_us")
    r32 = interleaved(setups, run(32, size=64), p.reps, res)
    res.summarize(Row("echo 64 B, 32 clients", "req/s", "higher", "int"), r32, "throughput")
    res.summarize(Row("echo 64 B, 32 clients", "p50 latency us", "lower", "int"), r32, "p50_us")
    res.summarize(Row("echo 64 B, 32 clients", "p99 latency us", "lower", "int"), r32, "p99_us")
    cpu_per_request(setups, p, res)
    rm = interleaved(setups, run(4, size=MIB), p.reps, res)
    res.summarize(Row("echo 1 MiB, 4 clients", "req/s", "higher", "f1"), rm, "throughput")
    mbs = res.summarize(Row("echo 1 MiB, 4 clients", "MB/s", "higher", "int"), rm, "mb_per_s")
    res.summarize(Row("echo 1 MiB, 4 clients", "p50 latency us", "lower", "int"), rm, "p50_us")
    res.summarize(Row("echo 1 MiB, 4 clients", "p99 latency us", "lower", "int"), rm, "p99_us")
    plain, curve = mbs.values.get("remote"), mbs.values.get("curve")
    if plain and curve is not None:
        row = Row("echo 1 MiB, 4 clients", "CURVE / plain MB/s", "higher", "x", ratios=False)
        row.values["curve"] = curve / plain
        res.add(row)


def cpu_per_request(setups: dict[str, Setup], p: Params, res: Results) -> None:
    """CPU time (utime + stime) of the front end process, and of the agent process (not
    their workers), per 64-byte echo, over a fixed number of requests from 32 clients."""
    n = p.cpu_requests

    def run(s: Setup) -> dict:
        loadgen(s, 32, size=64, requests=max(200, n // 10), max_seconds=60)  # warm up
        fe, ag = [s.pid], [s.agent.pid] if s.agent is not None else []
        fe0, ag0 = bench_run.cpu_seconds(fe), bench_run.cpu_seconds(ag)
        d = loadgen(s, 32, size=64, requests=n, max_seconds=120)
        time.sleep(0.1)
        d["front_end_us_per_req"] = (bench_run.cpu_seconds(fe) - fe0) / max(1, d["requests"]) * 1e6
        d["agent_us_per_req"] = (bench_run.cpu_seconds(ag) - ag0) / max(1, d["requests"]) * 1e6 if ag else None
        return d

    runs = interleaved(setups, run, 1, res)
    label = f"echo 64 B, 32 clients, {n:,} requests"
    res.summarize(Row(label, "front-end CPU us/req", "lower", "f1"), runs, "front_end_us_per_req")
    remote = {k: v for k, v in runs.items() if k in REMOTES}
    if remote:
        res.summarize(Row(label, "agent CPU us/req", "lower", "f1", ratios=False), remote, "agent_us_per_req")


def spin_phase(setups: dict[str, Setup], p: Params, res: Results) -> None:
    def run(s: Setup) -> dict:
        return loadgen(s, 8, duration=p.duration, warmup=p.warmup, payload=str(SPIN_US))

    r = interleaved(setups, run, p.reps, res)
    label = f"spin {SPIN_US} us, 8 clients"
    res.summarize(Row(label, "req/s", "higher", "int"), r, "throughput")
    res.summarize(Row(label, "p50 latency us", "lower", "int"), r, "p50_us")
    res.summarize(Row(label, "p99 latency us", "lower", "int"), r, "p99_us")
    eff = Row(label, "efficiency", "higher", "f2")
    res.summarize(eff, r, lambda d: d["throughput"] / (WORKERS * 1e6 / SPIN_US))


def prepare(kinds: list[str], skipped: dict[str, str], stack: contextlib.ExitStack) -> Context:
    """What the remote scenarios need: the CLI's flags, keys, the namespace. A scenario that
    cannot run goes into ``skipped``, with the reason."""
    ctx = Context()
    if why := bench_run.gaspar_runnable():
        skipped.update({k: why for k in kinds})
        return ctx
    if not any(k in REMOTES for k in kinds):
        return ctx
    why, ctx.insecure = remote_cli()
    if why:
        skipped.update({k: f"remote workers unavailable: {why}" for k in kinds if k in REMOTES})
        return ctx
    if "curve" in kinds:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="gaspar-bench-keys-"))
        try:
            ctx.keys = keygen(tmp)
        except (ServerFailed, subprocess.TimeoutExpired, OSError) as e:
            skipped["curve"] = f"keygen failed: {e}"
    if "veth" in kinds:
        netns = load_netns()
        if why := netns.available():
            skipped["veth"] = why
        else:
            ctx.veth = stack.enter_context(netns.Veth())
            log(f"netns: {ctx.veth!r}")
    return ctx


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks) - idle) / bench_run.CLK_TCK, sum(ticks) / bench_run.CLK_TCK


def ours_cpu() -> float:
    """CPU seconds of this script and every child it reaped (servers, agents, load generators)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, no repeats (under a minute)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    wanted = args.scenarios.split(",")
    if unknown := [s for s in wanted if s not in SCENARIOS]:
        ap.error(f"unknown scenarios: {', '.join(unknown)}")
    kinds = [k for k in SCENARIOS if k in wanted]
    command = bench_run.this_command()
    started = time.monotonic()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # gaspar.client, for stats

    old = {sig: signal.signal(sig, Interrupted.handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    res = Results()
    skipped: dict[str, str] = {}
    busy_before, load_before = 0.0, os.getloadavg()[0]
    machine0, ours0 = machine_cpu(), ours_cpu()
    live: list[Setup] = []
    try:
        with contextlib.ExitStack() as stack:  # last out: the namespace (and anything in it), the keys
            try:
                bench_run.raise_nofile()
                bench_run.build_loadgen()
                busy_before = bench_run.busy_share()
                if busy_before > 0.10:
                    res.notes.append(f"the machine was {busy_before:.0%} busy before the run: expect noise")
                ctx = prepare(kinds, skipped, stack)
                run_kinds = [k for k in kinds if k not in skipped]
                for k, why in skipped.items():
                    log(f"{k}: skipped: {why}")
                for handler, phase in (("echo", echo_phase), ("spin", spin_phase)):
                    setups = start_all(run_kinds, handler, ctx, live, res)
                    for k in run_kinds:
                        if k not in setups:  # no second wait for one that did not start
                            skipped[k] = f"did not start with handler {handler} (see below)"
                    run_kinds = list(setups)
                    try:
                        if setups:
                            phase(setups, p, res)
                    finally:
                        bench_run.stop_all(live)
                        live.clear()
            except KeyboardInterrupt:
                res.notes.append("interrupted")
                log("interrupted: stopping everything")
            finally:
                bench_run.stop_all(live)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    elapsed = time.monotonic() - started
    # what else ran meanwhile: the machine's busy time but ours (a test suite beside the
    # benchmark moves every figure on a small machine)
    machine1 = machine_cpu()
    span = machine1[1] - machine0[1]
    other = max(0.0, machine1[0] - machine0[0] - (ours_cpu() - ours0)) / span if span > 0 else 0.0
    if other > 0.10:
        res.notes.append(f"other processes used {other:.0%} of the machine's CPU during the run: the figures are noisy")
    m = bench_run.machine()
    m["busy_before_run"] = round(busy_before, 3)
    m["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    m["other_load_during_run"] = round(other, 3)
    mode = "quick" if args.quick else "full"
    header = [
        f"gaspar remote workers benchmark ({mode}), {datetime.datetime.now():%Y-%m-%d %H:%M}, {elapsed:.0f} s",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['kernel']}, Python {m['python']};"
        f" {busy_before:.0%} busy before the run, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f};"
        f" other processes used {other:.0%} of its CPU during the run",
        f"command: {command}",
        f"{WORKERS} workers each; local: gaspar serve --workers {WORKERS}; remote: --workers 0 + an agent"
        f" (gaspar worker --workers {WORKERS}) over loopback; curve: the same with CURVE; veth: the agent in a"
        " network namespace, across a veth pair",
        (f"cells: the median of {p.reps} runs" if p.reps > 1 else "cells: one run each")
        + f" of {p.duration:g} s (after {p.warmup:g} s of warm-up), a new connection per request;"
        " [n%] = the load generator's CPU time, % of one core; !N err: failed requests",
        "X/local: the scenario's value divided by local's (read with the `better` column)",
    ]
    shown = kinds  # a scenario that did not run shows as a column of -, the notes say why
    text = "\n".join(header) + "\n\n" + res.table(shown) + "\n"
    notes = [f"{k}: skipped: {why}" for k, why in skipped.items()] + res.notes
    doc = {
        **bench_run.run_record(mode, elapsed, m, command, p),
        "workers": WORKERS,
        "scenarios": kinds,
        "skipped": skipped,
        "notes": res.notes,
        "rows": [r.__dict__ for r in res.rows],
    }
    bench_run.publish("remote", text, notes, doc)
    return 1 if Interrupted.flag else 0


if __name__ == "__main__":
    sys.exit(main())
