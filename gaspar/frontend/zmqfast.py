"""pyzmq's Cython-level socket calls and plain int flags, for the front end's hot paths.

pyzmq's Python layer (``send_multipart``, ``recv_multipart``, enum flags) cost about a
quarter of the front end's Python time per request in cProfile; the producer and the
gateway call these instead. ``LARGE``: frames this big are sent without a copy. Asking a
socket for ``EVENTS`` (about 1.4 us here) is cheaper than a ``recv`` that finds nothing
(``zmq.Again``, about 3.9 us: pyzmq builds the exception in Python).
"""

from __future__ import annotations

import zmq
import zmq.backend

send = zmq.backend.Socket.send
recv = zmq.backend.Socket.recv
get = zmq.backend.Socket.get
NOW = int(zmq.NOBLOCK)
MORE_NOW = int(zmq.NOBLOCK | zmq.SNDMORE)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
LARGE = 64 * 1024
