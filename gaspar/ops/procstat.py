"""What the kernel says about a process, read when asked (``/proc``; psutil where there is
none): its CPU seconds, resident memory and start time, and how long its threads waited for
a CPU. The front end's stats, the agents' pongs and the memory limits read these; nothing
here is sampled in the background. And one thing it does: :func:`give_back_memory`.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (one small read of /proc), None if it is gone."""
    usage = proc_usage(pid)
    return usage[1] if usage is not None else None


def proc_usage(pid: int) -> tuple[float, int, float] | None:
    """``(cpu seconds, resident bytes, start time as a Unix timestamp)`` of a process, from
    /proc (psutil where there is no /proc); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/statm", "rb") as f:
            resident = int(f.read().split()[1]) * _PAGE
    except FileNotFoundError:
        return None
    except OSError:
        return _psutil_usage(pid)
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime
    started = _boot_time() + int(fields[19]) / _CLK_TCK
    return cpu, resident, started


def _psutil_usage(pid: int) -> tuple[float, int, float] | None:
    try:
        import psutil
    except ImportError:
        return None
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        return t.user + t.system, p.memory_info().rss, p.create_time()
    except psutil.Error:
        return None


def cpu_wait(pid: int) -> float | None:
    """Seconds a process's main thread was ready to run but waited for a CPU (the second
    field of Linux's ``/proc/<pid>/schedstat``); None where the kernel does not say."""
    ns = _wait_ns(f"/proc/{pid}/schedstat")
    return ns / 1e9 if ns >= 0 else None


class CpuWaits:
    """The front end's own wait for a CPU, summed over its threads (the hub's and 0MQ's I/O
    thread): high when its workers, or other processes, hold every core while it has work,
    so its dispatch and socket work wait behind them. Kept monotonic (a counter): a thread
    that ends leaves what it had waited at the last read counted (one that lived and ended
    between two reads is not seen; the front end's threads live as long as it does)."""

    def __init__(self) -> None:
        self.pid = 0
        self.seen: dict[int, int] = {}  # thread id -> nanoseconds at the last read
        self.total = 0

    def read(self, pid: int) -> float | None:
        if pid != self.pid:  # another process (a fork): start again
            self.pid, self.seen, self.total = pid, {}, 0
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return None
        now = {}
        for name in tids:
            ns = _wait_ns(f"/proc/{pid}/task/{name}/schedstat")
            if ns >= 0:
                tid = int(name)
                self.total += max(0, ns - self.seen.get(tid, 0))
                now[tid] = ns
        if not now:
            return None
        self.seen = now
        return self.total / 1e9


def _wait_ns(path: str) -> int:
    """The run-queue wait in a schedstat file, -1 if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return -1


_BOOT: list[float] = []


def _boot_time() -> float:
    if not _BOOT:
        try:
            with open("/proc/stat") as f:
                _BOOT.append(float(next(line for line in f if line.startswith("btime")).split()[1]))
        except (OSError, StopIteration):
            _BOOT.append(time.time() - time.monotonic())
    return _BOOT[0]


_trim: Any = None  # glibc's malloc_trim once looked up; False where there is none


def give_back_memory() -> None:
    """Return the C allocator's free memory to the system (glibc's ``malloc_trim``): after
    a burst of large buffers, free pages stay mapped, and resident, until the next ones
    reuse them. Nothing where there is no glibc."""
    global _trim
    if _trim is None:
        try:
            _trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


__all__ = ["proc_usage", "resident_bytes", "cpu_wait", "CpuWaits", "give_back_memory"]
