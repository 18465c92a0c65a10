"""A client run inside a Slurm allocation by tests/test_slurm.py (``salloc ... python -m
tests.slurm_client SCENARIO OUT``): it builds the pool from the allocation, one
``transport="srun"`` host per node with the node's grant, and writes what it saw to OUT
as JSON. Its functions are ``__main__``'s, so they reach the nodes by value."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any, Callable, Dict, List, Optional, Tuple

from sshexec import Host, SSHPoolExecutor, WorkerStartupError, allocation

STEP_NAME = "sshexec"  # what SrunTransport names its steps


def grant() -> Dict[str, int]:
    """{node: CPUs} of this allocation, from SLURM_JOB_NODELIST and SLURM_JOB_CPUS_PER_NODE."""
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    counts: List[int] = []
    for part in os.environ["SLURM_JOB_CPUS_PER_NODE"].split(","):
        found = re.match(r"^(\d+)(?:\(x(\d+)\))?$", part)
        assert found, part
        counts += [int(found.group(1))] * int(found.group(2) or 1)
    return dict(zip(nodes, counts))


def hosts(cpus: Dict[str, int]) -> List[Host]:
    return [Host(node, transport="srun", workers=n) for node, n in cpus.items()]


def our_steps() -> List[str]:
    found = subprocess.run(
        ["squeue", "--steps", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%i %j"],
        capture_output=True,
        text=True,
    ).stdout
    return [line.split()[0] for line in found.splitlines() if line.split()[1:] == [STEP_NAME]]


def steps_after_shutdown(timeout: float = 15.0) -> List[str]:
    """Our steps still listed ``timeout`` seconds after shutdown (a cancelled step may
    linger briefly in squeue)."""
    deadline = time.monotonic() + timeout
    while our_steps() and time.monotonic() < deadline:
        time.sleep(0.2)
    return our_steps()


def where(i: int, seconds: float = 0.0) -> Tuple[Optional[str], Optional[str], int, int]:
    time.sleep(seconds)
    return os.environ.get("SLURMD_NODENAME"), os.environ.get("SLURM_STEP_ID"), os.getpid(), i


def echo(data: bytes) -> bytes:
    return data


def serve() -> Dict[str, Any]:
    cpus = grant()
    data = bytes(range(256)) * 4096
    with SSHPoolExecutor(hosts=hosts(cpus)) as executor:
        served = list(executor.map(where, range(80), [0.05] * 80))
        workers = Counter(w.host for w in executor.stats(refresh=0).workers.values() if w.is_alive)
        steps = our_steps()
        echoed = executor.submit(echo, data).result(timeout=60) == data
    return {
        "grant": cpus,
        "workers": dict(workers),
        "served": sorted({s[0] for s in served if s[0]}),
        "pids": {node: len({s[2] for s in served if s[0] == node}) for node in cpus},
        "steps": steps,
        "steps_after": steps_after_shutdown(),
        "echoed": echoed,
        "client_node": os.environ.get("SLURMD_NODENAME"),
    }


def cancel(node: str) -> Dict[str, Any]:
    """Cancel ``node``'s agent step (``scancel job.step``) while a map runs."""
    with SSHPoolExecutor(hosts=hosts(grant())) as executor:
        futures = [executor.submit(where, i, 0.1) for i in range(60)]
        step: Optional[str] = None
        pending = set(futures)
        while step is None and pending:
            done, pending = wait(pending, timeout=60, return_when=FIRST_COMPLETED)
            assert done, "no result within 60 s"
            step = next((f.result()[1] for f in done if f.result()[0] == node), None)
        job = os.environ["SLURM_JOB_ID"]
        cancelled = subprocess.run(
            ["scancel", f"{job}.{step}"], capture_output=True, text=True
        ).stderr
        finished, left = wait(futures, timeout=120)
        results = [f.result() for f in finished if f.exception() is None]
        errors = [repr(f.exception()) for f in finished if f.exception() is not None]
    return {
        "step": step,
        "scancel": cancelled,
        "unfinished": len(left),
        "numbers": sorted(r[3] for r in results),
        "errors": errors,
        "nodes": sorted({r[0] for r in results if r[0]}),
        "steps_after": steps_after_shutdown(),
    }


def granted() -> Dict[str, Any]:
    """The pool as users build it: ``SSHPoolExecutor(hosts=sshexec.allocation())``."""
    hosts = allocation()
    with SSHPoolExecutor(hosts=hosts) as executor:
        served = list(executor.map(where, range(40), [0.05] * 40))
        workers = Counter(w.host for w in executor.stats(refresh=0).workers.values() if w.is_alive)
    return {
        "hosts": {h.hostname: [h.workers, h.transport] for h in hosts},
        "workers": dict(workers),
        "served": sorted({s[0] for s in served if s[0]}),
        "steps_after": steps_after_shutdown(),
    }


def check() -> Dict[str, Any]:
    """``sshexec check --allocation`` as a user runs it in the allocation."""
    done = subprocess.run(
        [sys.executable, "-m", "sshexec", "check", "--allocation", "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def refused(node: str) -> Dict[str, Any]:
    """A host that is not in the allocation."""
    try:
        with SSHPoolExecutor(hosts=[Host(node, transport="srun", workers=1)]) as executor:
            executor.submit(where, 0).result(timeout=60)
    except WorkerStartupError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "host": exc.host}
    return {"error": None}


def main() -> None:
    scenario, out, *args = sys.argv[1:]
    scenarios: Dict[str, Callable[..., Dict[str, Any]]] = {
        "serve": serve,
        "cancel": cancel,
        "refused": refused,
        "allocation": granted,
        "check": check,
    }
    found = scenarios[scenario](*args)
    with open(out, "w") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main()
