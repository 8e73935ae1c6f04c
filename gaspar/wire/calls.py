"""Typed calls on the wire, with no I/O: a handler's name, its arguments and its result.

A *call* is an extended request with the ``CALL`` flag (``gaspar.wire.framing``); its body::

    u8 codec ('m' msgpack, 'p' pickle) | u8 N | N bytes: the handler's name (UTF-8)
    | the codec's encoding of [args (array), kwargs (map, text keys)]

The reply's body (status OK) is the codec's encoding of the result; a stream's items
(status ``ITEM``) are each encoded the same way. Errors are the JSON error bodies of every
other request. The name comes first and plain, so the front end routes a call (to its
handler's pool) without decoding its arguments.

**Codecs.** msgpack (the default) is safe for any client: decoding it runs no code, and
``bytes`` stay ``bytes`` (msgpack's bin type). Tuples arrive as lists, as in JSON. Pickle
(protocol 5) carries any Python object, and large ``bytes``, ``bytearray`` and numpy
buffers travel out of band, after the pickle, and are decoded as views of the received
body: no copy. Decoding a pickle runs code chosen by whoever wrote it, so a server accepts
pickle only when its ``App(allow_pickle=True)``: for trusted clients only. Its payload::

    u32 K | K x u64 buffer lengths | u64 pickle length | the pickle | the K buffers
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from gaspar.errors import ProtocolError, SoftTimeout

MSGPACK = ord("m")
PICKLE = ord("p")
CODECS = {"msgpack": MSGPACK, "pickle": PICKLE}
MAX_NAME = 255
_COUNT = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BH")  # a msgpack type byte and a 16-bit length
_HEAD32 = struct.Struct("!BI")  # ... and a 32-bit length
#: Buffers smaller than this are kept inside the pickle (out of band costs more than a copy).
OUT_OF_BAND = 64 * 1024


def codec_id(codec: str) -> int:
    try:
        return CODECS[codec]
    except KeyError:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, not {codec!r}") from None


def encode(codec: int, value: Any) -> bytes:
    """One value (arguments, a result, an item) in ``codec``."""
    if codec == MSGPACK:
        if _large(value):  # a large bytes result: its bin header and itself, one copy
            return b"".join(_bin(value))
        return _packb(value)
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND:
            return True  # in band
        buffers.append(buffer)
        return False

    data = pickle.dumps(value, protocol=5, buffer_callback=out_of_band)
    raws = [b.raw() for b in buffers]
    head = _COUNT.pack(len(raws)) + b"".join(_LENGTH.pack(r.nbytes) for r in raws) + _LENGTH.pack(len(data))
    return b"".join([head, data, *raws])


def _packb(value: Any) -> bytes:
    import msgpack  # here: importing gaspar needs nothing beyond the standard library

    try:
        return msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # msgpack names the type it could not pack in its message, not where it was found
        raise TypeError(f"cannot send this value as msgpack: {exc} (use codec='pickle')") from None


def _large(value: Any) -> bool:
    """A bytes value worth writing as its own part (past 4 GiB msgpack refuses it itself)."""
    return type(value) in (bytes, bytearray) and OUT_OF_BAND <= len(value) <= 0xFFFFFFFF


def _bin(value: bytes | bytearray) -> tuple[bytes, bytes | bytearray]:
    """msgpack's bin 32 (what msgpack itself writes for 64 KiB or more), as its header and
    the value itself: written out as parts, the value is not copied to be encoded."""
    return _HEAD32.pack(0xC6, len(value)), value


def _value(value: Any) -> tuple[Any, ...]:
    """One value's parts: a large bytes value as its bin header and itself, else msgpack's."""
    return _bin(value) if _large(value) else (_packb(value),)


def list_header(count: int) -> bytes:
    """A msgpack array's header, for ``count`` items encoded one by one behind it."""
    return _header(count, 0x90, 0xDC)


def _header(count: int, fix: int, code16: int) -> bytes:
    """msgpack's array (fix 0x90, 0xdc) or map (fix 0x80, 0xde) header, its shortest form."""
    if count < 16:
        return bytes([fix | count])
    if count < 0x10000:
        return _HEAD16.pack(code16, count)
    return _HEAD32.pack(code16 + 1, count)


def encode_arguments(args: tuple, kwargs: dict[str, Any]) -> list[Any]:
    """``[args, kwargs]`` in msgpack, as parts to be written one after the other: the same
    bytes as ``packb``, but a ``bytes`` argument (or keyword value) of 64 KiB or more is its
    own part, not copied into the encoding (msgpack would copy it twice)."""
    values = [*args, *kwargs.values()]
    if not any(_large(v) for v in values):
        return [_packb([list(args), kwargs])]
    parts: list[Any] = [b"\x92", _header(len(args), 0x90, 0xDC)]
    for arg in args:
        parts += _value(arg)
    parts.append(_header(len(kwargs), 0x80, 0xDE))
    for key, value in kwargs.items():
        parts.append(_packb(key))
        parts += _value(value)
    return parts


#: Why a pickle is refused by an App that does not allow it (its worker, or its front end at once).
PICKLE_REFUSED = "this server does not accept pickle (App(allow_pickle=True) is for trusted clients)"


def decode(codec: int, payload: bytes | memoryview, allow_pickle: bool = False) -> Any:
    """What :func:`encode` made. A pickle is refused unless ``allow_pickle``: it can run code."""
    if codec == MSGPACK:
        import msgpack

        try:
            return msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except SoftTimeout:  # the client's limit passed while it decoded: not bad bytes
            raise
        except Exception as exc:  # msgpack raises several kinds for bad bytes
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__  # some say nothing more
            raise ProtocolError(f"a malformed msgpack payload ({why})") from None
    if codec != PICKLE:
        raise ProtocolError(f"unknown codec {codec!r}")
    if not allow_pickle:
        raise ProtocolError(PICKLE_REFUSED)
    view = memoryview(payload).cast("B")
    try:
        (count,) = _COUNT.unpack_from(view, 0)
        at = _COUNT.size
        if count > (len(view) - at) // _LENGTH.size:
            raise ValueError("more buffers than bytes")
        lengths = [_LENGTH.unpack_from(view, at + i * _LENGTH.size)[0] for i in range(count)]
        at += count * _LENGTH.size
        (size,) = _LENGTH.unpack_from(view, at)
        at += _LENGTH.size
        data, at = view[at : at + size], at + size
        buffers = []
        for n in lengths:
            buffers.append(view[at : at + n])
            at += n
        if at != len(view):
            raise ValueError("lengths do not add up")
        return pickle.loads(data, buffers=buffers)
    except (ValueError, struct.error, pickle.UnpicklingError, EOFError) as exc:
        raise ProtocolError(f"a malformed pickle payload ({exc})") from None


def decode_result(codec: str, payload: bytes | memoryview) -> Any:
    """A client's decoding of a result or a stream's item, in the codec it called with: a
    pickle is taken from the server only when the client itself asked for pickle."""
    return decode(codec_id(codec), payload, allow_pickle=codec == "pickle")


def encode_call(name: str, args: tuple, kwargs: dict[str, Any], codec: str = "msgpack") -> bytes:
    """A call's body."""
    return b"".join(call_parts(name, args, kwargs, codec))


def call_parts(name: str, args: tuple, kwargs: dict[str, Any], codec: str = "msgpack") -> tuple[Any, ...]:
    """A call's body in parts, its name and its arguments (``encode_arguments``), for a
    client to write behind its header in one join: a large argument is copied only there."""
    raw = name.encode("utf-8")
    if not raw or len(raw) > MAX_NAME:
        raise ValueError(f"a handler's name is 1 to {MAX_NAME} bytes, not {len(raw)}")
    cid = codec_id(codec)
    arguments = encode_arguments(args, kwargs) if cid == MSGPACK else [encode(cid, [list(args), kwargs])]
    return (bytes([cid, len(raw)]) + raw, *arguments)


def call_name(body: bytes | memoryview) -> tuple[int, str]:
    """A call's codec and handler name, from the first bytes of its body (cheap: the front
    end reads this much to route it)."""
    if len(body) < 3 or body[0] not in (MSGPACK, PICKLE):
        raise ProtocolError("not a call: a codec byte, then the handler's name, then the arguments")
    n = body[1]
    if n == 0:
        raise ProtocolError("a call's handler name is empty")
    if len(body) < 2 + n:
        raise ProtocolError("a call's handler name is cut short")
    try:
        return body[0], bytes(body[2 : 2 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a call's handler name is not UTF-8") from None


def decode_call(body: bytes | memoryview, allow_pickle: bool = False) -> tuple[int, str, list, dict[str, Any]]:
    """``(codec, name, args, kwargs)`` of a call's body; ProtocolError when malformed."""
    codec, name = call_name(body)
    decoded = decode(codec, memoryview(body)[2 + body[1] :], allow_pickle)
    if (
        not isinstance(decoded, (list, tuple))
        or len(decoded) != 2
        or not isinstance(decoded[0], (list, tuple))
        or not isinstance(decoded[1], dict)
        or not all(isinstance(k, str) for k in decoded[1])
    ):
        raise ProtocolError("a call's arguments are [args, kwargs]: an array and a map with text keys")
    return codec, name, list(decoded[0]), decoded[1]


__all__ = [
    "MSGPACK",
    "PICKLE",
    "codec_id",
    "encode",
    "encode_arguments",
    "decode",
    "decode_result",
    "encode_call",
    "call_parts",
    "call_name",
    "decode_call",
]
