"""How calls and results become Run/Done payloads and back, on both ends.

Owns: the payload layout. A payload is a pickle stream followed by the
out-of-band buffers it refers to (pickle protocol 5: a numpy array's memory,
a bytearray), whose sizes travel in the message's ``buffers`` field; a call is
either one pickle of ``(fn, args, kwargs)`` or a *split call* (``map``: the
function pickled once, then each item's arguments). Also the one pickler both ends
use for calls, results, initializers and exceptions (``Pickler``, ``serialize``), and
naming shared objects by key in the calls pickled inside ``sharing()`` (the rule, and
the shared blob's layout, are in ``shared``: keyed by content each time a call is
pickled, never by identity alone). Shipped to nodes. Must not import: any sshexec
module outside ``_wire``, or anything beyond the stdlib and cloudpickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import sys
import threading
import types
from collections import ChainMap
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Final,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
)

import cloudpickle

from . import carried
from . import protocol as proto

OUT_OF_BAND_MIN = 1 << 16  # smaller buffers are cheaper to copy into the pickle
SPLIT_CALL = b"S"  # a payload holding the function and its arguments as two pickles
STORED_CALL = b"R"  # a payload naming a function (or initializer) the host's agent stores
KEY_SIZE = 32  # a stored blob's key: SHA-256
STORE_MIN = 1 << 14  # pickled functions this big or bigger are stored once per host
SHARED_CALL = b"P"  # a payload that names shared objects (sharing()); a layout byte follows
SHARED_ID = "sshexec-shared"  # the persistent id of a shared object: (SHARED_ID, key)
PLAIN_TYPES: Final = frozenset((int, float, str, bytes, bool, type(None)))  # standard pickler's

Payload = Tuple[proto.Pieces, bytes]  # (pickle stream + buffers, their packed sizes)
Call = Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]
BufferCallback = Callable[[pickle.PickleBuffer], Any]

_reduce_code_by_cloudpickle = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _filename_argument() -> int:
    """Where ``co_filename`` sits among the arguments cloudpickle's code reducer gives
    ``types.CodeType``, found by trying each string argument; -1 if its reducer is not of
    that shape (then code is pickled exactly as cloudpickle does)."""
    probe = compile("pass", "<sshexec-probe>", "exec")
    make, args = _reduce_code_by_cloudpickle(probe)[:2]
    if make is not types.CodeType:
        return -1
    code_type: Any = types.CodeType  # its signature differs by Python version
    for at, arg in enumerate(args):
        if not isinstance(arg, str):
            continue
        try:
            rebuilt = code_type(*args[:at], "<sshexec-marker>", *args[at + 1 :])
        except (TypeError, ValueError):
            continue
        if rebuilt.co_filename == "<sshexec-marker>" and rebuilt.co_name == probe.co_name:
            return at
    return -1


_FILENAME_AT: Final = _filename_argument()


_marks = threading.local()  # .code: serialize() on this thread pickled code by value


def _reduce_code(code: types.CodeType) -> Any:
    # cloudpickle >= 3.1.3 writes co_filename as "<dynamic-code>" (a payload independent
    # of where the code was defined); remote tracebacks and log records need the real one.
    _marks.code = True  # only a node of this Python version can load it
    reduced = _reduce_code_by_cloudpickle(code)
    at = _FILENAME_AT
    if at < 0 or reduced[0] is not types.CodeType or reduced[1][at] == code.co_filename:
        return reduced
    args = reduced[1]
    return (types.CodeType, (*args[:at], code.co_filename, *args[at + 1 :]), *reduced[2:])


def _dispatch_table() -> ChainMap[type, Callable[[Any], Any]]:
    theirs = cloudpickle.Pickler.dispatch_table
    if isinstance(theirs, ChainMap) and theirs.maps:
        # cloudpickle's reducers with ours, then copyreg's (still live): no lookup level
        # more than cloudpickle's own, whose table is searched for most objects pickled
        return ChainMap({**theirs.maps[0], types.CodeType: _reduce_code}, *theirs.maps[1:])
    return ChainMap({types.CodeType: _reduce_code}, theirs)


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle's pickler, except that code pickled by value (functions and classes of
    ``__main__``, a notebook, a module registered with ``register_pickle_by_value``)
    keeps its real ``co_filename``: a worker's traceback and its log records then name
    the file, whose lines the client can show. The same function still gives the same
    payload; it differs from cloudpickle's only by that file name."""

    dispatch_table: ClassVar[Mapping[type, Callable[[Any], Any]]] = _dispatch_table()


def _shared_id(obj: Any) -> Any:
    entry = _marks.sharing.get(id(obj))
    if entry is None or entry[0] is not obj:
        return None
    _marks.blobs.append((entry[1], entry[2]))  # it must be stored before the call arrives
    return (SHARED_ID, entry[1])


@contextlib.contextmanager
def sharing(entries: Iterable[Tuple[Any, bytes, bytes]]) -> Iterator[None]:
    """Client: the calls this thread pickles inside the block name these objects by key
    (``(object, key, blob)``, from ``shared.Sharing.check`` just before: keyed by their
    content now) instead of carrying them; see ``shared`` for the rule."""
    outer = getattr(_marks, "sharing", None)
    _marks.sharing = {id(entry[0]): entry for entry in entries}
    try:
        yield
    finally:
        _marks.sharing = outer


class PortablePickler(Pickler):
    """``Pickler`` for a node of another Python version, where code objects pickled by
    value cannot be loaded: functions and classes of the client's ``__main__`` script
    travel by reference instead (``__main__.name``; the node runs the script as
    ``__mp_main__``, as ``multiprocessing``'s spawn does), and so do those of modules
    registered for pickling by value (the node is sent their source), each with the
    current values of the globals its code reads there (``carried``), so that a task
    sees what it would see on a node of the client's Python. Code that exists only as
    code (a lambda, a closure, a nested function, a notebook cell) still travels by
    value, and ``carried_code()`` says so."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._carrying: Set[int] = set()

    def reducer_override(self, obj: Any) -> Any:
        if _is_script_global(obj):
            # the values of the globals it reads travel with it (the rule: ``carried``)
            if id(obj) not in self._carrying:
                self._carrying.add(id(obj))  # its reference inside the reduce: plain
                reduced = carried.reduce(obj, _is_script_global)
                if reduced is not None:
                    return reduced
            return NotImplemented  # the standard pickler's reference: module + qualname
        return super().reducer_override(obj)


def _is_script_global(obj: Any) -> bool:
    """A function or class defined at the top of a module with a source file: the
    client's ``__main__`` script, or a module registered with cloudpickle's
    ``register_pickle_by_value`` (a node of another version gets its source instead)."""
    if not isinstance(obj, (types.FunctionType, type)):
        return False
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    if module is None or not getattr(module, "__file__", None):
        return False  # no file to send: a REPL, a notebook, python -c, a builtin
    found: Any = module
    for part in obj.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is obj


class _Sharing(Pickler):
    persistent_id = staticmethod(_shared_id)  # only while something is shared: per object


class _PortableSharing(PortablePickler):
    persistent_id = staticmethod(_shared_id)


_PICKLERS: Final = {
    (False, False): Pickler,
    (True, False): PortablePickler,
    (False, True): _Sharing,
    (True, True): _PortableSharing,
}


def serialize(
    obj: Any, buffer_callback: Optional[BufferCallback] = None, portable: bool = False
) -> bytes:
    """One pickle of ``obj`` by ``Pickler`` (protocol 5): what either end sends of a
    call, a ``map``'s function, an initializer, a result or an exception. ``portable``:
    with ``PortablePickler``, for a node of another Python version. Afterwards
    ``carried_code()`` tells whether code went by value, ``shared_blobs()`` which shared
    objects it names."""
    _marks.code, _marks.blobs = False, []
    with io.BytesIO() as file:
        _PICKLERS[portable, bool(getattr(_marks, "sharing", None))](
            file, protocol=5, buffer_callback=buffer_callback
        ).dump(obj)
        return file.getvalue()


def shared_blobs() -> Tuple[Tuple[bytes, bytes], ...]:
    """(key, pickle) of each shared object the latest ``serialize`` on this thread named."""
    return tuple(getattr(_marks, "blobs", ()))


def carried_code() -> bool:
    """Whether the latest ``serialize`` (or ``dumps``) on this thread pickled a code
    object by value: then only a node of the client's Python version can load it."""
    return bool(getattr(_marks, "code", False))


def dumps(
    obj: Any, *, copy: bool, plain: bool = False, prefix: bytes = b"", portable: bool = False
) -> Payload:
    """Pickle ``obj`` with its big contiguous buffers left out of the stream.

    ``copy``: take a snapshot of each buffer (the client, whose caller may change an
    array after ``submit`` returns) or send it from where it lies (the worker, whose
    result is not touched again). ``plain``: ``obj`` holds only built-in scalars, so the
    standard pickler does (much faster than cloudpickle's). ``prefix`` goes before the
    stream (a split call's pickled function)."""
    buffers: List[proto.Buffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: it goes in the stream
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(bytes(raw) if copy else raw)
        return False

    if plain:
        _marks.code, _marks.blobs = False, []
        stream = pickle.dumps(obj, protocol=5)
    else:
        stream = serialize(obj, buffer_callback=out_of_band, portable=portable)
        if _marks.blobs:  # it names shared objects: the worker must look them up
            prefix = SHARED_CALL + prefix
    sizes = b"".join(proto.BUFFER_SIZE.pack(len(b)) for b in buffers)
    return (prefix + stream if prefix else stream, *buffers), sizes


def split(payload: proto.Tail | memoryview, sizes: bytes) -> Tuple[memoryview, List[memoryview]]:
    """(pickle stream, out-of-band buffers) as views of one received payload."""
    if isinstance(payload, tuple):  # Tail allows pieces only for messages being sent
        raise TypeError("a received payload is one buffer, not pieces")
    view = memoryview(payload)
    if not sizes:
        return view, []
    if len(sizes) % proto.BUFFER_SIZE.size:
        raise ValueError(f"buffer sizes field of {len(sizes)} bytes")
    lengths = [size for (size,) in proto.BUFFER_SIZE.iter_unpack(sizes)]
    at = len(view) - sum(lengths)
    if at < 0:
        raise ValueError("the payload is shorter than its out-of-band buffers")
    buffers = []
    for length in lengths:
        buffers.append(view[at : at + length])
        at += length
    return view[: len(view) - sum(lengths)], buffers


def loads(payload: proto.Tail, sizes: bytes = b"") -> Any:
    """The object of a payload; its big buffers stay views of ``payload`` (no copy)."""
    stream, buffers = split(payload, sizes)
    return pickle.loads(stream, buffers=buffers)


def call_payload(
    fn: Callable[..., Any],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    portable: bool = False,
) -> Payload:
    """Client: a ``submit``'s payload, one pickle of ``(fn, args, kwargs)``."""
    return dumps((fn, args, kwargs), copy=True, portable=portable)


def split_call(
    pickled_fn: bytes,
    args: Tuple[Any, ...],
    portable: bool = False,
    kwargs: Optional[Dict[str, Any]] = None,
) -> Payload:
    """Client: a call's payload from its function pickled once (a ``map``'s, or a
    function pickled by reference): ``b"S"`` + 4-byte length of ``pickled_fn`` + it + the
    pickle of ``(args, kwargs)``."""
    prefix = SPLIT_CALL + len(pickled_fn).to_bytes(4, "big") + pickled_fn
    kwargs = kwargs or {}
    plain = all(type(arg) in PLAIN_TYPES for arg in args) and all(
        type(value) in PLAIN_TYPES for value in kwargs.values()
    )
    return dumps((args, kwargs), copy=True, plain=plain, prefix=prefix, portable=portable)


def by_value_registry() -> Optional[int]:
    """How many modules are registered to be pickled by value (None: unknown): a
    function's pickle by reference holds while this stays the same."""
    registry = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", None)
    return len(registry) if registry is not None else None


def stored_call(key: bytes, args: Tuple[Any, ...], portable: bool = False) -> Payload:
    """Client: a ``map`` item's payload whose function the host's agent holds as the
    blob ``key`` (``STORE_MIN`` bytes or more, stored once per host): ``b"R"`` + the
    32-byte key + the pickle of ``(args, {})``."""
    plain = all(type(arg) in PLAIN_TYPES for arg in args)
    return dumps((args, {}), copy=True, plain=plain, prefix=STORED_CALL + key, portable=portable)


def blob_key(data: bytes) -> bytes:
    """The name a blob goes by on every host: its SHA-256."""
    return hashlib.sha256(data).digest()


def stored_ref(data: bytes) -> Optional[Tuple[bytes, bytes]]:
    """(reference, key) for a pickled function or initializer big enough to be stored
    once per host; None for a small one, which travels inline."""
    if len(data) < STORE_MIN:
        return None
    key = blob_key(data)
    return STORED_CALL + key, key


FindClass = Callable[[str, str], Any]  # (module, qualified name) -> the object


Lookup = Callable[[bytes], Any]  # key -> the stored function or shared object


class _Unpickler(pickle.Unpickler):
    """An unpickler whose globals are looked up by ``find`` (which may fall back on the
    standard lookup) and whose shared objects by ``shared``."""

    def __init__(
        self,
        file: Any,
        buffers: Any,
        find: Optional[Callable[[str, str, FindClass], Any]],
        shared: Optional[Lookup],
    ) -> None:
        super().__init__(file, buffers=buffers)
        self._find, self._shared = find, shared

    def find_class(self, module: str, name: str) -> Any:
        if self._find is None:
            return super().find_class(module, name)
        return self._find(module, name, super().find_class)

    def persistent_load(self, pid: Any) -> Any:
        if self._shared is None or not (isinstance(pid, tuple) and pid[:1] == (SHARED_ID,)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._shared(pid[1])


def unpickle(
    data: Any,
    buffers: Any = (),
    find: Optional[Callable[[str, str, FindClass], Any]] = None,
    shared: Optional[Lookup] = None,
) -> Any:
    """``pickle.loads``, with globals found by ``find`` when given (a worker of another
    Python version, which finds the client's ``__main__`` in the script it runs) and
    shared objects by ``shared``."""
    if find is None and shared is None:
        return pickle.loads(data, buffers=buffers)
    return _Unpickler(io.BytesIO(data), buffers, find, shared).load()


def load_call(
    payload: proto.Tail,
    sizes: bytes = b"",
    stored: Optional[Lookup] = None,
    find: Optional[Callable[[str, str, FindClass], Any]] = None,
    shared: Optional[Lookup] = None,
) -> Call:
    """Worker: ``(fn, args, kwargs)`` from a Run payload, any layout; ``stored`` gives the
    (unpickled) function the host holds under a key, ``shared`` a shared object;
    ``find`` looks globals up."""
    stream, buffers = split(payload, sizes)
    if stream[:1] == SHARED_CALL:  # names shared objects; the layout byte follows
        stream = stream[1:]
        if shared is None:
            raise LookupError("the call names shared objects, and this worker has no store")
    else:
        shared = None
    kind = stream[:1]
    if kind == STORED_CALL:
        if stored is None:
            raise LookupError("the call names a stored function, and this worker has no store")
        fn = stored(bytes(stream[1 : 1 + KEY_SIZE]))
        args, kwargs = unpickle(stream[1 + KEY_SIZE :], buffers, find, shared)
        return fn, args, kwargs
    if kind != SPLIT_CALL:
        fn, args, kwargs = unpickle(stream, buffers, find, shared)
        return fn, args, kwargs
    end = 5 + int.from_bytes(stream[1:5], "big")
    fn = unpickle(stream[5:end], (), find)
    args, kwargs = unpickle(stream[end:], buffers, find, shared)
    return fn, args, kwargs


def process_chunk(fn: Callable[..., Any], chunk: Iterable[Tuple[Any, ...]]) -> List[Any]:
    """Runs one ``map`` chunk on the worker: ``fn`` applied to each argument tuple (sent
    by reference: every node has this module)."""
    return [fn(*args) for args in chunk]


def size(payload: Payload) -> int:
    return sum(len(piece) for piece in payload[0])
