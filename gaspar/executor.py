"""``gaspar.Executor``: a :class:`concurrent.futures.Executor` over a gaspar App.

Code written for ``ProcessPoolExecutor`` moves to gaspar by changing one line::

    # with ProcessPoolExecutor() as pool:
    with gaspar.Executor("127.0.0.1:8000") as pool:
        future = pool.submit(thumbnail, image, width=64)   # a handler of the server's App
        sizes = list(pool.map(embed, batches))

``submit`` takes a function decorated with ``@app.handler`` (its registered name is used;
the function itself never travels) or a handler's name, and returns a
:class:`~concurrent.futures.Future`. The calls run on the server's workers; this side only
waits, in ``max_workers`` threads, each call on a pooled connection of one
:class:`gaspar.client.Client`. ``cancel()`` on a future not started yet works as usual; a
started call runs to its end on the server.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor as _Executor
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from gaspar.client import DEFAULT_TIMEOUT, Client


def handler_name(fn: Callable[..., Any] | str) -> str:
    """The name a call uses for ``fn``: the one ``@app.handler`` registered, or ``fn`` if it
    is a name already."""
    if isinstance(fn, str):
        return fn
    name = getattr(fn, "__gaspar_handler__", None)
    if name is None:
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} is not a handler of a gaspar App: decorate it with "
            "@app.handler (and serve the app), or pass the handler's name"
        )
    return name


class Executor(_Executor):
    """Runs calls on a gaspar server's App; see the module docstring."""

    def __init__(
        self,
        address: str | tuple[str, int],
        max_workers: int = 32,
        timeout: float | None = DEFAULT_TIMEOUT,
        codec: str = "msgpack",
    ) -> None:
        self.client = Client(address, timeout=timeout, max_idle=max_workers)
        self.codec = codec
        self._threads = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gaspar-executor")

    def submit(self, fn: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Future:
        """Call the handler ``fn`` with these arguments on the server; a Future of its result."""
        name = handler_name(fn)
        return self._threads.submit(self.client.call, name, *args, codec=self.codec, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)
        if wait:
            self.client.close()


__all__ = ["Executor", "handler_name"]
