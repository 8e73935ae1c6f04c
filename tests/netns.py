"""Two hosts on one machine: a Linux network namespace joined to this one by a veth pair.

For tests (and bench/remote.py) that need a second host: run a process "on the other host"
with ``Veth.popen``, reach it at ``Veth.peer_ip`` from here (it reaches us at
``Veth.host_ip``), and cut or restore the link with ``down()`` / ``up()``. Needs root and
iproute2's ``ip``; ``available()`` says why not otherwise (for ``pytest.skip``)::

    reason = netns.available()
    if reason:
        pytest.skip(reason)
    with netns.Veth() as v:
        agent = v.popen([sys.executable, "-m", "gaspar", "worker", ..., "--connect", f"tcp://{v.host_ip}:{port}"])
        ...
        v.down()  # the other host drops off the network
        v.up()

On leaving the ``with`` block, even on an exception or ^C, every process started in the
namespace is SIGKILLed (its process group, then anything still in the namespace) and
reaped, the veth pair and the namespace are deleted. Every command is bounded by a
timeout. Namespaces are named ``gsp<pid>x<n>`` so parallel runs never clash; one left by a
process that died without cleaning up (SIGKILL) is removed by the next ``Veth``, with its
veth and whatever still ran in it. Nothing here needs ``ping``: only ``ip`` (iproute2).
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

IP_TIMEOUT = 10.0  # seconds, any one `ip` command
KILL_TIMEOUT = 5.0  # seconds to wait for killed processes to be gone
NET = ipaddress.ip_network("10.200.0.0/16")
SUBNETS = NET.num_addresses // 4  # /30s: .0 network, .1 host end, .2 namespace end, .3 broadcast
NAME_RE = re.compile(r"^gsp(\d+)x(\d+)$")

_counter = itertools.count()
_lock = threading.Lock()
_live: set[Veth] = set()  # created and not closed yet
_available: str | None | bool = False  # False: not checked yet


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


def _ip(*args: str, check: bool = True, timeout: float = IP_TIMEOUT) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"`ip {' '.join(args)}` did not finish within {timeout:g} s") from e
    if check and r.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _dev_names(pid: int, n: int) -> tuple[str, str]:
    """(root end, namespace end): at most 15 characters (IFNAMSIZ) for any pid and counter."""
    return f"gv{pid:x}x{n:x}h", f"gv{pid:x}x{n:x}p"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    """The names of the named network namespaces (``ip netns list``)."""
    r = _ip("netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def links() -> list[str]:
    """The names of the root namespace's network devices."""
    r = _ip("-o", "link", "show", check=False)
    return [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", r.stdout, re.M)]


def _kill_pids_in(ns: str) -> None:
    """SIGKILL every process in namespace ``ns`` (only ours ever run in one named like ours)
    and wait until none is left, bounded."""
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        r = _ip("netns", "pids", ns, check=False)
        pids = [int(x) for x in r.stdout.split() if x.isdigit()]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def cleanup_stale() -> list[str]:
    """Delete the namespaces of ours whose creating process is dead (a run that was
    SIGKILLed), with their veth and whatever still runs in them. Returns their names."""
    removed = []
    for ns in namespaces():
        m = NAME_RE.match(ns)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        host_dev, _ = _dev_names(int(m.group(1)), int(m.group(2)))
        _kill_pids_in(ns)
        _ip("link", "del", host_dev, check=False)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    return removed


def available() -> str | None:
    """None if network namespaces with veth pairs can be used here; else why not."""
    global _available
    if _available is not False:
        return _available
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = f"network namespaces are Linux only (this is {sys.platform})"
    elif os.geteuid() != 0:
        reason = "network namespaces need root (this runs as uid %d)" % os.geteuid()
    elif shutil.which("ip") is None:
        reason = "the `ip` command (iproute2) is not installed"
    else:
        probe = f"gsp{os.getpid()}x{next(_counter)}"
        try:
            _ip("netns", "add", probe)
            try:
                # a veth pair wholly inside the probe namespace: nothing shows here meanwhile
                _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
            finally:
                _ip("netns", "del", probe, check=False)
        except (NetnsError, OSError) as e:
            reason = f"cannot create a network namespace with a veth pair: {e}"
    _available = reason
    return reason


def _free_subnet(pid: int, n: int) -> ipaddress.IPv4Network:
    """A /30 of 10.200.0.0/16 that no address here is in, starting from one derived from the
    pid and counter (so parallel runs start far apart)."""
    used = []
    r = _ip("-o", "-4", "addr", "show", check=False)
    for m in re.finditer(r"\sinet\s+([\d.]+)/(\d+)", r.stdout):
        used.append(ipaddress.ip_network(f"{m.group(1)}/{m.group(2)}", strict=False))
    start = (pid * 61 + n * 7) % SUBNETS
    for i in range(SUBNETS):
        k = (start + i) % SUBNETS
        net = ipaddress.ip_network((int(NET.network_address) + 4 * k, 30))
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError(f"no free /30 left in {NET}")


class Veth:
    """A fresh network namespace linked to this one by a veth pair, as a context manager.

    ``ns``: the namespace's name; ``host_dev`` / ``host_ip``: the end here;
    ``peer_dev`` / ``peer_ip``: the end in the namespace (on a /30 of 10.200.0.0/16).
    """

    def __init__(self) -> None:
        with _lock:
            self.n = next(_counter)
        pid = os.getpid()
        self.ns = f"gsp{pid}x{self.n}"
        self.host_dev, self.peer_dev = _dev_names(pid, self.n)
        self.host_ip = self.peer_ip = ""
        self.prefix = 30
        self.procs: list[subprocess.Popen] = []
        self._created = False

    # ---------------------------------------------------------------- lifetime

    def __enter__(self) -> Veth:
        reason = available()
        if reason:
            raise NetnsError(reason)
        cleanup_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        ns, host, peer = self.ns, self.host_dev, self.peer_dev
        _ip("netns", "add", ns)
        self._created = True
        _live.add(self)
        with _lock:  # two Veths of this process must not pick the same subnet
            net = _free_subnet(os.getpid(), self.n)
            self.host_ip, self.peer_ip = str(net.network_address + 1), str(net.network_address + 2)
            _ip("link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns)
            _ip("addr", "add", f"{self.host_ip}/{self.prefix}", "dev", host)
        _ip("-n", ns, "addr", "add", f"{self.peer_ip}/{self.prefix}", "dev", peer)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("link", "set", host, "up")

    def close(self) -> None:
        """Kill every process started in the namespace, delete the veth and the namespace.
        Safe to call twice; leaves nothing behind even if a step fails."""
        procs, self.procs = self.procs, []
        for p in procs:
            _kill_group(p.pid)
        for p in procs:
            try:
                p.wait(KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        if self._created:
            steps = (
                lambda: _kill_pids_in(self.ns),  # what left its process group, say: all of it descends from ours
                lambda: _ip("link", "del", self.host_dev, check=False),  # takes the namespace's end with it
                lambda: _ip("netns", "del", self.ns, check=False),
            )
            for step in steps:  # each is tried even if one before it timed out
                try:
                    step()
                except NetnsError:
                    pass
            self._created = False
        _live.discard(self)

    # ---------------------------------------------------------------- use

    def _argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside the namespace, in a session (and process group) of its own;
        it is killed when the Veth closes. ``kw`` goes to ``subprocess.Popen``."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw["start_new_session"] = True
        proc = subprocess.Popen(self._argv(argv), **kw)  # `ip netns exec` execs argv: same pid
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float = 10.0, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace to completion (killed past ``timeout``);
        output captured as text unless ``kw`` says otherwise."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self._argv(argv), timeout=timeout, check=check, **kw)

    def down(self) -> None:
        """Take the namespace's end of the link down: the other host drops off the network."""
        _ip("-n", self.ns, "link", "set", self.peer_dev, "down")

    def up(self) -> None:
        """Bring the namespace's end of the link back up."""
        _ip("-n", self.ns, "link", "set", self.peer_dev, "up")

    def __repr__(self) -> str:
        return f"<Veth {self.ns} {self.host_dev} {self.host_ip} <-> {self.peer_dev} {self.peer_ip}>"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _close_all() -> None:
    """A Veth whose ``with`` block never ended (the interpreter exits from elsewhere)."""
    for v in list(_live):
        try:
            v.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
