"""``map``'s results: one small slot per item instead of a Future, yielded in order.

Owns: ``ordered_results`` (the iterator ``map`` returns: input order, the deadline,
``buffersize``'s lazy submission, cancelling what is left when it is closed),
chunking helpers, and ``MapItem``, which offers the part of the ``concurrent.futures.Future``
interface the pool drives (``set_running_or_notify_cancel``, ``set_result``,
``set_exception``, ``cancel``, ``done``, ``running``) and the ``result(timeout)``
``map``'s iterator waits on, with one lock and one condition for the whole ``map``
call. ``map`` never hands its per-item Futures to the caller, and a tiny task's
Future (a Condition, an RLock, a deque and two lists) cost more client CPU than the
rest of the task: creating it, notifying it, and collecting its garbage. Must not
import: asyncio, or any sshexec module.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import sys
import threading
import time
from typing import Any, Callable, Deque, Iterator, List, Optional, Sequence, Tuple, TypeVar

PENDING, RUNNING, CANCELLED, FINISHED = range(4)
T = TypeVar("T")


class MapResults:
    """What the items of one ``map`` call share: the condition their consumer waits on."""

    __slots__ = ("condition", "waiting")

    def __init__(self) -> None:
        self.condition = threading.Condition(threading.Lock())
        self.waiting = 0  # consumers inside result(): only then is notifying worth it


class MapItem:
    """One item's outcome, with the Future-like methods the pool and ``map`` use."""

    __slots__ = ("error", "owner", "state", "task_id", "value")

    def __init__(self, owner: MapResults) -> None:
        self.owner = owner
        self.task_id = 0  # set by the executor when its task is posted
        self.state = PENDING
        self.value: Any = None
        self.error: Optional[BaseException] = None

    def set_running_or_notify_cancel(self) -> bool:
        with self.owner.condition:
            if self.state == CANCELLED:
                return False
            if self.state != PENDING:
                raise cf.InvalidStateError(f"map item already {self._state_name()}")
            self.state = RUNNING
            return True

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._finish(None, error)

    def _finish(self, value: Any, error: Optional[BaseException]) -> None:
        owner = self.owner
        with owner.condition:
            if self.state in (CANCELLED, FINISHED):
                raise cf.InvalidStateError(f"map item already {self._state_name()}")
            self.value, self.error, self.state = value, error, FINISHED
            if owner.waiting:
                owner.condition.notify_all()

    def cancel(self) -> bool:
        owner = self.owner
        with owner.condition:
            if self.state in (RUNNING, FINISHED):
                return False
            if self.state == PENDING:
                self.state = CANCELLED
                if owner.waiting:
                    owner.condition.notify_all()
            return True

    def cancelled(self) -> bool:
        return self.state == CANCELLED

    def running(self) -> bool:
        return self.state == RUNNING

    def done(self) -> bool:
        return self.state in (CANCELLED, FINISHED)

    def result(self, timeout: Optional[float] = None) -> Any:
        owner = self.owner
        with owner.condition:
            if self.state not in (CANCELLED, FINISHED):
                deadline = None if timeout is None else time.monotonic() + timeout
                owner.waiting += 1
                try:
                    while self.state not in (CANCELLED, FINISHED):
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise cf.TimeoutError()
                        owner.condition.wait(left)
                finally:
                    owner.waiting -= 1
            if self.state == CANCELLED:
                raise cf.CancelledError()
            if self.error is not None:
                try:
                    raise self.error
                finally:
                    self = None  # type: ignore[assignment]  # no cycle through the traceback
            return self.value

    def _state_name(self) -> str:
        return ("pending", "running", "cancelled", "finished")[self.state]


def ordered_results(
    submit: Callable[[Tuple[Any, ...]], Optional[MapItem]],
    calls: Iterator[Tuple[Any, ...]],
    deadline: Optional[float],
    buffersize: Optional[int],
    on_loop_thread: Callable[[], bool],
    forget: Callable[[Sequence[MapItem]], None],
    cancelled: Callable[[Sequence[MapItem]], None],
) -> Iterator[Any]:
    """Submit the first ``buffersize`` calls (all without it), then yield results in
    order, submitting one more per result taken. ``submit`` returns None once the
    executor is gone; ``forget`` is told of running items nobody will wait for, and
    ``cancelled`` of the queued ones the iterator cancelled when it was closed early
    (a ``break``, an exception, garbage collection), so they leave the pool at once."""
    window = buffersize if buffersize is not None else sys.maxsize
    items: Deque[MapItem] = collections.deque()
    for args in itertools.islice(calls, window):
        item = submit(args)
        assert item is not None  # the executor is alive while map() runs
        items.append(item)

    def results() -> Iterator[Any]:
        timed_out: List[MapItem] = []
        try:
            while items:
                if buffersize is not None:
                    args = next(calls, None)
                    more = submit(args) if args is not None else None
                    if more is not None:
                        items.append(more)
                if on_loop_thread():
                    raise RuntimeError(
                        "map results cannot be waited for on the executor's loop thread"
                    )
                left = None if deadline is None else deadline - time.monotonic()
                item = items.popleft()
                try:
                    box = [_result_or_cancel(item, left)]
                except cf.TimeoutError:
                    timed_out.append(item)
                    raise
                del item
                yield box.pop()  # no local keeps the result alive while suspended
        finally:
            dropped = [i for i in items if i.state == PENDING and i.cancel()]
            if dropped:
                cancelled(dropped)
            if timed_out:  # shutdown will not wait for the ones already running
                forget([i for i in timed_out + list(items) if not i.done()])

    return results()


def in_chunks(calls: Iterator[Tuple[Any, ...]], size: int) -> Iterator[Tuple[Tuple[Any, ...], ...]]:
    while chunk := tuple(itertools.islice(calls, size)):
        yield chunk


def flatten(chunks: Iterator[List[T]]) -> Iterator[T]:
    for chunk in chunks:
        chunk.reverse()
        while chunk:
            yield chunk.pop()


def _result_or_cancel(item: MapItem, timeout: Optional[float]) -> Any:
    try:
        try:
            return item.result(timeout)
        finally:
            item.cancel()
    finally:
        del item  # drop the reference before the consumer sees the value
