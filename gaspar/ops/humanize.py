"""Figures written for a person, in a fixed width: ages, uptimes, memory, durations, and
numbers that must fit a column (``gaspar top``, ``gaspar ctl status``). Pure."""

from __future__ import annotations


def human_age(seconds: float | None) -> str:
    """``12s``, ``5m``, ``3h``, ``2d`` (the largest whole unit, rounded down)."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def human_uptime(seconds: float | None) -> str:
    """Two units: ``2d3h``, ``3h12m``, ``5m12s``, ``12s``."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for (big, bsize), (small, ssize) in ((("d", 86400), ("h", 3600)), (("h", 3600), ("m", 60)), (("m", 60), ("s", 1))):
        if s >= bsize:
            return f"{s // bsize}{big}{s % bsize // ssize}{small}"
    return f"{s}s"


def human_mib(nbytes: int | None) -> str:
    """Resident memory in MiB: ``31.9M``, ``812M``; GiB past 100,000 MiB."""
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    if mib < 100:
        return f"{mib:.1f}M"
    return f"{mib:.0f}M" if mib < 100_000 else f"{mib / 1024:.0f}G"


def human_duration(seconds: float | None) -> str:
    """``0.4ms``, ``243ms``, ``1.25s``."""
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def number(value: float | None, width: int, decimals: int = 1) -> str:
    """``value`` in at most ``width`` characters: fewer decimals, then k/M/G, then ``*``s."""
    if value is None:
        return "-"
    for d in range(decimals, -1, -1):
        text = f"{value:.{d}f}"
        if len(text) <= width:
            return text
    for suffix, size in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        text = f"{value / size:.0f}{suffix}"
        if len(text) <= width:
            return text
    return "*" * width


def milliseconds(value: float | None, width: int) -> str:
    if value is None:
        return "-"
    return number(value, width, 2 if value < 10 else 1 if value < 1000 else 0)


__all__ = ["human_age", "human_duration", "human_mib", "human_uptime", "milliseconds", "number"]
