"""Forgotten executors: interpreter exit and garbage collection leave nothing behind."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from sshexec import SSHPoolExecutor

from . import tasks
from .conftest import sshexec_threads
from .procs import wait_gone
from .sshd import SSHServer, executor_kwargs

CHILD = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {root!r})
    import atexit
    atexit.register(lambda: print("pending:", pending.result(timeout=0), flush=True))  # runs last
    import cloudpickle
    from tests import tasks
    cloudpickle.register_pickle_by_value(tasks)
    from sshexec import SSHPoolExecutor

    ex = SSHPoolExecutor(2, **json.loads(os.environ["KW"]))
    pids = sorted({{pid for _, pid, _ in ex.map(tasks.sleep_then_where, [0.2] * 6)}})
    pending = ex.submit(tasks.sleep_then, {pending}, "finished")
    print(json.dumps(pids), flush=True)
    {ending}
    """
)


def run_child(
    kwargs: Dict[str, Any], ending: str, pending: float = 0.0
) -> subprocess.CompletedProcess[str]:
    root = str(Path(__file__).resolve().parent.parent)
    code = CHILD.format(root=root, ending=ending, pending=pending)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "KW": json.dumps(kwargs)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, -9), proc.stderr
    assert time.monotonic() - started < 20
    return proc


def pids_of(proc: subprocess.CompletedProcess[str]) -> List[int]:
    pids: List[int] = json.loads(proc.stdout.splitlines()[0])
    assert len(pids) >= 1
    return pids


@pytest.fixture(params=["local", "ssh"])
def child_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    if request.param == "local":
        return {}
    servers: List[SSHServer] = request.getfixturevalue("sshd_pair")
    return executor_kwargs(servers)


def test_exit_without_shutdown_finishes_pending_work_and_leaves_no_worker(
    child_kwargs: Dict[str, Any],
) -> None:
    proc = run_child(child_kwargs, ending="sys.stdout.flush()", pending=0.5)
    assert "pending: finished" in proc.stdout  # as ProcessPoolExecutor: pending work completes
    assert wait_gone(pids_of(proc), timeout=8.0) == []


def test_killed_client_leaves_no_worker(child_kwargs: Dict[str, Any]) -> None:
    proc = run_child(child_kwargs, ending="os.kill(os.getpid(), 9)", pending=60)
    assert wait_gone(pids_of(proc), timeout=10) == []


def test_garbage_collected_executor_shuts_down(child_kwargs: Dict[str, Any]) -> None:
    executor = SSHPoolExecutor(2, **child_kwargs)
    pids = sorted({pid for _, pid, _ in executor.map(tasks.sleep_then_where, [0.2] * 4)})
    future = executor.submit(tasks.sleep_then, 0.3, "done anyway")
    del executor
    gc.collect()
    assert future.result(timeout=30) == "done anyway"
    assert wait_gone(pids, timeout=8.0) == []
    deadline = time.monotonic() + 10
    while sshexec_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sshexec_threads() == []


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_exits_while_an_executor_lives(child_kwargs: Dict[str, Any]) -> None:
    """A fork (ProcessPoolExecutor's default on Linux) must not inherit our exit hook's wait."""
    executor = SSHPoolExecutor(1, **child_kwargs)
    try:
        assert executor.submit(tasks.square, 3).result(timeout=30) == 9
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as other:
            assert other.submit(tasks.square, 4).result(timeout=30) == 16
    finally:
        executor.shutdown()
