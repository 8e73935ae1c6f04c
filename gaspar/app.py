"""Apps: many named handlers served by one daemon, called with typed arguments.

::

    app = gaspar.App()

    @app.handler                       # its name: "thumbnail"
    def thumbnail(image: bytes, width: int = 128) -> bytes: ...

    @app.handler(workers=1)            # a pool of its own (see below)
    def embed(texts: list[str]) -> list[list[float]]: ...

    @app.handler
    def frames(video: bytes):          # a generator: its items stream back as they come
        yield ...

``gaspar serve mod:app`` serves them all; a client calls one by name
(``Client(addr).call("thumbnail", data, width=64)``, ``Client.stream("frames", ...)``,
``gaspar.Executor(addr).submit(thumbnail, data)``). The decorated function is returned as
it was: it stays callable locally. Arguments and results travel through a codec
(``gaspar.wire.calls``): msgpack by default, pickle only with ``App(allow_pickle=True)``,
for trusted clients, since decoding a pickle runs code. A call for an unknown name is
refused with :class:`gaspar.errors.NoSuchHandler`, arguments that do not bind with
:class:`gaspar.errors.BadRequest` naming the problem, and a handler that raises gives
:class:`gaspar.errors.HandlerError` with the remote type, as for bytes handlers.

**Pools.** ``workers=N`` (or ``pool="name"``) names the pool a handler belongs to, and
``@app.setup("name")`` a hook run once in each worker of that pool after the fork (load a
model there, not in the front end). Handlers without a pool share ``default``.

An App is a :class:`gaspar.Consumer`: everything a Consumer does (hooks, broadcasts,
reloads) works the same, and a plain bytes request goes to ``App(default=fn)`` if given.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gaspar.core.autoscale import parse_range
from gaspar.errors import ProtocolError, SoftTimeout
from gaspar.process.running import Refused
from gaspar.process.worker import Consumer
from gaspar.wire import calls

DEFAULT_POOL = "default"
#: A generator called with ``call`` (not ``stream``) sends its items as one list: at most this
#: many bytes of them (the default max_message_size), or the call fails (``ReplyTooLarge``).
MAX_LISTED = 64 << 20


class ReplyTooLarge(Exception):
    """A generator called with ``call`` made more than :data:`MAX_LISTED` bytes of items."""


#: The keyword arguments of ``Client.call`` that are the client's, not the handler's.
CLIENTS_OWN = frozenset(("timeout", "handler_timeout", "codec"))


@dataclass
class Pool:
    """A pool of workers: how many (None: the ``--workers`` setting), and its setup hooks."""

    name: str
    workers: int | str | None = None  # N, or "MIN:MAX": it sizes itself (gaspar.core.autoscale)
    setup: list[Callable[[], Any]] = field(default_factory=list)
    max_memory: int | None = None  # resident bytes past which its workers are recycled


@dataclass
class Handler:
    """One named handler: the function, its pool, and whether it streams (a generator)."""

    name: str
    fn: Callable[..., Any]
    pool: str
    stream: bool
    signature: inspect.Signature | None


class App(Consumer):
    """A registry of named handlers, served by one daemon (``gaspar serve mod:app``)."""

    def __init__(self, *, allow_pickle: bool = False, default: Callable[[bytes], bytes | str] | None = None) -> None:
        # not Consumer.__init__: its ``handler`` attribute would hide the decorator
        self.default = default
        self.module = sys._getframe(1).f_globals.get("__name__", "")  # for reloaded()
        self.allow_pickle = allow_pickle
        self.handlers: dict[str, Handler] = {}
        self.pools: dict[str, Pool] = {DEFAULT_POOL: Pool(DEFAULT_POOL)}

    # -- declaring ---------------------------------------------------------------------------

    def handler(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        pool: str | None = None,
        workers: int | str | None = None,
    ) -> Any:
        """Register ``fn`` under ``name`` (its ``__name__`` by default); as ``@app.handler``
        or ``@app.handler(...)``. ``workers=N`` gives it a pool of its own, named after
        it, of N workers; ``pool=`` puts it in a named pool. Returns ``fn`` unchanged."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if not callable(fn):
                raise TypeError(f"a handler must be callable, not {type(fn).__name__}")
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                raise TypeError(f"{fn.__name__} is async: a handler runs in a worker process, as a plain function")
            if name is not None and (not isinstance(name, str) or not name):
                raise TypeError(f"a handler's name is a non-empty str, not {name!r}")
            key = name or getattr(fn, "__name__", "")
            try:
                calls.encode_call(key, (), {})  # a name the wire can carry
            except ValueError as exc:
                raise ValueError(f"handler name {key!r}: {exc}") from None
            if key in self.handlers:
                raise ValueError(f"a handler named {key!r} is registered already")
            where = pool or (key if workers is not None else DEFAULT_POOL)
            known = self.pools.get(where)
            if workers is not None and known is not None and known.workers not in (None, workers):
                raise ValueError(f"pool {where!r} has {known.workers} workers already, not {workers}")
            self.pool(where, workers=workers)
            try:
                signature = inspect.signature(fn)
            except (TypeError, ValueError):  # some builtins
                signature = None
            stream = inspect.isgeneratorfunction(fn)
            if taken := sorted(CLIENTS_OWN & set(signature.parameters if signature else ())):
                why = f"{key}: its {', '.join(taken)} cannot be given by keyword through Client.call (the client's own)"
                warnings.warn(why, stacklevel=3)
            self.handlers[key] = Handler(key, fn, where, stream, signature)
            try:
                fn.__gaspar_handler__ = key  # Executor.submit(fn) finds its name here
            except (AttributeError, TypeError):
                pass
            return fn

        return register if fn is None else register(fn)

    def pool(self, name: str, workers: int | str | None = None, max_memory: int | None = None) -> Pool:
        """Declare a pool (or set its size, ``N`` or ``"MIN:MAX"`` to size itself by its
        queue delay, or its workers' memory limit in bytes, which wins over
        ``max_worker_memory``); returns it."""
        if workers is not None and parse_range(workers)[1] < 1:  # N or MIN:MAX
            raise ValueError(f"a pool's workers must be at least 1, not {workers!r}")
        found = self.pools.setdefault(name, Pool(name))
        if workers is not None:
            found.workers = workers
        if max_memory is not None:
            found.max_memory = max_memory
        return found

    def setup(self, pool: str = DEFAULT_POOL) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
        """``@app.setup("embed")``: run this once in each worker of that pool, after the fork."""

        def register(fn: Callable[[], Any]) -> Callable[[], Any]:
            self.pool(pool).setup.append(fn)
            return fn

        return register

    def handler_of(self, body: Any) -> str:
        """In the front end: the handler a call's body names, if this App has it ("": a name
        it does not know, a codec it refuses, or a malformed call: see :meth:`refusal`). Only known names become
        labels of the figures, so a client cannot grow them."""
        try:
            codec, name = calls.call_name(body)
        except ProtocolError:
            return ""
        if codec == calls.PICKLE and not self.allow_pickle:
            return ""  # refused (see refusal)
        return name if name in self.handlers else ""

    def refusal(self, body: Any) -> tuple[str, str, str] | None:
        """In the front end: ``(kind, message, handler)`` for a call to a name this App does not
        have, or in pickle when it does not allow pickle, answered at once instead of
        queueing for a worker to refuse (under load it would wait, and be shed as
        Overloaded: "retry" for a call that can never run); None otherwise (a malformed
        call is its worker's to explain)."""
        try:
            codec, name = calls.call_name(body)
        except ProtocolError:
            return None
        if codec == calls.PICKLE and not self.allow_pickle:  # its name, for its figures, if it is ours
            return "BadRequest", calls.PICKLE_REFUSED, name if name in self.handlers else ""
        return None if name in self.handlers else ("NoSuchHandler", self._unknown(name), "")

    def _unknown(self, name: str) -> str:
        known = ", ".join(sorted(self.handlers)) or "none"
        return f"no handler named {name!r} (this app has: {known})"

    # -- in a worker -------------------------------------------------------------------------

    def handle(self, message: bytes) -> bytes | str:
        """A plain bytes request: for ``App(default=fn)``; refused otherwise."""
        if self.default is None:
            raise Refused("NoSuchHandler", "this server runs an App: send typed calls (Client.call), not bytes")
        return self.default(message)

    def reloaded(self) -> App:
        """The App of a fresh import of the module that made this one (a reload of a
        ``Producer(app)`` given as an object; ``gaspar serve mod:app`` imports afresh)."""
        module = importlib.reload(sys.modules[self.module])
        for value in vars(module).values():
            if isinstance(value, App) and set(value.handlers) >= set(self.handlers):
                return value
        raise LookupError(f"no App with handlers {sorted(self.handlers)} in {self.module} after a reload")

    def start(self, pools: set[str] | None = None) -> None:
        """Run the setup hooks of ``pools`` (all: None), once, in this worker."""
        for pool in self.pools.values():
            if pools is None or pool.name in pools:
                for hook in pool.setup:
                    hook()

    def _prepare(self, message: Any) -> tuple[int, Handler, tuple, dict[str, Any]]:
        try:
            codec, name, args, kwargs = calls.decode_call(message, self.allow_pickle)
        except SoftTimeout:  # the client's limit passed while it decoded (a large payload)
            raise
        except Exception as exc:  # ProtocolError, or a pickle's own errors
            raise Refused("BadRequest", str(exc)) from None
        handler = self.handlers.get(name)
        if handler is None:
            raise Refused("NoSuchHandler", self._unknown(name))
        return codec, handler, tuple(args), kwargs

    def _invoke(self, handler: Handler, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Call the handler. Arguments that do not bind make Python raise TypeError before
        its body runs: then (only then, it costs microseconds) the signature says whether
        it was the call's arguments (BadRequest, naming them) or the handler's own error."""
        try:
            return handler.fn(*args, **kwargs)
        except TypeError as exc:
            if handler.signature is not None:
                try:
                    handler.signature.bind(*args, **kwargs)
                except TypeError as bad:
                    raise Refused("BadRequest", f"{handler.name}(): {bad}") from None
            raise exc

    def call(self, message: Any) -> bytes:
        """A typed call's reply body: the handler's result, encoded."""
        codec, handler, args, kwargs = self._prepare(message)
        result = self._invoke(handler, args, kwargs)
        if handler.stream:  # called without streaming: the items as one list
            return _listed(handler.name, result, codec)
        return calls.encode(codec, result)

    def stream(self, message: Any) -> Iterator[bytes]:
        """A streaming call's items, encoded, as the handler makes them (a handler that
        returns a value instead streams that one item)."""
        codec, handler, args, kwargs = self._prepare(message)
        result = self._invoke(handler, args, kwargs)
        items = result if inspect.isgenerator(result) else iter((result,))
        return _Encoded(items, codec)


def _listed(name: str, items: Iterator[Any], codec: int) -> bytes:
    """A generator's items as one encoded list, encoded as they come (the objects are not
    kept for msgpack), and at most :data:`MAX_LISTED` bytes of them: an endless generator
    called with ``call`` would otherwise take its worker's memory without bound."""
    parts, kept, size = [], [], 0
    for item in items:
        data = calls.encode(codec, item)
        size += len(data)
        if size > MAX_LISTED:
            getattr(items, "close", lambda: None)()
            raise ReplyTooLarge(f"{name}() made more than {MAX_LISTED} bytes of items: call it with stream")
        if codec == calls.MSGPACK:
            parts.append(data)
        else:
            kept.append(item)
    if codec != calls.MSGPACK:
        return calls.encode(codec, kept)
    return calls.list_header(len(parts)) + b"".join(parts)


@dataclass
class PoolPlan:
    """What a consumer's pools come to: each pool's starting size (the default pool's is
    ``--workers``, not here), the ranges of those that size themselves (``MIN:MAX``), each
    handler's pool, and each pool's own memory limit. Empty for a bytes handler and for an
    App whose handlers all share the default pool: every worker then serves everything."""

    sizes: dict[str, int] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    handlers: dict[str, str] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)

    @property
    def most(self) -> dict[str, int]:
        """The most workers each pool may have on this host: its size, or its MAX when it
        sizes itself (a pool of ``0:N`` has none at first, and grows for its first call)."""
        return {pool: self.ranges.get(pool, (size, size))[1] for pool, size in self.sizes.items()}


def pool_plan(consumer: Any, sizes: dict[str, int | str] | None = None) -> PoolPlan:
    """The :class:`PoolPlan` of a consumer; ``sizes`` (``--pool NAME=N|MIN:MAX``, the
    ``pools`` setting) win over the App's ``workers=`` (1 when neither says)."""
    sizes = dict(sizes or {})
    if not isinstance(consumer, App):
        if sizes:
            raise ValueError(f"pools ({', '.join(sorted(sizes))}) need an App (gaspar.App), not a bytes handler")
        return PoolPlan()
    if DEFAULT_POOL in sizes:
        raise ValueError(f"the {DEFAULT_POOL} pool's size is workers (--workers N or MIN:MAX), not a pool's setting")
    unknown = set(sizes) - set(consumer.pools)
    if unknown:
        raise ValueError(f"no pool named {', '.join(sorted(unknown))} in this App (it has {', '.join(consumer.pools)})")
    empty = sorted(set(consumer.pools) - {DEFAULT_POOL} - {h.pool for h in consumer.handlers.values()})
    if empty:  # its workers would run its setup and serve nothing: most likely a misspelt name
        used = ", ".join(sorted({h.pool for h in consumer.handlers.values()})) or "none"
        raise ValueError(
            f"no handler runs in pool {', '.join(empty)} (a setup or app.pool with a typo?); pools: {used}"
        )
    plan = PoolPlan(memory={name: p.max_memory for name, p in consumer.pools.items() if p.max_memory})
    for name, pool in consumer.pools.items():
        if name != DEFAULT_POOL:
            low, high = parse_range(sizes[name] if name in sizes else pool.workers or 1)
            plan.sizes[name] = low
            if low != high:
                plan.ranges[name] = (low, high)
    if plan.sizes:
        plan.handlers = {name: h.pool for name, h in consumer.handlers.items()}
    return plan


def shape(consumer: Any) -> dict[str, Any] | None:
    """What a reload cannot change in a running daemon: an App's handlers' names and pools,
    and its pools' sizes and memory limits (the front end routes and counts by them from
    the start). None for a bytes handler."""
    if not isinstance(consumer, App):
        return None
    pools = {name: [str(p.workers), p.max_memory] for name, p in consumer.pools.items() if name != DEFAULT_POOL}
    return {"handlers": {name: h.pool for name, h in consumer.handlers.items()}, "pools": pools}


def reshaped(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    """Why a reload to code of shape ``new`` cannot be taken by a daemon that started with
    ``old`` ("" when it can: the same handlers in the same pools)."""
    if old is None or old == new:
        return ""
    if new is None:
        return "the new code is not an App any more: the App's handlers and pools are fixed at start; restart gaspar"
    was, now = old["handlers"], new["handlers"]
    changes = {
        "added": sorted(set(now) - set(was)),
        "removed": sorted(set(was) - set(now)),
        "moved": sorted(f"{h} ({was[h]} -> {now[h]})" for h in set(was) & set(now) if was[h] != now[h]),
    }
    what = "; ".join(f"{verb} {', '.join(names)}" for verb, names in changes.items() if names) or "pools resized"
    return f"the new code changes the App's handlers or pools ({what}): they are fixed at start; restart gaspar"


class _Encoded:
    """A generator's items, encoded; ``close()`` reaches the generator (``GeneratorExit``)."""

    def __init__(self, items: Iterator[Any], codec: int) -> None:
        self.items, self.codec = items, codec

    def __iter__(self) -> _Encoded:
        return self

    def __next__(self) -> bytes:
        return calls.encode(self.codec, next(self.items))

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()


__all__ = ["App", "Handler", "Pool", "PoolPlan", "DEFAULT_POOL", "pool_plan", "reshaped", "shape"]
