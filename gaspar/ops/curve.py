"""CURVE keys and the front end's ZAP handler: who may join the pool from another host.

Built on pyzmq's ``zmq.auth`` (the bundled libzmq has CURVE): ``gaspar keygen NAME --dir
DIR`` writes ``NAME.key`` (the public key, to hand out) and ``NAME.key_secret`` (mode 0600,
to keep), in zmq.auth's certificate format. The front end's remote socket is a CURVE
server with its secret key; an agent is a CURVE client with its own secret key and the
front end's public key.

**Who gets in.** The ZAP handler (:class:`Gatekeeper`) answers libzmq's authentication
requests from the front end's hub: a key is allowed only if its ``NAME.key`` is in the
``curve_allow`` directory, and the connection's user id is then that ``NAME``. The remote
socket sets ``ZMQ_ZAP_ENFORCE_DOMAIN``, so with no handler answering, nobody gets in (it
fails closed). A client without CURVE fails the handshake before any message. An agent's
JOIN must name the key it authenticated with (``gaspar.core.agents.Agents.join``), so an agent
cannot pass for another.

**Changing who gets in.** The ``curve_allow`` directory is read at start and again on
the front end's reload (SIGHUP, ``gaspar ctl reload``): a ``NAME.key`` added lets that
agent in at its next knock, with no restart; a live agent whose key was removed (or
replaced) is lost at once and cannot join again. A directory that cannot be read at a
reload leaves the keys in force as they were. The front end's own key pair is read at
start only.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq
import zmq.auth
from zmq.auth.base import Authenticator

log = logging.getLogger("gaspar")

ZAP_DOMAIN = b"gaspar"


class KeyError_(ValueError):
    """A key file that is missing or unreadable, with the path and what to do."""


def keygen(name: str, directory: str) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (0600) into ``directory`` (made 0700 if
    missing). Refuses to overwrite existing files: a lost secret cannot come back."""
    if not name or os.sep in name or name.startswith(".") or len(name) > 64:
        raise ValueError(f"a key's name is a plain word of 1 to 64 characters, not {name!r}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public, secret = (os.path.join(directory, name + ext) for ext in (".key", ".key_secret"))
    for path in (public, secret):
        if os.path.exists(path):
            raise ValueError(f"{path} exists; remove it first to make a new key (agents using it stop joining)")
    old = os.umask(0o077)  # the secret is never readable by others, not even for a moment
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    return public, secret


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read the secret key {path}: {exc}") from None
    if not secret:
        raise KeyError_(f"{path} holds no secret key (give the .key_secret file, not the .key)")
    return public, secret


def load_public(path: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read the public key {path}: {exc}") from None
    return public


def allowed_keys(directory: str) -> dict[bytes, str]:
    """public key (z85) -> NAME, for every ``NAME.key`` in ``directory``."""
    if not os.path.isdir(directory):
        raise KeyError_(f"curve_allow: {directory} is not a directory of NAME.key files")
    names = {}
    for entry in sorted(os.listdir(directory)):
        if entry.endswith(".key"):
            names[load_public(os.path.join(directory, entry))] = entry[: -len(".key")]
    return names


def secure_server(sock: zmq.Socket, secret_file: str) -> None:
    """Make ``sock`` a CURVE server that only lets in what the ZAP handler allows."""
    public, secret = load_secret(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    sock.zap_domain = ZAP_DOMAIN
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler, or another domain: refused


def secure_client(sock: zmq.Socket, secret_file: str, server_file: str) -> None:
    """Make ``sock`` a CURVE client with its own key pair, trusting the server's public key."""
    public, secret = load_secret(secret_file)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = load_public(server_file)


def _run_now(step: Any) -> None:
    """Run pyzmq's ZAP handling to its end, here and now. It is a coroutine (since pyzmq 25)
    only so that key callbacks may await; with keys from files it never waits."""
    if not hasattr(step, "send"):
        return  # an older pyzmq: it ran already
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise RuntimeError("the ZAP handler waited on something; gaspar's keys never do")


class Gatekeeper(Authenticator):
    """The ZAP handler: a REP socket at ``inproc://zeromq.zap.01`` on the front end's
    context, read from its hub (:meth:`handle_ready`). CURVE keys in ``allow_dir`` only;
    the user id of an allowed connection is its key's NAME."""

    def __init__(self, context: zmq.Context, allow_dir: str) -> None:
        super().__init__(context, log=logging.getLogger("gaspar.zap"))
        self.allow_dir = allow_dir
        self.names: dict[bytes, str] = {}
        self.reload()
        self.allowed = 0
        self.denied = 0
        self._logged = 0.0

    def reload(self) -> tuple[set[str], set[str]]:
        """Read ``allow_dir`` again; ``(added, revoked)``: the NAMEs that may now join, and
        those whose key was removed or replaced (a live agent of that name holds a key no
        longer allowed). Raises :class:`KeyError_` and keeps the keys in force when the
        directory or a key in it cannot be read."""
        names = allowed_keys(self.allow_dir)
        old, self.names = self.names, names
        self.certs[ZAP_DOMAIN.decode()] = dict.fromkeys(names, True)
        added = {name for key, name in names.items() if old.get(key) != name}
        revoked = {name for key, name in old.items() if names.get(key) != name}
        return added, revoked

    def allows(self, name: str) -> bool:
        """Whether a key named ``name`` is allowed now."""
        return name in self.names.values()

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.names.get(zmq.utils.z85.encode(client_public_key), "")

    def handle_ready(self) -> None:
        """Answer every authentication request waiting (non-blocking; the hub calls this
        when the socket is readable, and after each round)."""
        sock = self.zap_socket
        while sock is not None and sock.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                msg = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            _run_now(self.handle_zap_message(msg))

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: Any = "") -> None:
        super()._send_zap_reply(request_id, status_code, status_text, user_id)
        if status_code == b"200":
            self.allowed += 1
            return
        self.denied += 1
        now = time.monotonic()
        if now - self._logged >= 10.0:  # one line per 10 s: a refused agent retries
            self._logged = now
            log.warning("Refused an agent's CURVE handshake: %s (%s refused in all)", status_text.decode(), self.denied)
