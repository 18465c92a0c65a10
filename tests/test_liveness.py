"""Liveness that user code and big writes cannot fake, and Futures that always end.

A done-callback that blocks runs on the executor's callback thread, never on its loop
thread, so pings, replies and the agents' judgement of the client go on; cancelled
queued tasks wake ``wait()`` and ``as_completed()``; a big upload over a slow link is
not silence (the agent beats on its own clock, every byte received counts, and our own
writes still draining count too). Every wait is bounded."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from benchmarks.proxy import DelayProxy
from sshexec import SSHPoolExecutor
from sshexec._pool import session as session_module
from sshexec._wire import protocol as proto

from . import tasks
from .sshd import SSHServer, executor_kwargs
from .waits import bounded, eventually

Make = Callable[..., SSHPoolExecutor]


def silence_records(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if "said nothing" in r.getMessage()]


# ---- cancelling queued tasks ----------------------------------------------------------------


def test_cancelled_queued_futures_end_for_wait_and_as_completed(make_executor: Make) -> None:
    """2,000 tiny tasks, 700 cancelled at random while most are queued: ``wait`` sees
    every Future end, and ``as_completed`` yields each once."""
    executor = make_executor(2)
    futures = [executor.submit(tasks.square, i) for i in range(2000)]
    for future in random.Random(7).sample(futures, 700):
        future.cancel()
    _done, not_done = cf.wait(futures, timeout=60)
    assert not not_done, f"{len(not_done)} Futures never ended for wait()"
    seen = list(cf.as_completed(futures, timeout=60))
    assert len(seen) == len(set(map(id, seen))) == 2000
    for i, future in enumerate(futures):
        if not future.cancelled():
            assert future.result() == i * i


def test_cancel_futures_at_shutdown_ends_them_for_wait(make_executor: Make) -> None:
    """``shutdown(cancel_futures=True)`` cancels the queued tasks; ``wait`` sees them end."""
    executor = make_executor(2)
    futures = [executor.submit(tasks.sleep_then, 0.2, i) for i in range(40)]
    bounded(lambda: executor.shutdown(wait=True, cancel_futures=True), 60, "shutdown")
    _done, not_done = cf.wait(futures, timeout=10)
    assert not not_done, f"{len(not_done)} cancelled Futures never ended for wait()"
    assert any(f.cancelled() for f in futures)


# ---- callbacks off the loop thread ------------------------------------------------------------


@pytest.fixture
def sshexec_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING, logger="sshexec")
    yield caplog


def test_blocking_done_callback_stops_no_pings(
    make_executor: Make, tmp_path: Path, sshexec_logs: pytest.LogCaptureFixture
) -> None:
    """A done-callback that blocks for longer than the agents' silence deadline (3 s
    here) delays no ping: a long task on another worker is not lost, and runs once."""
    executor = make_executor(2, keepalive_interval=1.0)
    runs = tmp_path / "runs"
    long = executor.submit(tasks.note_run_then_sleep, str(runs), 10.0, "long")
    eventually(runs.exists, 30, "the long task started")
    names: List[str] = []

    def slow_database_write(_: Any) -> None:
        names.append(threading.current_thread().name)
        time.sleep(6.0)

    quick = executor.submit(tasks.sleep_then, 1.0, 9)
    quick.add_done_callback(slow_database_write)
    assert long.result(timeout=60) == "long"
    assert quick.result(timeout=10) == 9
    assert runs.read_text().count("run") == 1, runs.read_text()
    stats = executor.stats(refresh=0)
    assert sum(h.tasks_retried for h in stats.hosts.values()) == 0
    assert not silence_records(sshexec_logs)
    eventually(lambda: bool(names), 10, "the callback ran")
    assert names[0].startswith("sshexec-callbacks-"), names


def test_callbacks_run_in_order_off_the_loop_thread_and_may_submit(make_executor: Make) -> None:
    executor = make_executor(2)
    seen: List[int] = []
    names: List[str] = []
    more: Dict[int, cf.Future[int]] = {}

    def record(i: int) -> Callable[[cf.Future[int]], None]:
        def callback(future: cf.Future[int]) -> None:
            names.append(threading.current_thread().name)
            seen.append(future.result())
            more[i] = executor.submit(tasks.square, i)  # submit() from a callback works

        return callback

    futures = []
    for i in range(20):
        future = executor.submit(tasks.sleep_then, 0.05, i)
        future.add_done_callback(record(i))
        futures.append(future)
    _done, not_done = cf.wait(futures, timeout=60)
    assert not not_done
    eventually(lambda: len(more) == 20, 30, "every callback ran")
    assert sorted(seen) == list(range(20))
    assert not [n for n in names if n.startswith("sshexec-loop-")], names
    assert [more[i].result(timeout=30) for i in range(20)] == [i * i for i in range(20)]


def test_shutdown_wait_from_a_callback_returns(make_executor: Make) -> None:
    """``shutdown(wait=True)`` in a done-callback waits for the pool, not for itself:
    it returns, and every other Future ends."""
    executor = make_executor(2)
    box: Dict[str, Any] = {}

    def stop(_: Any) -> None:
        try:
            executor.shutdown(wait=True)
        except BaseException as exc:  # noted for the assertion below
            box["error"] = exc
        box["returned"] = True

    first = executor.submit(tasks.sleep_then, 0.3, 1)
    first.add_done_callback(stop)
    rest = [executor.submit(tasks.sleep_then, 0.5, i) for i in range(4)]
    later: List[int] = []
    rest[-1].add_done_callback(lambda f: later.append(f.result()))
    eventually(lambda: "returned" in box, 60, "shutdown(wait=True) in a callback returned")
    assert "error" not in box, box.get("error")
    _done, not_done = cf.wait(rest, timeout=30)
    assert not not_done
    eventually(lambda: later == [3], 30, "the callback queued behind it ran")


# ---- a slow link ---------------------------------------------------------------------------


@pytest.fixture
def slow_link(sshd_pair: List[SSHServer]) -> Iterator[Dict[str, Any]]:
    """Host alpha behind a 1 MB/s link (each way): executor keyword arguments for it."""
    server = sshd_pair[0]
    proxy = DelayProxy(server.port, 0.0, rate=1 << 20)
    port = proxy.start()
    try:
        with server.client.known_hosts.open("a") as f:  # the same sshd, at the proxy's port
            f.write(f"[{server.address}]:{port} {server.host_key}\n")
        kwargs = executor_kwargs([server])
        kwargs["hosts"] = [f"{server.client.user}@{server.address}:{port}"]
        yield kwargs
    finally:
        proxy.stop()


@pytest.mark.ssh
@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_big_argument_over_a_slow_link_is_not_silence(
    slow_link: Dict[str, Any], transport: str, sshexec_logs: pytest.LogCaptureFixture
) -> None:
    """8 MB at 1 MB/s with keepalive_interval=1: the client's pings wait behind the
    upload for 8 s, over the 3 s deadline; the agent's own beats (and our writes
    draining) keep the host alive, and the task runs once."""
    blob = os.urandom(8 << 20)
    with SSHPoolExecutor(1, keepalive_interval=1.0, transport=transport, **slow_link) as ex:
        future = ex.submit(tasks.nbytes, blob)
        assert future.result(timeout=100) == len(blob)
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9
    stats = ex.stats()
    assert sum(h.tasks_retried for h in stats.hosts.values()) == 0
    assert sum(h.tasks_failed for h in stats.hosts.values()) == 0
    assert len(stats.workers) == 1, "the worker was replaced"
    assert not silence_records(sshexec_logs)


@pytest.mark.ssh
def test_our_writes_draining_alone_are_not_silence(
    slow_link: Dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    sshexec_logs: pytest.LogCaptureFixture,
) -> None:
    """With the agent's beats off, the client hears nothing for the 8 s its ping waits
    behind the upload; but the upload drains (sshd opens the SSH window as the agent
    reads): the host is there, and nothing is lost."""
    send = session_module.HostSession.send

    def without_beats(self: Any, message: proto.Message) -> None:
        if isinstance(message, proto.Configure):
            message = proto.Configure(message.max_frame, message.silence_deadline, 0.0)
        send(self, message)

    monkeypatch.setattr(session_module.HostSession, "send", without_beats)
    blob = os.urandom(8 << 20)
    with SSHPoolExecutor(1, keepalive_interval=1.0, **slow_link) as ex:
        assert ex.submit(tasks.nbytes, blob).result(timeout=100) == len(blob)
    stats = ex.stats()
    assert sum(h.tasks_retried for h in stats.hosts.values()) == 0
    assert not silence_records(sshexec_logs)
