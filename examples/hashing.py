"""A CPU-bound handler served by gaspar, called from an eventlet application.

Run the daemon::

    gaspar serve examples.hashing:Hasher --bind 127.0.0.1:10123

then, in an eventlet program, ``gaspar.client.request`` is green: the loop keeps serving
while the hashing burns the workers' cores::

    import eventlet
    eventlet.monkey_patch()
    from gaspar import client
    pool = eventlet.GreenPool()
    digests = list(pool.imap(lambda m: client.request("127.0.0.1:10123", m), [b"a", b"b"]))
"""

from __future__ import annotations

import hashlib

import gaspar


class Hasher(gaspar.Consumer):
    """Stretches each request with 100,000 rounds of SHA-256; ``rounds`` may be changed by a
    broadcast (``producer.broadcast(b"5000")``) without a restart."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 100_000

    def handle(self, message: bytes) -> bytes:
        digest = message
        for _ in range(self.rounds):
            digest = hashlib.sha256(digest).digest()
        return digest.hex().encode()

    def on_broadcast(self, message: bytes) -> None:
        self.rounds = int(message)


def main() -> None:
    producer = gaspar.Producer(Hasher(), 10123)
    producer.start()


if __name__ == "__main__":
    main()
