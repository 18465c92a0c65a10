"""Ending Futures without ever running user code on the executor's loop thread.

Owns: ``Ender``, which sets a Future's outcome (result, exception, or cancellation
with its waiters notified). A Future with no done-callback (or only sshexec's own,
marked with ``inline``: cheap and never blocking) is ended right where its outcome is
known, with no thread hand-off: ``concurrent.futures.Future`` guards its callbacks
with an ``RLock``, so under it we check that none is registered and set the outcome
(a callback added meanwhile then runs in the thread that adds it). Any other Future is
ended on the executor's callback thread (``sshexec-callbacks-<n>``, started on first
need, ended by ``close``), in the order the outcomes arrived there: a callback that
blocks for a minute delays only the callbacks behind it, never pings, replies or
liveness. ``map``'s items have no callbacks and are always ended in place.
Must not import: asyncio, the pool or anything else of sshexec's.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, Optional, Tuple, TypeVar

log = logging.getLogger("sshexec.callbacks")

RESULT, ERROR, CANCEL = range(3)
INLINE = "_sshexec_inline"  # the mark of sshexec's own done-callbacks
JOIN_WARNING = 30.0  # seconds between warnings while shutdown waits for a callback
_ENDED = ("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED")  # Future's private states

F = TypeVar("F", bound=Callable[..., Any])
_Item = Optional[Tuple[Any, int, Any]]
_running: weakref.WeakSet[Ender] = weakref.WeakSet()  # enders whose thread was started


def inline(fn: F) -> F:
    """Mark a done-callback of sshexec's own as cheap and non-blocking: a Future that
    has only such callbacks is ended on the loop thread (no hand-off)."""
    setattr(fn, INLINE, True)
    return fn


def _is_plain(future: Future[Any]) -> bool:
    """No user callback would run when it ends (call with its ``_condition`` held)."""
    for callback in future._done_callbacks:  # type: ignore[attr-defined]
        if not getattr(callback, INLINE, False):
            return False
    return True


def apply(future: Any, kind: int, value: Any) -> None:
    """Set the outcome, unless the Future has ended already (cancelled by its owner)."""
    try:
        if kind == CANCEL:
            future.cancel()
            if future.cancelled():
                _notify_cancelled(future)
        elif future.done():
            return
        elif kind == RESULT:
            future.set_result(value)
        else:
            future.set_exception(value)
    except InvalidStateError:  # cancelled by its owner meanwhile: it stays cancelled
        pass
    except BaseException:  # user code in a done-callback: whoever runs it must go on
        log.exception("a Future's done-callback raised; the pool goes on")


def _notify_cancelled(future: Any) -> None:
    """Only this wakes ``wait()`` and ``as_completed()`` for a cancelled Future."""
    state = getattr(future, "_state", None)
    if state is None or state == "CANCELLED":  # a map item, or not notified yet
        future.set_running_or_notify_cancel()


def notify_cancelled(future: Any) -> None:
    """A cancelled Future's task leaves the queue: its waiters learn it ended. It runs
    no callback (``cancel()`` ran them, in the thread that cancelled)."""
    if future.cancelled():
        try:
            _notify_cancelled(future)
        except RuntimeError:  # notified already (Future logs that as critical first)
            pass


def join_all() -> None:
    """At interpreter exit: the callbacks every closed executor still has queued run."""
    for ender in list(_running):
        if ender._closed:
            ender.join()


class Ender:
    """Ends the Futures of one executor. ``end`` is called on the loop thread only."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.thread: Optional[threading.Thread] = None
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards starting and closing the thread
        self._closed = False

    def end(self, future: Any, kind: int, value: Any = None) -> None:
        condition = getattr(future, "_condition", None)
        if condition is None:  # a map item: no callbacks at all
            apply(future, kind, value)
            return
        with condition:  # an RLock: the Future's own methods take it again
            if future._state in _ENDED:
                if kind == CANCEL:
                    _notify_cancelled(future)  # cancelled by its owner: callbacks ran then
                return
            if _is_plain(future):
                apply(future, kind, value)  # only our inline callbacks run, here
                return
        self._post((future, kind, value))

    def _post(self, item: _Item) -> None:
        with self._lock:
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._serve, name=f"sshexec-callbacks-{self.name}", daemon=True
                )
                self.thread.start()
                _running.add(self)
            self._queue.put(item)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            apply(*item)
            del item  # no reference to the last Future while blocked on the queue

    def close(self) -> None:
        """No outcome comes any more: the thread ends after the ones queued."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if self.thread is not None:
                    self._queue.put(None)

    def on_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def join(self) -> None:
        """Wait until every queued Future has ended (after ``close``), unless called
        from a callback (it runs on the thread, and the rest wait for it to return)."""
        thread = self.thread
        if thread is None or self.on_thread():
            return
        waited = 0.0
        while thread.is_alive():
            thread.join(JOIN_WARNING)
            if thread.is_alive():
                waited += JOIN_WARNING
                log.warning("shutdown waits for a done-callback that has run for over %g s", waited)
