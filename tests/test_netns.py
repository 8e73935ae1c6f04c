"""tests/netns.py, the two-hosts-on-one-machine helper: the link works both ways, down()
cuts it, up() restores it, and nothing (process, namespace, veth) outlives the Veth."""

from __future__ import annotations

import socket
import sys

import netns
import pytest
from conftest import alive, wait_for

reason = netns.available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

# a TCP server inside the namespace: answers b"ok" to every connection
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(b"ok")
    c.close()
"""

# a TCP client inside the namespace: exit 0 if the server at argv answers b"ok"
CONNECT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
    sys.exit(0 if c.recv(2) == b"ok" else 1)
"""


def answers(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as c:
            c.settimeout(timeout)
            return c.recv(2) == b"ok"
    except OSError:
        return False


def test_link_down_up_and_cleanup():
    port = 7000  # the namespace is fresh: every port is free there
    with netns.Veth() as v:
        assert v.ns in netns.namespaces()
        assert v.host_dev in netns.links()
        assert v.peer_dev not in netns.links()  # that end is inside the namespace
        server = v.popen([sys.executable, "-c", LISTENER, v.peer_ip, str(port)])
        assert wait_for(lambda: answers(v.peer_ip, port), 5, 0.05), "the namespace's listener is unreachable"
        assert not answers("127.0.0.1", port), "the listener is not in the namespace"

        # the other way: from inside the namespace to a server here, at host_ip
        with socket.socket() as here:
            here.bind((v.host_ip, 0))
            here.listen(1)
            here.settimeout(5)
            client = v.popen([sys.executable, "-c", CONNECT, v.host_ip, str(here.getsockname()[1])])
            conn, peer = here.accept()
            assert peer[0] == v.peer_ip
            conn.sendall(b"ok")
            conn.close()
            assert client.wait(5) == 0

        v.down()
        assert not answers(v.peer_ip, port), "down() did not cut the link"
        v.up()
        assert wait_for(lambda: answers(v.peer_ip, port), 3, 0.05), "up() did not restore the link"
        assert v.run(["ip", "-o", "link", "show", v.peer_dev]).returncode == 0
    assert server.poll() is not None
    assert v.ns not in netns.namespaces()
    assert v.host_dev not in netns.links()


def test_cleanup_when_the_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with netns.Veth() as v:
            proc = v.popen(["sleep", "60"])
            assert wait_for(lambda: alive(proc.pid), 2)
            raise RuntimeError("boom")
    assert proc.returncode is not None
    assert not alive(proc.pid)
    assert v.ns not in netns.namespaces()
    assert v.host_dev not in netns.links()


def test_two_at_once_do_not_clash():
    with netns.Veth() as a, netns.Veth() as b:
        assert a.ns != b.ns and a.host_dev != b.host_dev
        assert len({a.host_ip, a.peer_ip, b.host_ip, b.peer_ip}) == 4
        assert a.run(["ip", "-o", "addr", "show"]).stdout.count(a.peer_ip) == 1
        assert b.peer_ip not in a.run(["ip", "-o", "addr", "show"]).stdout
    assert a.ns not in netns.namespaces() and b.ns not in netns.namespaces()
