"""Frame codec shared by the host, the agent and the worker.

Owns: the frame layout (two 4-byte big-endian lengths, head and tail; the head is a
msgpack array ``[tag, ...]``; the tail is the raw bytes of a message's ``TAIL`` field,
the pickled call or result, so big payloads are never packed, joined or unpacked),
``PROTOCOL_VERSION``, frame limits and the start marker. The message classes are
``messages``' and are re-exported here, so ``proto.Run`` names one.
Must not import: asyncio, cloudpickle, or anything beyond the stdlib and msgpack,
because this module is shipped to nodes inside the bootstrap bundle. It does no
I/O: bytes go in, messages come out.
"""

from __future__ import annotations

import struct
from dataclasses import fields
from typing import (
    Any,
    Dict,
    Final,
    Iterable,
    Iterator,
    List,
    Tuple,
    Type,
    Union,
    get_args,
)

import msgpack

from .messages import (  # re-exported (__all__): proto.Run, proto.Hello, ...
    CHUNK,
    SOURCE_KINDS,
    STAGE_CALL,
    STAGE_INIT,
    STAGE_RESULT,
    STAGE_RUN,
    STAGES,
    WINDOW,
    Ack,
    Beat,
    Buffer,
    CloseInput,
    Configure,
    Data,
    Exited,
    Forget,
    Kill,
    Limits,
    Signal,
    Spawn,
    Spawned,
    SpawnFailed,
    Stopped,
    Store,
    StoreFailed,
)
from .messages import (
    Done as Done,
)
from .messages import (
    Failed as Failed,
)
from .messages import (
    Fetch as Fetch,
)
from .messages import (
    Hello as Hello,
)
from .messages import (
    Init as Init,
)
from .messages import (
    Log as Log,
)
from .messages import (
    Message as Message,
)
from .messages import (
    Output as Output,
)
from .messages import (
    Pieces as Pieces,
)
from .messages import (
    Ping as Ping,
)
from .messages import (
    Pong as Pong,
)
from .messages import (
    Ready as Ready,
)
from .messages import (
    Revoke as Revoke,
)
from .messages import (
    Revoked as Revoked,
)
from .messages import (
    Run as Run,
)
from .messages import (
    Shutdown as Shutdown,
)
from .messages import (
    Source as Source,
)
from .messages import (
    Tail as Tail,
)

__all__ = [
    "BIG_TAIL",
    "BUFFER_SIZE",
    "CHUNK",
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "INIT_TASK_ID",
    "MAX_FRAME_LIMIT",
    "PROTOCOL_VERSION",
    "SOURCE_KINDS",
    "STAGES",
    "STAGE_CALL",
    "STAGE_INIT",
    "STAGE_RESULT",
    "STAGE_RUN",
    "START_MARKER",
    "WINDOW",
    "Ack",
    "Beat",
    "Buffer",
    "CloseInput",
    "Configure",
    "Data",
    "Exited",
    "Forget",
    "FrameDecoder",
    "FrameError",
    "Kill",
    "Limits",
    "Signal",
    "Spawn",
    "SpawnFailed",
    "Spawned",
    "Stopped",
    "Store",
    "StoreFailed",
    "encode",
    "encode_parts",
    "frame_pieces",
    "frames",
    "tail_pieces",
]

PROTOCOL_VERSION: Final = 9
# 2: Failed.stage, Revoke/Revoked; 3: Init.max_frame; 4: Init.forward_modules/log_level,
# Done/Failed.seconds, Ping/Pong, Output, Log, Fetch/Source; 5: head/tail frames;
# 6: the node agent (Configure, Spawn, Data, CloseInput, Signal, Store / Spawned, Exited,
# SpawnFailed) and calls naming a stored function (calls.STORED_CALL)
# Written by the worker right before its first frame; whatever precedes it on
# stdout (a chatty .bashrc, a motd) is shell chatter, not protocol.
START_MARKER: Final = b"\x00\x1fSSHEXEC-START-1\x1f\x00"
HEADER: Final = struct.Struct(">II")  # head length, tail length
MAX_FRAME_LIMIT: Final = (1 << 32) - 1  # head + tail: the largest frame a decoder accepts
BIG_TAIL: Final = 1 << 16  # tails from this size are written and kept as separate buffers
DEFAULT_MAX_FRAME: Final = 1 << 30  # 1 GiB; larger calls or results are refused
INIT_TASK_ID: Final = 0  # Failed(task_id=0) reports a failed initializer


class FrameError(ValueError):
    """The byte stream is not a valid sshexec frame stream (the host turns it into ProtocolError)."""


_CLASSES: Final[Tuple[Type[Any], ...]] = get_args(Message)
# "Tail": a tail field, bytes or bytearray as received (see FrameDecoder)
_TYPES: Final = {
    "int": int,
    "str": str,
    "bytes": bytes,
    "bool": bool,
    "float": float,
    "Tail": bytes,
}
# tag -> (class, expected field types of the head, index of the tail field or -1), to decode
_SCHEMA: Final[Dict[int, Tuple[Type[Any], Tuple[type, ...], int]]] = {}
# class -> (names of its head fields, name of its tail field or ""), to encode
_LAYOUT: Final[Dict[type, Tuple[Tuple[str, ...], str]]] = {}
for _cls in _CLASSES:
    _tail = getattr(_cls, "TAIL", "")
    _head = [f for f in fields(_cls) if f.name != _tail]
    _tail_at = [f.name for f in fields(_cls)].index(_tail) if _tail else -1
    _SCHEMA[_cls.TAG] = (_cls, tuple(_TYPES[str(f.type)] for f in _head), _tail_at)
    _LAYOUT[_cls] = (tuple(f.name for f in _head), _tail)


BUFFER_SIZE: Final = struct.Struct(">Q")  # one out-of-band buffer's size in ``buffers``


def tail_pieces(tail: Union[Buffer, Pieces]) -> Pieces:
    return tail if isinstance(tail, tuple) else (tail,)


def encode_parts(message: Message) -> Tuple[bytes, Pieces]:
    """``message`` as (header + head, tail pieces): the frame is them back to back."""
    names, tail_name = _LAYOUT[type(message)]
    tail = tail_pieces(getattr(message, tail_name)) if tail_name else ()
    head: bytes = msgpack.packb(
        [message.TAG, *[getattr(message, name) for name in names]], use_bin_type=True
    )
    return HEADER.pack(len(head), sum(map(len, tail))) + head, tail


def encode(message: Message) -> bytes:
    """One complete frame for ``message``, as one buffer."""
    head, tail = encode_parts(message)
    return b"".join((head, *tail)) if tail else head


def frame_pieces(messages: Iterable[Message]) -> List[Buffer]:
    """Several frames as few buffers to write in order: small frames joined, each big
    tail piece (``BIG_TAIL`` and over) left as it is, uncopied."""
    pieces: List[Buffer] = []
    small: List[Buffer] = []
    for message in messages:
        head, tail = encode_parts(message)
        small.append(head)
        for piece in tail:
            if len(piece) >= BIG_TAIL:
                pieces += (b"".join(small), piece)
                small = []
            elif piece:
                small.append(piece)
    if small:
        pieces.append(b"".join(small))
    return pieces


def frames(messages: Iterable[Message]) -> bytes:
    """Several frames coalesced into one buffer."""
    return b"".join(frame_pieces(messages))


def _build(item: Any, tail: Union[bytes, bytearray]) -> Message:
    if not isinstance(item, list) or not item or type(item[0]) is not int:
        raise FrameError("frame is not a [tag, ...] array")
    entry = _SCHEMA.get(item[0])
    if entry is None:
        raise FrameError(f"unknown message tag {item[0]!r}")
    cls, types, tail_at = entry
    values = item[1:]
    if tuple(map(type, values)) != types:  # checked field by field only when it differs
        _check(cls, types, values)
    if tail_at >= 0:
        values.insert(tail_at, tail)
    elif tail:
        raise FrameError(f"{cls.__name__} has no tail, got {len(tail)} bytes")
    message: Message = cls(*values)
    return message


def _check(cls: Any, types: Tuple[type, ...], values: List[Any]) -> None:
    """Each field has its type (an int where a float belongs becomes that float)."""
    if len(values) != len(types):
        raise FrameError(f"{cls.__name__} needs {len(types)} fields, got {len(values)}")
    for index, (value, expected) in enumerate(zip(values, types)):
        if type(value) is not expected:
            if expected is float and type(value) is int:
                values[index] = float(value)
                continue
            raise FrameError(f"{cls.__name__} field has type {type(value).__name__}")


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes, iterate ``messages()``, ``end()`` at EOF.

    The claimed length of a frame is checked against ``max_frame`` before any of
    its body is buffered, and nothing is ever allocated from the claim itself. A big
    tail is gathered in a bytearray of its own, which becomes the message's field.
    ``max_frame`` may be changed between messages (the worker adopts the host's limit
    from ``Init``): it applies from the next frame on.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._pos = 0  # start of the unread part of _buffer
        self._broken = False
        self._head: Any = None  # the decoded head of a frame whose big tail is arriving
        self._tail = bytearray()
        self._tail_size = 0

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, max_frame: int) -> None:
        if not isinstance(max_frame, int) or not 0 < max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be in 1..{MAX_FRAME_LIMIT}, got {max_frame!r}")
        self._max_frame = max_frame

    def feed(self, data: bytes) -> None:
        if self._broken:
            raise FrameError("decoder already failed")
        if self._head is not None:
            take = self._tail_size - len(self._tail)
            if len(data) <= take:
                self._tail += data
                return
            view = memoryview(data)
            self._tail += view[:take]
            data = view[take:]  # type: ignore[assignment]
        self._buffer += data

    def messages(self) -> Iterator[Message]:
        while True:
            message = self._next()
            if message is None:
                return
            yield message

    def _fail(self, reason: str) -> FrameError:
        self._broken = True
        return FrameError(reason)

    def _next(self) -> Message | None:
        if self._broken:
            raise FrameError("decoder already failed")
        if self._head is not None:
            if len(self._tail) < self._tail_size:
                return None
            item, tail = self._head, self._tail
            self._head, self._tail = None, bytearray()
            return self._build(item, tail)
        buf, pos = self._buffer, self._pos
        if len(buf) - pos < HEADER.size:
            self._compact()
            return None
        head_size, tail_size = HEADER.unpack_from(buf, pos)
        if head_size + tail_size > self._max_frame or head_size == 0:
            raise self._fail(
                f"frame of {head_size + tail_size} bytes (head {head_size}, tail {tail_size}) "
                f"is outside 1..{self._max_frame}"
            )
        start = pos + HEADER.size
        end = start + head_size + tail_size
        if len(buf) < (end if tail_size < BIG_TAIL else start + head_size):
            self._compact()
            return None
        item = self._unpack(memoryview(buf)[start : start + head_size])
        if tail_size < BIG_TAIL:
            self._pos = end
            return self._build(item, bytes(memoryview(buf)[start + head_size : end]))
        self._build(item, b"")  # a bad head fails now, not after its tail
        if _SCHEMA[item[0]][2] < 0:
            raise self._fail(f"{_SCHEMA[item[0]][0].__name__} has no tail, got {tail_size} bytes")
        self._head, self._tail_size = item, tail_size  # gather the tail apart
        self._tail = bytearray(memoryview(buf)[start + head_size : min(end, len(buf))])
        self._pos = min(end, len(buf))
        self._compact()
        return self._next()

    def _unpack(self, head: memoryview) -> Any:
        try:
            return msgpack.unpackb(head, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types on garbage
            raise self._fail(f"frame head is not msgpack: {type(exc).__name__}: {exc}") from exc

    def _build(self, item: Any, tail: Union[bytes, bytearray]) -> Message:
        try:
            return _build(item, tail)
        except FrameError:
            self._broken = True
            raise

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos + len(self._tail)

    def end(self) -> None:
        """Call at EOF: a partial frame left over means the stream was cut short."""
        if self.buffered or self._head is not None:
            raise FrameError(f"stream ended inside a frame ({self.buffered} bytes left over)")
