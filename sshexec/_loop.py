"""The executor's loop thread and the hooks that shut forgotten executors down.

Owns: one daemon thread per executor running its asyncio loop (``sshexec-loop-<n>``),
its ``Ender`` (whose ``sshexec-callbacks-<n>`` thread runs the Futures' done-callbacks:
closed when the loop ends, joined by ``shutdown(wait=True)``), the shutdown sequence
run on it, and the interpreter-exit hook over every live loop. Holds no reference to an executor. Must not import: asyncssh, or know
about transports, frames or tasks beyond handing them to the pool (``post``) and
the pool's ``aclose``.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set, TypeVar

from ._ending import Ender, join_all
from ._logs import logger

if TYPE_CHECKING:
    from ._pool.pool import Pool
    from ._tasks import Task

log = logger("sshexec.executor")

_loop_ids = itertools.count()
_live: Set[Runtime] = set()  # runtimes whose loop thread still runs; drained at exit
_exiting = False  # the interpreter is shutting down: no new work

T = TypeVar("T")


async def on_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` as a coroutine: for ``Runtime.call``, to run it on the loop thread."""
    return fn(*args)


def is_exiting() -> bool:
    return _exiting


class Runtime:
    """The loop thread and its pool. Holds no reference to the executor, so a
    forgotten executor can be collected and its finalizer can shut this down."""

    def __init__(self, grace: float) -> None:
        self.grace = grace  # how long running tasks get when a shutdown must be bounded
        self.loop = asyncio.new_event_loop()
        number = next(_loop_ids)
        self.thread = threading.Thread(target=self._run, name=f"sshexec-loop-{number}", daemon=True)
        self.ender = Ender(str(number))  # ends Futures that have callbacks, on its own thread
        self.pool: Optional[Pool] = None
        self.closing: Optional[Future[None]] = None
        self.lock = threading.Lock()  # the only lock: guards the flags below
        self.is_shut_down = False
        self._posted: List[Task] = []  # submitted, not yet handed to the pool (under lock)
        self._cancelled: List[int] = []  # ids of queued tasks whose Futures were cancelled
        self._delivery_due = False  # a _deliver call is scheduled (under lock)
        self.thread.start()
        _live.add(self)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            while True:
                try:
                    self.loop.run_forever()
                    break  # stopped by _close or abandon
                except BaseException:  # SystemExit in a done-callback (user code): keep serving
                    log.exception(
                        "an exception escaped the executor's event loop; it keeps running"
                    )
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.wait(pending, timeout=2.0))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                with self.lock:  # others check is_closed() under it before scheduling
                    self.loop.close()
                self.ender.close()  # no outcome comes any more
                _live.discard(self)

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def post(self, task: Task) -> None:
        """Hand a task to the pool; call with ``lock`` held. Tasks posted before the loop
        thread gets to them travel together: one loop wake-up per batch, not per task."""
        self._posted.append(task)
        self._deliver_soon()

    def cancel(self, task_ids: List[int]) -> None:
        """Any thread: these tasks' Futures were cancelled while queued; the pool drops
        them (in order after every task posted before)."""
        with self.lock:
            if self.loop.is_closed() or self.pool is None:
                return
            self._cancelled.extend(task_ids)
            self._deliver_soon()

    def _deliver_soon(self) -> None:
        if not self._delivery_due:
            self._delivery_due = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            tasks, self._posted = self._posted, []
            cancelled, self._cancelled = self._cancelled, []
            self._delivery_due = False
        assert self.pool is not None
        if tasks:
            self.pool.enqueue_many(tasks)
        if cancelled:
            self.pool.cancel(cancelled)

    def call(self, coro: Any, timeout: Optional[float]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def begin(self, coro: Any) -> Any:
        """Run ``coro`` on the loop: its ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def shutdown(
        self, wait: bool = True, cancel_futures: bool = False, bounded: bool = False
    ) -> None:
        """Close the pool on the loop thread. ``bounded`` (implied by ``cancel_futures``):
        running tasks get ``grace`` seconds, then their workers are killed. Ctrl-C while
        waiting kills them at once."""
        bounded = bounded or cancel_futures
        with self.lock:
            first = not self.is_shut_down
            self.is_shut_down = True
            closed = self.loop.is_closed()
            if closed:
                pass  # the pool is closed: only the callbacks may still be running
            elif first:
                grace = self.grace if bounded else None
                self.closing = asyncio.run_coroutine_threadsafe(
                    self._close(cancel_futures, grace), self.loop
                )
            else:
                if cancel_futures and self.pool is not None:
                    self.loop.call_soon_threadsafe(self.pool.cancel_queued)
                if bounded:
                    self.loop.call_soon_threadsafe(self._kill_later)
        if closed:
            if wait:
                self.ender.join()
            return
        if wait and self.closing is not None and self.thread.is_alive():
            if self.on_loop_thread():
                raise RuntimeError(
                    "shutdown(wait=True) called from the executor's own loop thread (a Future "
                    "callback?): it would wait for itself; use shutdown(wait=False) there"
                )
            try:
                self.closing.result()
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting for running tasks
                self.terminate()
                raise
            self.thread.join(10.0)
            # every Future has ended once the callbacks queued before it have run; from a
            # callback itself, the ones behind it run when it returns
            self.ender.join()

    def terminate(self) -> None:
        """Kill every worker now; running tasks fail, queued ones are cancelled."""
        with self.lock:
            if self.pool is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.pool.terminate)

    def forget(self, futures: Any) -> None:
        """Running tasks nobody will wait for (a timed-out map): shutdown kills them."""
        with self.lock:
            if self.pool is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.pool.abandon, futures)

    def _kill_later(self) -> None:
        if self.pool is not None:
            self.loop.call_later(self.grace, self.pool.terminate)

    async def _close(self, cancel_futures: bool, grace: Optional[float]) -> None:
        try:
            if self.pool is not None:
                await self.pool.aclose(cancel_futures, grace)
        except Exception:  # still stop the loop; say why the close was not clean
            log.exception("error while shutting down the pool")
        finally:
            self.loop.call_soon(self.loop.stop)

    def abandon(self) -> None:
        """The constructor failed: stop the loop and thread at once."""
        with self.lock:
            self.is_shut_down = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.ender.close()


def _shutdown_at_exit() -> None:
    # As ProcessPoolExecutor: pending work finishes, then workers stop on every host, and
    # submit() refuses new work from here on.
    global _exiting
    _exiting = True
    for runtime in list(_live):
        try:
            runtime.shutdown(wait=True)
        except Exception:  # keep shutting the others down
            log.exception("error shutting down an executor at exit")
    join_all()  # the callbacks of executors shut down earlier without waiting


def _forget_in_child() -> None:
    # A forked child has no loop threads: its copies of the parent's pools are not its own
    # to shut down (and waiting on them would hang its exit forever).
    for runtime in list(_live):
        runtime.is_shut_down = True
    _live.clear()


# Like concurrent.futures: before non-daemon threads are joined and before atexit hooks,
# so a hook registered later cannot submit to a pool that is going away.
getattr(threading, "_register_atexit", atexit.register)(_shutdown_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
