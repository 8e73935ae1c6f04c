"""gaspar against an older commit of itself, on the hot-path rows, interleaved.

    python bench/ab.py --base 51adbde [--rounds 5] [--seconds 2] [--rows 0,2]

The base commit's tree is exported (``git archive``) into a temporary directory (``--new``:
the new side's too; ``--new`` equal to ``--base`` measures the noise, A/A); each side's
daemon is ``python -m gaspar serve bench.handlers:...`` with that side's tree first on
``PYTHONPATH`` (the handlers and the load generator are this tree's, for both). Every round
runs each row on both sides, one after the other, the order alternating (AB, BA, ...), each
on a fresh daemon with 2 workers, so slow drift of the machine hits both alike. Per run:
requests/s, p50/p99, and the front end's own CPU per request (its utime+stime over the run,
divided by the replies). The table gives each side's median and the median and range of the
per-round ratios new/base. Results go to stdout, bench/ab.txt and bench/ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from bench.harness import ROOT, Server, build_loadgen, cpu_seconds, loadgen, log, machine, raise_nofile
except ImportError:  # run as a script: bench/ is sys.path[0]
    from harness import ROOT, Server, build_loadgen, cpu_seconds, loadgen, log, machine, raise_nofile

#: (row, handler, loadgen options): bench/run.py's hot-path rows.
ROWS = [
    ("echo 64 B, 64 clients, 1 request/connection", "echo", 64, {"size": 64}),
    ("spin 1 ms, 8 clients", "spin", 8, {"payload": "1000"}),
    ("persistent, 64 clients, pipeline 8", "echo", 64, {"size": 64, "persistent": True, "pipeline": 8}),
]


METRICS = (("throughput", "req/s"), ("p99_us", "p99 us"), ("front_end_us_per_req", "front end us/req"))


class Side(Server):
    """A gaspar daemon from one tree."""

    def __init__(self, tree: Path, handler: str, workers: int) -> None:
        super().__init__("gaspar", handler, workers)
        self.tree = tree

    def start(self) -> None:
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(self.tree), str(ROOT)]))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=self.tree,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def where_gaspar(tree: Path) -> str:
    code = "import gaspar, os; print(os.path.dirname(gaspar.__file__))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(ROOT)]))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def export(commit: str, where: Path) -> Path:
    """The commit's tree in ``where``, without its bench/ (the handlers and the load
    generator are this checkout's, for both sides)."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    shutil.rmtree(where / "bench", ignore_errors=True)
    return where


def rev_parse(ref: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", ref], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def one_run(tree: Path, handler: str, clients: int, opts: dict, seconds: float) -> dict:
    s = Side(tree, handler, 2)
    try:
        s.start()
        s.wait_ready()
        loadgen(s, clients, duration=0.5, warmup=0.2, **opts)  # warm up
        before = cpu_seconds([s.pid])
        d = loadgen(s, clients, duration=seconds, warmup=0.0, **opts)
        time.sleep(0.1)
        d["front_end_us_per_req"] = (cpu_seconds([s.pid]) - before) / max(1, d["requests"]) * 1e6
        return d
    finally:
        s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--new", help="a commit for the new side too (default: this checkout; --new = --base: A/A)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run")
    ap.add_argument("--rows", help="the rows to run, by number from 0 (default: all), e.g. 0,2")
    args = ap.parse_args(argv)
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    raise_nofile()
    build_loadgen()
    base_id, new_id = rev_parse(args.base), rev_parse(args.new or "HEAD")
    tmp = Path(tempfile.mkdtemp(prefix="gaspar-ab-"))
    try:
        sides = {"base": export(base_id, tmp / "base"), "new": export(new_id, tmp / "new") if args.new else ROOT}
        for name, tree in sides.items():
            found = where_gaspar(tree)
            assert found == str(tree / "gaspar"), f"{name} side imports gaspar from {found}, not {tree}"
        runs: dict[str, dict[str, list[dict]]] = {row: {"base": [], "new": []} for row, *_ in rows}
        for r in range(args.rounds):
            order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
            for row, handler, clients, opts in rows:
                for name in order:
                    d = one_run(sides[name], handler, clients, opts, args.seconds)
                    runs[row][name].append(d)
                    us = d["front_end_us_per_req"]
                    log(f"round {r + 1} {row} {name}: {d['throughput']:.0f}/s, front end {us:.1f} us/req")
        lines = [
            f"gaspar A/B: base {base_id[:10]} vs new {new_id[:10]}, {args.rounds} rounds of {args.seconds} s, 2 workers"
        ]
        lines.append(json.dumps(machine()))
        lines.append(f"{'row':46} {'metric':16} {'base':>9} {'new':>9} {'new/base':>9} {'range':>13}")
        table = []
        for row, *_ in rows:
            for key, label in (
                ("throughput", "req/s"),
                ("p99_us", "p99 us"),
                ("front_end_us_per_req", "front end us/req"),
            ):
                b = [d[key] for d in runs[row]["base"]]
                n = [d[key] for d in runs[row]["new"]]
                ratios = [y / x for x, y in zip(b, n, strict=True) if x]
                entry = {
                    "row": row,
                    "metric": label,
                    "base": statistics.median(b),
                    "new": statistics.median(n),
                    "ratio": statistics.median(ratios),
                    "min": min(ratios),
                    "max": max(ratios),
                }
                table.append(entry)
                lines.append(
                    f"{row:46} {label:16} {entry['base']:9.1f} {entry['new']:9.1f} {entry['ratio']:9.3f}"
                    f" {entry['min']:6.3f}-{entry['max']:.3f}"
                )
        text = "\n".join(lines)
        print(text)
        (ROOT / "bench" / "ab.txt").write_text(text + "\n")
        doc = {
            "base": base_id,
            "new": new_id,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "machine": machine(),
            "table": table,
            "runs": runs,
        }
        (ROOT / "bench" / "ab.json").write_text(json.dumps(doc, indent=1) + "\n")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
