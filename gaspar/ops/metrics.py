"""``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``, served from the front end's hub.

Turned on by ``metrics_bind`` (``gaspar serve --metrics-bind HOST:PORT``); needs the
optional ``prometheus_client`` (``pip install prometheus_client``, or gaspar's ``metrics``
extra: the README's Installation; gaspar 2 is not on the package index).

The HTTP server (:mod:`gaspar.frontend.metrics_http`) runs in green threads of the front end's own
hub, so a scrape reads the dispatcher and supervisor state in the thread that owns it: no
lock, no second OS thread racing the supervisor. It cuts off slow clients, caps its
connections and renders ``/metrics`` at most once a second. The registry is gaspar's own (not the global one),
with one collector that turns :meth:`Producer._stats` into metric families at scrape time,
plus prometheus_client's ``process_*`` metrics of the front end. Nothing is written to
disk and there is no multiprocess mode: the front end aggregates everything (workers send
their handler times with each reply; their CPU and memory are read from /proc when scraped).

* ``/healthz``: 200 while the daemon serves (until its workers are being stopped), else 503.
* ``/readyz``: 200 while at least one worker is ready and the daemon is not stopping, else
  503: a load balancer stops sending as soon as a stop begins.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

from gaspar.version import __version__

log = logging.getLogger("gaspar")

INSTALL_HINT = (
    "metrics need prometheus_client: pip install prometheus_client "
    "(or install gaspar with its metrics extra: README.rst, Installation)"
)


def require_prometheus() -> None:
    """Raise ImportError with how to get prometheus_client, if it is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc


class GasparCollector:
    """Metric families from one snapshot of the front end's stats, taken per scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def describe(self) -> list:
        return []  # families are only known at collect time; the registry does not need them

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        st = self.stats()
        requests = CounterMetricFamily("gaspar_requests", "Requests by how they ended.", labels=["outcome"])
        for outcome, n in st["outcomes"].items():
            requests.add_metric([outcome], n)
        yield requests
        shed = CounterMetricFamily("gaspar_shed", "Requests shed under overload, by reason.", labels=["reason"])
        for reason in ("queue_delay", "queue_timeout", "queue_full", "deadline"):
            shed.add_metric([reason], st["counters"]["shed_" + reason])
        yield shed
        yield CounterMetricFamily(
            "gaspar_replies_cut",
            "Replies and stream items not written whole: the client reset or closed, or was reset, first.",
            value=st["counters"].get("replies_cut", 0),
        )
        hists = st["histograms"]
        yield _histogram("gaspar_queue_wait_seconds", "Seconds requests waited in the queue.", hists)
        yield _histogram("gaspar_handler_duration_seconds", "Seconds handlers ran (wall time).", hists)
        yield _histogram("gaspar_request_duration_seconds", "Seconds from a request's arrival to its end.", hists)
        yield _histogram("gaspar_hub_lag_seconds", "How late the front end's event loop woke its ticker.", hists)
        yield _gauge("gaspar_queue_length", "Requests waiting for a worker.", st["queued"])
        yield _gauge("gaspar_requests_in_flight", "Requests queued or running.", st["pending"])
        yield _gauge("gaspar_connections", "Open client connections.", st["connections"])
        yield _gauge(
            "gaspar_buffered_bytes", "Request and reply bytes the front end holds.", st["overload"]["buffered_bytes"]
        )
        yield _gauge(
            "gaspar_overloaded", "1 while the queue is shed past its target.", int(st["overload"]["overloaded"])
        )
        yield _gauge(
            "gaspar_accept_backlog",
            "Connections waiting in the kernel's accept queue, not yet taken by the front end.",
            st["overload"].get("accept_backlog", 0),
        )
        front_wait = (st.get("front_end") or {}).get("cpu_wait_seconds")
        if front_wait is not None:  # Linux
            yield CounterMetricFamily(
                "gaspar_front_end_cpu_wait_seconds",
                "Seconds the front end's threads were ready to run but waited for a CPU.",
                value=front_wait,
            )
        stalled = GaugeMetricFamily(
            "gaspar_stalled", "1 while work waits and no request moves, by why (/readyz says 503).", labels=["reason"]
        )
        for reason in ("memory", "workers"):
            stalled.add_metric([reason], int(st["overload"].get("stalled") == reason))
        yield stalled
        workers = GaugeMetricFamily("gaspar_workers", "Worker processes by state.", labels=["state"])
        for state, n in st["worker_states"].items():
            workers.add_metric([state], n)
        yield workers
        yield _gauge("gaspar_workers_desired", "The pool's target size.", st["target_workers"])
        restarts = CounterMetricFamily(
            "gaspar_worker_restarts", "Worker processes that ended and were replaced, by reason.", labels=["reason"]
        )
        for reason, n in st["restarts_by_reason"].items():
            restarts.add_metric([reason], n)
        yield restarts
        cpu = CounterMetricFamily("gaspar_worker_cpu_seconds", "CPU seconds of each live worker.", labels=["worker"])
        rss = GaugeMetricFamily(
            "gaspar_worker_resident_memory_bytes", "Resident memory of each worker.", labels=["worker"]
        )
        handled = CounterMetricFamily(
            "gaspar_worker_requests", "Replies from each worker number since the start.", labels=["worker"]
        )
        wait = CounterMetricFamily(
            "gaspar_worker_cpu_wait_seconds",
            "Seconds each live worker's main thread was ready to run but waited for a CPU.",
            labels=["worker"],
        )
        for w in st["workers"]:
            label = [str(w["number"])]
            if w["cpu_seconds"] is not None:
                cpu.add_metric(label, w["cpu_seconds"])
                rss.add_metric(label, w["rss_bytes"])
            if w.get("cpu_wait_seconds") is not None:
                wait.add_metric(label, w["cpu_wait_seconds"])
            handled.add_metric(label, w["requests"])
        yield cpu
        yield wait
        yield rss
        yield handled
        yield from _agent_metrics(st)
        yield from _app_metrics(st)
        info = InfoMetricFamily("gaspar_build", "gaspar's version.")
        info.add_metric([], {"version": __version__})
        yield info


def _app_metrics(st: dict[str, Any]) -> Any:
    """An App's handlers (calls by outcome, run times) and pools (workers, queued, running:
    the default pool alone for a bytes handler). Handler names are the App's own: a client
    cannot add one."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    handlers = st.get("handlers") or {}
    if handlers:
        calls = CounterMetricFamily(
            "gaspar_handler_requests",
            "Calls to each handler of the App, by how they ended.",
            labels=["handler", "pool", "outcome"],
        )
        runs = HistogramMetricFamily(
            "gaspar_handler_call_duration_seconds", "Seconds each handler ran (wall time).", labels=["handler", "pool"]
        )
        for name, h in sorted(handlers.items()):
            for outcome, n in h["outcomes"].items():  # every one, from the start at 0
                calls.add_metric([name, h["pool"], outcome], n)
            d = h["duration_seconds"]
            runs.add_metric([name, h["pool"]], [(_le(le), n) for le, n in d["buckets"]], d["sum"])
        yield calls
        yield runs
    states = st.get("worker_states") or {}
    ready = sum(n for state, n in states.items() if state != "booting")
    # an App whose handlers share the default pool, or a bytes handler: that one pool
    pools = st.get("pools") or {"default": {"workers": ready, "queued": st["queued"], "running": st["running"]}}
    if pools:
        families = {
            key: GaugeMetricFamily(f"gaspar_pool_{key}", doc, labels=["pool"])
            for key, doc in (
                ("workers", "Ready workers of each pool (this host's and agents')."),
                ("queued", "Calls waiting for a worker of each pool."),
                ("running", "Calls running in each pool."),
            )
        }
        for name, figures in sorted(pools.items()):
            for key, family in families.items():
                family.add_metric([name], figures[key])
        yield from families.values()
    scaling = st.get("autoscale") or {}
    if scaling:
        sizes = GaugeMetricFamily(
            "gaspar_autoscale_workers",
            "Pools that size themselves (MIN:MAX): the size decided now, and its bounds.",
            labels=["pool", "bound"],
        )
        for name, figures in sorted(scaling.items()):
            for bound in ("size", "min", "max"):
                sizes.add_metric([name, bound], figures[bound])
        yield sizes


def _agent_metrics(st: dict[str, Any]) -> Any:
    """Remote agents (``remote_bind``): sessions by state, and each live agent's workers,
    busy ones, ping round trip, and CPU and memory (reported by the agent with each pong);
    nothing without a remote bind."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    remote = st.get("remote")
    if remote is None:
        return
    from gaspar.core.agents import JOINED, LEAVING, LEFT, LOST, REPLACED

    states = GaugeMetricFamily(
        "gaspar_agents",
        "Live agent sessions by state; agents not back, by how their last session ended (of the last 16).",
        labels=["state"],
    )
    count = dict.fromkeys((JOINED, LEAVING, LOST, LEFT, REPLACED), 0)
    live = [a for a in st["agents"] if a["state"] in (JOINED, LEAVING)]
    counted = {a["name"] for a in live}
    for a in live:
        count[a["state"]] += 1
    for a in st["agents"]:  # the ended ones, newest first: an agent's last session, if it is not back
        if a["name"] not in counted:
            counted.add(a["name"])
            count[a["state"]] = count.get(a["state"], 0) + 1
    for state, n in count.items():
        states.add_metric([state], n)
    yield states
    workers = GaugeMetricFamily("gaspar_agent_workers", "Ready workers of each live agent.", labels=["agent"])
    busy = GaugeMetricFamily("gaspar_agent_busy", "Workers of each live agent running a request.", labels=["agent"])
    rtt = GaugeMetricFamily("gaspar_agent_rtt_seconds", "Each live agent's last ping round trip.", labels=["agent"])
    cpu = CounterMetricFamily(
        "gaspar_agent_worker_cpu_seconds", "CPU seconds of each live agent's workers.", labels=["agent", "worker"]
    )
    rss = GaugeMetricFamily(
        "gaspar_agent_worker_resident_memory_bytes",
        "Resident memory of each live agent's workers.",
        labels=["agent", "worker"],
    )
    wait = CounterMetricFamily(
        "gaspar_agent_worker_cpu_wait_seconds",
        "Seconds each live agent's workers waited for a CPU on its host.",
        labels=["agent", "worker"],
    )
    own = GaugeMetricFamily(
        "gaspar_agent_resident_memory_bytes", "Resident memory of each live agent's own process.", labels=["agent"]
    )
    for a in live:
        workers.add_metric([a["name"]], a["slots"])
        busy.add_metric([a["name"]], a["busy"])
        if a["rtt_ms"] is not None:
            rtt.add_metric([a["name"]], a["rtt_ms"] / 1000)
        if a.get("rss_bytes") is not None:
            own.add_metric([a["name"]], a["rss_bytes"])
        for w in a["workers"]:  # as read on the agent's host at its last pong
            if w.get("cpu_seconds") is not None:
                cpu.add_metric([a["name"], str(w["number"])], w["cpu_seconds"])
                rss.add_metric([a["name"], str(w["number"])], w["rss_bytes"])
            if w.get("cpu_wait_seconds") is not None:
                wait.add_metric([a["name"], str(w["number"])], w["cpu_wait_seconds"])
    yield workers
    yield busy
    yield rtt
    yield cpu
    yield wait
    yield rss
    yield own
    events = CounterMetricFamily(
        "gaspar_agent_events", "Remote events: agents lost, joins and handshakes refused...", labels=["event"]
    )
    for event in (
        "agents_lost",
        "joins_refused",
        "handshakes_refused",
        "handshakes_failed",
        "stale_messages",
        "malformed_messages",
        "requests_lost",
    ):
        events.add_metric([event], remote[event])
    yield events


def _gauge(name: str, doc: str, value: float) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


def _histogram(name: str, doc: str, hists: dict[str, Any]) -> Any:
    from prometheus_client.core import HistogramMetricFamily

    h = hists[name.removeprefix("gaspar_")]
    buckets = [(_le(le), n) for le, n in h["buckets"]]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h["sum"])


def _le(le: float | str) -> str:
    return "+Inf" if le == "+Inf" else repr(float(le))


def make_registry(stats: Callable[[], dict[str, Any]]) -> Any:
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GasparCollector(stats))
    ProcessCollector(registry=registry)  # the front end's own process_* metrics
    return registry


def make_server(
    sock: socket.socket, stats: Callable[[], dict[str, Any]], healthy: Callable[[], bool], ready: Callable[[], bool]
) -> Any:
    """The metrics port's server (:class:`gaspar.frontend.metrics_http.MetricsServer`) on ``sock``."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from gaspar.frontend.metrics_http import MetricsServer

    registry = make_registry(stats)
    return MetricsServer(sock, lambda: generate_latest(registry), CONTENT_TYPE_LATEST, healthy, ready)


__all__ = ["make_server", "make_registry", "require_prometheus", "INSTALL_HINT"]
