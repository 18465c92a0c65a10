"""Shared fixtures: real sshd hosts, a real Slurm, the executor factory, and the leak check."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import cloudpickle
import pytest

from sshexec import Host, SSHPoolExecutor, parse_host

from . import tasks
from .procs import wait_no_workers, worker_pids
from .slurm import REQUIRE_ENV as SLURM_REQUIRE_ENV
from .slurm import Cluster
from .slurm import missing as slurm_missing
from .sshd import REQUIRE_ENV, Client, SSHServer, executor_kwargs, sshd_available
from .waits import shut_down

cloudpickle.register_pickle_by_value(tasks)  # nodes have no copy of the tests


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

    def hosts_with(total: int, **options: Any) -> List[Host]:
        """This fixture's hosts as ``Host`` values with ``options``, ``total`` workers."""
        if servers is None:
            return [Host(":", workers=total, **options)]
        share = total // len(servers)
        return [dataclasses.replace(parse_host(s.spec), workers=share, **options) for s in servers]

    make.kind = request.param  # type: ignore[attr-defined]
    make.hosts_with = hosts_with  # type: ignore[attr-defined]
    yield make
    for executor in made:
        shut_down(executor)  # as users end it: a queued task that cannot end fails here


@pytest.fixture
def made() -> Iterator[List[SSHPoolExecutor]]:
    """Executors a test builds itself; each is ended as users end it (bounded)."""
    executors: List[SSHPoolExecutor] = []
    yield executors
    for executor in executors:
        shut_down(executor)


@pytest.fixture
def executor(make_executor: Callable[..., SSHPoolExecutor]) -> SSHPoolExecutor:
    return make_executor()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real Slurm on this machine: munged, slurmctld and slurmd node1..node3 (2, 2 and
    1 CPUs), stopped (and every job cancelled) at the end of the session."""
    absent = slurm_missing()
    if absent:
        message = (
            f"Slurm not installed ({', '.join(absent)} missing): apt-get install slurmd "
            "slurmctld slurm-client munge"
        )
        if os.environ.get(SLURM_REQUIRE_ENV):
            pytest.fail(message + f" ({SLURM_REQUIRE_ENV} is set)")
        pytest.skip(message)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()
