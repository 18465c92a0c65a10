"""Process hygiene on the node: whatever way a client, agent or worker ends, nothing of
the job stays in the node's process table, not even a child a task started; the agent
serves descriptors past FD_SETSIZE; spawned workers are reaped by the agent alone."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import cloudpickle
import pytest

from sshexec import SSHPoolExecutor, WorkerLostError
from sshexec._node.spawn import start_worker
from sshexec._wire import protocol as proto

from . import leftovers, tasks
from .procs import alive, wait_gone
from .sshd import SSHServer, executor_kwargs
from .test_worker import Host
from .waits import bounded, eventually, shut_down

cloudpickle.register_pickle_by_value(leftovers)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

Make = Callable[..., SSHPoolExecutor]


@pytest.fixture
def reaped() -> Iterator[List[int]]:
    """Pids a test saw: whatever is still alive at its end is killed (a failing test must
    not leave a ``sleep 300`` behind)."""
    pids: List[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def read_json(path: Path) -> Dict[str, Any]:
    eventually(path.exists, 30, f"{path.name} written by the task")
    found: Dict[str, Any] = json.loads(path.read_text())
    return found


# ---- a killed client (issue item 5) ---------------------------------------------------

CLIENT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    import cloudpickle
    from tests import leftovers
    cloudpickle.register_pickle_by_value(leftovers)
    from sshexec import SSHPoolExecutor

    ex = SSHPoolExecutor(1, **json.loads(os.environ["KW"]))
    print(json.dumps(ex.submit(leftovers.start_sleep, {setsid}).result(timeout=60)), flush=True)
    os.kill(os.getpid(), 9)
    """
)


@pytest.mark.parametrize("setsid", [False, True], ids=["in-group", "setsid"])
@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_a_killed_client_leaves_no_process_of_the_job(
    kind: str, setsid: bool, request: pytest.FixtureRequest, reaped: List[int]
) -> None:
    """kill -9 of the client: the agent ends its worker and the ``sleep 300`` a task
    started, even in a session of its own, although its own stderr is gone."""
    kwargs: Dict[str, Any] = {}
    if kind == "ssh":
        servers: List[SSHServer] = request.getfixturevalue("sshd_pair")
        kwargs = executor_kwargs(servers[:1])
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT.format(root=root, setsid=setsid)],
        env={**os.environ, "KW": json.dumps(kwargs)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    found = json.loads(proc.stdout.splitlines()[0])
    reaped += [found["child"], found["worker"], found["agent"]]
    assert wait_gone(reaped, timeout=8) == [], f"left running: {found}"


# ---- a killed agent (item 5, the worker's side) ----------------------------------------


@pytest.mark.parametrize(
    "signum, setsid",
    [(signal.SIGKILL, False), (signal.SIGTERM, True)],
    ids=["agent-SIGKILL", "agent-SIGTERM-setsid"],
)
def test_a_killed_agents_worker_ends_its_tasks_children(
    make_executor: Make, tmp_path: Path, reaped: List[int], signum: int, setsid: bool
) -> None:
    """kill -9 of the agent mid-task: the worker ends after its EOF grace, and so does the
    ``sleep 300`` its task started (nobody else is left to end it). SIGTERM: the agent ends
    its workers and everything they started, even in a session of its own."""
    ex = make_executor(1, max_retries=0)
    marker = tmp_path / "pids"
    future = ex.submit(leftovers.sleep_with_a_child, str(marker), 60, setsid)
    found = read_json(marker)
    reaped += [found["child"], found["worker"]]
    os.kill(found["agent"], signum)
    assert wait_gone(reaped, timeout=10) == [], f"left running: {found}"
    concurrent.futures.wait([future], timeout=30)
    with pytest.raises(WorkerLostError):
        future.result(timeout=0)


def test_the_reader_wakes_serve_even_when_stderr_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken command stream with a broken stderr (the agent killed): the reader thread
    must still wake the main thread, which else waits forever."""

    class Gone:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    host = Host()
    try:
        host.receive()  # Hello
        monkeypatch.setattr(sys, "stderr", Gone())
        host.send_raw(b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1")  # a frame msgpack cannot decode
        assert host.served(), "serve() still waits for a reader thread that died"
    finally:
        monkeypatch.undo()
        host.close()


def test_a_broken_frame_pipe_ends_the_worker() -> None:
    """A write to the frame pipe that raises (the agent is gone) ends the worker process:
    ``on_lost`` is called, and the reader wakes the main thread."""
    host = Host()
    lost = threading.Event()
    host.worker.on_lost = lost.set
    try:
        host.receive()  # Hello
        os.close(host.replies_r)
        host.replies_r = os.open(os.devnull, os.O_RDONLY)  # closed again by host.close()
        host.send(proto.Ping(1))  # the reader answers Pong: EPIPE
        assert lost.wait(5), "a write that raised did not end the worker"
        assert host.served()
    finally:
        host.close()


# ---- a dead worker's children (item 6) and nested pools (items 6, 9) -------------------


def test_a_worker_that_dies_leaving_a_forked_child_is_reported_at_once(
    make_executor: Make, tmp_path: Path, reaped: List[int]
) -> None:
    """A task forks a ``multiprocessing.Process`` (it holds the worker's frame pipe), then
    the worker dies: its Future fails within seconds, not when the child ends, and the
    child is gone."""
    ex = make_executor(1, max_retries=0)
    marker = tmp_path / "pids"
    started = time.monotonic()
    future = ex.submit(leftovers.exit_leaving_a_forked_child, str(marker), 3)
    concurrent.futures.wait([future], timeout=8)
    child = read_json(marker)["child"]
    reaped.append(child)
    with pytest.raises(WorkerLostError, match="exit status 3"):
        future.result(timeout=0)
    assert time.monotonic() - started < 8
    assert wait_gone([child], timeout=5) == []


@pytest.mark.parametrize("pool", ["ProcessPoolExecutor", "loky"])
def test_a_pool_a_task_left_running_ends_with_its_worker(
    make_executor: Make, pool: str, reaped: List[int]
) -> None:
    """A task starts a process pool and returns without shutting it down: shutdown() of
    the executor returns promptly and no process of that pool is left."""
    ex = make_executor(1)
    pids = ex.submit(leftovers.leave_a_pool, pool).result(timeout=60)
    reaped += pids
    assert pids and all(alive(p) for p in pids)
    started = time.monotonic()
    shut_down(ex, 30)
    assert time.monotonic() - started < 10
    assert wait_gone(pids, timeout=5) == []


# ---- descriptors past FD_SETSIZE (item 8) ------------------------------------------------


def test_an_agent_with_descriptors_past_fd_setsize_serves(
    make_executor: Make, tmp_path: Path
) -> None:
    """An agent whose pipes are numbered past 1024 (a host with some 340 workers): select()
    refused them, poll() serves them."""
    wrapper = tmp_path / "python-many-fds"
    wrapper.write_text(
        "#!/bin/bash\n"
        "ulimit -n 4096\n"
        # fds 3-1100 open (not 255: bash reads this script from it)
        'for i in $(seq 3 1100); do [ $i = 255 ] || eval "exec $i</dev/null"; done\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    hosts = make_executor.hosts_with(2, python=str(wrapper))  # type: ignore[attr-defined]
    ex = make_executor(None, hosts=hosts)
    got = bounded(lambda: sorted(ex.map(tasks.square, range(10))), 60, "the map")
    assert got == [i * i for i in range(10)]
    assert max(ex.submit(leftovers.agent_fds).result(timeout=30)) > 1100


# ---- spawned workers (item 8) ------------------------------------------------------------


def test_a_spawned_worker_is_reaped_by_its_agent_alone() -> None:
    """Starting the next worker must not reap a previous one that died meanwhile (a dropped
    ``subprocess.Popen`` did: the agent never saw, nor reported, that exit)."""
    stage1 = b"x" * 64  # never sent: the interpreter waits for it on its stdin
    ends: List[int] = []
    pids: List[int] = []
    try:
        for _ in range(2):
            pipes = [*os.pipe(), *os.pipe(), *os.pipe()]
            ends += pipes
            pids.append(start_worker(pipes[0], pipes[3], pipes[5], "/nonexistent", stage1))
            if len(pids) == 1:
                os.kill(pids[0], signal.SIGKILL)
                eventually(lambda: not alive(pids[0]), 10, "the first worker is dead")
        pid, status = os.waitpid(pids[0], 0)  # ChildProcessError if reaped by someone else
        assert (pid, os.WTERMSIG(status)) == (pids[0], signal.SIGKILL)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        for fd in ends:
            os.close(fd)


def test_spawned_workers_report_exact_exit_statuses(make_executor: Make) -> None:
    hosts = make_executor.hosts_with(2, env={"SSHEXEC_AGENT_START": "spawn"})  # type: ignore[attr-defined]
    ex = make_executor(None, hosts=hosts, max_retries=0)
    with pytest.raises(WorkerLostError, match="exit status 7"):
        ex.submit(tasks.hard_exit, 7).result(timeout=30)
    with pytest.raises(WorkerLostError, match="killed by signal SIGSEGV"):
        ex.submit(tasks.segfault).result(timeout=30)
    assert ex.submit(tasks.square, 9).result(timeout=30) == 81
