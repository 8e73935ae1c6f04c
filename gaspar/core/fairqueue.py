"""The dispatcher's queue, with no I/O: first in, first out or newest first, one share per
connection.

A persistent connection may pipeline many requests, but it holds at most ``share()``
places in the queue (as many as there are workers); its others wait in a line of their own,
*held*, and each joins the queue when one of its requests leaves it (to a worker, shed or
cancelled): at the tail while the queue is first in, first out; while it is newest first,
at the head, as old as the oldest there (served last, shed first). So a client pipelining a
thousand requests costs everyone else about one handler run, as HTTP/2 servers bound a
connection's concurrent streams; alone, it still keeps every worker busy. A held request's
wait in the queue counts from when it joined it: a client queueing behind itself is not
overload (its whole wait is still bounded by ``queue_timeout``: :meth:`take_held`).
Requests without an owner (one per connection) are never held.

**An owner that does not read its replies is paused** (:meth:`pause`): none more of its
requests joins the queue (those in it stay) until :meth:`resume`, so a client that pipelines
requests for large replies and never reads them holds its share's replies, not all of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class Queued(Protocol):
    """What the queue reads and writes of a request (``gaspar.core.records.Pending``)."""

    owner: Any
    held: bool
    queued_at: float


class FairQueue:
    """Requests no worker could take yet. ``share()``: the places one owner may hold;
    ``newest_first()``: whether the queue is served newest first now; ``clock``: now."""

    def __init__(self, share: Callable[[], int], newest_first: Callable[[], bool], clock: Callable[[], float]) -> None:
        self.share, self.newest_first, self.clock = share, newest_first, clock
        #: The queued requests, oldest end first (held ones are not here): the dispatcher's
        #: hot paths test and count this deque itself, not the object (a Python ``__len__``
        #: call each, about a dozen a request).
        self.items: deque[Any] = deque()
        self._in_queue: dict[Any, int] = {}  # owner -> its requests in the queue
        self._held: dict[Any, deque[Any]] = {}  # owner -> its requests past its share
        self._paused: set[Any] = set()  # owners whose held requests do not join the queue
        #: Requests waiting behind their own owner's share of the queue (a count kept as they come
        #: and go: the overload control reads it at every check).
        self.held = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        """The queued requests, oldest end first (held ones are not in the queue)."""
        return iter(self.items)

    @property
    def oldest(self) -> Any:
        """The request at the oldest end (the queue must not be empty)."""
        return self.items[0]

    def oldest_arrival(self) -> float | None:
        """When the longest-waiting request arrived, queued or held behind its owner's
        share (each owner's held ones are first in, first out); None when none waits."""
        times = [held[0].queued_at for held in self._held.values() if held]
        if self.items:
            times.append(self.oldest.queued_at)
        return min(times, default=None)

    def held_requests(self) -> list[Any]:
        return [req for held in self._held.values() for req in held]

    def take_held(self, cutoff: float) -> list[Any]:
        """Take out the held requests that arrived before ``cutoff`` (a held request's
        ``queued_at`` is its arrival until it joins the queue), each owner's oldest first. Not
        a paused owner's: it does not read its replies, and answers would only refresh its
        connection's life (``idle_timeout`` ends it, and its requests with it)."""
        old = []
        for owner, held in self._held.items():
            if owner in self._paused:
                continue
            for req in held:
                if req.queued_at >= cutoff:
                    break
                old.append(req)
        for req in old:
            self.remove(req)
        return old

    def submit(self, req: Queued) -> bool:
        """A new request: into the queue (True), or held behind its owner's share (False)."""
        owner = req.owner
        if owner is not None and (
            self._in_queue.get(owner, 0) >= max(1, self.share()) or (self._paused and owner in self._paused)
        ):
            req.held = True
            held = self._held.get(owner)
            if held is None:
                held = self._held[owner] = deque()
            held.append(req)
            self.held += 1
            return False
        self.put(req)
        return True

    def put(self, req: Queued, first: bool = False) -> None:
        """Into the queue: at the newest end, or at the oldest (``first``: first in line
        again, e.g. a request its worker never started)."""
        if first:
            self.items.appendleft(req)
        else:
            self.items.append(req)
        if req.owner is not None:
            self._in_queue[req.owner] = self._in_queue.get(req.owner, 0) + 1

    def pop(self, oldest: bool) -> Any:
        """Take the request at the oldest end, or at the newest."""
        req = self.items.popleft() if oldest else self.items.pop()
        if req.owner is not None:
            self._left(req.owner)
        return req

    def remove(self, req: Queued) -> None:
        """Take out a request, queued or held."""
        if req.held:
            held = self._held[req.owner]
            held.remove(req)
            self.held -= 1
            if not held:
                del self._held[req.owner]
            return
        self.items.remove(req)
        if req.owner is not None:
            self._left(req.owner)

    def pause(self, owner: Any) -> bool:
        """``owner`` does not read its replies: its held requests stay held (False: none
        joins the queue, as :meth:`resume` says when one does)."""
        self._paused.add(owner)
        return False

    def resume(self, owner: Any) -> bool:
        """``owner`` reads again (or is gone): its held requests take its free places in the
        queue; True when any joined it."""
        self._paused.discard(owner)
        joined = False
        while owner in self._held and self._in_queue.get(owner, 0) < max(1, self.share()):
            self._join(owner)
            joined = True
        return joined

    def clear(self) -> None:
        self.items.clear()
        self._in_queue.clear()
        self._held.clear()
        self.held = 0
        self._paused.clear()

    def _left(self, owner: Any) -> None:
        """One of ``owner``'s requests left the queue: its next held one takes the place."""
        n = self._in_queue[owner] - 1
        if n:
            self._in_queue[owner] = n
        else:
            del self._in_queue[owner]
        if owner in self._held and n < max(1, self.share()) and owner not in self._paused:
            self._join(owner)

    def _join(self, owner: Any) -> None:
        """``owner``'s next held request joins the queue."""
        held = self._held[owner]
        req = held.popleft()
        self.held -= 1
        if not held:
            del self._held[owner]
        req.held = False
        if self.newest_first() and self.items:  # served last, shed first
            req.queued_at = self.items[0].queued_at
            self.put(req, first=True)
        else:
            req.queued_at = self.clock()
            self.put(req)


__all__ = ["FairQueue", "Queued"]
