"""A model-based test of the pool core: hypothesis drives a real ``SSHPoolExecutor``
(its table, scheduler, supervisors, links and shutdown) against the in-memory
transport of ``memnode``, whose workers finish, raise, die idle or busy, hang, answer
revokes late, fail to start and pass their tasks' time limits, while the test submits
(some calls with limits), maps, cancels, kills tasks (``kill()``), breaks out of maps,
kills workers and shuts down.

Futures are observed as users observe them: through ``wait()`` and ``as_completed()``
(a cancelled Future nobody notified is ``done()`` and still hangs both). Half of them
carry done-callbacks (some raise), so they end on the executor's callback thread, the
rest on the loop thread; a callback records its thread, never the loop's.

After every step, on the loop thread: every pending Future's task is queued, on a live
worker the pool knows, or ending (its worker just died), or its outcome is on the
callback thread's queue; the table and the scheduler agree task by task and worker by
worker; no Future ended twice; no work went to a worker the pool had forgotten; and
``wait(timeout=0)`` counts as done exactly the Futures that are done (every cancelled
one included). After shutdown, ``wait`` sees every Future end and ``as_completed``
yields each exactly once.
``SSHEXEC_MODEL_EXAMPLES`` sets the number of examples (the soak in ``benchmarks/``
runs many more)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import random
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import sshexec._executor as executor_module
from sshexec import SSHPoolExecutor
from sshexec._ending import RESULT
from sshexec._tasks import ENDING, QUEUED, SENT

from . import tasks
from .memnode import MemNode

EXAMPLES = int(os.environ.get("SSHEXEC_MODEL_EXAMPLES", "40"))
STEPS = int(os.environ.get("SSHEXEC_MODEL_STEPS", "40"))


class PoolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # one host runs the client's Python, the other another version: what carries code
        # by value (tests.tasks travels by value) goes only to the first
        self.node = MemNode(["%d.%d.%d" % sys.version_info[:3], "3.98.0"])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                executor_module,
                "build_transports",
                lambda *a, **k: [(t, 1, "sim") for t in self.node.transports],
            )
            # few slots, so that tasks queue up behind them
            self.ex = SSHPoolExecutor(max_retries=1, prefetch=1, shutdown_grace=0.5)
        pool = self.ex._pool
        self.node.known_workers = lambda: pool.links
        self.node.task_of = pool.table.get
        self.futures: List[cf.Future[Any]] = []
        self.expected: Dict[int, Any] = {}  # id(future) -> its value, when it succeeds
        self.endings: Dict[int, int] = {}  # id(future) -> times it ended (with callbacks)
        self.callback_threads: List[str] = []  # where done-callbacks ran
        self.maps: List[Any] = []  # map iterators (generators: they have close())
        self.is_shut = False

    # ---- running steps on the loop thread ---------------------------------------------

    def on_loop(self, fn: Any) -> Any:
        async def step() -> Any:
            value = fn()
            for _ in range(30):  # let the replies, losses and dispatches it caused settle
                await asyncio.sleep(0)
            return value

        return self.ex._runtime.call(step(), timeout=10)

    def workers(self) -> List[Any]:
        return self.on_loop(self.node.live)  # type: ignore[no-any-return]

    def track(self, future: cf.Future[Any], value: Any) -> None:
        """Every other Future gets done-callbacks (every fourth one that raises)."""
        self.futures.append(future)
        self.expected[id(future)] = value
        self.endings[id(future)] = 0
        if len(self.futures) % 2:
            return  # none: it ends on the loop thread, no hand-off

        def ended(f: cf.Future[Any]) -> None:
            self.endings[id(f)] += 1
            self.callback_threads.append(threading.current_thread().name)

        future.add_done_callback(ended)
        if len(self.futures) % 4 == 0:
            future.add_done_callback(_raising_callback)

    # ---- what users do ------------------------------------------------------------------

    @precondition(lambda self: not self.is_shut)
    @rule(n=st.integers(1, 4), x=st.integers(0, 100))
    def submit(self, n: int, x: int) -> None:
        for i in range(n):
            self.track(self.ex.submit(tasks.square, x + i), (x + i) ** 2)

    @precondition(lambda self: not self.is_shut)
    @rule(x=st.integers(0, 100))
    def submit_lambda(self, x: int) -> None:
        """Code that exists only as code: only the host of the client's Python may run it."""
        self.track(self.ex.submit(lambda v: v + 1, x), x + 1)

    @precondition(lambda self: not self.is_shut)
    @rule(x=st.integers(0, 100), memory=st.booleans())
    def submit_limited(self, x: int, memory: bool) -> None:
        """A call with a time limit (and a memory limit) through an options() view."""
        view = self.ex.options(timeout=30, memory="1G" if memory else None)
        self.track(view.submit(tasks.square, x), x**2)

    @precondition(lambda self: not self.is_shut)
    @rule()
    def submit_failing(self) -> None:
        self.track(self.ex.submit(tasks.raise_value_error, "model"), ValueError)

    @precondition(lambda self: not self.is_shut)
    @rule(n=st.integers(1, 30), chunksize=st.sampled_from([1, 3]))
    def start_map(self, n: int, chunksize: int) -> None:
        self.maps.append(self.ex.map(tasks.square, range(n), chunksize=chunksize))

    @precondition(lambda self: bool(self.maps) and not self.is_shut)
    @rule(data=st.data())
    def break_out_of_map(self, data: st.DataObject) -> None:
        it = self.maps.pop(data.draw(st.integers(0, len(self.maps) - 1)))
        it.close()  # what a break does to the generator

    @precondition(lambda self: bool(self.futures) and not self.is_shut)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self.futures[data.draw(st.integers(0, len(self.futures) - 1))].cancel()

    @precondition(lambda self: bool(self.futures) and not self.is_shut)
    @rule(seed=st.integers(0, 2**16), share=st.sampled_from([0.3, 1.0]))
    def cancel_many(self, seed: int, share: float) -> None:
        """A user cancels a batch, from a thread of its own, while the pool runs."""
        picked = random.Random(seed).sample(self.futures, int(len(self.futures) * share) or 1)
        bounded_run(lambda: [f.cancel() for f in picked])

    # ---- what workers and hosts do ------------------------------------------------------

    @precondition(lambda self: not self.is_shut)
    @rule(data=st.data(), times=st.integers(1, 4))
    def finish(self, data: st.DataObject, times: int) -> None:
        index = data.draw(st.integers(0, 7))  # drawn whatever is live: replays draw alike
        live = self.workers()
        if live:
            worker = live[index % len(live)]
            for _ in range(times):
                self.on_loop(worker.finish)

    @precondition(lambda self: not self.is_shut)
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, 7))
        live = self.workers()
        if live:
            self.on_loop(live[index % len(live)].die)

    @precondition(lambda self: not self.is_shut)
    @rule(data=st.data())
    def time_out(self, data: st.DataObject) -> None:
        """A worker's running task passes its time limit: its agent stops it."""
        index = data.draw(st.integers(0, 7))
        live = self.workers()
        if live:
            self.on_loop(live[index % len(live)].time_out)

    @precondition(lambda self: bool(self.futures) and not self.is_shut)
    @rule(data=st.data())
    def kill(self, data: st.DataObject) -> None:
        """A user kills one task (queued, sent or running), from a thread of its own."""
        future = self.futures[data.draw(st.integers(0, len(self.futures) - 1))]
        bounded_run(lambda: self.ex.kill(future))

    @precondition(lambda self: not self.is_shut)
    @rule(data=st.data(), hung=st.booleans())
    def hang(self, data: st.DataObject, hung: bool) -> None:
        index = data.draw(st.integers(0, 7))  # drawn whatever is live: replays draw alike
        live = self.workers()
        if live:
            worker = live[index % len(live)]
            worker.is_hung = hung

    @precondition(lambda self: not self.is_shut)
    @rule(data=st.data(), slow=st.booleans())
    def slow_revokes(self, data: st.DataObject, slow: bool) -> None:
        index = data.draw(st.integers(0, 7))  # drawn whatever is live: replays draw alike
        live = self.workers()
        if live:
            worker = live[index % len(live)]
            worker.slow_revokes = slow
            if not slow:
                self.on_loop(worker.answer_revokes)

    @rule(host=st.integers(0, 1), n=st.integers(1, 3), stage=st.sampled_from(["spawn", "connect"]))
    def fail_next_starts(self, host: int, n: int, stage: str) -> None:
        transport = self.node.transports[host]
        transport.fail_next, transport.fail_stage = n, stage

    @rule(seconds=st.sampled_from([0.0, 0.02, 0.1]))
    def time_passes(self, seconds: float) -> None:
        """Backoffs and reconnects run on real time; also always enabled, so a run goes
        on (checking the invariants) after its executor has ended."""
        time.sleep(seconds)

    # ---- ending ---------------------------------------------------------------------------

    @precondition(lambda self: not self.is_shut)
    @rule()
    def kill_workers(self) -> None:
        self.end(self.ex.kill_workers)

    @precondition(lambda self: not self.is_shut)
    @rule(cancel_futures=st.booleans())
    def shutdown(self, cancel_futures: bool) -> None:
        self.end(lambda: self.ex.shutdown(wait=True, cancel_futures=cancel_futures))

    def end(self, call: Any) -> None:
        """End the executor as users do, while its workers get through their tasks (a
        running task ends some time; a hung one too, at last)."""
        self.is_shut = True
        for transport in self.node.transports:
            transport.fail_next = 0
        done = threading.Event()
        failure: List[BaseException] = []

        def run() -> None:
            try:
                call()
            except BaseException as exc:  # re-raised below, on the test's thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=run, name="model-shutdown", daemon=True).start()
        for _ in range(400):
            if done.wait(0.025):
                break
            try:
                self.ex._runtime.call(_call(self.node.drain), timeout=1)
            except (RuntimeError, cf.TimeoutError, cf.CancelledError):
                pass  # the loop has closed: shutdown is over
        assert done.wait(10), "shutdown did not return: it hangs"
        if failure:
            raise failure[0]
        # shutdown(wait=True) returned: every Future has ended, as wait() sees it
        _done, not_done = cf.wait(self.futures, timeout=0)
        assert not not_done, f"{len(not_done)} Futures never ended for wait() after shutdown"
        seen = [id(f) for f in cf.as_completed(self.futures, timeout=10)]
        assert len(seen) == len(set(seen)) == len(self.futures), "as_completed: not each once"
        assert not self.ex._pool.table._tasks, "tasks left in the table after shutdown"
        on_loop = [n for n in self.callback_threads if n.startswith("sshexec-loop-")]
        assert not on_loop, "a done-callback ran on the loop thread"

    def teardown(self) -> None:
        if not self.is_shut:
            self.end(lambda: self.ex.shutdown(wait=True))
        for it in self.maps:
            it.close()

    # ---- what must always hold ----------------------------------------------------------

    @invariant()
    def futures_end_once_and_right(self) -> None:
        for future in self.futures:
            assert self.endings[id(future)] <= 1, "a Future ended twice"
            if future.done() and not future.cancelled():
                wanted = self.expected[id(future)]
                error = future.exception()
                if wanted is ValueError:
                    assert isinstance(error, (ValueError, Exception)), error
                elif error is None:
                    assert future.result() == wanted

    @invariant()
    def nothing_is_left_hanging(self) -> None:
        if self.is_shut:
            return
        problems, ending = self.on_loop(self._check)
        assert not problems, "\n".join(problems)
        self.flush_callbacks()  # the outcomes queued for the callback thread are set
        stuck = [f for f in ending if not f.done()]
        assert not stuck, f"{len(stuck)} pending Futures have no task in the table"
        assert not self.node.violations, self.node.violations

    @invariant()
    def wait_sees_every_ended_future(self) -> None:
        """What is ``done()`` is done for ``wait()`` too: a cancelled Future whose task
        left the queue was notified (only that wakes ``wait`` and ``as_completed``)."""
        if self.is_shut:
            return
        self.on_loop(lambda: None)  # cancels posted by cancel() reach the table
        self.flush_callbacks()
        ended = [f for f in self.futures if f.done()]
        done, _ = cf.wait(self.futures, timeout=0)
        missed = [f for f in ended if f not in done]
        assert not missed, f"{len(missed)} Futures are done() but not for wait(): {missed[:3]}"

    def flush_callbacks(self) -> None:
        """Wait until what the callback thread holds has run (a marker behind it)."""
        marker: cf.Future[None] = cf.Future()
        marker.add_done_callback(lambda _: None)
        self.ex._runtime.ender.end(marker, RESULT, None)
        marker.result(timeout=10)

    def _check(self) -> Tuple[List[str], List[cf.Future[Any]]]:
        pool = self.ex._pool
        table = pool.table
        sched = table.scheduler
        problems = []
        ending: List[cf.Future[Any]] = []  # its outcome may wait on the callback thread
        by_future = {id(t.future): t for t in table}
        for future in self.futures:
            if future.done():
                continue
            task = by_future.get(id(future))
            if task is None:
                ending.append(future)
            elif task.state == SENT and task.worker_id not in pool.links:
                problems.append(f"{task} is on a worker the pool does not know")
        queued = set(sched._queue) | set(sched._bound)
        for pinned in sched._pinned.values():
            queued |= set(pinned)
        in_table = {t.task_id for t in table if t.state == QUEUED}
        if queued != in_table:
            problems.append(f"queued: scheduler {sorted(queued)} vs table {sorted(in_table)}")
        if set(sched._workers) != set(pool.links):
            problems.append(
                f"workers: scheduler {sorted(sched._workers)} vs links {sorted(pool.links)}"
            )
        for worker_id, slots in sched._workers.items():
            sent = {t.task_id for t in table if t.state == SENT and t.worker_id == worker_id}
            if set(slots.in_flight) != sent:
                problems.append(f"{worker_id}: in flight {list(slots.in_flight)} vs sent {sent}")
        for task in table:
            if task.state not in (QUEUED, SENT, ENDING):
                problems.append(f"{task} has no state")
        return problems, ending


async def _call(fn: Any) -> Optional[Any]:
    return fn()


def _raising_callback(_: Any) -> None:
    raise ValueError("a user's done-callback raised")


def bounded_run(fn: Any) -> None:
    """``fn()`` on a thread of its own (a user's), bounded."""
    thread = threading.Thread(target=fn, name="model-user", daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "cancel() hangs"


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True)
def _quiet_pool_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("CRITICAL", logger="sshexec")
