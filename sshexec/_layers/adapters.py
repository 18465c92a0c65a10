"""What the layers over the executor (``sshexec.Pool``, the joblib backend) share.

Owns: ``CallbackThread``, one daemon thread (``sshexec-<role>-<n>``) that runs posted
calls in order. The layers post their Futures' outcomes there from done-callbacks, so
user callbacks, joblib's dispatching (which pickles the next batch) and their locks never
run on, or stall, the executor's loop thread; as in multiprocessing.Pool's result handler,
a slow callback delays the ones behind it, never the pool's I/O. And ``planned_workers``.
Must not import: pool internals, asyncio. Holds no reference to its owner, so a
forgotten owner can be collected and its finalizer can stop the thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

if TYPE_CHECKING:
    from .._executor import SSHPoolExecutor

log = logging.getLogger("sshexec.callbacks")
_ids = itertools.count()
_Item = Optional[Tuple[Callable[..., object], Tuple[Any, ...]]]


class CallbackThread:
    """Runs ``post``-ed calls one at a time, in order, on its own daemon thread.

    A call that raises is logged and the thread goes on. ``stop()`` lets the calls
    posted before it run, then ends the thread. Thread-safe.
    """

    def __init__(self, role: str) -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._stopped = False
        self.thread = threading.Thread(
            target=_serve, args=(self._queue,), name=f"sshexec-{role}-{next(_ids)}", daemon=True
        )
        self.thread.start()

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the thread after every call posted before it."""
        self._queue.put((fn, args))

    def stop(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """End the thread once the calls posted so far have run; with ``wait``, wait for
        that (at most ``timeout`` seconds; never when called from the thread itself)."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
        if wait and not self.on_thread():
            self.thread.join(timeout)
            if self.thread.is_alive():
                log.warning("%s still runs a callback %s s after stop()", self.thread.name, timeout)

    def on_thread(self) -> bool:
        """True when called from this thread (that is, from a posted call)."""
        return threading.current_thread() is self.thread


def _serve(items: queue.SimpleQueue[_Item]) -> None:
    while True:
        item = items.get()
        if item is None:
            return
        fn, args = item
        try:
            fn(*args)
        except BaseException:  # a user callback must not end the thread that runs the others
            log.exception("a callback raised; later callbacks still run")
        del item, fn, args  # drop the references before blocking on the queue again


def planned_workers(executor: SSHPoolExecutor) -> int:
    """How many workers the executor plans in all (those still starting included).

    SSHPoolExecutor has no public property for it yet; like ProcessPoolExecutor it keeps
    ``_max_workers``. Without it, the live workers now."""
    planned = getattr(executor, "_max_workers", None)
    if isinstance(planned, int) and planned > 0:
        return planned
    live = sum(host.workers for host in executor.stats(refresh=0).hosts.values())
    return max(live, 1)
