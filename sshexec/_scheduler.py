"""Pure placement policy: which task goes to which worker, and what a lost worker costs.

Owns: the queue of task ids, each worker's in-flight slots (``prefetch`` deep,
so a worker always has its next task before finishing the current one; deeper per
worker when the pool asks, see ``set_depth``), task budgets for
``max_tasks_per_child``, and retry accounting. Only ``_tasks.TaskTable`` calls it,
so its ids always match the table's tasks. Queues are ordered dicts: cancelling a
queued task is O(1) (a ``map`` abandoned with a million items queued cancels them
all). Must not import: asyncio, Futures, clocks, I/O or logging; it sees task ids
and worker ids only.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Set, Tuple


@dataclass
class _Slots:
    in_flight: Deque[int] = field(default_factory=collections.deque)  # dispatch order == run order
    budget: Optional[int] = None  # tasks it may still be given (max_tasks_per_child)
    group: Optional[str] = None  # its host: tasks pinned to the group run only there
    same_python: bool = True  # runs the client's Python version: may take bound tasks
    depth: int = 1  # tasks it may hold at once (the pool deepens it for long round trips)


@dataclass(frozen=True)
class Loss:
    """What removing a worker means for its tasks."""

    requeued: Tuple[int, ...]  # back in the queue (not charged, or still under max_retries)
    failed: Tuple[int, ...]  # out of retries: the caller fails their Futures
    charged: Optional[int]  # the task that was running when the worker died, if any


MAX_DEPTH = 64  # tasks in flight per worker, at most
IN_FLIGHT_BYTES = 32 << 20  # deepening stops when a worker would hold more payload than this


def depth_for(rtt: float, task_seconds: float, payload_bytes: float) -> int:
    """Tasks a worker should hold so it never waits for the next one: a deep worker is
    refilled only once half its tasks are done (see ``refill_at``), so the half must
    cover a round trip at its task time; within MAX_DEPTH and IN_FLIGHT_BYTES."""
    wanted = int(2 * rtt / max(task_seconds, 1e-5)) + 2
    by_bytes = int(IN_FLIGHT_BYTES // max(payload_bytes, 1.0))
    return max(1, min(wanted, MAX_DEPTH, by_bytes))


def refill_at(depth: int) -> int:
    """A worker holding ``depth`` tasks gets more once it holds this many or fewer: half
    empty for a deep worker, so new tasks go out many to a write (one SSH packet, one
    read on the worker) instead of one per finished task; one free slot for depth <= 3."""
    return depth - max(1, depth // 2)


class Scheduler:
    def __init__(self, prefetch: int = 2, max_retries: int = 1) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.prefetch, self.max_retries = prefetch, max_retries
        self._queue: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._workers: Dict[str, _Slots] = {}
        self._losses: Dict[int, int] = {}  # task id -> workers it has already lost
        self._revoking: Set[int] = set()  # asked back from a worker; not stolen twice
        self._pinned: Dict[str, collections.OrderedDict[int, None]] = {}  # group -> its own queue
        self._group_of: Dict[int, str] = {}  # pinned task id -> its group, until complete
        # tasks only a worker of the client's Python version can run (code by value)
        self._bound: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._is_bound: Set[int] = set()  # bound task ids, until complete

    # ---- tasks ------------------------------------------------------------------------

    def submit(self, task_id: int, group: Optional[str] = None, bound: bool = False) -> None:
        """Queue a task; with ``group`` only that group's workers may run it; ``bound``:
        only workers of the client's Python version (``add_worker(same_python=...)``)."""
        if bound:
            self._is_bound.add(task_id)
        if group is not None:
            self._group_of[task_id] = group
        self._queue_of(task_id)[task_id] = None

    def _queue_of(self, task_id: int) -> collections.OrderedDict[int, None]:
        group = self._group_of.get(task_id)
        if group is not None:
            return self._pinned.setdefault(group, collections.OrderedDict())
        return self._bound if task_id in self._is_bound else self._queue

    def cancel(self, task_id: int) -> bool:
        """Drop a queued (never dispatched) task; False if it is not in the queue."""
        group = self._group_of.get(task_id)
        if group is not None and group not in self._pinned:
            return False
        queue = self._queue_of(task_id)
        if queue.pop(task_id, False) is not None:  # absent: the default, False
            return False
        if group is not None and not queue:
            del self._pinned[group]
        self._forget(task_id)
        return True

    def drain_queue(self) -> List[int]:
        """Every queued task id, removing them (cancel_futures, broken pool)."""
        drained = list(self._queue) + list(self._bound)
        self._queue.clear()
        self._bound.clear()
        for pinned in self._pinned.values():
            drained.extend(pinned)
        self._pinned.clear()
        for task_id in drained:
            self._forget(task_id)
        return drained

    def drain_bound(self) -> List[int]:
        """The queued tasks only the client's Python version can run, removed (no host
        of that version is left)."""
        drained = list(self._bound)
        self._bound.clear()
        for task_id in drained:
            self._forget(task_id)
        return drained

    def _has_queued(self) -> bool:
        return bool(self._queue or self._pinned or self._bound)

    def drain_group(self, group: str) -> List[int]:
        """The queued tasks pinned to ``group``, removed (its host is given up)."""
        drained = list(self._pinned.pop(group, ()))
        for task_id in drained:
            self._forget(task_id)
        return drained

    def _forget(self, task_id: int) -> None:
        self._losses.pop(task_id, None)
        self._group_of.pop(task_id, None)
        self._is_bound.discard(task_id)

    def _requeue_front(self, task_ids: List[int]) -> None:
        for task_id in reversed(task_ids):
            queue = self._queue_of(task_id)
            queue[task_id] = None
            queue.move_to_end(task_id, last=False)

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._bound) + sum(len(p) for p in self._pinned.values())

    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self._workers.values())

    def attempts_lost(self, task_id: int) -> int:
        return self._losses.get(task_id, 0)

    # ---- workers ----------------------------------------------------------------------

    def add_worker(
        self,
        worker_id: str,
        budget: Optional[int] = None,
        group: Optional[str] = None,
        same_python: bool = True,
    ) -> None:
        self._workers[worker_id] = _Slots(
            budget=budget, group=group, depth=self.prefetch, same_python=same_python
        )

    def set_depth(self, worker_id: str, depth: int) -> None:
        """Let the worker hold up to ``depth`` tasks (never fewer than ``prefetch``): more
        when its round trip is long next to its task time, so its link never idles."""
        slots = self._workers.get(worker_id)
        if slots is not None:
            slots.depth = max(self.prefetch, depth)

    def depth(self, worker_id: str) -> int:
        return self._workers[worker_id].depth

    def workers(self) -> List[str]:
        return list(self._workers)

    def load(self, worker_id: str) -> int:
        return len(self._workers[worker_id].in_flight)

    def is_spent(self, worker_id: str) -> bool:
        """True when the worker has used its budget and has nothing in flight: retire it."""
        slots = self._workers[worker_id]
        return slots.budget == 0 and not slots.in_flight

    def assignments(self) -> List[Tuple[str, int]]:
        """Fill free slots breadth-first (every idle worker gets one task before any
        worker gets a second) and return the new (worker_id, task_id) pairs in order."""
        placed: List[Tuple[str, int]] = []
        if not self._has_queued():
            return placed
        room = [
            (worker_id, slots)
            for worker_id, slots in self._workers.items()
            if len(slots.in_flight) <= refill_at(slots.depth) and slots.budget != 0
        ]
        if not room:
            return placed
        lowest = min(len(slots.in_flight) for _, slots in room)
        for depth in range(lowest, max(slots.depth for _, slots in room)):
            if not self._has_queued():
                break
            for worker_id, slots in room:
                if len(slots.in_flight) > depth or depth >= slots.depth or slots.budget == 0:
                    continue
                task_id = self._next_for(slots)
                if task_id is None:
                    if not self._has_queued():
                        break
                    continue
                slots.in_flight.append(task_id)
                if slots.budget is not None:
                    slots.budget -= 1
                placed.append((worker_id, task_id))
        return placed

    def _next_for(self, slots: _Slots) -> Optional[int]:
        """A task pinned to the worker's group first, else the oldest shared one it may
        run (bound ones only on a worker of the client's Python version)."""
        if slots.group is not None:
            pinned = self._pinned.get(slots.group)
            if pinned:
                task_id = pinned.popitem(last=False)[0]
                if not pinned:
                    del self._pinned[slots.group]
                return task_id
        if slots.same_python and self._bound:
            if not self._queue or next(iter(self._bound)) < next(iter(self._queue)):
                return self._bound.popitem(last=False)[0]  # ids grow: the older first
        return self._queue.popitem(last=False)[0] if self._queue else None

    def steals(self) -> List[Tuple[str, int]]:
        """Prefetched tasks to ask back, as (worker_id, task_id): one for each idle worker
        while the queue is empty, taken from the back of the longest line. A task waiting
        behind a slow one then runs on the idle worker instead."""
        if self._queue or self._bound:
            return []
        idle_workers = [s for s in self._workers.values() if not s.in_flight and s.budget != 0]
        idle = len(idle_workers)
        # a bound task taken back must find an idle worker of the client's Python
        bound_ok = sum(1 for s in idle_workers if s.same_python)
        asked: List[Tuple[str, int]] = []
        while idle > 0:
            waiting = {
                worker_id: [
                    t
                    for t in list(slots.in_flight)[1:]
                    if t not in self._revoking
                    and t not in self._group_of
                    and (bound_ok > 0 or t not in self._is_bound)
                ]
                for worker_id, slots in self._workers.items()
            }
            victim = max(waiting, key=lambda w: len(waiting[w]), default=None)
            if victim is None or not waiting[victim]:
                break
            task_id = waiting[victim][-1]
            self._revoking.add(task_id)
            asked.append((victim, task_id))
            idle -= 1
            if task_id in self._is_bound:
                bound_ok -= 1
        return asked

    def returned(self, worker_id: str, task_id: int) -> None:
        """The worker gave a revoked task back unstarted: it goes to the front of the queue."""
        self._revoking.discard(task_id)
        slots = self._workers.get(worker_id)
        if slots is not None and task_id in slots.in_flight:
            slots.in_flight.remove(task_id)
            if slots.budget is not None:
                slots.budget += 1
            self._requeue_front([task_id])

    def complete(self, worker_id: str, task_id: int) -> None:
        slots = self._workers.get(worker_id)
        if slots is not None:
            try:
                slots.in_flight.remove(task_id)
            except ValueError:
                pass
        self._forget(task_id)
        self._revoking.discard(task_id)

    def remove_worker(self, worker_id: str, *, charge: bool = True) -> Loss:
        """Forget a worker. The oldest in-flight task was running and is charged one loss
        (when ``charge``); tasks queued behind it never started and go back for free.
        Requeued tasks go to the front, keeping their order."""
        slots = self._workers.pop(worker_id, None)
        if slots is None or not slots.in_flight:
            return Loss((), (), None)
        tasks = list(slots.in_flight)
        self._revoking.difference_update(tasks)
        failed: List[int] = []
        charged: Optional[int] = None
        if charge:
            charged = tasks[0]
            self._losses[charged] = self._losses.get(charged, 0) + 1
            if self._losses[charged] > self.max_retries:
                failed.append(tasks.pop(0))
                self._forget(charged)
        self._requeue_front(tasks)
        return Loss(tuple(tasks), tuple(failed), charged)
