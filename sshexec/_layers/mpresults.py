"""What ``sshexec.Pool``'s asynchronous calls return: ``AsyncResult``, ``MapResult`` and
the ``imap`` iterators, with multiprocessing.pool's semantics.

Owns: each result's state, set only from the pool's results thread (``_set``,
``_set_length``, ``_cancel``); callbacks run there before the result becomes ready, as
in multiprocessing; and ``Throttle``, the bound on ``imap``'s ``buffersize``.
Must not import: the executor or the pool; a result holds no reference to its pool.
"""

from __future__ import annotations

import collections
import logging
import threading
from multiprocessing import TimeoutError as MPTimeoutError
from typing import Any, Callable, Deque, Dict, Generic, List, Optional, Tuple, TypeVar

T = TypeVar("T")
Outcome = Tuple[bool, Any]  # (True, value) or (False, exception), as multiprocessing's
log = logging.getLogger("sshexec.callbacks")


def _run_callback(callback: Optional[Callable[[Any], object]], value: Any) -> None:
    if callback is None:
        return
    try:
        callback(value)
    except Exception:  # multiprocessing's result thread dies here and the pool hangs; ours goes on
        log.exception("a Pool callback raised; the result is still set")


class Throttle:
    """At most ``size`` tasks submitted and not yet taken by the consumer (``buffersize``).
    A full throttle parks its job instead of blocking the tasks thread; ``open()`` lifts
    the bound for good (close and terminate must not wait on a consumer)."""

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._free = size
        self._open = False
        self._parked: Optional[Tuple[Callable[[Any], None], Any]] = None

    def acquire(self, resume: Callable[[Any], None], job: Any) -> bool:
        """Take a slot; when none is free, keep ``resume(job)`` for the next release."""
        with self._lock:
            if self._free > 0 or self._open:
                self._free -= 1
                return True
            self._parked = (resume, job)
            return False

    def release(self) -> None:
        with self._lock:
            self._free += 1
            parked, self._parked = self._parked, None
        if parked is not None:
            parked[0](parked[1])

    def open(self) -> None:
        with self._lock:
            self._open = True
            parked, self._parked = self._parked, None
        if parked is not None:
            parked[0](parked[1])


class AsyncResult(Generic[T]):
    """The result of ``Pool.apply_async`` (and, as ``MapResult``, of ``map_async``), as
    ``multiprocessing.pool.AsyncResult``. Thread-safe."""

    def __init__(
        self,
        forget: Callable[[Any], None],
        callback: Optional[Callable[[Any], object]] = None,
        error_callback: Optional[Callable[[BaseException], object]] = None,
    ) -> None:
        self._event = threading.Event()
        self._forget = forget  # removes this result from the pool's outstanding set
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        """True once the call has completed (returned, raised or was cancelled)."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call returned without raising.

        Raises:
            ValueError: The result is not ready yet.
        """
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait until the result is ready, or ``timeout`` seconds."""
        self._event.wait(timeout)

    def get(self, timeout: Optional[float] = None) -> T:
        """The call's return value, or raise its exception.

        Raises:
            multiprocessing.TimeoutError: Not ready within ``timeout`` seconds.
            concurrent.futures.CancelledError: ``terminate()`` stopped the call first.
        """
        self.wait(timeout)
        if not self.ready():
            raise MPTimeoutError
        if self._success:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def _finish(self, success: bool, value: Any, run_callbacks: bool = True) -> None:
        self._success, self._value = success, value
        if run_callbacks:
            _run_callback(self._callback if success else self._error_callback, value)
        self._event.set()
        self._forget(self)

    def _set(self, index: int, outcome: Outcome) -> None:
        if not self.ready():
            self._finish(*outcome)

    def _cancel(self, error: BaseException) -> None:
        """``terminate()``: an unfinished call fails with ``error``; no callback runs (in
        multiprocessing none ever would: the result stays pending forever)."""
        if not self.ready():
            self._finish(False, error, run_callbacks=False)


class MapResult(AsyncResult[List[T]]):
    """The result of ``map_async``/``starmap_async``: ready once every chunk has ended; the
    first exception to arrive is the one ``get()`` raises, as in multiprocessing."""

    def __init__(
        self,
        forget: Callable[[Any], None],
        chunksize: int,
        length: int,
        callback: Optional[Callable[[Any], object]] = None,
        error_callback: Optional[Callable[[BaseException], object]] = None,
    ) -> None:
        super().__init__(forget, callback, error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._error: Optional[BaseException] = None
        self._left = 0 if chunksize <= 0 else length // chunksize + bool(length % chunksize)
        if self._left == 0:
            self._event.set()
            forget(self)

    def _set(self, index: int, outcome: Outcome) -> None:
        if self.ready():
            return
        success, value = outcome
        self._left -= 1
        if success:
            self._value[index * self._chunksize : (index + 1) * self._chunksize] = value
        elif self._error is None:
            self._error = value
        if self._left == 0:
            if self._error is None:
                self._finish(True, self._value)
            else:
                self._finish(False, self._error)


class IMapIterator(Generic[T]):
    """What ``imap`` returns: results in input order; ``next(timeout)`` as in
    multiprocessing. With a ``chunksize`` above 1 each task's chunk is handed out item by
    item, ``next(timeout)`` included, and, as multiprocessing's generator there, iteration
    ends after a chunk's exception. Thread-safe."""

    def __init__(
        self,
        forget: Callable[[Any], None],
        throttle: Optional[Throttle] = None,
        chunked: bool = False,
    ) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._forget = forget
        self._throttle = throttle
        self._chunked = chunked  # each outcome is a list of results
        self._chunk: Deque[Any] = collections.deque()  # what is left of the current one
        self._ended = False  # chunked: a chunk failed; like multiprocessing's generator, done
        self._items: Deque[Outcome] = collections.deque()
        self._index = 0  # outcomes moved to _items so far
        self._length: Optional[int] = None  # tasks in all, once the input is exhausted
        self._unsorted: Dict[int, Outcome] = {}

    def __iter__(self) -> IMapIterator[T]:
        return self

    def next(self, timeout: Optional[float] = None) -> T:
        """The next result, or raise its exception.

        Raises:
            StopIteration: Every result has been returned.
            multiprocessing.TimeoutError: None is ready within ``timeout`` seconds.
        """
        while True:
            with self._cond:
                if self._ended:
                    raise StopIteration
                if self._chunk:
                    return self._chunk.popleft()  # type: ignore[no-any-return]
                if not self._items and self._index != self._length:
                    self._cond.wait_for(lambda: self._items or self._index == self._length, timeout)
                if not self._items:
                    if self._index == self._length:
                        raise StopIteration
                    raise MPTimeoutError
                success, value = self._items.popleft()
                if self._chunked:
                    if success:
                        self._chunk.extend(value)
                    else:
                        self._ended = True
            if self._throttle is not None:
                self._throttle.release()
            if not success:
                raise value
            if not self._chunked:
                return value  # type: ignore[no-any-return]

    __next__ = next

    def _append(self, outcome: Outcome) -> None:
        self._items.append(outcome)
        self._index += 1

    def _set(self, index: int, outcome: Outcome) -> None:
        with self._cond:
            if self._is_over():
                return  # cancelled by terminate()
            if index != self._index:
                self._unsorted[index] = outcome
                return
            self._append(outcome)
            while self._index in self._unsorted:
                self._append(self._unsorted.pop(self._index))
            self._cond.notify_all()
            self._check_done()

    def _set_length(self, length: int) -> None:
        with self._cond:
            if self._length is None:
                self._length = length
                self._cond.notify_all()
                self._check_done()

    def _is_over(self) -> bool:
        return self._length is not None and self._index >= self._length

    def _check_done(self) -> None:
        if self._index == self._length:
            self._forget(self)

    def _cancel(self, error: BaseException) -> None:
        """``terminate()``: the results already in are returned, then ``error`` is raised
        once in place of the rest, and iteration ends."""
        with self._cond:
            if self._is_over():
                return
            self._unsorted.clear()
            self._append((False, error))
            self._length = self._index
            self._cond.notify_all()
            self._forget(self)


class IMapUnorderedIterator(IMapIterator[T]):
    """What ``imap_unordered`` returns: results in the order they complete."""

    def _set(self, index: int, outcome: Outcome) -> None:
        with self._cond:
            if self._is_over():
                return  # cancelled by terminate()
            self._append(outcome)
            self._cond.notify_all()
            self._check_done()
