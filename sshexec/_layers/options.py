"""``SSHPoolExecutor.options()`` views, and task limits as users write them.

Owns: ``task_limits`` (a time limit in seconds and a memory limit in bytes or ``"500M"``
/ ``"2G"``, checked, as the ``(seconds, bytes)`` pair a task carries, or None for no
limit) and ``Options``, a view of an executor whose ``submit`` and ``map`` give their
tasks other limits (the same pool, workers and Futures; nothing is started for it).
Must not import: pool internals; only the executor's own API.
"""

from __future__ import annotations

import re
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Tuple, TypeVar, Union

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from .._executor import SSHPoolExecutor

    P = ParamSpec("P")

T = TypeVar("T")
Limits = Optional[Tuple[float, int]]  # (seconds, bytes), 0 for none; None: no limit at all
Memory = Union[int, str, None]

KEEP: Any = object()  # options(): this limit as the executor's
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MEMORY = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)


def parse_memory(memory: Memory) -> int:
    """Bytes from ``memory``: an int, or a number with K, M, G or T (powers of 1024; a
    trailing "B" or "iB" allowed: "500M", "2G", "1.5GiB"). 0 for None."""
    if memory is None:
        return 0
    if isinstance(memory, bool):
        raise TypeError("memory must be bytes (an int) or a size like '500M', not a bool")
    if isinstance(memory, int):
        value = memory
    elif isinstance(memory, str):
        match = _MEMORY.fullmatch(memory)
        if match is None:
            raise ValueError(f"memory {memory!r} is not a size like 500M, 2G or 1048576")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise TypeError(f"memory must be bytes (an int) or a size like '500M', not {memory!r}")
    if value <= 0:
        raise ValueError(f"memory must be > 0, got {memory!r}")
    return value


def task_limits(timeout: Optional[float], memory: Memory) -> Limits:
    """The pair a task carries, checked; None when neither limit is set."""
    seconds = 0.0
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be seconds (a number) or None, not {timeout!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        seconds = float(timeout)
    size = parse_memory(memory)
    return (seconds, size) if seconds or size else None


def derive(base: Limits, timeout: Any, memory: Any) -> Limits:
    """``base`` with what ``options()`` was given (``KEEP``: that one as it was)."""
    seconds, size = base if base is not None else (0.0, 0)
    if timeout is not KEEP:
        seconds = task_limits(timeout, None)[0] if timeout is not None else 0.0  # type: ignore[index]
    if memory is not KEEP:
        size = parse_memory(memory)
    return (seconds, size) if seconds or size else None


class Options:
    """A view of an ``SSHPoolExecutor`` whose ``submit`` and ``map`` apply other task
    limits; everything else is the executor's. Thread-safe as the executor is."""

    def __init__(self, executor: SSHPoolExecutor, limits: Limits) -> None:
        self._executor, self._limits = executor, limits

    @property
    def limits(self) -> Limits:
        """(seconds, bytes) this view gives its tasks (0: no such limit), or None."""
        return self._limits

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """``SSHPoolExecutor.submit`` with this view's limits."""
        future: Future[T] = self._executor._submitter.submit(
            fn, args, kwargs, None, limits=self._limits
        )
        return future

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
        buffersize: Optional[int] = None,
    ) -> Iterator[T]:
        """``SSHPoolExecutor.map`` with this view's limits, for each item (a chunk of n
        items, with ``chunksize``, gets n times the time limit)."""
        return self._executor._submitter.map(
            fn, iterables, timeout, chunksize, buffersize, self._limits
        )

    def options(self, *, timeout: Any = KEEP, memory: Any = KEEP) -> Options:
        """Another view: these limits instead of this view's (None: no such limit)."""
        return Options(self._executor, derive(self._limits, timeout, memory))

    def kill(self, future: Future[Any]) -> bool:
        """``SSHPoolExecutor.kill``."""
        return self._executor.kill(future)

    def __getattr__(self, name: str) -> Any:  # stats(), shutdown(), ...: the executor's
        return getattr(self._executor, name)

    def __repr__(self) -> str:
        return f"<options {self._limits} of {self._executor!r}>"
