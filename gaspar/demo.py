"""Handlers for trying gaspar out: ``gaspar serve gaspar.demo:echo``."""

from __future__ import annotations

import hashlib


def echo(message: bytes) -> bytes:
    """Return the request unchanged."""
    return message


def sha256(message: bytes) -> str:
    """A little CPU work: the hex SHA-256 of the request, hashed 10,000 times over."""
    digest = message
    for _ in range(10_000):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()
