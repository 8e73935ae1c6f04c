"""The daemon's log: its two formats, the access log and handler errors.

**Access log** (``access_log``): one line per request (:func:`access_line`), in the daemon
log's own format; a file is reopened when logrotate moves it. **Handler errors** are logged
with their traceback, rate-limited (:func:`log_handler_error`), and the count of those held
back is logged once their window ends (:func:`log_held_back`, called by the front end's
ticker for every ``LogLimiter`` it has).

**Formats.** ``configure(level, "text", stream)`` is gunicorn's line format
(:class:`TextFormatter`); ``"json"`` is one JSON object per line (:class:`JsonFormatter`):
``time``, ``level``, ``pid``, ``logger``, ``message``, ``exc_info`` when there is a
traceback, then whatever ``extra={...}`` the record carries.

**No forged lines.** Much of what is logged comes from peers: a handler's exception message
(which often quotes the request), an agent's name, what a worker prints. In the text format
every record starts a line with ``[time] [pid] [LEVEL]``, and nothing else may: the
arguments of a record (the variable parts of its message) have their control characters
escaped (:func:`escape`: a newline becomes ``\\n``), and any other line break left in a
record (a traceback, a message built beforehand) starts a continuation line indented by
:data:`CONTINUATION`, with the record's other control characters escaped too. A line that
starts with ``[`` is therefore always a record of its own. JSON needs none of this: its own
escaping keeps a record on one line, and its fields keep the text as it was.

**Capture** of what workers print is :mod:`gaspar.process.capture`.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S %z"
FORMATS = ("text", "json")


# what every LogRecord has; the rest of its __dict__ came from extra={...}
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def configure(level: str | int, fmt: str = "text", stream: TextIO | None = None) -> None:
    """The root logger's one handler: ``fmt`` is ``text`` (gunicorn's lines) or ``json``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(LOG_FORMAT, LOG_DATEFMT))
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])


# -- the text format: escaped, one record per line plus indented continuations ---------------------

#: What starts each continuation line of a record in the text format (a traceback's lines).
CONTINUATION = "    "
# Control characters (C0, DEL, C1), Unicode's line and paragraph separators, and the
# bidirectional overrides that reorder what a terminal shows ("Trojan Source").
_OTHERS = "\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f{_OTHERS}]")
_UNSAFE_IN_RECORD = re.compile(f"[\x00-\x08\x0b-\x1f{_OTHERS}]")  # keeps a record's tabs and line breaks
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _code(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: str) -> str:
    """``text`` on one line, safe to log: control characters (a newline, a carriage return,
    a terminal's escape sequences), line separators and bidirectional overrides become
    backslash escapes (``\\n``, ``\\x1b``, ``\\u2028``); everything else is kept."""
    return _UNSAFE.sub(_code, text) if _UNSAFE.search(text) else text


class _Escaped:
    """A log argument that is neither a string nor a number: escaped once formatted."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return escape(repr(self.value))


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return _Escaped(value) if _UNSAFE.search(value) else value
    if value is None or isinstance(value, (int, float)):
        return value  # "%d" and "%.3f" still work
    return _Escaped(value)


class TextFormatter(logging.Formatter):
    """gunicorn's line format, where only a record can start a line.

    A record's arguments are escaped (:func:`escape`) before they go into its message, so
    a peer's text (an exception message, an agent's name) stays on the record's line. Line
    breaks that remain (a traceback, a message built beforehand) start continuation lines
    indented by :data:`CONTINUATION`, and the record's other control characters are
    escaped: the next line that starts with ``[`` is the next record.
    """

    def format(self, record: logging.LogRecord) -> str:
        record.message = self.safe_message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        s = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            s = s.rstrip("\n") + "\n" + record.exc_text
        if record.stack_info:
            s = s.rstrip("\n") + "\n" + self.formatStack(record.stack_info)
        if _UNSAFE_IN_RECORD.search(s):
            s = _UNSAFE_IN_RECORD.sub(_code, s)
        return s.rstrip("\n").replace("\n", "\n" + CONTINUATION)

    @staticmethod
    def safe_message(record: logging.LogRecord) -> str:
        """The record's message, its arguments escaped."""
        msg = str(record.msg)
        args = record.args
        if not args:
            return msg
        if isinstance(args, Mapping):
            return msg % {key: _safe(value) for key, value in args.items()}
        return msg % tuple(_safe(value) for value in args)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside are escaped).

    Fields: ``time`` (ISO 8601, local time with its offset, milliseconds), ``level``,
    ``pid`` (the process that logged it), ``logger``, ``message``, ``exc_info`` (the
    formatted traceback) and ``stack_info`` when present, then the record's extra
    attributes. An extra named like a field replaces it: a captured worker line carries
    ``pid`` = the worker's. Values JSON cannot hold are written as ``str(value)``; the
    output is ASCII, so it stays valid JSON whatever the stream's encoding.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str)


def open_access_log(path: str) -> logging.Logger:
    """The ``gaspar.access`` logger, writing to ``path`` (``-``: standard error), in the
    daemon log's own format (text or JSON). A file is reopened when logrotate moves it.
    Lines are written from the hub: fine for a local file, as gunicorn's access log."""
    logger = logging.getLogger("gaspar.access")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr) if path == "-" else logging.handlers.WatchedFileHandler(path)
    root = next((h.formatter for h in logging.getLogger().handlers if h.formatter is not None), None)
    handler.setFormatter(root or TextFormatter("[%(asctime)s] [%(process)d] %(message)s"))
    logger.addHandler(handler)
    return logger


def close_access_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def access_line(
    logger: logging.Logger,
    peer: tuple[str, int] | None,
    outcome: str,
    bytes_in: int,
    bytes_out: int,
    queued: float | None,
    handler: float | None,
    total: float,
    worker: int | str | None,
    call: str = "",
) -> None:
    """One access-log line for a request: who, how big, how long, how it ended, which worker,
    and for a typed call its handler (`` call=NAME`` at the end; ``call`` in JSON).

    A fact that does not apply (no queue wait, no handler run, no worker) is ``-`` in the
    text and ``null`` in JSON's fields."""
    fields = {
        "peer": f"{peer[0]}:{peer[1]}" if peer else None,
        "outcome": outcome,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "queue_ms": None if queued is None else round(queued * 1000, 3),
        "handler_ms": None if handler is None else round(handler * 1000, 3),
        "total_ms": round(total * 1000, 3),
        "worker": worker,
    }
    shown = {key: "-" if value is None else value for key, value in fields.items()}
    for key in ("queue_ms", "handler_ms", "total_ms"):
        if fields[key] is not None:
            shown[key] = f"{fields[key]}ms"
    text = (
        "%(peer)s %(outcome)s in=%(bytes_in)sB out=%(bytes_out)sB queue=%(queue_ms)s "
        "handler=%(handler_ms)s total=%(total_ms)s worker=%(worker)s"
    )
    if call:
        fields["call"] = shown["call"] = call
        text += " call=%(call)s"
    logger.info(text, shown, extra=fields)


#: An error report (a handler error's JSON body) larger than this is not parsed for the log;
#: its start is logged instead: parsing holds the front end's event loop some 10 ms a MiB,
#: and an exception's message may quote a whole request (up to ``max_message_size``).
MAX_REPORT = 1024 * 1024
_REPORT_TYPE = re.compile(rb'\{"type": "([\w.]{1,200})"')


def log_handler_error(limiter: Any, worker: int | str | None, pid: int | None, body: bytes) -> None:
    """The operator sees what the client saw, and more: one line with the worker and the
    handler's exception type and message (escaped: one line whatever it holds), and the
    traceback the worker sent as the record's ``exc_info`` (the text format shows it on
    indented continuation lines; JSON as the ``exc_info`` field). At most as often as
    ``limiter`` allows, the count of the lines held back reported with the next one
    allowed if nobody reported it before (:func:`log_held_back`)."""
    logger = logging.getLogger("gaspar")
    if not logger.isEnabledFor(logging.ERROR):
        return
    allowed, suppressed = limiter.allow()
    if not allowed:
        return
    facts = error_report(body)
    kind = escape(str(facts.get("type")))
    more = f" ({suppressed} more not logged in the last {_period(limiter.period)})" if suppressed else ""
    record = logger.makeRecord(
        logger.name,
        logging.ERROR,
        __file__,
        0,
        "Handler error in worker %s (pid:%s): %s: %s%s",
        (worker, pid, kind, escape(str(facts.get("message", ""))), more),
        None,
        extra={"worker": worker, "worker_pid": pid, "error_type": kind},
    )
    record.exc_text = str(facts.get("traceback") or "").rstrip("\n") or None
    logger.handle(record)


def log_held_back(
    limiter: Any, what: str, level: int = logging.WARNING, logger: logging.Logger | None = None, final: bool = False
) -> int:
    """The summary line of what ``limiter`` held back, once the window in which it held
    them back has ended (``final``: now, e.g. at a stop), so a count is logged even if no
    more lines come: "Not logged: 23 more handler errors in the last minute (at most 10 per
    minute)". The front end's ticker calls it every 0.1 s, for each of its limiters. Returns
    the count it reported (0: nothing to say). JSON gets ``held_back`` and ``log_limit``
    (``what``)."""
    held = limiter.flush(final)
    if held:
        (logger or logging.getLogger("gaspar")).log(
            level,
            "Not logged: %s more %s in the last %s (at most %s per %s)",
            held,
            what,
            _period(limiter.period),
            limiter.burst,
            _period(limiter.period),
            extra={"held_back": held, "log_limit": what},
        )
    return held


def error_report(body: bytes) -> dict[str, Any]:
    """The facts of a handler error's JSON body (``type``, ``message``, ``traceback``); a
    body that is not JSON, or over :data:`MAX_REPORT` bytes, gives its start as the message."""
    if len(body) <= MAX_REPORT:
        try:
            facts = json.loads(body)
            if isinstance(facts, dict):
                return facts
        except ValueError:
            pass
        return {"type": "Unknown", "message": bytes(body[:200]).decode("utf-8", "replace")}
    found = _REPORT_TYPE.match(body)
    start = bytes(body[:1000]).decode("utf-8", "replace")
    return {
        "type": found.group(1).decode() if found else "Unknown",
        "message": f"(a report of {len(body)} bytes, too large to log whole; it starts: {start})",
    }


def _period(seconds: float) -> str:
    return {60.0: "minute", 1.0: "second", 3600.0: "hour"}.get(float(seconds), f"{seconds:g} s")
