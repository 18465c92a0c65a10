"""Actors (``SSHPoolExecutor.actor``): objects kept on a host, whose method calls return
Futures; on local workers and real sshd hosts (both transports), and on a node running
another Python version."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, as_completed, wait
from pathlib import Path
from typing import Any, Callable, Dict, List

import cloudpickle
import pytest

from sshexec import ActorDiedError, CallDecodeError, SSHPoolExecutor

from . import actor_classes as ac
from .procs import alive
from .sshd import SSHServer, executor_kwargs
from .test_versions import client_module, executor_on, need, on, version_of  # noqa: F401

cloudpickle.register_pickle_by_value(ac)  # nodes have no copy of the tests

WAIT = 60.0


def results(futures: List[Future[Any]]) -> List[Any]:
    _, pending = wait(futures, timeout=WAIT)
    assert not pending
    return [f.result() for f in futures]


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def test_counter_from_four_threads_keeps_count_and_order(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    ex = make_executor(2)
    counter = ex.actor(ac.Counter)
    futures: Dict[int, List[Future[Any]]] = {}

    def hammer(thread: int) -> None:
        futures[thread] = [counter.add(thread, i) for i in range(2500)]

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [f for fs in futures.values() for f in fs]
    assert sorted(results(every)) == list(range(1, 10_001))
    for thread, fs in futures.items():  # each thread's calls ran in the order it made them
        got = results(fs)
        assert got == sorted(got)
        assert counter.order(thread).result(WAIT) == list(range(2500))
    assert counter.value().result(WAIT) == 10_000
    listed = ex.actors()
    assert [(a.cls, a.state, a.calls_served) for a in listed] == [("Counter", "alive", 10_004 + 1)]
    assert listed[0].host in ex.stats().hosts
    stats = ex.stats(refresh=0)
    assert sum(h.actor_calls for h in stats.hosts.values()) == 10_005
    assert stats.tasks_done == 0  # actor calls are not pool tasks
    assert "actor calls" in stats.table() and "10005" in stats.table()
    counter.close()


def test_exception_fails_that_call_only_and_proxy_arrives_as_the_object(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    ex = make_executor(2)
    with ex.actor(ac.Counter, 5) as counter:
        futures = [counter.add(), counter.fail("nope"), counter.add(), counter.is_me(counter)]
        wait(futures, timeout=WAIT, return_when=FIRST_EXCEPTION)
        wait(futures, timeout=WAIT)
        assert futures[0].result() == 6
        with pytest.raises(ValueError, match="nope") as caught:
            futures[1].result()
        assert "Traceback" in str(caught.value.__cause__)  # the remote traceback
        assert futures[2].result() == 7
        assert futures[3].result() is True
        other = ex.actor(ac.Counter)
        with pytest.raises(CallDecodeError, match="same actor"):
            other.is_me(counter).result(WAIT)
        other.close()
        assert ex.submit(sum, [1, 2]).result(WAIT) == 3  # the pool serves on beside them
    with pytest.raises(RuntimeError, match="closed"):
        counter.add()
    with pytest.raises(AttributeError, match="no method 'ad'"):
        counter.ad()  # a typo fails here, not on the host


def test_close_runs_the_objects_close_and_ends_its_process(
    make_executor: Callable[..., SSHPoolExecutor], tmp_path: Path
) -> None:
    ex = make_executor(1)
    counter = ex.actor(ac.Counter)
    marker = tmp_path / "closed"
    counter.note_close_in(str(marker))
    pid = counter.pid().result(WAIT)
    futures = [counter.add() for _ in range(3)]
    counter.close()  # after the calls made before it
    assert results(futures) == [1, 2, 3]
    assert marker.read_text() == "3"
    assert gone(pid)
    (listed,) = ex.actors()
    assert listed.state == "closed" and listed.calls_served == 5


def test_init_exception_is_actor_died_for_every_call(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    ex = make_executor(1)
    broken = ex.actor(ac.Broken, "no lattice", restart=2)
    futures = [broken.anything() for _ in range(3)]
    for future in as_completed(futures, timeout=WAIT):
        with pytest.raises(
            ActorDiedError, match=r"Broken.*__init__ raised RuntimeError: no lattice"
        ):
            future.result()
    with pytest.raises(ActorDiedError, match="no lattice"):
        broken.anything().result(WAIT)
    (listed,) = ex.actors()
    assert (listed.state, listed.restarts) == ("dead", 0)  # __init__ would raise again


def test_kill_fails_pending_calls_and_restart_builds_a_fresh_object(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    ex = make_executor(1)
    counter = ex.actor(ac.Counter, restart=1)
    assert results([counter.add() for _ in range(5)]) == [1, 2, 3, 4, 5]
    pid = counter.pid().result(WAIT)
    pending = [counter.nap(30)] + [counter.add() for _ in range(3)]
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    for future in as_completed(pending, timeout=WAIT):
        with pytest.raises(ActorDiedError) as caught:
            future.result()
        assert "SIGKILL" in str(caught.value) and "Counter" in str(caught.value)
        assert caught.value.host in ex.stats().hosts
    assert counter.value().result(WAIT) == 0  # a fresh object, built from the arguments
    new_pid = counter.pid().result(WAIT)
    assert new_pid != pid
    assert ex.actors()[0].restarts == 1
    os.kill(new_pid, signal.SIGKILL)  # no restart left: dead for good
    with pytest.raises(ActorDiedError, match="SIGKILL"):
        counter.nap(30).result(WAIT)
    with pytest.raises(ActorDiedError):
        counter.add().result(WAIT)
    assert ex.actors()[0].state == "dead"
    assert ex.submit(sum, [1]).result(WAIT) == 1


def test_dropped_proxy_ends_its_process(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    ex = make_executor(1)
    counter = ex.actor(ac.Counter)
    pid = counter.pid().result(WAIT)
    del counter
    gc.collect()
    assert gone(pid)
    deadline = time.monotonic() + 10
    while ex.actors()[0].state != "closed" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ex.actors()[0].state == "closed"


def test_shutdown_with_live_actors_is_bounded(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    ex = make_executor(2, shutdown_grace=2.0)
    actors = [ex.actor(ac.Counter) for _ in range(3)]
    pids = results([a.pid() for a in actors])
    busy = actors[0].nap(0.5)  # a call under way is waited for, like a task
    started = time.monotonic()
    ex.shutdown()
    assert time.monotonic() - started < 2.0 + 3.0
    assert busy.result(0) == 0
    assert all(gone(pid, 5) for pid in pids)
    assert {a.state for a in ex.actors()} == {"closed"}
    with pytest.raises(RuntimeError):
        actors[1].add()


def test_shutdown_bounds_a_hung_close(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    ex = make_executor(1, shutdown_grace=1.0)
    stuck = ex.actor(ac.Counter)
    stuck.hang_on_close()
    pid = stuck.pid().result(WAIT)
    started = time.monotonic()
    ex.shutdown()  # plain: its close() gets shutdown_grace, then the process is killed
    assert time.monotonic() - started < 1.0 + 4.0
    assert gone(pid)


def test_bounded_shutdown_kills_a_hung_actor(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    ex = make_executor(1, shutdown_grace=1.0)
    sleeper = ex.actor(ac.Counter)
    pid = sleeper.pid().result(WAIT)
    hung = sleeper.nap(60)
    started = time.monotonic()
    with pytest.raises(KeyError):
        with ex:
            raise KeyError("leave")  # leaving on an exception: bounded shutdown
    assert time.monotonic() - started < 1.0 + 1.0 + 4.0
    wait([hung], timeout=WAIT)
    with pytest.raises(ActorDiedError):
        hung.result()
    assert gone(pid)


def test_big_state_is_sent_once(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    np = pytest.importorskip("numpy")
    ex = make_executor(1)
    data = np.arange(500 * (1 << 20) // 8, dtype=np.float64)  # 500 MiB
    holder = ex.actor(ac.Holder, data)
    del data
    assert holder.size().result(WAIT) == 500 << 20
    answers = results([holder.at(i * 1000) for i in range(2000)])
    assert answers == [float(i * 1000) for i in range(2000)]
    sent = sum(h.bytes_sent for h in ex.stats(refresh=0).hosts.values())
    assert 500 << 20 < sent < (500 << 20) + (2 << 20)  # the array once, then small calls
    holder.close()


def test_memory_kill_is_a_death(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    ex = make_executor(1, task_memory="300M")
    counter = ex.actor(ac.Counter, restart=1)
    assert counter.add().result(WAIT) == 1
    with pytest.raises(ActorDiedError, match="memory limit"):
        counter.hog(800 << 20).result(WAIT)
    assert counter.add().result(WAIT) == 1  # restarted: a fresh object
    counter.close()


@pytest.mark.ssh
def test_host_lost_moves_a_restarted_actor(
    start_server: Callable[..., SSHServer], sshd_pair: List[SSHServer], made: List[Any]
) -> None:
    doomed = start_server("doomed")
    ex = SSHPoolExecutor(2, **executor_kwargs([doomed, sshd_pair[1]], reconnect_grace=2.0))
    made.append(ex)
    doomed_host, other_host = ex._actor_door.hosts()
    counter = ex.actor(ac.Counter, host=None, restart=1)
    assert counter.add().result(WAIT) == 1
    if ex.actors()[0].host != doomed_host:  # put it on the host that goes away
        counter.close()
        counter = ex.actor(ac.Counter, host=doomed_host, restart=1)
    assert counter.value().result(WAIT) in (0, 1)
    pending = counter.nap(30)
    time.sleep(0.3)
    doomed.go_down()
    with pytest.raises(ActorDiedError) as caught:
        pending.result(WAIT)
    assert caught.value.host == doomed_host
    assert counter.add().result(WAIT) == 1  # a fresh object, on the host that is left
    assert [a.host for a in ex.actors() if a.state == "alive"] == [other_host]
    counter.close()


@pytest.mark.ssh
def test_openssh_transport(sshd_pair: List[SSHServer], made: List[SSHPoolExecutor]) -> None:
    ex = SSHPoolExecutor(2, **executor_kwargs(sshd_pair, transport="openssh"))
    made.append(ex)
    first = ex.actor(ac.Counter, 10)
    second = ex.actor(ac.Counter, 20, host=ex._actor_door.hosts()[1])
    assert results([first.add(), second.add(), first.add()]) == [11, 21, 12]
    hosts = {a.actor_id: a.host for a in ex.actors()}
    assert len(set(hosts.values())) == 2  # the least loaded host, then the one asked for
    with pytest.raises(ValueError, match="not one of"):
        ex.actor(ac.Counter, host="nowhere")
    first.close()
    second.close()


OTHERS = [v for v in ("3.9", "3.12", "3.10") if v != "%d.%d" % sys.version_info[:2]][:2]


@pytest.mark.ssh
@pytest.mark.parametrize("minor", OTHERS)
def test_actor_on_another_python(
    minor: str,
    sshd_pair: List[SSHServer],
    client_module: Any,  # noqa: F811
    made: List[SSHPoolExecutor],
) -> None:
    other = need(minor)
    module = Path(client_module.__file__)
    module.write_text(
        module.read_text()
        + "\n\nclass Tally:\n    def __init__(self, start):\n        self.n = start\n\n"
        "    def add(self, k):\n        self.n += k\n        return self.n, platform.python_version()\n"
    )
    import importlib

    tally_module = importlib.reload(client_module)
    ex = executor_on(sshd_pair[:1], [on(sshd_pair[0], other)], made)
    tally = ex.actor(tally_module.Tally, 1)
    got = results([tally.add(2), tally.add(3)])
    assert [n for n, _ in got] == [3, 6]
    assert {v for _, v in got} == {version_of(other)}
    tally.close()


EXITING = """
import json, os, sys
sys.path.insert(0, {root!r})
import cloudpickle
from tests import actor_classes
cloudpickle.register_pickle_by_value(actor_classes)
from sshexec import SSHPoolExecutor

ex = SSHPoolExecutor(1, **json.loads(os.environ["KW"]))
kept = ex.actor(actor_classes.Counter)
kept.note_close_in({marker!r})
pending = [kept.add() for _ in range(50)]
print(json.dumps(kept.pid().result(60)), flush=True)
# no close(), no shutdown(): the interpreter's exit ends the actor after its calls
"""


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_exit_without_shutdown_ends_actors(
    where: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    kwargs = executor_kwargs(request.getfixturevalue("sshd_pair")) if where == "ssh" else {}
    marker = tmp_path / "closed"
    code = EXITING.format(root=str(Path(__file__).resolve().parent.parent), marker=str(marker))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "KW": json.dumps(kwargs)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 20
    pid = json.loads(done.stdout.splitlines()[0])
    assert gone(pid)
    assert marker.read_text() == "50"  # its calls ran, then its close()


def test_a_class_made_in_a_function_travels(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    def make(base: int) -> Any:
        class Local:  # a closure: pickled by value, as a task's lambda is
            def __init__(self, scale: int) -> None:
                self.scale = scale

            def plus(self, x: int) -> int:
                return base + self.scale * x

        return Local

    ex = make_executor(1)
    with ex.actor(make(10), scale=3) as local:
        assert results([local.plus(1), local.plus(2)]) == [13, 16]


def test_a_blob_an_actor_call_names_stays_on_the_host_while_the_call_is_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool's blob sweeps count actor calls sent and not answered: a shared array a
    call names (as a joblib Parallel call's are) is not forgotten on the host while the
    call waits behind a slow one, whatever the pool stores meanwhile."""
    numpy = pytest.importorskip("numpy")
    from sshexec._pool import blobs

    from .test_flow import sharing

    monkeypatch.setattr(blobs, "BUDGET", 1 << 20)  # any blob nothing needs goes at once
    first, second = numpy.full(1 << 18, 1.0), numpy.full(1 << 18, 2.0)  # 2 MiB each
    with SSHPoolExecutor(1) as ex, ex.actor(ac.Counter) as counter:
        napping = counter.nap(1.5)
        with sharing(first):
            total = counter.sum_of(first)  # sent behind the nap, its blob stored
        with sharing(second):  # stores another blob: over budget, a sweep
            assert ex.submit(numpy.sum, second).result(timeout=60) == second.sum()
        assert total.result(timeout=60) == first.sum()
        assert napping.result(timeout=60) == 0
