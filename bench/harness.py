"""The bench harness: servers, the C load generator, the machine's figures, publishing.

Shared by every bench script (run.py, overload.py, remote.py, remote_soak.py, webapp.py),
which import it and never each other.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
LOADGEN = BUILD / "loadgen"
CORES = os.cpu_count() or 1
# asyncio + ProcessPoolExecutor runs on uvloop too when uvloop is installed
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
SERVERS = ("gaspar", "asyncio_ppe", *(("asyncio_uvloop",) if HAVE_UVLOOP else ()), "prefork", "eventlet")
BASELINES = SERVERS[1:]
FRONT_END = {
    "gaspar": "the `gaspar serve` process (not its workers)",
    "asyncio_ppe": "the asyncio process (not the pool's processes)",
    "asyncio_uvloop": "the asyncio process on uvloop (not the pool's processes)",
    "prefork": "all the accepting processes (there is no front end; they run the handler too)",
    "eventlet": "the one process (it runs the handler too)",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")

try:
    from bench.handlers import sha
except ImportError:  # run as a script: bench/ is sys.path[0]
    from handlers import sha

# the request that shows a server is up, per handler, and its reply (None: the request)
PROBES = {"echo": (b"ready", None), "spin": (b"0", None), "sha": (b"1", sha(b"1"))}


@dataclass
class Params:
    duration: float  # seconds measured per short run
    warmup: float  # seconds before that, not measured
    reps: int  # short runs per measurement; the median is reported
    fair_duration: float
    scale: tuple[int, ...]
    scale_warmup: dict[int, float]
    scale_duration: dict[int, float]
    cpu_requests: int
    open_rate: float


QUICK = Params(
    duration=0.4,
    warmup=0.15,
    reps=1,
    fair_duration=1.2,
    scale=(100, 1000),
    scale_warmup={100: 0.3, 1000: 0.8},
    scale_duration={100: 0.6, 1000: 0.6},
    cpu_requests=4000,
    open_rate=500,
)
FULL = Params(
    duration=1.2,
    warmup=0.5,
    reps=3,
    fair_duration=6.0,
    scale=(100, 1000, 10000),
    scale_warmup={100: 0.5, 1000: 1.5, 10000: 5.0},
    scale_duration={100: 3.0, 1000: 3.0, 10000: 5.0},
    cpu_requests=20000,
    open_rate=500,
)


class ServerFailed(RuntimeError):
    pass


T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def stop_all(servers) -> None:
    """Stop servers together: SIGINT to each, then one shared 5 s grace, then SIGKILL."""
    servers = [s for s in servers if s.proc is not None]
    for s in servers:
        s.interrupt()
    t0 = time.monotonic()
    deadline = t0 + 5
    for s in servers:
        killed = s.stop(deadline)
        log(f"stopped {s.kind} ({s.handler}, {s.workers} workers) after {time.monotonic() - t0:.1f} s" + killed)


# ---------------------------------------------------------------- processes


def build_loadgen() -> Path:
    src = BENCH / "loadgen.c"
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= src.stat().st_mtime:
        return LOADGEN
    BUILD.mkdir(exist_ok=True)
    tmp = LOADGEN.with_suffix(".tmp")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(src), "-lm"], check=True, timeout=120)
    os.replace(tmp, LOADGEN)
    return LOADGEN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (index 0 is the state)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes only (not their children)."""
    total = 0
    for pid in pids:
        try:
            fields = proc_stat(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if int(proc_stat(int(entry))[1]) == pid:
                        kids.append(int(entry))
                except (OSError, IndexError, ValueError):
                    pass
    return kids


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def repo_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository first on PYTHONPATH (and ``extra`` set)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def spawn_logged(argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``argv`` in the repository, its output to ``log_path``, in a process group of
    its own (so it can be killed whole)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def this_command() -> str:
    """How this benchmark was started, as a shell line (its header and JSON record it)."""
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def run_record(mode: str, elapsed: float, machine_info: dict, command: str, params: Any) -> dict[str, Any]:
    """The fields every benchmark's JSON starts with: how, when, where and with what it ran."""
    return {
        "mode": mode,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "elapsed_seconds": round(elapsed, 1),
        "machine": machine_info,
        "command": command,
        "params": params.__dict__,
    }


def publish(name: str, text: str, notes: list[str], doc: dict[str, Any]) -> None:
    """Print a benchmark's table with its notes under it, and write it to bench/NAME.txt;
    everything it measured (``doc``) to bench/NAME.json."""
    if notes:
        text += "\nnotes:\n" + "\n".join(f"  - {n}" for n in notes) + "\n"
    print(text, end="")
    (BENCH / f"{name}.txt").write_text(text)
    (BENCH / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")


def log_tail(path: Path, n: int = 8) -> str:
    """The last ``n`` lines of a log, on one line (for an error message)."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


class Server:
    """One server process (with its workers) on its own port."""

    def __init__(self, kind: str, handler: str, workers: int) -> None:
        self.kind, self.handler, self.workers = kind, handler, workers
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = BUILD / f"{kind}-{handler}-w{workers}.log"

    def argv(self) -> list[str]:
        spec = f"bench.handlers:{self.handler}"
        if self.kind == "gaspar":
            return [sys.executable, "-m", "gaspar", "serve", spec, "--bind", f"127.0.0.1:{self.port}"] + [
                "--workers",
                str(self.workers),
                "--log-level",
                "warning",
                *shlex.split(os.environ.get("GASPAR_BENCH_ARGS", "")),  # experiments: other settings
            ]
        if self.kind == "asyncio_uvloop":
            script, extra = str(BENCH / "baseline_asyncio_ppe.py"), ["--uvloop"]
        else:
            script, extra = str(BENCH / f"baseline_{self.kind}.py"), []
        argv = [sys.executable, script, "--port", str(self.port), "--workers", str(self.workers), "--handler", spec]
        return argv + extra

    def start(self) -> None:
        # PYTHONWARNINGS: eventlet's deprecation notice
        self.proc = spawn_logged(self.argv(), self.log, repo_env(PYTHONWARNINGS="ignore"))

    def log_tail(self, n: int = 8) -> str:
        return log_tail(self.log, n)

    def probe(self, timeout: float = 2.0) -> bool:
        """One real request, checked: does the server answer it correctly?"""
        msg, want = PROBES.get(self.handler, (b"ready", None))
        want = msg if want is None else want
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(struct.pack("!I", len(msg)) + msg)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return False
        return data == want

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.kind} exited with status {self.proc.returncode}: {self.log_tail()}")
            if self.probe():
                return
            time.sleep(0.1)
        raise ServerFailed(f"{self.kind} did not answer within {timeout:.0f} s: {self.log_tail()}")

    def interrupt(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def stop(self, deadline: float | None = None) -> str:
        """SIGINT to the server; SIGKILL to its process group after 5 s (and for stragglers)."""
        if self.proc is None:
            return ""
        self.interrupt()
        deadline = deadline or time.monotonic() + 5
        how = ""
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            how = ", killed: SIGINT did not stop it"
        kill_group(self.proc)
        self.proc = None
        return how

    @property
    def pid(self) -> int:
        return self.proc.pid

    def front_end_pids(self) -> list[int]:
        if self.kind == "prefork":
            return [self.pid, *children(self.pid)]
        return [self.pid]

    def all_pids(self) -> list[int]:
        return descendants(self.pid)


# ---------------------------------------------------------------- the load generator


def loadgen_argv(port: int, connections: int, **opts) -> list[str]:
    argv = [str(LOADGEN), "--port", str(port), "--connections", str(connections), "--quiet"]
    for name, value in opts.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def loadgen_budget(opts: dict) -> float:
    """How long a run may take before it is killed: its own time plus its drain, plus slack."""
    own = float(opts.get("warmup") or 0) + float(opts.get("duration") or 0)
    if opts.get("requests"):
        own = float(opts.get("max_seconds") or 120)
    return own + float(opts.get("drain") or 15) + 15


def start_loadgen(port: int, connections: int, **opts) -> subprocess.Popen:
    return subprocess.Popen(
        loadgen_argv(port, connections, **opts),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process's whole group (it was started in a session of its own), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def finish_loadgen(proc: subprocess.Popen, budget: float) -> dict:
    try:
        out, err = proc.communicate(timeout=budget)
    except BaseException as e:  # a timeout, or ^C: the load generator goes too
        with contextlib.suppress(ProcessLookupError):  # it may have exited just then
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=5)
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeError(f"loadgen ran past {budget:.0f} s and was killed") from None
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    return json.loads(out)


def loadgen(server: Server, connections: int, *, sample: bool = False, **opts) -> dict:
    """One load generator run against one server; with ``sample``, the server's peak RSS."""
    opts.setdefault("drain", 15)
    opts.setdefault("timeout", 30)
    if opts.get("requests"):
        opts.setdefault("max_seconds", 120)
    proc = start_loadgen(server.port, connections, **opts)
    if sample:
        peak_fe = peak_all = 0
        deadline = time.monotonic() + loadgen_budget(opts)
        while proc.poll() is None and time.monotonic() < deadline:
            peak_fe = max(peak_fe, rss_kb(server.front_end_pids()))
            peak_all = max(peak_all, rss_kb(server.all_pids()))
            time.sleep(0.1)
    result = finish_loadgen(proc, loadgen_budget(opts))
    if sample:
        result["rss_front_end_kb"] = peak_fe
        result["rss_all_kb"] = peak_all
    return result


# ---------------------------------------------------------------- results


@dataclass
class Row:
    scenario: str
    metric: str
    better: str  # "higher" or "lower"
    fmt: str  # "int", "f1", "f2", "x"
    values: dict[str, float | None] = field(default_factory=dict)
    lg_share: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    runs: dict[str, list] = field(default_factory=dict)
    gaspar_only: bool = False


def fmt_value(v: float | None, fmt: str) -> str:
    if v is None:
        return "n/a"
    if fmt == "int":
        return f"{v:,.0f}"
    if fmt == "f1":
        return f"{v:,.1f}"
    if fmt == "f2":
        return f"{v:.2f}"
    if fmt == "x":
        return f"{v:.2f}x"
    return str(v)


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def add(self, row: Row) -> Row:
        shown = ", ".join(f"{k} {fmt_value(v, row.fmt)}" for k, v in row.values.items())
        log(f"{row.scenario}: {row.metric}: {shown}")
        self.rows.append(row)
        return row

    def table(self, servers: tuple[str, ...]) -> str:
        head = ["scenario", "metric", "better", *servers, *[f"g/{b}" for b in BASELINES]]
        body = []
        for r in sorted(self.rows, key=lambda r: r.scenario.split()[0]):  # stable: by scenario number
            cells = [r.scenario, r.metric, r.better]
            for s in servers:
                v = r.values.get(s)
                cell = fmt_value(v, r.fmt)
                lg = r.lg_share.get(s)
                if v is not None and lg is not None:
                    cell += f" [{lg * 100:.0f}%]"
                if r.errors.get(s):
                    cell += f" !{r.errors[s]}err"
                if r.gaspar_only and s != "gaspar":
                    cell = "-"
                cells.append(cell)
            for b in BASELINES:
                g, v = r.values.get("gaspar"), r.values.get(b)
                cells.append(f"{g / v:.2f}" if g is not None and v and not r.gaspar_only else "-")
            body.append(cells)
        widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            out = []
            for i, c in enumerate(cells):
                out.append(c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]))
            return "  ".join(out).rstrip()

        sep = "  ".join("-" * w for w in widths)
        return "\n".join([line(head), sep, *(line(c) for c in body)])


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(row: Row, runs: dict[str, list[dict]], key: str | Callable[[dict], float]) -> Row:
    """Fill a row from raw runs: the median of ``key``, the median loadgen CPU share, errors."""
    get = key if callable(key) else (lambda d: d[key])
    for name, rs in runs.items():
        row.runs[name] = rs
        row.values[name] = median([get(d) for d in rs])
        row.lg_share[name] = median([d["cpu_share"] for d in rs])
        row.errors[name] = sum(d.get("errors", 0) for d in rs)
    return row


def busy_share(seconds: float = 0.5) -> float:
    """How busy the whole machine is right now (0..1), from /proc/stat."""

    def sample() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]

    try:
        a = sample()
        time.sleep(seconds)
        b = sample()
    except OSError:
        return 0.0
    d = [y - x for x, y in zip(a, b, strict=True)]
    idle = d[3] + (d[4] if len(d) > 4 else 0)
    return 1 - idle / max(1, sum(d))


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": CORES,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_executable": sys.executable,
    }


# ---------------------------------------------------------------- scenarios


def gaspar_runnable() -> str | None:
    """None if ``python -m gaspar serve --help`` works, else why not."""
    try:
        r = subprocess.run(
            [sys.executable, "-m", "gaspar", "serve", "--help"],
            cwd=ROOT,
            env=repo_env(),
            capture_output=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "`python -m gaspar serve --help` did not finish in 30 s"
    if r.returncode != 0:
        tail = " | ".join(r.stderr.decode(errors="replace").strip().splitlines()[-3:])
        return f"`python -m gaspar serve --help` failed: {tail}"
    return None


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 65536)) if hard != resource.RLIM_INFINITY else 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        pass
