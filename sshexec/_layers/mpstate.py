"""``PoolState``: what ``sshexec.Pool`` is under its facade: state, tasks thread,
results thread.

Owns: the pool's state (``RUN``/``CLOSE``/``TERMINATE``) and outstanding results; the
tasks thread that submits each ``Job``'s tasks in call order (lazily, bounded by a
``Throttle``); the results thread (``_adapters.CallbackThread``) that turns each Future
into a multiprocessing outcome and sets it; close, terminate, join.

Data flow: ``Pool`` method -> ``Job`` -> tasks thread -> executor.submit -> Future done
(loop thread) -> results thread: ``result._set`` (callback, then ready).
Must not import: pool internals (only the public executor); never references the
``Pool`` object, so a forgotten pool can be collected.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
from concurrent.futures import CancelledError, Future
from concurrent.futures.process import _RemoteTraceback
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

from .._ending import inline
from .._errors import WorkerLostError
from .adapters import CallbackThread
from .mpresults import Throttle

if TYPE_CHECKING:
    from .._executor import SSHPoolExecutor

log = logging.getLogger("sshexec.callbacks")

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
_ids = itertools.count()
Task = Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]


class Job:
    """One Pool call's tasks; task i's outcome goes to ``result._set(i, ...)``."""

    def __init__(
        self,
        tasks: Iterator[Task],
        result: Any,  # AsyncResult, MapResult or an IMap iterator
        set_length: Optional[Callable[[int], None]] = None,  # imap: the task count, at the end
        throttle: Optional[Throttle] = None,
    ) -> None:
        self.tasks, self.result, self.set_length, self.throttle = (
            tasks,
            result,
            set_length,
            throttle,
        )
        self.submitted = 0  # tasks submitted so far: the next one's index


def _terminated() -> CancelledError:
    return CancelledError("the pool was terminated before this task finished")


def _like_multiprocessing(exc: BaseException) -> BaseException:
    """The remote stack as the cause multiprocessing gives (``multiprocessing.pool.
    RemoteTraceback``), instead of concurrent.futures' type."""
    cause = exc.__cause__
    if isinstance(cause, _RemoteTraceback):
        import multiprocessing.pool

        exc.__cause__ = multiprocessing.pool.RemoteTraceback(cause.tb)  # type: ignore[attr-defined]
    return exc


class PoolState:
    """The pool's state and its two threads; ``Pool`` is only a facade over this."""

    def __init__(self, executor: SSHPoolExecutor) -> None:
        self.executor = executor
        self.lock = threading.Lock()  # guards state, outstanding and throttles
        self.state = RUN
        self.terminating = False
        self.joined = False
        self.outstanding: Dict[int, Any] = {}  # id -> result not yet complete
        self.throttles: List[Throttle] = []
        self.jobs: queue.SimpleQueue[Optional[Job]] = queue.SimpleQueue()
        self.results = CallbackThread("pool-results")
        self.feeder = threading.Thread(
            target=self._feed, name=f"sshexec-pool-tasks-{next(_ids)}", daemon=True
        )
        self.feeder.start()

    def add(self, job: Job) -> None:
        with self.lock:
            if self.state != RUN:
                raise ValueError("Pool not running")
            self.outstanding[id(job.result)] = job.result
            if job.throttle is not None:
                self.throttles.append(job.throttle)
        self.jobs.put(job)

    def forget(self, result: Any) -> None:
        with self.lock:
            self.outstanding.pop(id(result), None)

    # -- the tasks thread

    def _feed(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self.state == TERMINATE:
                return
            if self._feed_job(job) and job.throttle is not None:
                with self.lock:
                    self.throttles.remove(job.throttle)
            del job

    def _feed_job(self, job: Job) -> bool:
        """Submit the job's tasks; False when its buffer is full: the job is parked, and
        put back on the queue once its consumer takes a result, so later calls on the pool
        never wait behind an imap nobody reads (``pool.apply_async`` inside its loop)."""
        while True:
            if job.throttle is not None and not job.throttle.acquire(self.jobs.put, job):
                return False
            if self.state == TERMINATE:
                return True  # terminate() cancels what is left
            try:
                task = next(job.tasks, None)
            except Exception as exc:  # the input iterable raised: its error takes that place
                self.results.post(job.result._set, job.submitted, (False, exc))
                job.submitted += 1
                break
            if task is None:
                break
            self._submit(job.result, job.submitted, task)
            job.submitted += 1
        if job.set_length is not None:
            self.results.post(job.set_length, job.submitted)
        return True

    def _submit(self, result: Any, index: int, task: Task) -> None:
        fn, args, kwargs = task
        try:
            future = self.executor.submit(fn, *args, **kwargs)
        except Exception as exc:  # shut down (interpreter exit, terminate) or broken
            if self.terminating:
                self.results.post(result._cancel, _terminated())
            else:
                self.results.post(result._set, index, (False, exc))
            return
        future.add_done_callback(inline(functools.partial(self._done, result, index)))

    def _done(self, result: Any, index: int, future: Future[Any]) -> None:
        self.results.post(self._deliver, result, index, future)  # off the loop thread

    # -- the results thread

    def _deliver(self, result: Any, index: int, future: Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or (self.terminating and isinstance(exc, WorkerLostError)):
            result._cancel(_terminated())  # stopped by terminate(), not lost
        elif exc is None:
            result._set(index, (True, future.result()))
        else:
            result._set(index, (False, _like_multiprocessing(exc)))

    def _cancel_outstanding(self) -> None:
        with self.lock:
            left = list(self.outstanding.values())
        for result in left:
            result._cancel(_terminated())

    # -- ending

    def close(self) -> None:
        with self.lock:
            if self.state != RUN:
                return
            self.state = CLOSE
            throttles = list(self.throttles)
        for throttle in throttles:  # join() must not wait for a consumer of imap's results
            throttle.open()
        self.jobs.put(None)

    def terminate(self) -> None:
        with self.lock:
            if self.terminating:
                return
            was_running = self.state == RUN
            self.state, self.terminating = TERMINATE, True
            throttles = list(self.throttles)
        for throttle in throttles:
            throttle.open()
        if was_running:
            self.jobs.put(None)
        self.executor.kill_workers()
        self.results.post(self._cancel_outstanding)
        self._join_threads(timeout=10.0)

    def join(self) -> None:
        with self.lock:
            if self.state == RUN:
                raise ValueError("Pool is still running")
        # after close: every call's tasks are submitted; after terminate it has stopped
        self.feeder.join(10.0 if self.terminating else None)
        self.executor.shutdown(wait=True)  # every task ended: every outcome is posted
        self._join_threads(timeout=10.0 if self.terminating else None)
        self.joined = True

    def _join_threads(self, timeout: Optional[float]) -> None:
        if threading.current_thread() is not self.feeder:
            self.feeder.join(timeout)
            if self.feeder.is_alive():
                log.warning("the Pool's tasks thread is still reading an input iterable")
        self.results.stop(wait=True, timeout=timeout)

    def abandon(self) -> None:
        """The Pool was collected before ``join()``: its tasks finish, then it shuts down,
        on a thread of its own (this may run anywhere, the loop thread included)."""
        if not self.terminating and not self.joined:
            self.close()
            threading.Thread(target=self.join, name="sshexec-pool-closer", daemon=True).start()
