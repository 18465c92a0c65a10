"""How a call becomes what its task carries: its payload for workers of the client's
Python, and, for a host running another Python version, a portable one.

Owns: ``MapFunction`` (a ``map``'s function pickled once, stored once per host when
big, and pickled portably once when needed) and ``encode`` (a call's ``Encoded``: the
payload, the blobs to store first (that function, shared objects: ``calls.sharing``),
whether only the client's Python can run it, and the portable encoding for the others). A call whose pickle carries no code by value runs anywhere
as it is; one that does is pickled again portably (``__main__``'s functions and classes
by reference) only when some host runs another version, and is *bound* (named, for the
error) when code remains even then. Must not import: asyncio, the pool's internals
beyond ``_pool.versions``, or do I/O.
"""

from __future__ import annotations

import pickle
import types
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from ._pool.versions import describe
from ._wire import calls

FRAME_OVERHEAD = 64  # msgpack envelope around a Run payload, generously
Blob = Tuple[bytes, bytes]  # key, data: stored once per host
Other = Tuple[calls.Payload, Tuple[Blob, ...]]


class Encoded(NamedTuple):
    payload: calls.Payload
    size: int
    blobs: Tuple[Blob, ...]  # stored on a host before the call is sent there
    bound: Optional[str]  # the function, named, when only the client's Python can run it
    other: Optional[Other]  # for a worker of another Python, when it differs


class MapFunction:
    """A ``map``'s function, pickled once for all its items."""

    def __init__(self, fn: Callable[..., Any], max_frame: int) -> None:
        self.fn = fn
        self.data: Optional[bytes] = calls.serialize(fn)  # raises: each item says why
        self.code = calls.carried_code()
        if len(self.data) > max_frame - FRAME_OVERHEAD:
            self.data = None  # each item's own call then fails with the size error
        self.stored = _stored(self.data)
        # the keys of its stored blobs, for as long as it lives (blobs.Claims)
        self.keys: List[bytes] = [self.stored[0]] if self.stored is not None else []
        self._portable: Optional[Tuple[Optional[bytes], Optional[Blob]]] = None

    def portable(self) -> Tuple[Optional[bytes], Optional[Blob]]:
        """(pickled portably, its blob), once; (None, None) when it still carries code."""
        if self._portable is None:
            data: Optional[bytes] = calls.serialize(self.fn, portable=True)
            if calls.carried_code():
                data = None
            self._portable = (data, _stored(data))
            if self._portable[1] is not None:
                self.keys.append(self._portable[1][0])
        return self._portable


def _stored(data: Optional[bytes]) -> Optional[Blob]:
    ref = calls.stored_ref(data) if data is not None else None
    return (ref[1], data) if ref is not None and data is not None else None


def _with_function(
    data: bytes, stored: Optional[Blob], args: Tuple[Any, ...], portable: bool
) -> calls.Payload:
    if stored is not None:
        return calls.stored_call(stored[0], args, portable=portable)
    return calls.split_call(data, args, portable=portable)


def encode(
    fn: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    function: Optional[MapFunction],
    other_python: bool,
) -> Encoded:
    """Pickle one call (``function``: ``fn`` pickled once, by ``map``). Raises what
    pickling raises."""
    reference = by_reference(fn) if function is None else None
    if reference is not None:  # its pickle is a name: pickled once, the arguments alone
        payload = calls.split_call(reference, args, kwargs=kwargs)
        code, blobs = calls.carried_code(), calls.shared_blobs()
    elif function is None or function.data is None:
        payload = calls.call_payload(fn, args, kwargs)
        code, blobs = calls.carried_code(), calls.shared_blobs()
    else:
        payload = _with_function(function.data, function.stored, args, False)
        code = function.code or calls.carried_code()
        blobs = _with_stored(function.stored, calls.shared_blobs())
    size = calls.size(payload)
    if not code:
        return Encoded(payload, size, blobs, None, None)
    other: Optional[Other] = None
    if other_python:  # a host runs another version: try the portable pickling
        if function is None or function.data is None:
            portable = calls.call_payload(fn, args, kwargs, portable=True)
            if not calls.carried_code():
                other = (portable, calls.shared_blobs())
        else:
            data, stored = function.portable()
            if data is not None:
                portable = _with_function(data, stored, args, True)
                if not calls.carried_code():
                    other = (portable, _with_stored(stored, calls.shared_blobs()))
    return Encoded(payload, size, blobs, None if other else describe(fn), other)


def by_reference(fn: Callable[..., Any]) -> Optional[bytes]:
    """``fn``'s pickle when it is a reference (a function of a module every node imports,
    not one pickled by value): the same bytes each time, so made once per function."""
    if type(fn) is not types.FunctionType:
        return None
    registry = calls.by_value_registry()
    if registry is None:
        return None
    known = _REFERENCES.get(fn)
    if known is not None and known[0] == registry:
        return known[1]
    reference: Optional[bytes] = None
    try:
        data = calls.serialize(fn)
        if not calls.carried_code() and not calls.shared_blobs():
            if data == pickle.dumps(fn, protocol=5):  # by name, as the standard pickler does
                reference = data
    except Exception:  # the whole call's pickling says why, if it fails too
        reference = None
    _REFERENCES[fn] = (registry, reference)
    return reference


_REFERENCES: weakref.WeakKeyDictionary[Callable[..., Any], Tuple[int, Optional[bytes]]] = (
    weakref.WeakKeyDictionary()
)


def on_wire(encoded: Encoded) -> int:
    """Bytes of the call with every blob it names: what must fit in ``max_frame``."""
    sizes = [_on_wire(encoded.payload, encoded.blobs)]
    if encoded.other is not None:
        sizes.append(_on_wire(*encoded.other))
    return max(sizes)


def _on_wire(payload: calls.Payload, blobs: Tuple[Blob, ...]) -> int:
    return calls.size(payload) + len(payload[1]) + sum(len(data) for _, data in blobs)


def _with_stored(stored: Optional[Blob], shared: Tuple[Blob, ...]) -> Tuple[Blob, ...]:
    return (stored, *shared) if stored is not None else shared
