"""A worker process against a ROUTER of the test's own: the messages of docs/protocol.rst,
cancels included, with no front end in between."""

from __future__ import annotations

import multiprocessing
import struct
import time

import pytest
import zmq

from gaspar.process.worker import Consumer, Worker, run_worker
from gaspar.wire.envelope import TIMING


def handle(message: bytes) -> bytes:
    if message.startswith(b"sleep"):
        time.sleep(float(message[5:]))
    return message


def work(endpoint: str) -> None:
    import os

    worker = Worker(1, 1, 7, Consumer(handler=handle), "gaspar-test")
    os._exit(run_worker(worker, endpoint))


def rid_of(id_: int) -> bytes:
    return struct.pack("!Q", id_)


@pytest.fixture
def worker(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = 5000
    endpoint = f"ipc://{tmp_path}/w"
    router.bind(endpoint)
    proc = multiprocessing.get_context("fork").Process(target=work, args=(endpoint,), daemon=True)
    proc.start()
    rid, head, _hello = router.recv_multipart()
    assert head == b"H"
    try:
        yield router, rid, proc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        router.close(0)
        ctx.term()


def test_a_late_cancel_is_ignored_and_the_worker_carries_on(worker):
    router, rid, proc = worker
    router.send_multipart([rid, b"C" + rid_of(5)])  # for a request that already ran
    router.send_multipart([rid, b"Q" + rid_of(1), b"x"])
    got_rid, head, body = router.recv_multipart()
    assert head[:9] == b"R" + rid_of(1) and head[9] == 0 and body == b"x"
    wall, cpu = TIMING.unpack_from(head, 10)
    assert wall >= 0 and cpu == -1.0  # CPU time is not measured for a sub-millisecond handler
    router.send_multipart([rid, b"X"])
    proc.join(5)
    assert proc.exitcode == 0


def test_a_request_handed_ahead_and_cancelled_is_skipped_never_run(worker):
    router, rid, proc = worker
    router.send_multipart([rid, b"Q" + rid_of(1), b"sleep0.3"])
    router.send_multipart([rid, b"P" + rid_of(2), b"never"])
    router.send_multipart([rid, b"P" + rid_of(3), b"after"])
    router.send_multipart([rid, b"C" + rid_of(2)])
    replies = [router.recv_multipart()[1:] for _ in range(3)]
    assert [r[0][:9] for r in replies] == [b"R" + rid_of(1), b"S" + rid_of(2), b"R" + rid_of(3)]
    assert replies[2][1] == b"after"
    router.send_multipart([rid, b"X"])
    proc.join(5)
    assert proc.exitcode == 0


def test_several_requests_in_one_message_run_in_order_and_each_gets_its_reply(worker):
    """The front end sends a pipelining client's requests for one worker as one multipart
    message (gaspar.frontend.router): head and body, head and body... The worker reads them
    two by two; a cancel in a message of its own still finds one of them not yet run."""
    router, rid, proc = worker
    router.send_multipart([rid, b"Q" + rid_of(1), b"sleep0.3", b"P" + rid_of(2), b"two", b"P" + rid_of(3), b"three"])
    router.send_multipart([rid, b"C" + rid_of(2)])
    router.send_multipart([rid, b"P" + rid_of(4), b"four", b"P" + rid_of(5), b"five"])
    replies = [router.recv_multipart()[1:] for _ in range(5)]
    heads = [r[0][:9] for r in replies]
    assert heads == [b"R" + rid_of(1), b"S" + rid_of(2), b"R" + rid_of(3), b"R" + rid_of(4), b"R" + rid_of(5)]
    assert [r[1] for r in replies if r[0][:1] == b"R"] == [b"sleep0.3", b"three", b"four", b"five"]
    router.send_multipart([rid, b"X"])
    proc.join(5)
    assert proc.exitcode == 0
