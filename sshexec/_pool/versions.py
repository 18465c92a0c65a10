"""Which Python each host runs, and what a worker of another version can be given.

A node may run any Python 3.9 or newer. A worker of the client's minor version runs
everything; one of another version runs what can travel between versions (functions
and classes by reference: importable on the node, forwarded as source, or defined in
the client's ``__main__`` script, which the node then runs as ``__mp_main__``), and a
task that carries code by value (a lambda, a closure, a nested function, a notebook
cell) is *bound*: only a worker of the client's version may run it.

Owns: ``same_python``, ``Starts`` (each side's ``Init`` and stored initializer), and
the ``PythonVersionError`` for a bound task no host can run. Must not import: asyncio,
or the pool.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Dict, Iterable, Optional, Tuple

from .._errors import PythonVersionError
from .._wire import calls
from .._wire import protocol as proto

if TYPE_CHECKING:
    from .._tasks import Task

CLIENT: str = "%d.%d.%d" % sys.version_info[:3]


def minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def same_python(version: str) -> bool:
    """A node Python of the client's minor version (byte code and code objects alike)."""
    return minor(version) == minor(CLIENT)


Blob = Tuple[bytes, bytes]  # key, data: stored once per host


class Starts:
    """The ``Init`` a new worker gets, and the initializer blob to store first, for a
    worker of the client's Python and for one of another version (None there when the
    initializer exists only as code)."""

    def __init__(
        self, init: proto.Init, initializer: bytes, other_initializer: Optional[bytes]
    ) -> None:
        self._sides: Dict[bool, Optional[Tuple[proto.Init, Optional[Blob]]]] = {
            True: _side(init, initializer),
            False: None if other_initializer is None else _side(init, other_initializer),
        }
        self.max_frame = init.max_frame
        self.forward_modules = init.forward_modules  # the client answers Fetch only if set
        # the initializers' blobs: kept on every host for the pool's life
        self.blob_keys = {side[1][0] for side in self._sides.values() if side and side[1]}

    def for_python(self, version: str) -> Optional[Tuple[proto.Init, Optional[Blob]]]:
        return self._sides[same_python(version)]


def _side(init: proto.Init, initializer: bytes) -> Tuple[proto.Init, Optional[Blob]]:
    ref = calls.stored_ref(initializer) if initializer else None
    if ref is None:
        return dataclasses.replace(init, initializer=initializer, python=CLIENT), None
    return dataclasses.replace(init, initializer=ref[0], python=CLIENT), (ref[1], initializer)


def bound_error(task: Task, hosts: Iterable[Tuple[str, Optional[str]]]) -> PythonVersionError:
    """``task`` carries code only the client's Python can load, and no host runs it."""
    seen = ", ".join(f"{name}: {version or 'not connected'}" for name, version in hosts)
    return PythonVersionError(
        f"task {task.task_id}: {task.bound} exists only as code (a lambda, a closure, a "
        f"nested function, a notebook cell or a function made by exec), which only Python "
        f"{minor(CLIENT)}, this client's, can load, and no host runs {minor(CLIENT)} "
        f"({seen}). Define it at module level (in your script or a module), or give a host "
        f"python='/path/to/python{minor(CLIENT)}'."
    )


def describe(fn: object) -> str:
    """``name (file:line)`` of a callable, for the error above."""
    target = fn
    for _ in range(4):  # partials and bound methods
        target = getattr(target, "func", None) or getattr(target, "__func__", None) or target
    code = getattr(target, "__code__", None)
    name = getattr(target, "__qualname__", None) or repr(target)
    if code is None:
        return name
    return f"{name} ({code.co_filename}:{code.co_firstlineno})"
