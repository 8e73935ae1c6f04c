"""``gaspar top HOST:PORT``: a live view of a running daemon, in the manner of uwsgitop.

Every ``--interval`` seconds it asks the daemon for its stats over the wire (the JSON that
``gaspar stats`` prints: ``client.request(addr, b"", stats=True)``) and draws a frame from
the last two samples::

    poll ──> (stats, t) ──┐
    poll ──> (stats, t) ──┴─> render(prev, stats, elapsed, width) ──> lines ──> curses / stdout

:func:`render` is pure (two stats dicts and the seconds between them in, lines of text
out), so every figure on the screen is tested without a terminal. :class:`Sampler` polls;
:func:`run` owns the terminal (curses, from the standard library) and :func:`once` prints
one frame to standard output for scripts.

What the rates mean: ``req/s`` is the growth of ``outcomes["ok"] + outcomes["error"]``
(replies from handlers; about the sum of the worker rows' req/s, which also count replies
that went to no one because their client had left) over the time between the two polls,
measured here; ``shed/s`` is the growth of ``outcomes["shed"]``; a CPU % is the
growth of a process's CPU seconds over the same time. The latency quantiles are those of
the requests that ended between the two polls (the difference of the histograms' buckets,
estimated within a bucket as the server does), or since the daemon started on the first
frame. A rate that would span a restart (of the daemon, or of a worker's process) is
shown as ``-`` rather than guessed.

Honest limits: a poll is answered by the front end's event loop, so a daemon whose loop is
stuck is shown as unreachable once the poll times out; while a poll waits, keys wait too.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gaspar.errors import GasparError
from gaspar.ops.humanize import human_age, human_duration, human_mib, human_uptime, milliseconds, number
from gaspar.ops.telemetry import Histogram

Stats = dict[str, Any]


# -- figures from two samples ---------------------------------------------------------------


def rate(before: float | None, after: float | None, elapsed: float) -> float | None:
    """Growth per second; None without both figures, without time, or if it went down."""
    if before is None or after is None or elapsed <= 0 or after < before:
        return None
    return (after - before) / elapsed


def replies(stats: Stats) -> int:
    """Requests answered by a handler (``ok`` + ``error``): what req/s counts."""
    outcomes = stats.get("outcomes") or {}
    return outcomes.get("ok", 0) + outcomes.get("error", 0)


def quantiles(before: Stats | None, after: Stats | None) -> tuple[float | None, float | None]:
    """p50 and p99 of a histogram snapshot (``{"buckets": [[le, cumulative], ...]}``) over
    what it observed between two snapshots; since the start without ``before``."""
    if not after:
        return None, None
    if before is None:
        return after.get("p50"), after.get("p99")
    if not after.get("buckets") or not before.get("buckets"):
        return None, None
    h = Histogram.from_snapshot(after).minus(Histogram.from_snapshot(before))
    if h is None or h.count <= 0:
        return None, None
    return h.quantile(0.5), h.quantile(0.99)


# -- the frame ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    keep: int  # columns with the highest value go first when the terminal is narrow
    left: bool = False


COLUMNS = (
    Column("#", 3, 0),
    Column("PID", 7, 0),
    Column("STATE", 8, 1, left=True),
    Column("REQUESTS", 8, 1),
    Column("REQ/S", 7, 2),
    Column("AVG ms", 7, 3),
    Column("P99 ms", 7, 4),
    Column("CPU%", 5, 2),
    Column("RSS", 6, 3),
    Column("RESTARTS", 8, 4),
    Column("AGE", 4, 5),
)  # 70 characters and 10 spaces: 80 columns


def fit_columns(width: int) -> list[Column]:
    """The columns that fit ``width``, in order, the least useful dropped first."""
    cols = list(COLUMNS)
    while sum(c.width + 1 for c in cols) - 1 > width and any(c.keep for c in cols):
        cols.remove(max(reversed(cols), key=lambda c: c.keep))  # ties: the rightmost
    return cols


def table_header(width: int) -> str:
    return _row({c.title: c.title for c in COLUMNS}, fit_columns(width), width)


def _row(cells: dict[str, str], cols: list[Column], width: int) -> str:
    text = " ".join(
        cells[c.title][: c.width].ljust(c.width) if c.left else cells[c.title][-c.width :].rjust(c.width) for c in cols
    )
    return text.rstrip()[:width]


def _wrap(chunks: list[str], width: int, sep: str = "  ") -> list[str]:
    """Chunks joined by ``sep`` on as few lines as fit ``width`` (a chunk alone too wide is cut)."""
    lines: list[str] = []
    line = ""
    for chunk in chunks:
        if line and len(line) + len(sep) + len(chunk) > width:
            lines.append(line)
            line = ""
        line = f"{line}{sep}{chunk}" if line else chunk
    lines.append(line)
    return [ln[:width] for ln in lines]


def worker_rows(prev: Stats | None, stats: Stats, elapsed: float) -> list[dict[str, str]]:
    """One row of cells per worker process, by number (a retiring process after the live
    one with its number). Requests, times and restarts are per worker *number* (they go on
    across its restarts), so a retiring process that shares its number with a live one
    shows ``-`` there; CPU % is per process (same pid in both samples)."""
    workers = sorted(stats.get("workers") or [], key=lambda w: (w["number"], w.get("state") == "retiring", w["pid"]))
    before_cpu = {w["pid"]: w.get("cpu_seconds") for w in (prev or {}).get("workers") or []}
    before_requests: dict[int, int] = {}
    for w in (prev or {}).get("workers") or []:
        if w.get("requests") is not None:
            before_requests[w["number"]] = max(before_requests.get(w["number"], 0), w["requests"])
    live = {w["number"] for w in workers if w.get("state") != "retiring"}
    rows = []
    for w in workers:
        shared = w.get("state") == "retiring" and w["number"] in live
        cpu = rate(before_cpu.get(w["pid"]), w.get("cpu_seconds"), elapsed)
        per_number = {
            "REQUESTS": number(w.get("requests"), 8, 0),
            "REQ/S": number(rate(before_requests.get(w["number"]), w.get("requests"), elapsed), 7),
            "AVG ms": milliseconds(w.get("handler_avg_ms"), 7),
            "P99 ms": milliseconds(w.get("handler_p99_ms"), 7),
            "RESTARTS": number(w.get("restarts"), 8, 0),
        }
        rows.append(
            {
                "#": str(w["number"]),
                "PID": str(w["pid"]),
                "STATE": w.get("state") or "-",
                **(dict.fromkeys(per_number, "-") if shared else per_number),
                "CPU%": number(None if cpu is None else cpu * 100, 5),
                "RSS": human_mib(w.get("rss_bytes")),
                "AGE": human_age(w.get("age_seconds")),
            }
        )
    return rows


def header(prev: Stats | None, stats: Stats, elapsed: float, width: int, address: str) -> list[str]:
    before = prev or {}
    states, outcomes = stats.get("worker_states") or {}, stats.get("outcomes") or {}
    overload = stats.get("overload") or {}
    overloaded, backlog = overload.get("overloaded"), overload.get("accept_backlog")
    hist, before_hist = stats.get("histograms") or {}, before.get("histograms") or {}
    req50, req99 = quantiles(prev and before_hist.get("request_duration_seconds"), hist.get("request_duration_seconds"))
    wait50, wait99 = quantiles(prev and before_hist.get("queue_wait_seconds"), hist.get("queue_wait_seconds"))
    front, before_front = stats.get("front_end") or {}, before.get("front_end") or {}
    front_cpu = rate(before_front.get("cpu_seconds"), front.get("cpu_seconds"), elapsed)
    front_wait = rate(before_front.get("cpu_wait_seconds"), front.get("cpu_wait_seconds"), elapsed) or 0
    req_rate = rate(replies(prev), replies(stats), elapsed) if prev else None
    shed_rate = rate((before.get("outcomes") or {}).get("shed"), outcomes.get("shed"), elapsed)
    clock = time.strftime("%H:%M:%S", time.localtime(stats["time"])) if stats.get("time") else "-"
    live = sum(1 for w in stats.get("workers") or [] if w.get("state") != "retiring")
    lines = [
        [
            f"gaspar top {address}".rstrip(),
            f"pid {stats.get('pid', '-')}",
            f"v{stats.get('version', '?')}",
            f"up {human_uptime(stats.get('uptime'))}",
            clock,
            "OVERLOADED" if overloaded else "overloaded: no",
        ],
        [
            f"workers {live} of {stats.get('target_workers', '-')}",
            *(f"{s} {states.get(s, 0)}" for s in ("booting", "idle", "busy", "retiring")),
            f"restarts {stats.get('restarts', 0)}",
            *(
                f"{pool} {a['size']} in {a['min']}:{a['max']}"
                for pool, a in sorted((stats.get("autoscale") or {}).items())
            ),
        ],
        [
            f"queued {stats.get('queued', 0)}",
            f"in flight {stats.get('pending', 0)}",
            f"running {stats.get('running', 0)}",
            f"connections {stats.get('connections', 0)}",
            f"req/s {number(req_rate, 9)}",
            f"shed {outcomes.get('shed', 0)} ({number(shed_rate, 9)}/s)",
        ],
        [
            f"latency, last {number(elapsed, 5)}s:" if prev else "latency, since start:",
            f"request p50 {human_duration(req50)} p99 {human_duration(req99)}",
            f"queue wait p50 {human_duration(wait50)} p99 {human_duration(wait99)}",
        ],
        [
            f"front end cpu {number(None if front_cpu is None else front_cpu * 100, 6)}%",
            f"rss {human_mib(front.get('rss_bytes'))}",
            *([f"waits for a cpu {front_wait * 100:.0f}%"] if front_wait >= 0.01 else []),  # behind its workers
            *([f"accept backlog {backlog}"] if backlog else []),  # only when it falls behind
        ],
    ]
    return [line for chunks in lines for line in _wrap(chunks, width)]


def render(
    prev: Stats | None,
    stats: Stats | None,
    elapsed: float,
    width: int = 80,
    *,
    address: str = "",
    error: str | None = None,
) -> list[str]:
    """One frame: header lines, a blank line, the workers' table; no line wider than
    ``width``. ``prev`` is the sample taken ``elapsed`` seconds before ``stats`` (None on the
    first frame: no rates then). With ``error`` (the last poll failed) the frame says the
    server is unreachable and that it is being retried."""
    width = max(1, width)
    if error is not None or stats is None:
        title = _wrap([f"gaspar top {address}".rstrip()], width)
        return [*title, *textwrap.wrap(f"UNREACHABLE: {error or 'no stats yet'}; retrying", width)]
    if prev is not None and prev.get("pid") != stats.get("pid"):
        prev = None  # the daemon restarted: no rate spans it
    cols = fit_columns(width)
    rows = worker_rows(prev, stats, elapsed)
    table = [table_header(width), *(_row(r, cols, width) for r in rows)] if rows else ["(no local workers)"]
    agents = agent_lines(stats, width, prev, elapsed)
    return [*header(prev, stats, elapsed, width, address), "", *table, *agents, *app_lines(stats, width, prev, elapsed)]


def app_lines(stats: Stats, width: int, prev: Stats | None = None, elapsed: float = 0.0) -> list[str]:
    """An App's pools and handlers (calls a second, errors, refused, the p99 of their run
    time), a line each; nothing for a bytes handler."""
    pools, handlers, lines = stats.get("pools") or {}, stats.get("handlers") or {}, []
    failed, refused = ("error", "timeout", "worker_died"), ("bad_request", "shed", "unavailable")  # ran; never
    if pools:
        lines += ["", "pools:"]
        for name, p in sorted(pools.items()):
            chunks = [name, f"workers {p['workers']}", f"queued {p['queued']}", f"running {p['running']}"]
            lines += _wrap([*chunks, "OVERLOADED"] if p.get("overloaded") else chunks, width)
    if handlers:
        lines += ["", "handlers:"]
        before = (prev or {}).get("handlers") or {}
        for name, h in sorted(handlers.items()):
            total = sum(h["outcomes"].values())
            then = sum((before.get(name) or {}).get("outcomes", {}).values()) if prev is not None else None
            p99, out = h["duration_seconds"].get("p99"), h["outcomes"]
            chunks = [
                f"{name} ({h['pool']})",
                f"calls/s {number(rate(then, total, elapsed), 6)}",
                f"ok {out.get('ok', 0)}",
                f"errors {sum(out.get(k, 0) for k in failed)}",
                f"refused {sum(out.get(k, 0) for k in refused)}",
                f"p99 {'-' if p99 is None else f'{p99 * 1000:.1f}ms'}",
            ]
            lines += _wrap(chunks, width)
    return lines


def agent_lines(stats: Stats, width: int, prev: Stats | None = None, elapsed: float = 0.0) -> list[str]:
    """A line (wrapped to ``width``) per agent session on other hosts, live ones first: its
    workers' CPU (percent of one core, summed, over the workers seen in both samples) and
    the resident memory of the agent and its workers, as its last pong reported them."""
    agents = stats.get("agents") or []
    if not agents:
        return []
    before = {
        (a["name"], a["session"], w["pid"]): w.get("cpu_seconds")
        for a in (prev or {}).get("agents") or []
        for w in a.get("workers") or []
    }
    lines = ["", f"agents on other hosts ({(stats.get('remote') or {}).get('agents_live', 0)} live):"]
    for a in agents:
        rtt = "-" if a.get("rtt_ms") is None else f"{a['rtt_ms']:.1f}ms"
        rates = [
            rate(before.get((a["name"], a["session"], w["pid"])), w.get("cpu_seconds"), elapsed)
            for w in a.get("workers") or []
        ]
        known = [r for r in rates if r is not None]
        cpu = number(sum(known) * 100, 5) + "%" if known else "-"
        sizes = [a.get("rss_bytes"), *(w.get("rss_bytes") for w in a.get("workers") or [])]
        rss = human_mib(sum(n for n in sizes if n is not None)) if any(n is not None for n in sizes) else "-"
        chunks = [
            f"{a['name']}@{a['host']}",
            f"session {a['session']}",
            a["state"].upper() if a["state"] not in ("joined", "leaving") else a["state"],
            f"workers {a['slots']}",
            f"busy {a['busy']}",
            f"done {a['done']}",
            f"lost {a['lost']}",
            f"cpu {cpu}",
            f"rss {rss}",
            f"rtt {rtt}",
            f"heard {human_age(a.get('last_heard_seconds_ago'))} ago",
        ]
        lines += _wrap(chunks, width)
    return lines


# -- polling ------------------------------------------------------------------------------------


def fetch(address: str, timeout: float) -> Stats:
    """The daemon's stats; raises GasparError (or ValueError on a reply that is not JSON)."""
    from gaspar import client

    stats = json.loads(client.request(address, b"", timeout=timeout, stats=True))
    if not isinstance(stats, dict):
        raise ValueError("the stats reply is not a JSON object")
    return stats


class Sampler:
    """Polls a daemon and keeps the last two good samples, to render frames from."""

    def __init__(
        self,
        address: str,
        timeout: float,
        fetch: Callable[[str, float], Stats] = fetch,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.address, self.timeout, self._fetch, self._clock = address, timeout, fetch, clock
        self.prev: tuple[Stats, float] | None = None
        self.last: tuple[Stats, float] | None = None
        self.error: str | None = None

    def poll(self) -> bool:
        """One poll; True if the daemon answered."""
        try:
            stats = self._fetch(self.address, self.timeout)
        except (GasparError, OSError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        self.error = None
        self.prev, self.last = self.last, (stats, self._clock())
        return True

    def render(self, width: int) -> list[str]:
        if self.error is not None or self.last is None:
            return render(None, None, 0.0, width, address=self.address, error=self.error)
        stats, t = self.last
        prev, t0 = self.prev if self.prev is not None else (None, t)
        return render(prev, stats, t - t0, width, address=self.address)


def poll_timeout(interval: float) -> float:
    """How long one poll may take: a busy daemon may be slow to answer, but not for ever."""
    return min(10.0, max(2.0, interval))


# -- the terminal ---------------------------------------------------------------------------------


def once(address: str, interval: float, out=None) -> int:
    """Print one frame (from two polls ``interval`` apart); 0, or 1 if the daemon did not
    answer the second poll."""
    out = out or sys.stdout
    sampler = Sampler(address, poll_timeout(interval))
    sampler.poll()
    time.sleep(interval)
    ok = sampler.poll()
    width = shutil.get_terminal_size((80, 24)).columns
    out.write("".join(line.rstrip() + "\n" for line in sampler.render(width)))
    out.flush()
    return 0 if ok else 1


def run(address: str, interval: float = 1.0, once_only: bool = False) -> int:
    """``gaspar top``: a live view until ``q`` or Ctrl-C (exit 0); ``once_only``: :func:`once`."""
    if once_only:
        return once(address, interval)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("gaspar: error: top needs a terminal; use --once to print one frame", file=sys.stderr)
        return 2
    import curses

    try:
        curses.wrapper(_live, Sampler(address, poll_timeout(interval)), interval)
    except KeyboardInterrupt:
        pass
    except curses.error as exc:  # e.g. a TERM that terminfo does not know
        print(f"gaspar: error: cannot drive this terminal ({exc}); use --once", file=sys.stderr)
        return 2
    return 0


def _live(screen: Any, sampler: Sampler, interval: float) -> None:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal that cannot hide its cursor
    next_poll = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_poll:
            sampler.poll()
            next_poll = max(next_poll + interval, time.monotonic())
            _draw(screen, sampler)
        screen.timeout(max(1, int((next_poll - time.monotonic()) * 1000)))
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return
        if key == curses.KEY_RESIZE:
            _draw(screen, sampler)


def _draw(screen: Any, sampler: Sampler) -> None:
    import curses

    height, width = screen.getmaxyx()
    lines = sampler.render(width)
    head = table_header(width)
    screen.erase()
    for y, line in enumerate(lines[:height]):
        attr = curses.A_BOLD if y == 0 else curses.A_REVERSE if line == head else curses.A_NORMAL
        try:
            screen.addnstr(y, 0, line.ljust(width) if line == head else line, width, attr)
        except curses.error:
            pass  # the bottom-right cell: the text is drawn, the cursor cannot move past it
    screen.refresh()


__all__ = ["render", "Sampler", "run", "once", "human_age", "human_mib", "human_duration", "fit_columns", "COLUMNS"]
