"""Shared fixtures: real sshd hosts, the executor factory, and the leak check."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import cloudpickle
import pytest

from sshexec import SSHPoolExecutor

from . import tasks
from .sshd import REQUIRE_ENV, Client, SSHServer, executor_kwargs, sshd_available

cloudpickle.register_pickle_by_value(tasks)  # nodes have no copy of the tests

WORKER_SIGNATURE = b"os._exit(4)');exec(b)"  # the bootstrap loader on every worker's command line


def worker_pids(ancestor: Optional[int] = None) -> List[int]:
    """Live sshexec worker processes (local, or started by an sshd), optionally only the
    descendants of ``ancestor``, so that concurrent test runs do not see each other's."""
    parents: Dict[int, int] = {}
    workers = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        if WORKER_SIGNATURE in cmdline and fields[0] != b"Z":
            workers.append(int(entry))
    if ancestor is None:
        return workers

    def descends(pid: int) -> bool:
        for _ in range(64):
            pid = parents.get(pid, 0)
            if pid == ancestor:
                return True
            if pid <= 1:
                return False
        return False

    return [pid for pid in workers if descends(pid)]


def wait_no_workers(timeout: float = 8.0, ancestor: Optional[int] = None) -> List[int]:
    deadline = time.monotonic() + timeout
    while (pids := worker_pids(ancestor)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_gone(pids: List[int], timeout: float = 10.0) -> List[int]:
    """Wait up to ``timeout`` for these processes to end; the ones still alive."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def sshexec_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sshexec-") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves sshexec threads or worker processes behind."""
    me = os.getpid()
    before = set(worker_pids(me))
    yield
    deadline = time.monotonic() + 10
    while sshexec_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    threads = sshexec_threads()
    leftover = [p for p in wait_no_workers(ancestor=me) if p not in before]
    for pid in leftover:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not threads, f"threads left running: {threads}"
    assert not leftover, f"worker processes left running: {leftover}"


def need_sshd() -> None:
    if not sshd_available():
        message = "OpenSSH sshd not found: install Debian's openssh-server (apt-get install openssh-server)"
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(message + f" ({REQUIRE_ENV} is set)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def ssh_client(tmp_path_factory: pytest.TempPathFactory) -> Client:
    need_sshd()
    return Client(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="session")
def start_server(
    ssh_client: Client, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., SSHServer]]:
    """Factory for extra sshd hosts (own config); all are stopped at session end."""
    servers: List[SSHServer] = []

    def start(
        name: str, extra_config: str = "", trusted: bool = True, address: str = "127.0.0.1"
    ) -> SSHServer:
        root = tmp_path_factory.mktemp(f"sshd-{name}")
        server = SSHServer(name, root, ssh_client, extra_config, address)
        server.start()
        if trusted:
            ssh_client.trust(server)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def sshd_pair(start_server: Callable[..., SSHServer]) -> List[SSHServer]:
    """Two separate hosts, alpha and beta; tasks see SSHEXEC_TEST_HOST=alpha|beta."""
    return [start_server("alpha"), start_server("beta")]


@pytest.fixture(params=["local", "ssh"])
def make_executor(request: pytest.FixtureRequest) -> Iterator[Callable[..., SSHPoolExecutor]]:
    """Builds executors on local workers or on the two sshd hosts; shuts them all down."""
    made: List[SSHPoolExecutor] = []
    servers = request.getfixturevalue("sshd_pair") if request.param == "ssh" else None

    def make(max_workers: Any = 2, **kwargs: Any) -> SSHPoolExecutor:
        if servers is not None:
            kwargs = executor_kwargs(servers, **kwargs)
        executor = SSHPoolExecutor(max_workers, **kwargs)
        made.append(executor)
        return executor

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make_executor: Callable[..., SSHPoolExecutor]) -> SSHPoolExecutor:
    return make_executor()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
