"""Callables that leave processes behind on the node: children, forked children, nested
pools. Registered with cloudpickle.register_pickle_by_value by the tests that use them."""

from __future__ import annotations

import builtins
import json
import multiprocessing
import os
import subprocess
import time
from typing import Any, Dict, List


def _record(path: str, found: Dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(found, f)
    os.replace(path + ".tmp", path)


def start_sleep(setsid: bool = False) -> Dict[str, int]:
    """Starts ``sleep 300`` (in this worker's group, or in a session of its own) and
    returns at once, the sleep still running."""
    child = subprocess.Popen(["sleep", "300"], start_new_session=setsid)
    builtins._sshexec_left_child = child  # type: ignore[attr-defined]
    return {"worker": os.getpid(), "agent": os.getppid(), "child": child.pid}


def sleep_with_a_child(path: str, seconds: float, setsid: bool = False) -> None:
    """Starts ``sleep 300``, writes the pids to ``path``, then sleeps (to be killed)."""
    found = start_sleep(setsid)
    _record(path, found)
    time.sleep(seconds)


def exit_leaving_a_forked_child(path: str, code: int) -> None:
    """A ``multiprocessing.Process`` child (forked: it holds the worker's frame pipe), then
    ``os._exit``."""
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    _record(path, {"child": child.pid})
    os._exit(code)


def leave_a_pool(kind: str) -> List[int]:
    """Starts a process pool inside the task and returns its workers' pids, the pool left
    running (kept in ``builtins``: nothing collects it)."""
    pool: Any
    if kind == "loky":
        import loky

        pool = loky.get_reusable_executor(2)
    else:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
    builtins._sshexec_left_pool = pool  # type: ignore[attr-defined]
    for future in [pool.submit(os.getpid) for _ in range(4)]:
        future.result(timeout=60)
    return sorted(pool._processes)


def agent_fds() -> List[int]:
    """The descriptors of this worker's agent (its parent)."""
    return sorted(int(fd) for fd in os.listdir(f"/proc/{os.getppid()}/fd"))
