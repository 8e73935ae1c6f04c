"""A soak of one front end and one agent over loopback: faults over and over, under load.

    python bench/remote_soak.py              # 90 s
    python bench/remote_soak.py --seconds 600

A ``gaspar serve --workers 1 --remote-bind`` front end and a ``gaspar worker --workers 2``
agent (heartbeats every 0.25 s, liveness 1 s). Four client threads send unique requests
for ``--seconds`` while the agent is, in turn, frozen for 1.6 s (SIGSTOP, then SIGCONT)
twice and SIGKILLed and started again once, every 1.5 s. It prints the tally of outcomes
(every reply is checked against its request), how many fault cycles ran, the front end's
resident memory and open file descriptors at the start and the end, and what ``gaspar
stats`` says afterwards: nothing left pending or running, the agent back. Loopback only;
servers and their logs (bench/.build/soak-*.log) as run.py's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

try:
    from bench import harness as bench_run
except ImportError:  # run as a script: bench/ is sys.path[0]
    import harness as bench_run

BUILD, ROOT = bench_run.BUILD, bench_run.ROOT
free_port, repo_env, rss_kb = bench_run.free_port, bench_run.repo_env, bench_run.rss_kb
spawn_logged = bench_run.spawn_logged
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # gaspar's client, for the load

import gaspar  # noqa: E402
from gaspar import client  # noqa: E402

FAST = ["--heartbeat-interval", "0.25", "--agent-liveness", "1"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=90.0)
    args = ap.parse_args()
    logs = BUILD
    logs.mkdir(parents=True, exist_ok=True)
    env = repo_env()
    port, remote = free_port(), free_port()
    serve = [sys.executable, "-m", "gaspar", "serve", "gaspar.demo:echo", "--bind", f"127.0.0.1:{port}", "-w", "1"]
    serve += ["--remote-bind", f"tcp://127.0.0.1:{remote}", "--control-socket", "off", *FAST]
    front = spawn_logged(serve, logs / "soak-front.log", env)
    worker = [sys.executable, "-m", "gaspar", "worker", "gaspar.demo:echo", "--connect", f"tcp://127.0.0.1:{remote}"]
    worker += ["-w", "2", "--name", "soak", "--reconnect-max", "1", *FAST]
    addr = f"127.0.0.1:{port}"
    agent = None
    try:
        agent = spawn_logged(worker, logs / "soak-agent.log", env)
        if not _wait_joined(addr, 30):
            print("the agent did not join; see bench/.build/soak-*.log", file=sys.stderr)
            return 1
        start = (rss_kb([front.pid]), open_fds(front.pid))
        tally: collections.Counter[str] = collections.Counter()
        stop = time.monotonic() + args.seconds

        def load(k: int) -> None:
            i = 0
            while time.monotonic() < stop:
                i += 1
                body = b"%d-%d" % (k, i)
                try:
                    tally["ok" if client.request(addr, body, timeout=5) == body else "wrong"] += 1
                except gaspar.GasparError as exc:
                    tally[type(exc).__name__] += 1

        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        cycles = 0
        while time.monotonic() < stop - 3:
            cycles += 1
            if cycles % 3:
                agent.send_signal(signal.SIGSTOP)
                time.sleep(1.6)
                agent.send_signal(signal.SIGCONT)
            else:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(10)
                agent = spawn_logged(worker, logs / "soak-agent.log", env)
            time.sleep(1.5)
        for t in threads:
            t.join(30)
        joined = _wait_joined(addr, 15)
        stats = _stats(addr)
        end = (rss_kb([front.pid]), open_fds(front.pid))
        print(f"{args.seconds:.0f} s, {cycles} fault cycles (2 freezes, 1 kill each 3): {dict(tally)}")
        print(f"front end: RSS {start[0]} -> {end[0]} KiB, open fds {start[1]} -> {end[1]}")
        print(f"after: pending {stats['pending']}, running {stats['running']}, agent back: {bool(joined)}")
        print("remote:", json.dumps({k: v for k, v in stats["remote"].items() if k != "endpoint"}))
        return 0 if joined and not tally["wrong"] and stats["pending"] == 0 else 1
    finally:
        for proc in (agent, front):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)


def _stats(addr: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "gaspar", "stats", addr], cwd=ROOT, env=repo_env(), capture_output=True, timeout=30
    )
    return json.loads(out.stdout)


def _wait_joined(addr: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            agents = _stats(addr)["agents"]
            if any(a["state"] == "joined" and a["slots"] == 2 for a in agents):
                return True
        except (ValueError, KeyError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.25)
    return False


if __name__ == "__main__":
    sys.exit(main())
