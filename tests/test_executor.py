"""The Executor contract, on local workers and on two real sshd hosts."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import os
import re
import threading
import time
from concurrent.futures.process import _RemoteTraceback
from typing import Any, Callable, Iterator, List

import pytest

from sshexec import SSHPoolExecutor

from . import tasks

Make = Callable[..., SSHPoolExecutor]


def test_submit_returns_result(executor: SSHPoolExecutor) -> None:
    assert executor.submit(tasks.add, 2, b=3).result(timeout=30) == 5
    assert executor.submit(pow, 2, 10).result(timeout=30) == 1024


def test_lambda_and_closure_travel_by_value(executor: SSHPoolExecutor) -> None:
    offset = 41
    assert executor.submit(lambda: offset + 1).result(timeout=30) == 42


def test_map_keeps_input_order(executor: SSHPoolExecutor) -> None:
    assert list(executor.map(tasks.square, range(200))) == [x * x for x in range(200)]


def test_map_zips_iterables_to_the_shortest(executor: SSHPoolExecutor) -> None:
    assert list(executor.map(tasks.add, [1, 2, 3], [10, 20])) == [11, 22]


@pytest.mark.parametrize("chunksize", [1, 3, 7, 1000])
def test_map_chunksize(executor: SSHPoolExecutor, chunksize: int) -> None:
    results = executor.map(tasks.add, range(50), range(50), chunksize=chunksize)
    assert list(results) == [2 * x for x in range(50)]


def test_map_rejects_bad_chunksize_and_buffersize(executor: SSHPoolExecutor) -> None:
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(tasks.square, [1], chunksize=0)
    with pytest.raises(ValueError, match="buffersize"):
        executor.map(tasks.square, [1], buffersize=0)
    with pytest.raises(TypeError, match="buffersize"):
        executor.map(tasks.square, [1], buffersize=2.5)  # type: ignore[arg-type]


def test_map_raises_at_iteration_in_order(executor: SSHPoolExecutor) -> None:
    results = executor.map(tasks.square, [1, 2, "x", 4])
    assert next(results) == 1
    assert next(results) == 4
    with pytest.raises(TypeError):
        next(results)


def test_map_timeout_counts_from_the_call(executor: SSHPoolExecutor) -> None:
    results = executor.map(tasks.sleep_then, [0.0, 5.0], timeout=0.8)
    assert next(results) is None
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        next(results)
    assert time.monotonic() - started < 3.0


def test_map_buffersize_reads_lazily(executor: SSHPoolExecutor) -> None:
    consumed: List[int] = []

    def numbers() -> Iterator[int]:
        for n in itertools.count():
            consumed.append(n)
            yield n

    results = executor.map(tasks.square, numbers(), buffersize=4)
    assert len(consumed) == 4  # only the first window is read at the call
    first = list(itertools.islice(results, 20))
    assert first == [n * n for n in range(20)]
    assert len(consumed) <= 20 + 4 + 1
    del results


def test_map_buffersize_with_chunks(executor: SSHPoolExecutor) -> None:
    results = executor.map(tasks.square, iter(range(1000)), chunksize=50, buffersize=2)
    assert sum(results) == sum(x * x for x in range(1000))


def test_as_completed_and_wait(executor: SSHPoolExecutor) -> None:
    futures = [executor.submit(tasks.sleep_then, 0.05 * (i % 3), i) for i in range(12)]
    assert sorted(f.result() for f in cf.as_completed(futures, timeout=60)) == list(range(12))
    slow = executor.submit(tasks.sleep_then, 3.0, "slow")
    fast = executor.submit(tasks.sleep_then, 0.0, "fast")
    done, not_done = cf.wait([slow, fast], timeout=60, return_when=cf.FIRST_COMPLETED)
    assert fast in done and slow in not_done
    bad = executor.submit(tasks.raise_value_error)
    done, _ = cf.wait([slow, bad], timeout=60, return_when=cf.FIRST_EXCEPTION)
    assert bad in done
    done, not_done = cf.wait([slow, fast, bad], timeout=60)
    assert not not_done


def test_asyncio_wrap_future(executor: SSHPoolExecutor) -> None:
    async def main() -> List[int]:
        futures = [asyncio.wrap_future(executor.submit(tasks.square, i)) for i in range(5)]
        return list(await asyncio.gather(*futures))

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_exception_keeps_type_and_carries_remote_traceback(
    executor: SSHPoolExecutor, make_executor: Make
) -> None:
    future = executor.submit(tasks.raise_value_error, "bad value 17")
    with pytest.raises(ValueError, match="bad value 17") as info:
        future.result(timeout=30)
    cause = info.value.__cause__
    assert type(cause) is _RemoteTraceback
    assert "raise_value_error" in cause.tb and "ValueError: bad value 17" in cause.tb
    assert cause.tb.lstrip('\n"').startswith("host ")
    assert " pid " in cause.tb.splitlines()[2]


def test_cancel_pending_future(make_executor: Make) -> None:
    executor = make_executor(1)
    blockers = [executor.submit(tasks.sleep_then, 1.0) for _ in range(3)]
    waiting = [executor.submit(tasks.square, i) for i in range(5)]
    assert all(f.cancel() for f in waiting)
    assert all(f.cancelled() for f in waiting)
    assert [f.result(timeout=30) for f in blockers] == [None, None, None]


def test_submit_after_shutdown_raises(executor: SSHPoolExecutor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(tasks.square, 2)
    executor.shutdown()  # idempotent


def test_shutdown_waits_for_pending(executor: SSHPoolExecutor) -> None:
    futures = [executor.submit(tasks.sleep_then, 0.1, i) for i in range(6)]
    executor.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == list(range(6))


def test_shutdown_nowait_still_completes_pending(executor: SSHPoolExecutor) -> None:
    futures = [executor.submit(tasks.sleep_then, 0.2, i) for i in range(4)]
    started = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - started < 0.5
    assert [f.result(timeout=30) for f in futures] == list(range(4))


def test_shutdown_cancel_futures(make_executor: Make) -> None:
    executor = make_executor(1)
    running = executor.submit(tasks.sleep_then, 0.5, "ran")
    time.sleep(0.2)
    queued = [executor.submit(tasks.square, i) for i in range(20)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=0) == "ran"
    assert sum(f.cancelled() for f in queued) >= 15  # all but the few already prefetched
    assert all(f.done() for f in queued)


def test_with_block_shuts_down(make_executor: Make) -> None:
    with make_executor() as executor:
        future = executor.submit(tasks.square, 9)
    assert future.result(timeout=0) == 81
    with pytest.raises(RuntimeError):
        executor.submit(tasks.square, 1)


def test_print_inside_tasks_does_not_corrupt_frames(
    executor: SSHPoolExecutor, capfd: pytest.CaptureFixture[str]
) -> None:
    results = list(executor.map(tasks.say, [f"line-{i}" for i in range(30)]))
    assert results == [f"line-{i}" for i in range(30)]
    # a task's output travels ahead of its result: it is all there once map returns
    captured = capfd.readouterr()
    out, err = captured.out.splitlines(), captured.err.splitlines()
    assert sorted(line.split("] ", 1)[1] for line in out) == sorted(results)
    assert sorted(line.split("] ", 1)[1] for line in err) == sorted(f"err:{r}" for r in results)
    assert all(re.match(r"^\[[^\]]+:[0-9]+\] ", line) for line in out + err)


def test_done_callback_may_submit(executor: SSHPoolExecutor) -> None:
    chained: List[cf.Future[int]] = []
    ready = threading.Event()

    def again(future: cf.Future[int]) -> None:
        chained.append(executor.submit(tasks.square, future.result()))
        ready.set()

    executor.submit(tasks.sleep_then, 0.3, 3).add_done_callback(again)
    assert ready.wait(30)
    assert chained[0].result(timeout=30) == 9


def test_shutdown_wait_from_callback_returns(executor: SSHPoolExecutor) -> None:
    """Callbacks run on the executor's callback thread, not its loop thread: there
    ``shutdown(wait=True)`` waits for the pool (not for the callback itself) and returns."""
    errors: List[BaseException] = []
    ready = threading.Event()

    def stop(_: Any) -> None:
        try:
            executor.shutdown(wait=True)
        except RuntimeError as exc:
            errors.append(exc)
        ready.set()

    pending = executor.submit(tasks.sleep_then, 0.5)
    pending.add_done_callback(stop)  # still running: the callback runs when it ends
    assert ready.wait(30)
    assert not errors, errors
    with pytest.raises(RuntimeError):
        executor.submit(tasks.square, 2)


def test_initializer_runs_in_every_worker(make_executor: Make) -> None:
    executor = make_executor(2, initializer=tasks.init_marker, initargs=("ready",))
    assert set(executor.map(tasks.read_marker, range(8))) == {"ready"}


def test_max_tasks_per_child_replaces_workers(make_executor: Make) -> None:
    executor = make_executor(1, max_tasks_per_child=2)
    pids = [executor.submit(tasks.where).result(timeout=30)[1] for _ in range(6)]
    assert len(set(pids)) == 3


def test_large_payload_round_trip(executor: SSHPoolExecutor) -> None:
    blob = os.urandom(16 << 20)
    assert executor.submit(bytes, blob).result(timeout=60) == blob
    assert len(executor.submit(tasks.big, 24 << 20).result(timeout=60)) == 24 << 20


def test_unpicklable_argument_fails_only_its_future(executor: SSHPoolExecutor) -> None:
    future = executor.submit(tasks.square, threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pickle"):
        future.result(timeout=30)
    assert executor.submit(tasks.square, 5).result(timeout=30) == 25


def test_max_workers_none_means_cores(make_executor: Make) -> None:
    executor = make_executor(None)
    per_host = os.cpu_count() or 1
    hosts = 2 if make_executor.kind == "ssh" else 1  # type: ignore[attr-defined]
    assert executor._max_workers == per_host * hosts
    assert "workers=" in repr(executor)


def test_tasks_spread_over_hosts(make_executor: Make) -> None:
    executor = make_executor(4)
    seen = {host for host, _, _ in executor.map(tasks.where, range(40))}
    expected = {"alpha", "beta"} if make_executor.kind == "ssh" else {"local"}  # type: ignore[attr-defined]
    assert seen == expected


def test_many_small_tasks(executor: SSHPoolExecutor) -> None:
    futures = [executor.submit(tasks.square, i) for i in range(2000)]
    assert sum(f.result(timeout=60) for f in futures) == sum(i * i for i in range(2000))


def test_submit_from_many_threads(executor: SSHPoolExecutor) -> None:
    results: List[int] = []
    lock = threading.Lock()

    def client(base: int) -> None:
        values = [executor.submit(tasks.add, base, i).result(timeout=60) for i in range(20)]
        with lock:
            results.extend(values)

    threads = [threading.Thread(target=client, args=(100 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == sorted(100 * t + i for t in range(4) for i in range(20))
