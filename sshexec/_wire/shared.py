"""Shared objects: a big argument many calls name (a training set every fit of a grid
search gets) crosses once per host, as a blob the host's agent keeps, named in each call
by the SHA-256 of its content.

The rule: an object is shared only by the code that asks for it, for the calls it
pickles while it asks (``calls.sharing``: the joblib backend, for each batch of one
``Parallel`` call), and each time such a call is pickled the object's key is computed
again from its content *then*, as joblib's memmapping names an array's file by a hash of
its content. A changed array (``a[:] = 1`` between two calls, or between two batches)
is a new blob; a call pickled outside such a scope (a plain ``submit``, ``map``) carries
the object by value, as always. Nothing is keyed by identity alone, so no call can name
a stale copy. Cost: one SHA-256 pass over the object's buffers per call that names it
(hashlib releases the GIL; about 0.12 s per 200 MB here, less than joblib's own md5 hash
per batch), plus one copy when its content is new.

Owns: the shared blob's layout (``blob``/``load``: a pickle whose big buffers follow it,
so hashing and loading need no copy) and ``Sharing`` (one scope's latest blob per
object). Shipped to nodes (``load``). Must not import: any sshexec module outside
``_wire``, or anything beyond the stdlib.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import calls
from . import protocol as proto

_COUNT = struct.Struct(">I")  # how many out-of-band buffers follow the pickle

Entry = Tuple[Any, bytes, bytes]  # (the object, its key, its blob): what a call names


def pieces(obj: Any) -> List[proto.Buffer]:
    """``obj``'s blob as pieces, its big contiguous buffers left where they lie: buffer
    count, their sizes, the pickle stream (the standard pickler: the blob loads on any
    Python), then the buffers."""
    buffers: List[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: it goes in the stream
            return True
        if raw.nbytes < calls.OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    stream = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    sizes = b"".join(proto.BUFFER_SIZE.pack(b.nbytes) for b in buffers)
    return [_COUNT.pack(len(buffers)) + sizes, stream, *buffers]


def key_of(blob_pieces: List[proto.Buffer]) -> bytes:
    """The blob's key: the SHA-256 of its bytes (``calls.blob_key`` of the joined pieces),
    without joining them."""
    digest = hashlib.sha256()
    for piece in blob_pieces:
        digest.update(piece)
    return digest.digest()


def load(data: bytes, find: Optional[Callable[[str, str, calls.FindClass], Any]] = None) -> Any:
    """Worker: the object of a shared blob; its buffers stay views of ``data`` (bytes:
    read-only, as joblib's memmapped arrays are)."""
    view = memoryview(data)
    (count,) = _COUNT.unpack_from(view)
    end = _COUNT.size + count * proto.BUFFER_SIZE.size
    stream, buffers = calls.split(view[end:], bytes(view[_COUNT.size : end]))
    return calls.unpickle(stream, buffers, find)


class Sharing:
    """One scope's shared objects (a joblib ``Parallel`` call's): the latest blob of each,
    so an unchanged object is hashed again but not copied again. Thread-safe."""

    def __init__(self) -> None:
        self._latest: Dict[int, Tuple[bytes, bytes]] = {}  # id(obj) -> (key, blob)
        self._lock = threading.Lock()
        self.keys: List[bytes] = []  # every key it has named: its hosts hold them for it

    def check(self, obj: Any) -> Entry:
        """``obj`` as a call pickled now names it: keyed by its content now."""
        found = pieces(obj)
        key = key_of(found)
        with self._lock:
            latest = self._latest.get(id(obj))
        if latest is None or latest[0] != key:
            latest = (key, b"".join(found))
            with self._lock:
                self._latest[id(obj)] = latest
                self.keys.append(key)
        return obj, latest[0], latest[1]
