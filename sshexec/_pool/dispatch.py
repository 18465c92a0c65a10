"""Tasks to workers and replies to Futures: the pool's hot path.

Owns: ``Dispatcher``: turning the table's placements into ``Run`` (after a ``Limits``
when the task's limits are not those the worker has) and ``Revoke`` frames coalesced
per worker, the replies of each link (``Done``/``Failed`` end their
task through the table, after ``returned.Returned``'s verdict on the files it sent
back; ``Revoked`` puts it back; a failed initializer gives the host up), retiring a worker that has used its ``max_tasks_per_child``, adaptive
prefetch (a worker's depth from its round trip and mean task time), and when to sweep
the hosts' blobs (``blobs.Keeper``: it sees which blobs the tasks sent still need). Loop thread only.
Must not import: subprocess or asyncssh, or touch hosts, links' channels or shutdown.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

from .._errors import ResultDecodeError, SSHExecError, rebuild
from .._logs import logger
from .._scheduler import depth_for
from .._tasks import SENT, Task, TaskTable
from .._wire import calls
from .._wire import protocol as proto
from .blobs import HostBlobs, Keeper
from .link import WorkerLink

log = logger("sshexec.pool")

NO_LIMITS = (0.0, 0)
PING_EVERY = 1.0  # seconds between round-trip measurements of a busy worker


class Dispatcher:
    def __init__(
        self,
        table: TaskTable,
        links: Dict[str, WorkerLink],
        retire: Callable[[WorkerLink], None],
    ) -> None:
        self.table, self.links = table, links  # links: every worker the table knows
        self._retire = retire
        self._pending = False  # a call of now() is scheduled
        self._payload_mean = 0.0  # moving mean of Run payload sizes (bytes)
        self.keeper = Keeper(self._in_flight, self._hosts)

    def soon(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.now)

    def now(self) -> None:
        """Send what the table places, coalesced per worker, and ask back what it steals."""
        self._pending = False
        sends, steals = self.table.place()
        batches: Dict[str, List[proto.Message]] = {}
        stored: Set[HostBlobs] = set()
        for worker_id, tasks in sends.items():
            messages = batches.setdefault(worker_id, [])
            link = self.links[worker_id]
            session, same_python = link.session, link.same_python
            for task in tasks:
                payload, blobs = task.payload, task.blobs
                if not same_python and task.other is not None:  # pickled portably for it
                    (payload, buffers), blobs = task.other
                else:
                    buffers = task.buffers
                for blob in blobs:  # a big map function, shared arguments: once per host
                    if session.store(*blob):
                        stored.add(session.blobs)
                log.debug("dispatch task=%d worker=%s", task.task_id, worker_id)
                self._payload_mean += (task.size - self._payload_mean) * 0.1
                if task.limits != link.limits:  # sent when they change (_node/limits.py)
                    link.limits = task.limits
                    messages.append(proto.Limits(*(task.limits or NO_LIMITS)))
                messages.append(proto.Run(task.task_id, payload, buffers))
        for worker_id, task_id in steals:
            log.debug("revoke task=%d worker=%s", task_id, worker_id)
            batches.setdefault(worker_id, []).append(proto.Revoke(task_id))
        sessions = {id(self.links[w].session): self.links[w].session for w in batches}
        for session in sessions.values():
            session.hold()
        for worker_id, messages in batches.items():
            self.links[worker_id].send(*proto.frame_pieces(messages))  # few writes per worker
        for session in sessions.values():
            session.release()  # one write per host, now
        for host in stored:
            self.keeper.stored(host)

    def _in_flight(self) -> Iterator[Tuple[HostBlobs, Tuple[Tuple[bytes, bytes], ...]]]:
        """Each task sent and not ended: its host's blobs, and the blobs it names."""
        for task in self.table:
            link = self.links.get(task.worker_id or "")
            if task.state == SENT and link is not None:
                other = task.other[1] if task.other is not None else ()
                yield link.session.blobs, (*task.blobs, *other)

    def _hosts(self) -> List[HostBlobs]:
        return list({id(link.session): link.session.blobs for link in self.links.values()}.values())

    # ---- replies (each link's reader calls these) --------------------------------------

    def on_reply(self, link: WorkerLink, message: proto.Message) -> None:
        if isinstance(message, (proto.Done, proto.Failed)):
            if link.returned is not None:  # return_files: the files it sent may fail it
                message = link.returned.verdict(link.worker_id, message)
            if message.task_id == proto.INIT_TASK_ID:
                assert isinstance(message, proto.Failed)
                link.init_failed = True
                failed = link.session.blobs.failed
                kept = [failed[key] for key in self.keeper.pinned if key in failed]
                link.host.give_up(
                    f"initializer failed: {message.type_name}: {message.message}"
                    + (f" (the agent could not keep it: {kept[0]})" if kept else "")
                )
                return
            self._on_outcome(link, message)
        elif isinstance(message, proto.Revoked):
            self.table.returned(link.worker_id, message.task_id)
        elif isinstance(message, proto.Ready):
            log.debug("worker ready worker=%s", link.worker_id)
        else:
            log.warning("unexpected %s from worker=%s", type(message).__name__, link.worker_id)

    def _on_outcome(self, link: WorkerLink, reply: proto.Done | proto.Failed) -> None:
        counters = link.counters
        counters.busy_seconds += reply.seconds
        link.note_task_time(reply.seconds)
        if isinstance(reply, proto.Done):
            counters.tasks_done += 1
        else:
            counters.tasks_failed += 1
        task = self.table.finish(link.worker_id, reply.task_id)
        if task is None:
            return
        log.debug("task done task=%d worker=%s", task.task_id, link.worker_id)
        if isinstance(reply, proto.Failed):
            error = rebuild(reply, link.worker_id)
            self.table.fail(task, _not_stored(link, task, reply, error) or error)
            return
        try:
            result = calls.loads(reply.payload, reply.buffers)
        except BaseException as exc:  # e.g. its class is not importable here; even SystemExit
            error = ResultDecodeError(
                f"task {task.task_id}: the result from worker {link.worker_id} cannot be "
                f"unpickled on this host: {type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            self.table.fail(task, error)
        else:
            self.table.resolve(task, result)

    def after_replies(self, link: WorkerLink) -> None:
        if link.init_failed:
            return
        if link.is_alive and not link.is_closing and self.table.is_spent(link.worker_id):
            self._retire(link)
        elif link.is_alive:
            self._tune(link)
        self.keeper.maybe_sweep()
        self.soon()

    def _tune(self, link: WorkerLink) -> None:
        """Adaptive prefetch, once per chunk of replies: hold enough tasks at the worker to
        cover its round trip (re-measured every PING_EVERY s) at its mean task time."""
        rtt, mean = link.counters.rtt_seconds, link.task_time
        if rtt is not None and mean is not None:
            self.table.set_depth(link.worker_id, depth_for(rtt, mean, self._payload_mean))
        link.ping_if_due(PING_EVERY)


def _not_stored(
    link: WorkerLink, task: Task, reply: proto.Failed, error: BaseException
) -> Optional[BaseException]:
    """The call could not be loaded because the host's agent could not keep a blob it
    names: that, with the agent's reason, is the task's error."""
    failed = link.session.blobs.failed
    if reply.stage != proto.STAGE_CALL or not failed:
        return None
    other = task.other[1] if task.other is not None else ()
    for key, data in (*task.blobs, *other):
        reason = failed.get(key)
        if reason is not None:
            exc = SSHExecError(
                f"task {task.task_id}: the agent on {link.session.host} could not keep a blob "
                f"this call needs ({len(data)} bytes), so worker {link.worker_id} could not "
                f"load the call: {reason}. Free space there, or send less data per call."
            )
            exc.__cause__ = error
            return exc
    return None
