"""Task limits and kill(), on real workers (local, and through real sshd hosts): a task
past its time or memory is ended on the node with every process it started, its Future
fails with TaskTimeout / TaskMemoryError, its host is back to full strength within a
second, and nothing else is touched; kill() ends one running task alone; limits given
through options() stay on the calls made through it."""

from __future__ import annotations

import concurrent.futures as cf
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List

import cloudpickle
import pytest

import sshexec
from sshexec import SSHPoolExecutor, TaskKilled, TaskMemoryError, TaskTimeout
from sshexec._layers.options import parse_memory, task_limits
from sshexec._wire import protocol as proto

from . import tasks
from .procs import alive
from .test_worker import Host, call
from .test_worker import host as host
from .waits import eventually

Make = Callable[..., SSHPoolExecutor]


def group_members(group: int) -> List[int]:
    """Live processes of process group ``group``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == group:
            found.append(int(name))
    return found


def live_workers(ex: SSHPoolExecutor) -> int:
    return sum(h.workers for h in ex.stats(refresh=0).hosts.values())


def planned(ex: SSHPoolExecutor) -> int:
    return sum(h.workers or 0 for h in ex._pool.hosts)


def wait_full(ex: SSHPoolExecutor, seconds: float = 15.0) -> None:
    eventually(lambda: live_workers(ex) == planned(ex), seconds, "every worker started")


def failure_time(future: cf.Future[Any], since: float, seconds: float = 30.0) -> float:
    done, _ = cf.wait([future], timeout=seconds)
    assert done, f"the Future did not end within {seconds} s"
    return time.monotonic() - since


def totals(ex: SSHPoolExecutor, name: str) -> int:
    return sum(getattr(h, name) for h in ex.stats(refresh=0).hosts.values())


def test_timeout_ends_the_task_and_everything_it_started(
    make_executor: Make, tmp_path: Path
) -> None:
    ex = make_executor(2)
    wait_full(ex)
    path = str(tmp_path / "pids")
    started = time.monotonic()
    future = ex.options(timeout=2).submit(tasks.hang_with_child, path)
    elapsed = failure_time(future, started)
    error = future.exception()
    assert isinstance(error, TaskTimeout) and isinstance(error, TimeoutError), error
    assert 2.0 <= elapsed <= 2.5, f"failed after {elapsed:.2f} s"
    assert error.limit == 2.0 and error.host in str(error) and "2 s" in str(error)
    assert error.worker_id.startswith(error.host) and f"task {error.task_id}" in str(error)
    worker, child, away = (int(p) for p in Path(path).read_text().split())
    eventually(
        lambda: not group_members(worker) and not any(alive(p) for p in (worker, child, away)),
        1.0,
        "the worker's process group, its child and its grandchild in a session of its own are gone",
    )
    eventually(lambda: live_workers(ex) == planned(ex), 1.0, "the host is back to full strength")
    assert totals(ex, "timeouts") == 1
    assert ex.submit(tasks.sleep_then, 0.1, "fine").result(timeout=30) == "fine"


def test_memory_limit_kills_the_hog_and_not_its_neighbour(make_executor: Make) -> None:
    hosts = make_executor.hosts_with(4)[:1]  # type: ignore[attr-defined]
    ex = make_executor(None, hosts=hosts)  # two (ssh) or four (local) workers on one host
    wait_full(ex)
    neighbour = ex.submit(tasks.sleep_then, 1.5, "neighbour")
    started = time.monotonic()
    hog = ex.options(memory="500M").submit(tasks.hog, 2 << 30)
    elapsed = failure_time(hog, started)
    error = hog.exception()
    assert isinstance(error, TaskMemoryError) and isinstance(error, MemoryError), error
    assert elapsed <= 1.0, f"the hog failed after {elapsed:.2f} s"
    assert error.limit == 500 << 20 and error.host in str(error)
    assert neighbour.result(timeout=30) == "neighbour"
    eventually(lambda: live_workers(ex) == planned(ex), 1.0, "the host is back to full strength")
    assert totals(ex, "memory_kills") == 1


def test_memory_counts_the_processes_a_task_starts(make_executor: Make) -> None:
    ex = make_executor(1)
    future = ex.options(memory="300M").submit(tasks.hog_in_child, 1 << 30)
    failure_time(future, time.monotonic())
    assert isinstance(future.exception(), TaskMemoryError), future.exception()


def test_memory_leaves_out_what_an_earlier_task_left_running(make_executor: Make) -> None:
    """A process an earlier task of the worker left behind is not the next task's: the
    limit counts what the task runs (found by the long chaos run, where a time-limited
    task failed with TaskMemoryError for five children earlier tasks had left)."""
    ex = make_executor(1)
    assert ex.submit(tasks.leave_a_big_child, 400 << 20).result(timeout=60) > 0
    small = ex.options(memory="300M").submit(tasks.sleep_then, 0.3, "small")
    assert small.result(timeout=30) == "small"


def test_kill_ends_one_running_task_of_eight(make_executor: Make, tmp_path: Path) -> None:
    ex = make_executor(None, hosts=make_executor.hosts_with(8))  # type: ignore[attr-defined]
    wait_full(ex)
    paths = [str(tmp_path / f"pid{i}") for i in range(8)]
    futures = [ex.submit(tasks.sleep_after_writing_pid, p, 2.0) for p in paths]
    eventually(lambda: all(os.path.exists(p) for p in paths), 15, "all eight tasks run")
    pids = [int(Path(p).read_text()) for p in paths]
    assert len(set(pids)) == 8, "two tasks ran on one worker"
    started = time.monotonic()
    assert ex.kill(futures[3]) is True
    assert failure_time(futures[3], started) <= 0.5
    assert isinstance(futures[3].exception(), TaskKilled), futures[3].exception()
    eventually(lambda: not alive(pids[3]), 1.0, "the killed task's worker is gone")
    eventually(lambda: live_workers(ex) == planned(ex), 1.0, "the host is back to full strength")
    others = [f.result(timeout=30) for i, f in enumerate(futures) if i != 3]
    assert others == [p for i, p in enumerate(pids) if i != 3], "another task was run again"
    assert ex.kill(futures[0]) is False  # ended already
    eventually(lambda: totals(ex, "kills") == 1, 5, "the kill is counted")


def test_kill_of_a_queued_task_cancels_it(make_executor: Make) -> None:
    ex = make_executor(1, prefetch=1)
    running = ex.submit(tasks.sleep_then, 1.0, "ran")
    queued = ex.submit(tasks.square, 3)
    assert ex.kill(queued) is True
    assert queued.cancelled()
    assert running.result(timeout=30) == "ran"
    assert totals(ex, "kills") == 0


def test_options_limit_only_the_calls_made_through_them(make_executor: Make) -> None:
    ex = make_executor(2)
    limited = ex.options(timeout=1)
    slow = ex.submit(tasks.sleep_then, 1.5, "unlimited")
    cut = limited.submit(tasks.sleep_then, 30, "never")
    mapped = limited.map(tasks.sleep_then, [0.1, 30], ["a", "b"])
    assert next(mapped) == "a"
    with pytest.raises(TaskTimeout):
        next(mapped)
    with pytest.raises(TaskTimeout):
        cut.result(timeout=30)
    assert slow.result(timeout=30) == "unlimited"
    assert list(ex.map(tasks.sleep_then, [1.2], ["plain"])) == ["plain"]
    assert limited.options(timeout=None).submit(tasks.sleep_then, 1.2, "lifted").result(30)


def test_the_executor_default_and_lifting_it(make_executor: Make) -> None:
    ex = make_executor(1, task_timeout=1.0)
    with pytest.raises(TaskTimeout):
        ex.submit(tasks.sleep_then, 30).result(timeout=30)
    assert ex.options(timeout=None).submit(tasks.sleep_then, 1.3, "ok").result(30) == "ok"


def test_limits_as_users_write_them() -> None:
    assert parse_memory("500M") == 500 << 20
    assert parse_memory("2G") == parse_memory("2GiB") == parse_memory("2 gb") == 2 << 30
    assert parse_memory("1.5k") == 1536 and parse_memory(4096) == 4096
    assert task_limits(None, None) is None
    assert task_limits(2, None) == (2.0, 0)
    for bad in ("lots", "-1M", 0, "0"):
        with pytest.raises(ValueError):
            task_limits(None, bad)
    for wrong in (True, 1.5, [1]):
        with pytest.raises(TypeError):
            parse_memory(wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        task_limits(0, None)
    with pytest.raises(TypeError):
        task_limits("5", None)  # type: ignore[arg-type]


def test_the_errors_are_public_and_pickle() -> None:
    import pickle

    for cls in (TaskTimeout, TaskMemoryError, TaskKilled):
        assert cls.__module__ == "sshexec" and getattr(sshexec, cls.__name__) is cls
        error = cls(7, "node1", "node1#2", 2.0, "measured")
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is cls and str(again) == str(error) and again.host == "node1"


# ---- the agent's side, without processes ----------------------------------------------


def test_the_agent_reads_the_board_and_stops_what_is_past_its_limits() -> None:
    from sshexec._node import limits

    now = [100.0]
    stopped: List[Any] = []
    watch = limits.Limits(lambda *args: stopped.append(args), lambda: now[0])
    board = limits.new_board()
    page = limits.view(board)
    watch.add(1, os.getpid(), board)
    assert watch.due() == 100.0 + limits.IDLE_EVERY
    watch.check(now[0])  # idle: nothing to do, look again later
    assert not stopped and watch.due() == 100.0 + limits.IDLE_EVERY
    page[1], page[2], page[3], page[0] = 99.5, 2.0, 0.0, 7  # task 7 started at 99.5, 2 s
    watch.check(now[0])
    assert not stopped and watch.due() == 100.0 + limits.IDLE_EVERY
    now[0] = 101.45
    watch.check(now[0])
    assert not stopped and watch.due() == 101.5  # its deadline, exactly
    now[0] = 101.5
    watch.check(now[0])
    assert stopped == [(1, 7, "timeout", "ran 2.00 s, over its limit of 2 s")]
    assert watch.due() == float("inf")  # stopped once: its board is no longer read

    stopped.clear()
    board = limits.new_board()
    page = limits.view(board)
    watch.add(2, os.getpid(), board)
    page[1], page[2], page[3], page[0] = now[0], 0.0, 1.0, 8  # this process is over 1 byte
    watch.check(now[0])
    assert stopped and stopped[0][:3] == (2, 8, "memory"), stopped

    stopped.clear()
    board = limits.new_board()
    page = limits.view(board)
    watch.add(3, os.getpid(), board)
    watch.kill(3, 9)  # not started yet: stopped when it is
    watch.check(now[0])
    assert not stopped and watch.due() == now[0] + limits.FAST_EVERY
    page[1], page[0] = now[0], 9
    watch.check(now[0])
    assert stopped == [(3, 9, "killed", "killed by kill()")]


SERVING: List[Any] = []  # the in-process worker whose board a task reads


def board_now() -> List[float]:
    return list(SERVING[0].board)


def test_the_worker_notes_each_task_and_its_limits_on_its_board(host: Host) -> None:
    SERVING[:] = [host.worker]
    host.start()
    assert isinstance(host.receive(), proto.Ready)
    before = time.monotonic()
    host.send(proto.Limits(2.5, 1000), proto.Run(5, call(board_now)))
    done = host.receive()
    assert isinstance(done, proto.Done)
    task, started, seconds, memory = cloudpickle.loads(done.payload)
    assert (task, seconds, memory) == (5, 2.5, 1000) and before <= started <= time.monotonic()
    assert host.worker.board[0] == 0  # idle again: nothing for the agent to stop
    host.send(proto.Run(6, call(board_now)), proto.Limits(0.0, 0), proto.Run(7, call(board_now)))
    six, seven = host.receive(), host.receive()
    assert isinstance(six, proto.Done) and isinstance(seven, proto.Done)
    assert cloudpickle.loads(six.payload)[::2] == [6, 2.5]  # the limits hold until changed
    assert cloudpickle.loads(seven.payload)[::2] == [7, 0.0]


# ---- sshexec map --timeout / --memory -------------------------------------------------

NAPS = """
import time

def nap(line):
    time.sleep(float(line))
    return "slept " + line
"""


def test_map_with_a_time_limit_fails_the_line_past_it(tmp_path: Path) -> None:
    from .test_cli import run_cli

    (tmp_path / "naps.py").write_text(NAPS)
    stdin = "0.1\n30\n0.2\n"
    args = ("map", "naps:nap", "--workers", "2", "--timeout", "1", "--memory", "1G")
    result = run_cli(*args, "--keep-going", cwd=tmp_path, stdin=stdin)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == ["slept 0.1", "", "slept 0.2"]
    assert "line 2 failed" in result.stderr and "TaskTimeout" in result.stderr
    assert "1 of 3 lines failed" in result.stderr
    stopped = run_cli(*args, cwd=tmp_path, stdin=stdin)
    assert stopped.returncode == 1 and stopped.stdout.splitlines() == ["slept 0.1"]


# ---- through the layers ---------------------------------------------------------------


def test_joblib_and_pool_take_the_limits() -> None:
    import gc

    joblib = pytest.importorskip("joblib")
    import sshexec.joblib  # noqa: F401  (registers the backend)
    from sshexec import Pool

    with joblib.parallel_config(backend="sshexec", max_workers=2, task_timeout=1.0):
        with pytest.raises(TaskTimeout):
            joblib.Parallel(batch_size=1)(joblib.delayed(tasks.sleep_then)(s, s) for s in (0.1, 30))
    gc.collect()  # a block whose calls raised leaves a reference cycle (see the README)
    with Pool(1, task_memory="300M") as pool:
        with pytest.raises(TaskMemoryError):
            pool.apply(tasks.hog, (1 << 30,))
        assert pool.apply(tasks.square, (4,)) == 16  # the pool goes on


def test_limits_hold_for_spawned_workers_too(make_executor: Make, tmp_path: Path) -> None:
    hosts = make_executor.hosts_with(2, env={"SSHEXEC_AGENT_START": "spawn"})  # type: ignore[attr-defined]
    ex = make_executor(None, hosts=hosts)
    started = time.monotonic()
    future = ex.options(timeout=1.5).submit(tasks.sleep_then, 30)
    assert 1.5 <= failure_time(future, started) <= 2.5
    assert isinstance(future.exception(), TaskTimeout), future.exception()
    running = ex.submit(tasks.sleep_then, 30)
    time.sleep(0.5)
    assert ex.kill(running) and isinstance(running.exception(timeout=5), TaskKilled)
    assert ex.submit(tasks.square, 5).result(timeout=30) == 25
    ex.shutdown()
    assert not list(Path(tempfile.gettempdir()).glob("sshexec-board-*")), "a board file is left"
