"""Tasks the pool ends on purpose: the client's side of task limits and ``kill()``.

Owns: ``stopped`` (the agent's ``Stopped``: the task's Future fails with ``TaskTimeout``,
``TaskMemoryError`` or ``TaskKilled``, never retried; its worker's end is expected, so
the tasks queued behind it go back to the queue free of charge and the host tops up at
once; the host's counters count it) and ``kill`` (a task sent to a worker fails with
``TaskKilled`` now, and the agent is asked to end it: at once if the worker runs it, or
when it starts it, while a ``Revoke`` takes it out of the worker's queue; a task put
back in the queue after a loss just leaves it). The limits themselves are enforced by
the node (``_node/limits.py``). Loop thread only. Must not import: asyncssh or
subprocess, or placement policy.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from .._errors import TaskKilled, TaskMemoryError, TaskTimeout
from .._logs import logger
from .._tasks import QUEUED, SENT, Task, TaskTable
from .._wire import messages as msgs
from .._wire import protocol as proto
from .link import WorkerLink

log = logger("sshexec.pool")


def stopped(table: TaskTable, link: WorkerLink, message: proto.Stopped) -> None:
    """The agent killed ``link``'s worker for ``message.task_id`` (its Exited follows)."""
    why, host = message.why, link.host.name
    link.expect_end(f"stopped for task {message.task_id}: {why} ({message.detail})")
    counters = link.counters
    if why == msgs.STOP_TIMEOUT:
        counters.timeouts += 1
    elif why == msgs.STOP_MEMORY:
        counters.memory_kills += 1
    else:
        counters.kills += 1
    log.log(  # a kill is the user's own doing; a limit passed is worth a warning
        logging.INFO if why == msgs.STOP_KILLED else logging.WARNING,
        "task stopped task=%d worker=%s: %s (%s)",
        message.task_id,
        link.worker_id,
        why,
        message.detail,
    )
    task = table.get(message.task_id)
    if task is None or task.state != SENT or task.worker_id != link.worker_id:
        return  # killed by kill() (failed already), or it ended just before
    counters.tasks_failed += 1
    seconds, memory = task.limits if task.limits is not None else (0.0, 0)
    error: Exception
    if why == msgs.STOP_TIMEOUT:
        error = TaskTimeout(task.task_id, host, link.worker_id, seconds, message.detail)
    elif why == msgs.STOP_MEMORY:
        error = TaskMemoryError(task.task_id, host, link.worker_id, memory, message.detail)
    else:
        error = TaskKilled(task.task_id, host, link.worker_id, None, message.detail)
    table.fail(task, error)


def kill(table: TaskTable, links: Dict[str, WorkerLink], future: Any) -> Optional[bool]:
    """``SSHPoolExecutor.kill``'s step on the loop: whether it stopped anything; None for
    a task that never left the queue (its owner cancels the Future: never on this thread,
    which runs no user callback)."""
    task = _find(table, future)
    if task is None:
        return False
    if task.state == QUEUED and not task.is_started:
        return None
    if task.state == QUEUED:
        host = task.group or "-"
        table.fail(task, TaskKilled(task.task_id, host, "-", None, "before it ran again"))
        return True
    if task.state != SENT or task.worker_id is None:
        return False  # its worker was lost and it is failing already
    worker_id = task.worker_id
    link = links.get(worker_id)
    host = link.host.name if link is not None else worker_id.rsplit("#", 1)[0]
    table.fail(task, TaskKilled(task.task_id, host, worker_id, None, "killed while running"))
    if link is not None and link.is_alive:
        kill_task = getattr(link.channel, "kill_task", None)
        if kill_task is not None:
            kill_task(task.task_id)
        link.send(proto.encode(proto.Revoke(task.task_id)))  # if it waits in the worker
    return True


def _find(table: TaskTable, future: Any) -> Optional[Task]:
    for task in table:
        if task.future is future:
            return task
    return None
