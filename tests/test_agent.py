"""The node agent: one per host over one session, forking the workers; exact exit
statuses; big things sent once per host; spawn where fork is not wanted; nothing left
behind (processes, blob files)."""

from __future__ import annotations

import glob
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from sshexec import SSHPoolExecutor, WorkerLostError

from . import tasks
from .procs import agents_and_workers, parent_of, wait_gone
from .sshd import SSHServer, executor_kwargs
from .waits import bounded, eventually

Make = Callable[..., SSHPoolExecutor]
BLOB_DIRS = "/dev/shm/sshexec-blobs-*" if os.access("/dev/shm", os.W_OK) else "/tmp/sshexec-blobs-*"


def pids_by_host(executor: SSHPoolExecutor) -> Dict[str, List[int]]:
    found: Dict[str, List[int]] = {}
    for worker in executor.stats(refresh=0).workers.values():
        if worker.is_alive:
            found.setdefault(worker.host, []).append(worker.pid)
    return found


@pytest.mark.ssh
def test_one_agent_per_host_forks_every_worker(sshd_pair: List[SSHServer]) -> None:
    with SSHPoolExecutor(8, **executor_kwargs(sshd_pair)) as ex:
        eventually(lambda: sum(map(len, pids_by_host(ex).values())) == 8, 30, "8 workers up")
        assert sorted(ex.map(tasks.square, range(20))) == sorted(i * i for i in range(20))
        live = pids_by_host(ex)
        for server in sshd_pair:
            assert server.proc is not None
            tree = agents_and_workers(server.proc.pid)  # the node's own process table
            assert len(tree) == 1, f"{server.name}: agents {tree}"  # one session, one agent
            ((_agent, workers),) = tree.items()
            assert sorted(workers) == sorted(live[server.spec])  # each a child of the agent


def test_exit_status_and_signal_of_each_death(make_executor: Make, tmp_path: Path) -> None:
    """The agent reaps its workers and reports how each ended, exactly."""
    ex = make_executor(max_retries=0)
    with pytest.raises(WorkerLostError, match="exit status 7"):
        ex.submit(tasks.hard_exit, 7).result(timeout=30)
    with pytest.raises(WorkerLostError, match="killed by signal SIGSEGV"):
        ex.submit(tasks.segfault).result(timeout=30)
    marker = tmp_path / "pid"
    future = ex.submit(tasks.sleep_after_writing_pid, str(marker), 30)
    eventually(marker.exists, 15, "the task has started")
    os.kill(int(marker.read_text()), signal.SIGTERM)  # from outside, as an admin would
    with pytest.raises(WorkerLostError, match="killed by signal SIGTERM"):
        future.result(timeout=30)
    assert ex.submit(tasks.square, 9).result(timeout=30) == 81


def test_a_maps_big_function_crosses_once_per_host(make_executor: Make) -> None:
    ex = make_executor()
    payload = os.urandom(2 << 20)  # 2 MiB the function carries (a closure's data, say)

    def size_of_payload(i: int, data: bytes = payload) -> int:
        return len(data) + i

    got = bounded(lambda: list(ex.map(size_of_payload, range(120))), 60, "the map")
    assert got == [len(payload) + i for i in range(120)]
    stats = ex.stats(refresh=0)
    for host in stats.hosts.values():
        if host.tasks_done:
            assert host.bytes_sent < 3 * len(payload), host  # sent once, not per task
    saved = sum(h.bytes_saved for h in stats.hosts.values())
    hosts = sum(1 for h in stats.hosts.values() if h.tasks_done)
    assert saved >= (120 - hosts) * len(payload)
    assert "saved" in stats.table()


def test_a_big_initializer_crosses_once_per_host(make_executor: Make) -> None:
    marker = os.urandom(50_000).hex()  # 100 kB of initargs: stored once per host
    ex = make_executor(4, initializer=tasks.init_marker, initargs=(marker,))
    values = set(bounded(lambda: list(ex.map(tasks.read_marker, range(40))), 60, "the map"))
    assert values == {marker}
    eventually(lambda: sum(map(len, pids_by_host(ex).values())) == 4, 30, "4 workers up")
    stats = ex.stats(refresh=0)
    workers_per_host = {h: len(p) for h, p in pids_by_host(ex).items()}
    saved = sum(h.bytes_saved for h in stats.hosts.values())
    assert saved >= sum(n - 1 for n in workers_per_host.values()) * len(marker)


def test_workers_can_be_spawned_instead_of_forked(make_executor: Make) -> None:
    env = {"SSHEXEC_AGENT_START": "spawn"}
    hosts = make_executor.hosts_with(2, env=env)  # type: ignore[attr-defined]
    ex = make_executor(None, hosts=hosts)
    modules = set(ex.map(tasks.loaded_module, ["sshexec._node.agent"] * 6))
    assert modules == {False}  # a fresh interpreter, not a fork of the agent
    assert sorted(ex.map(tasks.square, range(10))) == [i * i for i in range(10)]


def test_nothing_is_left_on_the_node(make_executor: Make) -> None:
    ex = make_executor()
    big = os.urandom(1 << 20)
    assert set(ex.map(lambda i, big=big: len(big), range(8))) == {1 << 20}
    pids = [p for ps in pids_by_host(ex).values() for p in ps]
    agents = {f"-{parent_of(pid)}-" for pid in pids}  # not other test runs' agents
    mine = {d for d in glob.glob(BLOB_DIRS) if any(a in os.path.basename(d) for a in agents)}
    assert mine, "the agents' blob stores exist while they run"
    bounded(lambda: ex.shutdown(wait=True), 30, "shutdown")
    assert wait_gone(pids) == []
    assert not (mine & set(glob.glob(BLOB_DIRS))), "blob stores left behind"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_killed_agent_takes_its_workers_along(make_executor: Make) -> None:
    ex = make_executor(max_retries=2)
    assert sorted(ex.map(tasks.square, range(6))) == [i * i for i in range(6)]
    pids = [p for ps in pids_by_host(ex).values() for p in ps]
    agents = {parent_of(pid) for pid in pids}
    for agent in agents:
        os.kill(agent, signal.SIGKILL)  # the host's agent dies: its workers must not stay
    assert wait_gone(pids, 15) == []
    # the host comes back with a new agent and the pool carries on
    assert bounded(lambda: list(ex.map(tasks.square, range(6))), 60, "map") == [
        i * i for i in range(6)
    ]
