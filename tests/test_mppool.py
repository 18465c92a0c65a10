"""sshexec.Pool against multiprocessing.Pool: the same scenarios on both, equal results
and exception types, on local workers and on the two sshd hosts. Where they differ on
purpose (the README's list), the test says so and checks sshexec's side."""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import CancelledError
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

import sshexec
from sshexec import WorkerLostError

from . import tasks
from .procs import wait_gone
from .sshd import SSHServer, executor_kwargs

WAIT = 60.0  # every get() is bounded: a hang fails the test, it does not stall the suite
SPAWN = multiprocessing.get_context("spawn")  # no fork of a threaded test process


def outcome(call: Callable[[], Any]) -> Tuple[str, Any]:
    try:
        return "ok", call()
    except BaseException as exc:  # the comparison is about which exception, not handling it
        return "raised", type(exc)


def steps(iterator: Any, limit: int = 100) -> List[Tuple[str, Any]]:
    """Each ``next(timeout)`` of an imap iterator: values, then the exception, then the end."""
    seen: List[Tuple[str, Any]] = []
    for _ in range(limit):
        try:
            seen.append(("ok", iterator.next(timeout=WAIT)))
        except StopIteration:
            return seen
        except Exception as exc:
            seen.append(("raised", type(exc)))
    return seen


def plain_steps(iterator: Iterator[Any], limit: int = 100) -> List[Tuple[str, Any]]:
    """As ``steps`` with the builtin ``next()`` (multiprocessing's chunked imap is a plain
    generator)."""
    return steps(type("Plain", (), {"next": lambda self, timeout: next(iterator)})(), limit)


def scenarios(pool: Any) -> Dict[str, Any]:
    r: Dict[str, Any] = {}
    r["map"] = outcome(lambda: pool.map(tasks.square, range(40)))
    r["map_chunks"] = outcome(lambda: pool.map(tasks.square, range(40), chunksize=7))
    r["map_empty"] = outcome(lambda: pool.map(tasks.square, []))
    r["map_generator"] = outcome(lambda: pool.map(tasks.square, (i for i in range(9))))
    r["map_error"] = outcome(lambda: pool.map(tasks.square, [1, "a", 3]))
    r["map_not_iterable"] = outcome(lambda: pool.map(tasks.square, 5))
    r["starmap"] = outcome(lambda: pool.starmap(tasks.add, [(i, i) for i in range(20)], 3))
    r["starmap_async"] = outcome(lambda: pool.starmap_async(tasks.add, [(1, 2)]).get(WAIT))
    r["apply"] = outcome(lambda: pool.apply(tasks.add, (1,), {"b": 2}))
    r["apply_error"] = outcome(lambda: pool.apply(tasks.raise_value_error, ("boom",)))
    failed = pool.apply_async(tasks.raise_value_error, ("text",))
    try:
        failed.get(WAIT)
    except ValueError as exc:
        r["error_text"], r["cause_type"] = str(exc), type(exc.__cause__)
    r["unpicklable_arg"] = outcome(lambda: pool.apply(tasks.square, (threading.Lock(),)))
    r["map_unpicklable_item"] = outcome(lambda: pool.map(tasks.square, [1, threading.Lock()]))
    r["imap"] = outcome(lambda: list(pool.imap(tasks.square, range(30))))
    r["imap_chunks"] = outcome(lambda: list(pool.imap(tasks.square, range(30), chunksize=4)))
    bad_three = functools.partial(tasks.raise_on, 3)
    r["imap_error_in_middle"] = steps(pool.imap(bad_three, [1, 2, 3, 4, 5]))
    r["imap_chunks_error"] = plain_steps(pool.imap(bad_three, range(8), chunksize=2))
    r["imap_unordered_error"] = sorted(
        plain_steps(pool.imap_unordered(bad_three, range(6))), key=repr
    )
    r["imap_input_raises"] = steps(pool.imap(tasks.square, tasks.failing_input(3)))
    r["imap_not_iterable"] = steps(pool.imap(tasks.square, 5))
    r["imap_bad_chunksize"] = outcome(lambda: pool.imap(tasks.square, [1], chunksize=0))
    r["imap_unordered"] = outcome(lambda: sorted(pool.imap_unordered(tasks.square, range(30))))
    r["imap_unordered_chunks"] = outcome(
        lambda: sorted(pool.imap_unordered(tasks.square, range(30), chunksize=4))
    )
    r["imap_unordered_bad_chunksize"] = outcome(
        lambda: pool.imap_unordered(tasks.square, [1], chunksize=-1)
    )
    slow = pool.apply_async(tasks.sleep_then, (1.5, "late"))
    r["ready_before"] = slow.ready()
    r["successful_before"] = outcome(slow.successful)
    r["get_timeout"] = outcome(lambda: slow.get(timeout=0.1))
    r["next_timeout"] = outcome(lambda: pool.imap(tasks.sleep_then, [1.5]).next(timeout=0.1))
    r["wait_returns"] = outcome(lambda: slow.wait(0.05))
    r["get_later"] = outcome(lambda: slow.get(WAIT))
    r["ready_after"] = slow.ready()
    r["successful_after"] = outcome(slow.successful)
    r["failed_successful"] = outcome(failed.successful)
    r["repr"] = repr(pool).split(" ", 1)[1]
    r["pickle_pool"] = outcome(lambda: pool.__reduce__())
    return r


def callback_scenarios(pool: Any) -> Dict[str, Any]:
    """callback and error_callback: their arguments, that they ran before get() returned,
    and that one thread (not the caller's) ran them all."""
    me = threading.get_ident()
    calls: List[Tuple[str, Any]] = []
    threads = set()

    def record(kind: str) -> Callable[[Any], None]:
        def callback(value: Any) -> None:
            threads.add(threading.get_ident())
            calls.append((kind, value if kind == "ok" else type(value)))

        return callback

    results = [
        pool.apply_async(tasks.square, (3,), callback=record("ok"), error_callback=record("err")),
        pool.apply_async(
            tasks.raise_value_error, callback=record("ok"), error_callback=record("err")
        ),
        pool.map_async(tasks.square, range(5), callback=record("ok"), error_callback=record("err")),
        pool.map_async(
            tasks.square, ["x", 1], 1, callback=record("ok"), error_callback=record("err")
        ),
        pool.starmap_async(tasks.add, [(1, 2), (3, 4)], callback=record("ok")),
    ]
    for result in results:
        result.wait(WAIT)
    ran_before_ready = len(calls)
    return {
        "calls": sorted(calls, key=repr),
        "ran_before_ready": ran_before_ready,
        "one_thread": len(threads) == 1,
        "not_the_caller": me not in threads,
    }


@pytest.fixture(params=["local", "ssh"])
def pool_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    if request.param == "local":
        return {}
    servers: List[SSHServer] = request.getfixturevalue("sshd_pair")
    return executor_kwargs(servers)


def test_same_outcomes(pool_kwargs: Dict[str, Any]) -> None:
    with SPAWN.Pool(2) as theirs:
        expected = scenarios(theirs)
    with sshexec.Pool(2, **pool_kwargs) as ours:
        got = scenarios(ours)
    assert got == expected
    assert got["map"] == ("ok", [i * i for i in range(40)])  # and they are right


def test_same_callbacks(pool_kwargs: Dict[str, Any]) -> None:
    with SPAWN.Pool(2) as theirs:
        expected = callback_scenarios(theirs)
    with sshexec.Pool(2, **pool_kwargs) as ours:
        got = callback_scenarios(ours)
    assert got == expected
    assert got["ran_before_ready"] == 5 and got["one_thread"] and got["not_the_caller"]


def test_initializer_sets_a_global_later_tasks_read(pool_kwargs: Dict[str, Any]) -> None:
    def run(pool: Any) -> List[str]:
        with pool:
            return sorted(set(pool.map(tasks.read_global, range(8), chunksize=1)))

    args: Dict[str, Any] = dict(initializer=tasks.set_global, initargs=("set by the initializer",))
    expected = run(SPAWN.Pool(2, **args))
    assert run(sshexec.Pool(2, **args, **pool_kwargs)) == expected == ["set by the initializer"]


def test_close_then_join_waits_for_the_tasks(pool_kwargs: Dict[str, Any]) -> None:
    def run(pool: Any) -> Any:
        pending = [pool.apply_async(tasks.sleep_then, (0.3, i)) for i in range(4)]
        late = pool.map_async(tasks.square, range(6))
        pool.close()
        joined = outcome(pool.join)
        states = [r.ready() for r in pending] + [late.ready()]
        after = outcome(lambda: pool.apply_async(tasks.square, (1,)))
        return joined, states, [r.get(0) for r in pending], late.get(0), after, outcome(pool.join)

    expected = run(SPAWN.Pool(2))
    assert run(sshexec.Pool(2, **pool_kwargs)) == expected
    assert expected[1] == [True] * 5 and expected[4] == ("raised", ValueError)


def test_join_while_running_and_use_after_terminate(pool_kwargs: Dict[str, Any]) -> None:
    def run(pool: Any) -> Any:
        early = outcome(pool.join)
        pool.terminate()
        return early, outcome(lambda: pool.map(tasks.square, [1])), outcome(pool.join)

    expected = run(SPAWN.Pool(2))
    assert run(sshexec.Pool(2, **pool_kwargs)) == expected
    assert expected[0] == ("raised", ValueError)


def test_terminate_with_tasks_running(pool_kwargs: Dict[str, Any]) -> None:
    """terminate() returns at once although tasks run; what finished before keeps its value.
    Unfinished results: multiprocessing leaves them pending forever (get() times out),
    sshexec fails them with CancelledError (a documented difference)."""

    def run(pool: Any) -> Tuple[Any, ...]:
        done = pool.apply_async(tasks.square, (7,))
        done.wait(WAIT)
        running = [pool.apply_async(tasks.sleep_then, (30, i)) for i in range(2)]
        queued = pool.map_async(tasks.sleep_then, [30] * 4)
        time.sleep(1.0)  # the two are running
        start = time.monotonic()
        pool.terminate()
        quick = time.monotonic() - start < 15
        pool.join()
        return quick, done.get(0), running, queued

    quick, value, running, queued = run(SPAWN.Pool(2))
    assert (quick, value) == (True, 49)
    assert outcome(lambda: running[0].get(0.2)) == ("raised", multiprocessing.TimeoutError)

    quick, value, running, queued = run(sshexec.Pool(2, **pool_kwargs))
    assert (quick, value) == (True, 49)
    for result in [*running, queued]:
        assert outcome(functools.partial(result.get, WAIT)) == ("raised", CancelledError)
        assert result.ready() and not result.successful()


def test_with_block_terminates(pool_kwargs: Dict[str, Any]) -> None:
    start = time.monotonic()
    with sshexec.Pool(2, **pool_kwargs) as pool:
        pids = set(pool.map(tasks.pid_in, range(4), chunksize=1))
        slow = pool.apply_async(tasks.sleep_then, (30, "never"))
    assert time.monotonic() - start < 20
    assert outcome(lambda: slow.get(WAIT)) == ("raised", CancelledError)
    if not pool_kwargs:
        assert not wait_gone(sorted(pids)), "local workers outlived the with block"


def test_terminate_ends_an_imap_being_read(pool_kwargs: Dict[str, Any]) -> None:
    pool = sshexec.Pool(2, **pool_kwargs)
    results = pool.imap(tasks.sleep_then, [0.0, 30.0, 30.0, 30.0])
    assert results.next(timeout=WAIT) is None
    pool.terminate()
    assert steps(results) == [("raised", CancelledError)]
    pool.join()


def test_imap_buffersize_reads_the_input_as_results_are_taken() -> None:
    read: List[int] = []

    def numbers() -> Iterator[int]:
        for i in range(1000):
            read.append(i)
            yield i

    with sshexec.Pool(2) as pool:
        results = pool.imap(tasks.square, numbers(), buffersize=3)
        first = [results.next(timeout=WAIT) for _ in range(5)]
        time.sleep(0.5)  # the tasks thread may only run ahead by the buffer
        assert first == [0, 1, 4, 9, 16]
        assert len(read) <= 5 + 3 + 1
        unordered = pool.imap_unordered(tasks.square, range(20), chunksize=3, buffersize=2)
        assert sorted(unordered) == [i * i for i in range(20)]
        for bad in (0, -1):
            with pytest.raises(ValueError, match="buffersize must be None or > 0"):
                pool.imap(tasks.square, [1], buffersize=bad)
        with pytest.raises(TypeError, match="buffersize must be an integer or None"):
            pool.imap(tasks.square, [1], buffersize=2.5)  # type: ignore[arg-type]


def test_a_buffered_imap_does_not_hold_up_later_calls() -> None:
    """Submitting from inside the loop over a full buffered imap: the later calls are not
    queued behind the imap's unread input."""
    with sshexec.Pool(2) as pool:
        followers = [
            pool.apply_async(tasks.add, (x, 1)).get(WAIT)
            for x in pool.imap(tasks.square, range(12), buffersize=2)
        ]
    assert followers == [i * i + 1 for i in range(12)]


def test_chunked_imap_has_next_with_a_timeout_too() -> None:
    with sshexec.Pool(2) as pool:
        results = pool.imap(tasks.sleep_then, [1.0] * 4, chunksize=2)
        with pytest.raises(multiprocessing.TimeoutError):
            results.next(timeout=0.1)
        assert [results.next(timeout=WAIT) for _ in range(4)] == [None] * 4
        with pytest.raises(StopIteration):
            results.next(timeout=WAIT)


def test_close_and_join_do_not_wait_for_a_buffered_imap_consumer() -> None:
    pool = sshexec.Pool(2)
    results = pool.imap(tasks.square, range(10), buffersize=2)
    assert results.next(timeout=WAIT) == 0
    pool.close()
    pool.join()  # multiprocessing's hangs here (CPython gh-155477)
    assert list(results) == [i * i for i in range(1, 10)]


def test_chunksize_none_follows_the_standard_formula() -> None:
    """chunksize=None: len // (4 * workers), rounded up; each chunk is one task."""
    with sshexec.Pool(2) as pool:
        pids = pool.map(tasks.pid_in, range(17))  # 17 / 8 -> chunks of 3: 6 tasks
        stats = pool._state.executor.stats(refresh=0)  # sshexec.Pool's own executor
        assert stats.tasks_done == 6
        assert len(pids) == 17


def test_argument_errors_match() -> None:
    cases: Tuple[Dict[str, Any], ...] = ({"processes": 0}, {"processes": -1}, {"initializer": 3})
    if sys.version_info >= (3, 10):  # 3.9's Pool starts workers that fail the assertion
        cases += ({"maxtasksperchild": 0}, {"maxtasksperchild": "a"})
    for kwargs in cases:
        with pytest.raises(Exception) as theirs:
            SPAWN.Pool(**kwargs)
        with pytest.raises(type(theirs.value)) as ours:
            sshexec.Pool(**kwargs)
        assert str(ours.value) == str(theirs.value)
    for bad in (0, "a"):
        with pytest.raises(ValueError, match="maxtasksperchild must be a positive int or None"):
            sshexec.Pool(maxtasksperchild=bad)  # type: ignore[arg-type]


def test_maxtasksperchild_replaces_workers() -> None:
    with sshexec.Pool(1, maxtasksperchild=1) as pool:
        pids = [pool.apply(tasks.pid_in) for _ in range(3)]
    assert len(set(pids)) == 3


# -- where sshexec.Pool differs on purpose (the README lists these)


def test_a_dead_worker_fails_its_task_instead_of_hanging_the_pool(
    pool_kwargs: Dict[str, Any],
) -> None:
    with sshexec.Pool(2, max_retries=0, **pool_kwargs) as pool:
        dying = pool.apply_async(tasks.hard_exit, (3,))
        with pytest.raises(WorkerLostError):
            dying.get(WAIT)
        exiting = pool.apply_async(tasks.exit_with, (2,))
        with pytest.raises(SystemExit):
            exiting.get(WAIT)
        assert pool.map(tasks.square, range(6)) == [i * i for i in range(6)]  # still serves


def test_lambdas_and_local_functions_travel() -> None:
    offset = 10
    with sshexec.Pool(2) as pool:
        assert pool.map(lambda x: x + offset, range(3)) == [10, 11, 12]


def test_a_raising_callback_is_logged_and_the_result_still_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def bad(_: Any) -> None:
        raise RuntimeError("callback bug")

    with sshexec.Pool(1) as pool:
        result = pool.apply_async(tasks.square, (4,), callback=bad)
        assert result.get(WAIT) == 16
        assert pool.apply(tasks.square, (5,)) == 25
    assert "a Pool callback raised" in caplog.text


def test_a_forgotten_pool_warns_then_finishes_its_tasks() -> None:
    with pytest.warns(ResourceWarning, match="unclosed running sshexec.Pool"):
        result = sshexec.Pool(1).apply_async(tasks.sleep_then, (0.2, "done"))
        gc.collect()
    assert result.get(WAIT) == "done"


def test_workers_run_elsewhere_over_ssh(sshd_pair: List[SSHServer]) -> None:
    with sshexec.Pool(2, **executor_kwargs(sshd_pair)) as pool:
        hosts = {pool.apply_async(tasks.sleep_then_where, (0.5,)) for _ in range(4)}
        seen = {result.get(WAIT)[0] for result in hosts}
    assert seen == {"alpha", "beta"}
    assert os.environ.get("SSHEXEC_TEST_HOST") is None
