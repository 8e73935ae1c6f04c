"""Loading the user's code: ``MODULE:CALLABLE`` as a Consumer, and ``--config`` files.

A leaf module (the CLI, the fork server and the agent all load the application, and none of
them may import the others for it). A failure is a :class:`UsageError`: a one-line reason,
then the last frames of the traceback in the user's own code (a SyntaxError's file, line and
caret), gaspar's, importlib's and runpy's frames left out.
"""

from __future__ import annotations

import importlib
import os
import traceback
from typing import Any

from gaspar import apppath
from gaspar.config import Settings
from gaspar.process.worker import Consumer


class UsageError(Exception):
    """A one-line reason to exit with status 2; ``detail``, if any, is printed after it."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


#: Frames of these files are the machinery of loading the user's code, not the user's code.
_OWN_FILES = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(importlib.__file__)) + os.sep,
    "<frozen importlib",
    "<frozen runpy>",  # --config files are run by runpy (frozen since 3.11)
)


def user_traceback(exc: BaseException, limit: int = 5) -> str:
    """The last ``limit`` frames of ``exc``'s traceback that are not gaspar's, importlib's
    or runpy's, and for a SyntaxError its file, line and caret; "" when there is none."""
    import runpy

    own = (*_OWN_FILES, os.path.abspath(runpy.__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(own)]
    lines = []
    if frames:
        shown = frames[-limit:]
        head = "most recent call last" if len(shown) == len(frames) else f"the last {limit} of {len(frames)} frames"
        lines += [f"Traceback ({head}):\n", *traceback.format_list(shown)]
    if isinstance(exc, SyntaxError) and exc.filename:
        only = traceback.format_exception_only(type(exc), exc)
        lines += [line for line in only if not line.startswith(f"{type(exc).__name__}:")]
    return "".join(lines).rstrip("\n")


def as_consumer(obj: Any) -> Consumer:
    """A Consumer from what ``Producer`` and ``gaspar serve`` accept: a Consumer (an App is
    one), a Consumer subclass, or a plain function ``bytes -> bytes``."""
    if isinstance(obj, type) and issubclass(obj, Consumer):
        return obj()
    if isinstance(obj, Consumer):
        return obj
    if not callable(obj):
        raise TypeError(f"Producer needs a Consumer or a callable, not {type(obj).__name__}")
    return Consumer(handler=obj)


def load_consumer(spec: str) -> Consumer:
    """``module:callable`` -> a Consumer. The callable may be a plain function, a Consumer
    instance or a Consumer subclass (instantiated with no arguments)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected MODULE:CALLABLE, got {spec!r}")
    apppath.append(os.getcwd())  # importable, but searched after the standard library
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        hint = apppath.shadow_hint(module_name, None)
        reason = f"cannot import {module_name!r}: {type(exc).__name__}: {exc}{hint}"
        raise UsageError(reason, user_traceback(exc)) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            hint = apppath.shadow_hint(module_name, module)
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}{hint}") from None
    if isinstance(obj, Consumer):
        return obj
    if isinstance(obj, type) and issubclass(obj, Consumer):
        return obj()
    if callable(obj):
        return Consumer(handler=obj)
    raise UsageError(f"{spec!r} is a {type(obj).__name__}, not a callable or a Consumer")


#: Names a config file may set besides the settings: the command line's own options.
CONFIG_EXTRAS = ("bind", "workers", "chdir", "pythonpath")


def load_config(path: str) -> dict[str, Any]:
    """Settings from a Python file, as gunicorn's ``-c``: ``timeout = 5``,
    ``def post_fork(worker): ...``, ``bind = "0.0.0.0:10123"``, ``workers = 4``. Every
    top-level name must be one of those, a dunder or an imported module: anything else
    is a usage error that names it and the closest known name (a typo must not pass)."""
    import dataclasses
    import difflib
    import runpy
    import types

    try:
        namespace = runpy.run_path(path)
    except Exception as exc:
        reason = f"cannot load config {path!r}: {type(exc).__name__}: {exc}"
        raise UsageError(reason, user_traceback(exc)) from exc
    known = [f.name for f in dataclasses.fields(Settings)] + list(CONFIG_EXTRAS)
    for name, value in namespace.items():
        if name in known or (name.startswith("__") and name.endswith("__")) or isinstance(value, types.ModuleType):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"config {path!r}: {name!r} is not a setting{hint}")
    return {name: namespace[name] for name in known if name in namespace}


__all__ = ["CONFIG_EXTRAS", "UsageError", "load_config", "load_consumer", "user_traceback"]
