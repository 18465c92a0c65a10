"""Where ``map``'s items land: one small slot per item instead of a Future per item.

Owns: ``MapItem``, which offers the part of the ``concurrent.futures.Future``
interface the pool drives (``set_running_or_notify_cancel``, ``set_result``,
``set_exception``, ``cancel``, ``done``, ``running``) and the ``result(timeout)``
``map``'s iterator waits on, with one lock and one condition for the whole ``map``
call. ``map`` never hands its per-item Futures to the caller, and a tiny task's
Future (a Condition, an RLock, a deque and two lists) cost more client CPU than the
rest of the task: creating it, notifying it, and collecting its garbage. Must not
import: asyncio, or any sshexec module.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any, Optional

PENDING, RUNNING, CANCELLED, FINISHED = range(4)


class MapResults:
    """What the items of one ``map`` call share: the condition their consumer waits on."""

    __slots__ = ("condition", "waiting")

    def __init__(self) -> None:
        self.condition = threading.Condition(threading.Lock())
        self.waiting = 0  # consumers inside result(): only then is notifying worth it


class MapItem:
    """One item's outcome, with the Future-like methods the pool and ``map`` use."""

    __slots__ = ("error", "owner", "state", "value")

    def __init__(self, owner: MapResults) -> None:
        self.owner = owner
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
