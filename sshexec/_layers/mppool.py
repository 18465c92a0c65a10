"""``sshexec.Pool``: multiprocessing.Pool's API over an ``SSHPoolExecutor``.

Owns: the facade: multiprocessing's argument checks and messages, and turning ``map``,
``imap`` and ``apply`` calls into ``Job``s of executor tasks (chunks, ``chunksize=None``'s
formula, ``buffersize``). What runs them, the state and the threads, is ``_mpstate``'s;
results and iterators are ``_mpresults``'.
Must not import: pool internals (only the public executor).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
)

import cloudpickle

from .._executor import SSHPoolExecutor
from . import byvalue
from .adapters import planned_workers
from .mpresults import AsyncResult, IMapIterator, IMapUnorderedIterator, MapResult, Throttle
from .mpstate import RUN, Job, PoolState, Task

if TYPE_CHECKING:
    from .._hosts import HostsArg

T = TypeVar("T")
cloudpickle.register_pickle_by_value(byvalue)  # the chunk runners travel; nodes lack sshexec


def _chunks(items: Iterable[Any], size: int) -> Iterator[Tuple[Any, ...]]:
    it = iter(items)
    while True:
        chunk = tuple(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


def _throttle(buffersize: Optional[int]) -> Optional[Throttle]:
    if buffersize is None:
        return None
    if not isinstance(buffersize, int) or isinstance(buffersize, bool):
        raise TypeError("buffersize must be an integer or None")
    if buffersize < 1:
        raise ValueError("buffersize must be None or > 0")
    return Throttle(buffersize)


class Pool:
    """``multiprocessing.Pool`` whose worker processes run on other machines over SSH
    (local subprocesses when no hosts are given), on an ``SSHPoolExecutor``.

    Methods, results and exceptions are multiprocessing's; the README lists where they
    differ (a dead worker fails its task instead of hanging the pool; ``terminate()``
    fails unfinished results with ``CancelledError``; callbacks that raise are logged).
    Callbacks run on one results thread, in completion order, before ``get()`` returns.
    All methods are thread-safe.

    Args:
        processes: Worker processes in all; None: one per usable core of each host.
        initializer: Called as ``initializer(*initargs)`` in each worker before its first
            task; what it sets in module globals stays visible to later tasks there.
        initargs: Arguments for ``initializer``.
        maxtasksperchild: Replace each worker after this many tasks.
        context: Accepted for compatibility with multiprocessing; ignored.
        hosts: As ``SSHPoolExecutor``'s (None: ``SSHEXEC_HOSTS``, else local workers).
        **options: Any other keyword option of ``SSHPoolExecutor`` (``python``,
            ``known_hosts``, ``ssh_options``, ``max_retries``, ...).

    Raises:
        ValueError, TypeError: As multiprocessing.Pool for its own arguments; as
            ``SSHPoolExecutor`` for the executor options.
        WorkerStartupError, BrokenPool: No host can start a worker.
    """

    __module__ = "sshexec"

    def __init__(
        self,
        processes: Optional[int] = None,
        initializer: Optional[Callable[..., object]] = None,
        initargs: Sequence[Any] = (),
        maxtasksperchild: Optional[int] = None,
        context: Any = None,
        *,
        hosts: Optional[HostsArg] = None,
        **options: Any,
    ) -> None:
        del context  # processes are started by SSH or subprocess, not multiprocessing
        if processes is not None and processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        executor = SSHPoolExecutor(
            processes,
            initializer=initializer,
            initargs=tuple(initargs),
            max_tasks_per_child=maxtasksperchild,
            hosts=hosts,
            **options,
        )
        self._processes = planned_workers(executor)
        self._state = PoolState(executor)
        weakref.finalize(self, self._state.abandon)

    def __repr__(self) -> str:
        return f"<sshexec.Pool state={self._state.state} pool_size={self._processes}>"

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def __del__(self) -> None:
        shared = self.__dict__.get("_state")
        if shared is not None and shared.state == RUN:
            warnings.warn(
                f"unclosed running sshexec.Pool {self!r}",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        """As multiprocessing's: ``terminate()``."""
        self.terminate()

    def _check_running(self) -> None:
        if self._state.state != RUN:
            raise ValueError("Pool not running")

    # -- one call

    def apply(
        self, func: Callable[..., T], args: Sequence[Any] = (), kwds: Mapping[str, Any] = {}
    ) -> T:
        """``func(*args, **kwds)`` on a worker; waits for and returns its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Sequence[Any] = (),
        kwds: Mapping[str, Any] = {},
        callback: Optional[Callable[[T], object]] = None,
        error_callback: Optional[Callable[[BaseException], object]] = None,
    ) -> AsyncResult[T]:
        """Run ``func(*args, **kwds)`` on a worker.

        Returns:
            An ``AsyncResult``. ``callback(value)`` or ``error_callback(exception)`` runs
            on the results thread before it becomes ready.

        Raises:
            ValueError: The pool is closed or terminated.
        """
        self._check_running()
        result: AsyncResult[T] = AsyncResult(self._state.forget, callback, error_callback)
        self._state.add(Job(iter([(func, tuple(args), dict(kwds))]), result, None, None))
        return result

    # -- map and starmap

    def map(
        self, func: Callable[[Any], T], iterable: Iterable[Any], chunksize: Optional[int] = None
    ) -> List[T]:
        """``[func(x) for x in iterable]`` over the workers, in input order, sent in chunks
        (``chunksize=None``: about four per worker, multiprocessing's formula)."""
        return self._map_async(func, iterable, byvalue.map_chunk, chunksize).get()

    def map_async(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: Optional[int] = None,
        callback: Optional[Callable[[List[T]], object]] = None,
        error_callback: Optional[Callable[[BaseException], object]] = None,
    ) -> MapResult[T]:
        """As ``map``, returning a ``MapResult``; ``callback`` gets the whole list."""
        return self._map_async(
            func, iterable, byvalue.map_chunk, chunksize, callback, error_callback
        )

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: Optional[int] = None,
    ) -> List[T]:
        """As ``map``, with each item unpacked as the arguments: ``func(*args)``."""
        return self._map_async(func, iterable, byvalue.starmap_chunk, chunksize).get()

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: Optional[int] = None,
        callback: Optional[Callable[[List[T]], object]] = None,
        error_callback: Optional[Callable[[BaseException], object]] = None,
    ) -> MapResult[T]:
        """As ``starmap``, returning a ``MapResult``."""
        return self._map_async(
            func, iterable, byvalue.starmap_chunk, chunksize, callback, error_callback
        )

    def _map_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Any],
        runner: Callable[..., List[Any]],
        chunksize: Optional[int] = None,
        callback: Optional[Callable[[List[T]], object]] = None,
        error_callback: Optional[Callable[[BaseException], object]] = None,
    ) -> MapResult[T]:
        self._check_running()
        items: Sequence[Any] = iterable if hasattr(iterable, "__len__") else list(iterable)  # type: ignore[assignment]
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        elif chunksize < 1 and len(items):
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        if len(items) == 0:
            chunksize = 0
        result: MapResult[T] = MapResult(
            self._state.forget, chunksize, len(items), callback, error_callback
        )
        if chunksize > 0:
            tasks: Iterator[Task] = (
                (runner, (func, chunk), {}) for chunk in _chunks(items, chunksize)
            )
            self._state.add(Job(tasks, result, None, None))
        return result

    # -- lazy iterators

    def imap(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int = 1,
        buffersize: Optional[int] = None,
    ) -> IMapIterator[T]:
        """A lazier ``map``: results in input order as they are ready, ``next(timeout)``.

        Args:
            chunksize: Items per task.
            buffersize: At most this many tasks submitted whose results have not been
                taken yet, so a huge or endless iterable is read as results are consumed
                (Executor.map's ``buffersize``; newer CPython Pools have it too).
        """
        return self._imap(IMapIterator, func, iterable, chunksize, buffersize, "{0:n}")

    def imap_unordered(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int = 1,
        buffersize: Optional[int] = None,
    ) -> IMapIterator[T]:
        """As ``imap``, with results in the order they complete (a chunk's items together)."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, buffersize, "{0!r}")

    def _imap(
        self,
        kind: Type[IMapIterator[T]],
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int,
        buffersize: Optional[int],
        form: str,
    ) -> IMapIterator[T]:
        self._check_running()
        if chunksize != 1 and chunksize < 1:
            raise ValueError(("Chunksize must be 1+, not " + form).format(chunksize))
        throttle = _throttle(buffersize)
        result = kind(self._state.forget, throttle, chunked=chunksize != 1)
        if chunksize == 1:
            tasks = _one_per_item(func, iterable)
        else:
            tasks = _chunk_tasks(func, iterable, chunksize)
        self._state.add(Job(tasks, result, result._set_length, throttle))
        return result

    # -- ending

    def close(self) -> None:
        """No more tasks; those given so far finish, then the workers exit (see ``join``)."""
        self._state.close()

    def terminate(self) -> None:
        """Stop now: kill every worker on every host. Results not finished fail with
        ``concurrent.futures.CancelledError`` (multiprocessing leaves them pending)."""
        self._state.terminate()

    def join(self) -> None:
        """Wait for the tasks to finish and the workers to exit, after ``close()`` or
        ``terminate()``.

        Raises:
            ValueError: The pool is still running.
        """
        self._state.join()


def _one_per_item(func: Callable[[Any], Any], iterable: Iterable[Any]) -> Iterator[Task]:
    for item in iterable:  # a generator, so iter(iterable) fails on the tasks thread, as there
        yield func, (item,), {}


def _chunk_tasks(func: Callable[[Any], Any], iterable: Iterable[Any], size: int) -> Iterator[Task]:
    for chunk in _chunks(iterable, size):
        yield byvalue.map_chunk, (func, chunk), {}
