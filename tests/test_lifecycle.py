"""Every Future ends and every shutdown returns, on the paths users take: breaking out
of ``map``, cancelling, callbacks and logging filters that raise, workers that die idle
or mid-dispatch, hosts that fail a start or are not up yet, ``kill_workers()``, and a
consumer of remote output that stops reading. Each of these once hung, or lost a
Future, while the suite stayed green. Every wait is bounded (``bounded``)."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from sshexec import SSHPoolExecutor, WorkerLostError

from . import tasks
from .sshd import SSHServer, executor_kwargs
from .waits import bounded, eventually

Make = Callable[..., SSHPoolExecutor]


def live_workers(executor: SSHPoolExecutor) -> int:
    return sum(h.workers for h in executor.stats(refresh=0).hosts.values())


# ---- leaving early ------------------------------------------------------------------


@pytest.mark.parametrize("chunksize, buffersize", [(1, None), (4, None), (1, 8)])
def test_break_out_of_map_in_a_with_block(
    make_executor: Make, chunksize: int, buffersize: Any
) -> None:
    def scenario() -> List[int]:
        seen = []
        with make_executor() as ex:
            for r in ex.map(
                tasks.sleep_then,
                [0.02] * 400,
                range(400),
                chunksize=chunksize,
                buffersize=buffersize,
            ):
                seen.append(r)
                if r >= 10:
                    break  # leaving the with block must not wait for the 389 others
        return seen

    started = time.monotonic()
    assert bounded(scenario, 30, "leaving the with block after a break") == list(range(11))
    assert time.monotonic() - started < 15  # nowhere near 400 * 0.02 / 2 workers + start


def test_exception_in_the_loop_body_leaves_the_with_block(make_executor: Make) -> None:
    def scenario() -> None:
        with make_executor() as ex:
            for r in ex.map(tasks.sleep_then, [0.02] * 400, range(400)):
                if r == 5:
                    raise KeyError("user code failed")

    with pytest.raises(KeyError):
        bounded(scenario, 30, "leaving the with block on an exception")


def test_cancelled_futures_leave_and_plain_shutdown_returns(make_executor: Make) -> None:
    ex = make_executor()
    running = [ex.submit(tasks.sleep_then, 0.5, i) for i in range(2)]
    queued = [ex.submit(tasks.sleep_then, 0.5, i) for i in range(50)]
    cancelled = [f for f in queued if f.cancel()]
    assert len(cancelled) >= 40  # the few already sent to a worker run
    bounded(lambda: ex.shutdown(wait=True), 30, "shutdown(wait=True) after cancel()")
    assert all(f.done() for f in running + queued)
    assert [f.result() for f in running] == [0, 1]
    assert all(f.cancelled() or f.result() is not None for f in queued)


def test_abandoned_map_iterator_is_collected_and_shutdown_returns(make_executor: Make) -> None:
    ex = make_executor()
    results: Iterator[Any] = ex.map(tasks.sleep_then, [0.05] * 300, range(300))
    assert next(results) == 0
    del results  # closed by the garbage collector: its queued items are cancelled
    bounded(lambda: ex.shutdown(wait=True), 30, "shutdown after an abandoned map")


# ---- user code on the loop thread -------------------------------------------------------


@pytest.mark.parametrize("raised", [RuntimeError("cb"), SystemExit(2), KeyboardInterrupt()])
def test_done_callback_that_raises_does_not_stop_the_pool(
    make_executor: Make, raised: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    ex = make_executor()

    def callback(_: Any) -> None:
        raise raised

    for i in range(4):
        ex.submit(tasks.square, i).add_done_callback(callback)
    assert bounded(lambda: list(ex.map(tasks.square, range(20))), 30, "map after callbacks") == [
        i * i for i in range(20)
    ]
    bounded(lambda: ex.shutdown(wait=True), 30, "shutdown after raising callbacks")


class RaisingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        raise SystemExit("a logging filter that exits")


def test_logging_filter_that_raises_does_not_stop_the_pool(make_executor: Make) -> None:
    pool_log = logging.getLogger("sshexec.pool")
    old_level = pool_log.level
    bad = RaisingFilter()
    ex = make_executor()
    pool_log.addFilter(bad)
    pool_log.setLevel(logging.DEBUG)  # every dispatch and reply logs now
    try:
        got = bounded(lambda: list(ex.map(tasks.square, range(30))), 30, "map")
        assert got == [i * i for i in range(30)]
        bounded(lambda: ex.shutdown(wait=True), 30, "shutdown with a raising filter")
    finally:
        pool_log.removeFilter(bad)
        pool_log.setLevel(old_level)


def test_system_exit_while_pickling_a_call_fails_only_its_future(executor: SSHPoolExecutor) -> None:
    future = executor.submit(tasks.square, tasks.ExitOnPickle())  # type: ignore[arg-type]
    with pytest.raises(pickle.PicklingError, match="SystemExit") as info:
        future.result(timeout=10)
    assert isinstance(info.value.__cause__, SystemExit)
    results = executor.map(tasks.square, [tasks.ExitOnPickle(), 3])
    with pytest.raises(pickle.PicklingError, match="SystemExit"):
        next(results)
    assert executor.submit(tasks.square, 5).result(timeout=30) == 25


# ---- workers that die ---------------------------------------------------------------------


def test_idle_worker_that_dies_is_replaced(make_executor: Make) -> None:
    ex = make_executor()
    pids = {pid for _, pid, _ in bounded(lambda: list(ex.map(tasks.where, range(8))), 30, "map")}
    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)  # idle: no task is lost with it
    eventually(
        lambda: victim not in {w.pid for w in ex.stats(refresh=0).workers.values() if w.is_alive},
        15,
        "the dead worker is noticed",
    )
    eventually(lambda: live_workers(ex) == 2, 30, "a replacement starts")
    got = bounded(lambda: list(ex.map(tasks.where, range(8))), 30, "map after the death")
    assert victim not in {pid for _, pid, _ in got}
    assert sum(h.tasks_retried for h in ex.stats(refresh=0).hosts.values()) == 0
    bounded(lambda: ex.shutdown(wait=True), 30, "shutdown")


def test_workers_dying_during_dispatch_lose_no_future(make_executor: Make, tmp_path: Path) -> None:
    ex = make_executor(4 if make_executor.kind == "local" else 2, max_retries=1)  # type: ignore[attr-defined]
    # every seventh task kills its worker the first time it runs: losses keep landing while
    # the other workers are being sent tasks, and every lost task must run again elsewhere
    futures = [
        ex.submit(tasks.die_once, str(tmp_path / f"m{i}"), i)
        if i % 7 == 0
        else ex.submit(tasks.sleep_then, 0.005, i)
        for i in range(120)
    ]
    _, not_done = bounded(lambda: cf.wait(futures, timeout=90), 100, "waiting for the tasks")
    assert not not_done, f"{len(not_done)} Futures never ended"
    assert [f.result() for f in futures] == list(range(120))
    bounded(lambda: ex.shutdown(wait=True), 30, "shutdown")


def flaky_site(tmp_path: Path) -> Tuple[Path, Path]:
    """A sitecustomize that makes a fresh interpreter exit at once when the flag file
    exists (removing it): with the agent spawning workers (no fork), the next worker to
    start dies before its Hello, while the agent and the other workers live on."""
    site, flag = tmp_path / "site", tmp_path / "fail-next-start"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get('SSHEXEC_ROLE') == 'worker' and os.path.exists({str(flag)!r}):\n"
        f"    os.remove({str(flag)!r})\n"
        "    os._exit(3)\n"
    )
    return site, flag


def test_a_failed_replacement_start_does_not_freeze_the_host(
    make_executor: Make, tmp_path: Path
) -> None:
    site, flag = flaky_site(tmp_path)
    env = {"SSHEXEC_AGENT_START": "spawn", "PYTHONPATH": str(site)}
    hosts = make_executor.hosts_with(4, env=env)  # type: ignore[attr-defined]
    ex = make_executor(None, hosts=hosts)
    bounded(lambda: list(ex.map(tasks.square, range(8))), 30, "map")
    eventually(lambda: live_workers(ex) == 4, 30, "all four workers up")
    victim = next(w for w in ex.stats(refresh=0).workers.values() if w.is_alive)
    flag.touch()  # the replacement's first start fails
    os.kill(victim.pid, signal.SIGKILL)
    eventually(lambda: not flag.exists(), 30, "a replacement start was tried (and failed)")
    eventually(lambda: live_workers(ex) == 4, 30, "the host is topped up again")
    assert not any(h.error for h in ex.stats(refresh=0).hosts.values())
    bounded(lambda: ex.shutdown(wait=True), 30, "shutdown")


def test_kill_workers_starts_nothing_and_charges_nothing(
    make_executor: Make, caplog: pytest.LogCaptureFixture
) -> None:
    ex = make_executor()
    running = [ex.submit(tasks.sleep_then, 60, i) for i in range(2)]
    queued = [ex.submit(tasks.sleep_then, 60, i) for i in range(4)]
    eventually(lambda: live_workers(ex) == 2, 20, "both workers up")
    time.sleep(0.5)  # both running tasks are inside time.sleep on their workers
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sshexec"):
        bounded(ex.kill_workers, 20, "kill_workers()")
    for future in running:
        error = future.exception(timeout=5)
        assert isinstance(error, WorkerLostError), error
        assert "kill_workers" in str(error)
    assert all(f.cancelled() or isinstance(f.exception(timeout=5), Exception) for f in queued)
    stats = ex.stats(refresh=0)
    assert sum(h.tasks_retried for h in stats.hosts.values()) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if m.startswith("worker started")], messages
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "lost" in r.getMessage()
    ]


# ---- hosts that are not there yet -------------------------------------------------------


@pytest.mark.ssh
def test_host_down_at_construction_joins_when_it_comes_up(
    start_server: Callable[..., SSHServer],
) -> None:
    up = start_server("joins-up")
    late = start_server("joins-late")
    late.stop()  # its port stays reserved for it; nothing listens there yet
    kwargs = executor_kwargs([up, late], max_workers=2, reconnect_grace=60.0)

    def scenario() -> List[str]:
        with SSHPoolExecutor(**kwargs) as ex:
            assert bounded(lambda: ex.submit(tasks.square, 3).result(), 30, "a task") == 9
            late.start()
            eventually(
                lambda: ex.stats(refresh=0).hosts[late.spec].workers == 1, 40, "the late host joins"
            )
            return sorted({h for h, _, _ in ex.map(tasks.sleep_then_where, [0.2] * 8)})

    assert bounded(scenario, 90, "the executor") == ["joins-late", "joins-up"]


# ---- remote output --------------------------------------------------------------------


class StuckStream:
    """A stdout whose reader has stopped reading, until ``release``."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.text: List[str] = []

    def write(self, text: str) -> int:
        self.release.wait(30)
        self.text.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_stuck_stdout_holds_only_the_printing_worker(make_executor: Make) -> None:
    ex = make_executor()
    assert bounded(lambda: list(ex.map(tasks.square, range(4))), 30, "warm-up") == [0, 1, 4, 9]
    stuck, real = StuckStream(), sys.stdout
    sys.stdout = stuck
    try:
        printing = ex.submit(tasks.sleep_then_say, 0.0, "hello from a worker")
        time.sleep(0.5)  # its line is waiting at the stuck stdout
        quiet = ex.submit(tasks.square, 12)
        assert bounded(lambda: quiet.result(), 15, "a quiet task's result") == 144
        assert not printing.done()  # its result waits behind its own output
        stuck.release.set()
        assert bounded(lambda: printing.result(), 15, "the printing task") == "hello from a worker"
    finally:
        stuck.release.set()
        sys.stdout = real
    assert any("hello from a worker" in t for t in stuck.text)
