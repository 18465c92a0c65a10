"""What a worker looks up while it unpickles a call: the agent's blobs, a map's stored
function, shared objects, and, for a client of another Python version, its script.

Owns: ``Lookups``: reading blobs from the agent's store (``blob_dir``: its directories,
an ``os.pathsep`` list; each blob arrived before the first command naming it), keeping
the last few stored functions and shared objects unpickled (shared ones read-only where
they can be, as joblib's memmaps are; one whose blob the agent has since deleted, told
by the client that nothing needs it, is dropped at the next miss or within
``PRUNE_EVERY`` seconds of use),
and ``find_in_script``: the globals of the client's ``__main__`` are the script's,
fetched from the client and run once as ``__mp_main__`` (as ``multiprocessing``'s spawn
does; its ``if __name__ == "__main__":`` part does not run). Shipped to nodes. Must not
import: any client module, asyncio.
"""

from __future__ import annotations

import linecache
import os
import sys
import time
import types
from typing import Any, Callable, Dict, Optional, Tuple

from .._wire import calls, carried, shared
from .._wire import protocol as proto

KEEP = 4  # stored functions (and shared objects) a worker keeps unpickled
PRUNE_EVERY = 1.0  # seconds between checks that kept objects' blobs are still stored
MAIN, SCRIPT = "__main__", "__mp_main__"  # the client's script, and its name here


class Lookups:
    def __init__(
        self, blob_dir: Optional[str], fetch: Callable[[str], Optional[proto.Source]]
    ) -> None:
        self.blob_dir, self.fetch = blob_dir, fetch
        self.find: Optional[Callable[[str, str, calls.FindClass], Any]] = None  # see Init
        self._functions: Dict[bytes, Any] = {}
        self._shared: Dict[bytes, Any] = {}
        self._script: Optional[types.ModuleType] = None
        self.where = "this node"  # named in errors: set from Init (host, hostname, Python)
        self._pruned = 0.0

    def blob(self, key: bytes) -> bytes:
        if self.blob_dir is None:
            raise LookupError("this worker has no agent store to read stored blobs from")
        for folder in self.blob_dir.split(os.pathsep):
            try:
                with open(os.path.join(folder, key.hex()), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                continue
        raise LookupError(
            f"the blob {key.hex()[:16]} is not in the agent's store ({self.blob_dir})"
        )

    def _is_stored(self, key: bytes) -> bool:
        folders = self.blob_dir.split(os.pathsep) if self.blob_dir else []
        return any(os.path.exists(os.path.join(f, key.hex())) for f in folders)

    def _kept(self, cache: Dict[bytes, Any], key: bytes, load: Callable[[], Any]) -> Any:
        """``cache[key]``, loaded when missing; the last ``KEEP`` used stay, and only
        while their blobs are stored (a forgotten one is not held for ever)."""
        if key not in cache or time.monotonic() - self._pruned > PRUNE_EVERY:
            self._pruned = time.monotonic()
            for kept in (self._functions, self._shared):
                for other in [k for k in kept if k != key and not self._is_stored(k)]:
                    del kept[other]
        return _kept(cache, key, load)

    def stored_function(self, key: bytes) -> Any:
        """A map's stored function, unpickled once per worker for all its items."""

        def load() -> Tuple[Any, carried.Carried]:
            outer = carried.take()  # what the call's own pickle carried so far
            try:
                return calls.unpickle(self.blob(key), (), self.find), carried.take()
            finally:
                carried.note(outer)

        function, values = self._kept(self._functions, key, load)
        carried.note(values)  # the globals it read when pickled: for each call again
        return function

    def shared_object(self, key: bytes) -> Any:
        """A shared argument (a training set passed to every call), unpickled once."""

        def load() -> Any:
            obj = shared.load(self.blob(key), self.find)
            setflags = getattr(obj, "setflags", None)
            if setflags is not None:
                try:
                    setflags(write=False)
                except (TypeError, ValueError):
                    pass
            return obj

        return self._kept(self._shared, key, load)

    def find_in_script(self, module: str, name: str, find: calls.FindClass) -> Any:
        if module not in (MAIN, SCRIPT):
            return find(module, name)
        found: Any = self.script()
        for part in name.split("."):
            found = getattr(found, part)
        return found

    def script(self) -> types.ModuleType:
        """The client's main script, standing in for ``__main__``."""
        if self._script is None:
            reply = self.fetch(MAIN)
            if reply is None or reply.kind != "source":
                detail = reply.detail if reply is not None else "the client did not answer"
                raise ImportError(
                    f"the client's __main__ script, which this call needs on {self.where}, "
                    f"cannot run there: {detail}"
                )
            import multiprocessing  # noqa: F401  (its import points __mp_main__ at __main__)

            module = types.ModuleType(SCRIPT)
            module.__file__ = reply.origin
            lines = reply.code.splitlines(keepends=True)
            linecache.cache[reply.origin] = (len(reply.code), None, lines, reply.origin)
            sys.modules[SCRIPT] = module
            try:
                exec(compile(reply.code, reply.origin, "exec"), module.__dict__)
            except BaseException:
                del sys.modules[SCRIPT]
                raise
            sys.modules[MAIN] = sys.modules[SCRIPT] = module  # as multiprocessing's spawn
            self._script = module
        return self._script


def _kept(cache: Dict[bytes, Any], key: bytes, load: Callable[[], Any]) -> Any:
    """``cache[key]``, loaded when missing; the last ``KEEP`` used stay."""
    value = cache.pop(key) if key in cache else load()
    cache[key] = value  # most recent last
    while len(cache) > KEEP:
        cache.pop(next(iter(cache)))
    return value
