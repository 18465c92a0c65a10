"""Every task's state, in one place: ``Task`` and the ``TaskTable``.

Owns: ``Task`` (one submitted call until its Future ends) and ``TaskTable``, the one
owner of every task's state. A task is *queued* (waiting for a slot), *sent* (on a
live worker), or *ending* (its worker was lost and it is out of retries: it fails as
soon as the pool has read how the worker died, within a bounded wait); an *ended*
task is no longer in the table. The scheduler's placement, the links' replies and
losses, cancellation and shutdown all go through the table, so they cannot disagree:
it is the only caller of the ``Scheduler`` and the only code that ends Futures
(``set_running_or_notify_cancel`` first, and again when a cancelled task leaves the
queue, the only thing that wakes ``wait``/``as_completed``; ``done()`` checked before
every outcome; the outcome set through the ``Ender``, so no done-callback ever runs on
the loop thread). Loop thread only.
Must not import: asyncio, the pool, or do I/O.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ._ending import CANCEL, ERROR, RESULT, Ender, notify_cancelled
from ._logs import logger
from ._mapresults import MapItem
from ._scheduler import Scheduler
from ._wire import calls

log = logger("sshexec.pool")

QUEUED, SENT, ENDING = "queued", "sent", "ending"

TaskFuture = Union["Future[Any]", MapItem]  # a submit's Future, or a map item's slot
Encoding = Tuple[calls.Payload, Tuple[Tuple[bytes, bytes], ...]]  # payload, its blobs


class Task:
    """One submitted call until its Future ends. Slotted, with no list until a loss:
    thousands wait at once in a big ``map``, and every container object each one holds
    is more work for the client's garbage collector."""

    __slots__ = (
        "blobs",
        "bound",
        "buffers",
        "future",
        "group",
        "is_abandoned",
        "is_started",
        "limits",
        "losses",
        "other",
        "payload",
        "size",
        "state",
        "task_id",
        "worker_id",
    )

    def __init__(
        self,
        task_id: int,
        payload: calls.Payload,
        size: int,
        future: TaskFuture,
        group: Optional[str] = None,
        blobs: Tuple[Tuple[bytes, bytes], ...] = (),
        bound: Optional[str] = None,
        other: Optional[Encoding] = None,
        limits: Optional[Tuple[float, int]] = None,
    ) -> None:
        self.task_id, self.future = task_id, future
        self.payload, self.buffers = payload  # pickle stream + out-of-band buffers, sizes
        self.size = size  # bytes of payload, as calls.size() gave the submitter
        self.group = group  # run only on this host (run_on_hosts)
        self.blobs = blobs  # (key, data) its payload names: stored on a host before it is sent
        # what only a worker of the client's Python can run: its function, named (else None)
        self.bound = bound
        self.other = other  # (payload, blobs) for a worker of another Python, when different
        self.limits = limits  # (seconds, bytes; 0: none) the node enforces, or None
        self.is_started = False  # its Future is running (it has been sent at least once)
        self.is_abandoned = False  # nobody waits for it any more (a timed-out map)
        self.state = QUEUED
        self.worker_id: Optional[str] = None  # while sent
        self.losses: Tuple[Tuple[str, str], ...] = ()  # (worker_id, how it died)

    def __repr__(self) -> str:
        where = f" on {self.worker_id}" if self.worker_id else ""
        return f"<Task {self.task_id} {self.state}{where}>"


@dataclass
class Loss:
    """What removing a worker did to its tasks."""

    requeued: List[Task] = field(default_factory=list)  # back in the queue
    ending: List[Task] = field(default_factory=list)  # out of retries: to fail once told how
    charged: Optional[Task] = None  # the task that was running when the worker died


class TaskTable:
    """The tasks of one pool. ``on_idle`` is called whenever the last task that somebody
    waits for ends (abandoned ones do not count): shutdown waits for exactly that."""

    def __init__(
        self, scheduler: Scheduler, on_idle: Callable[[], None], ender: Optional[Ender] = None
    ) -> None:
        self.scheduler = scheduler
        self.ender = ender if ender is not None else Ender("table")
        self._tasks: Dict[int, Task] = {}
        self._waited = 0  # tasks in the table that are not abandoned
        self._on_idle = on_idle

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(list(self._tasks.values()))

    def get(self, task_id: int) -> Optional[Task]:
        return self._tasks.get(task_id)

    @property
    def is_idle(self) -> bool:
        """No task is left that anybody waits for."""
        return self._waited == 0

    def waited_for(self) -> int:
        return self._waited

    # ---- entering and leaving ---------------------------------------------------------

    def add(self, task: Task) -> None:
        self._tasks[task.task_id] = task
        self._waited += 1
        self.scheduler.submit(task.task_id, task.group, task.bound is not None)

    def cancel(self, task_id: int) -> bool:
        """A queued task's Future was cancelled: it leaves at once. False when it is not
        queued (already sent, ended, or never here)."""
        task = self._tasks.get(task_id)
        if task is None or task.state != QUEUED or task.is_started:
            return False
        self.scheduler.cancel(task_id)
        self._remove(task)
        notify_cancelled(task.future)
        return True

    def cancel_queued(self) -> None:
        """shutdown(cancel_futures=True): every queued task that never started is cancelled.
        A task put back after losing its worker has a running Future: it stays, and runs."""
        for task_id in self.scheduler.drain_queue():
            task = self._tasks[task_id]
            if task.is_started:
                self.scheduler.submit(task_id, task.group, task.bound is not None)  # back
                continue
            self._remove(task)
            self.ender.end(task.future, CANCEL)

    def _remove(self, task: Task) -> None:
        del self._tasks[task.task_id]
        task.state, task.worker_id = "ended", None
        if not task.is_abandoned:
            self._waited -= 1
            if self._waited == 0:
                self._on_idle()

    # ---- placement --------------------------------------------------------------------

    def place(self) -> Tuple[Dict[str, List[Task]], List[Tuple[str, int]]]:
        """New (worker -> tasks to send, in order) and (worker, task id) to ask back.
        A task whose Future was cancelled meanwhile is dropped here, never sent."""
        sends: Dict[str, List[Task]] = {}
        for worker_id, task_id in self.scheduler.assignments():
            task = self._tasks[task_id]
            if not task.is_started:
                task.is_started = True
                if not task.future.set_running_or_notify_cancel():
                    self.scheduler.complete(worker_id, task_id)
                    self._remove(task)  # cancelled while queued
                    continue
            task.state, task.worker_id = SENT, worker_id
            sends.setdefault(worker_id, []).append(task)
        return sends, self.scheduler.steals()

    def returned(self, worker_id: str, task_id: int) -> None:
        """The worker gave a revoked task back unstarted: queued again, at the front."""
        self.scheduler.returned(worker_id, task_id)
        task = self._tasks.get(task_id)
        if task is not None and task.state == SENT and task.worker_id == worker_id:
            task.state, task.worker_id = QUEUED, None

    def finish(self, worker_id: str, task_id: int) -> Optional[Task]:
        """The worker replied for this task: it leaves the table, and the caller ends its
        Future with ``resolve`` or ``fail``. None when the table no longer holds it."""
        self.scheduler.complete(worker_id, task_id)
        task = self._tasks.get(task_id)
        if task is None or task.state != SENT or task.worker_id != worker_id:
            return None
        self._remove(task)
        return task

    # ---- workers ----------------------------------------------------------------------

    def add_worker(
        self, worker_id: str, budget: Optional[int], group: Optional[str], same_python: bool
    ) -> None:
        self.scheduler.add_worker(worker_id, budget=budget, group=group, same_python=same_python)

    def remove_worker(self, worker_id: str, *, charge: bool, requeue: bool = True) -> Loss:
        """Forget a worker, in one step: its running task is charged a loss (``charge``)
        and ends once out of retries; the rest go back to the queue (``requeue``) or, when
        the pool is being killed, end too."""
        placed = self.scheduler.remove_worker(worker_id, charge=charge)
        loss = Loss(charged=self._tasks.get(placed.charged) if placed.charged is not None else None)
        for task_id in placed.failed:
            task = self._tasks[task_id]
            task.state, task.worker_id = ENDING, None
            loss.ending.append(task)
        for task_id in placed.requeued:
            task = self._tasks[task_id]
            task.state, task.worker_id = QUEUED, None
            loss.requeued.append(task)
        if not requeue:
            for task in loss.requeued:
                self.scheduler.cancel(task.task_id)
                task.state = ENDING
            loss.ending.extend(loss.requeued)
            loss.requeued = []
        return loss

    def is_spent(self, worker_id: str) -> bool:
        return self.scheduler.is_spent(worker_id)

    def set_depth(self, worker_id: str, depth: int) -> None:
        self.scheduler.set_depth(worker_id, depth)

    # ---- ending Futures ---------------------------------------------------------------

    def resolve(self, task: Task, value: Any) -> None:
        """End a task that ``finish`` returned with its result."""
        self.ender.end(task.future, RESULT, value)

    def fail(self, task: Task, error: BaseException) -> None:
        """End a task with ``error``: a task ``finish`` returned, or any task still in
        the table (which leaves it). A Future cancelled by its owner stays cancelled."""
        if self._tasks.get(task.task_id) is task:  # still here: out of the scheduler too
            if task.state == QUEUED:
                self.scheduler.cancel(task.task_id)
            elif task.state == SENT and task.worker_id is not None:
                self.scheduler.complete(task.worker_id, task.task_id)
            self._remove(task)
        future = task.future
        if future.done():
            return
        if not future.running() and not _safely(future.set_running_or_notify_cancel):
            return  # cancelled by the user
        self.ender.end(future, ERROR, error)

    def fail_ending(self, tasks: Sequence[Task], error: Callable[[Task], BaseException]) -> None:
        for task in tasks:
            if self._tasks.get(task.task_id) is task:
                self.fail(task, error(task))

    def fail_bound(self, error: Callable[[Task], BaseException]) -> None:
        """The queued tasks only the client's Python version can run fail (no host of
        that version is left)."""
        for task_id in self.scheduler.drain_bound():
            task = self._tasks[task_id]
            self.fail(task, error(task))

    def fail_group(self, group: str, error: BaseException) -> None:
        """The queued tasks pinned to ``group`` fail (its host is unusable)."""
        for task_id in self.scheduler.drain_group(group):
            self.fail(self._tasks[task_id], error)

    def fail_all(self, error: BaseException) -> None:
        """The pool is broken: every task still here fails."""
        for task in list(self._tasks.values()):
            self.fail(task, error)

    def fail_queued(self, error: BaseException) -> None:
        """Every queued task fails (no worker will be started to run it)."""
        for task_id in self.scheduler.drain_queue():
            self.fail(self._tasks[task_id], error)

    def wait_for_all(self) -> None:
        """Shutdown is killing what is left: abandoned tasks are waited for again."""
        for task in self._tasks.values():
            if task.is_abandoned:
                task.is_abandoned = False
                self._waited += 1

    def abandon(self, futures: Sequence[TaskFuture]) -> None:
        """A timed-out map gave up on these: shutdown will not wait for them."""
        wanted = {id(f) for f in futures}
        for task in self._tasks.values():
            if id(task.future) in wanted and not task.is_abandoned:
                task.is_abandoned = True
                self._waited -= 1
        if self._waited == 0:
            self._on_idle()


def _safely(method: Callable[..., Any], *args: Any) -> Any:
    """Call a Future's method that runs no callback; a Future in a state it did not
    expect is logged, never raised into the pool."""
    try:
        return method(*args)
    except BaseException:
        log.exception("a Future was in an unexpected state; the pool goes on")
        return False
