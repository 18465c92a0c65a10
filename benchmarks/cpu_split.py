"""Where the CPU of a task goes: ``python -m benchmarks.cpu_split [--tasks N] [--reps R]``.

Runs ``map(tiny, range(N), chunksize=1)`` (and ``submit(tiny).result()`` one at a time)
on each contender with 2 workers and reads every process's CPU time (utime + stime from
``/proc``) before and after: the client, its ``ssh`` children, the loopback sshd's
session processes, the node agent and the workers (a node Python with Python children
is an agent; one without is a worker). Prints microseconds of CPU per task for each
role and the wall rate. CPU time, unlike wall time, barely moves when other work
shares the machine, which is why the README's profile of the missed targets uses it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from sshexec import SSHPoolExecutor

from . import sshd as loopback
from . import tasks
from .contenders import settle
from .execnet_peer import ExecnetExecutor
from .procs import Proc, processes


def roles(procs: Dict[int, Proc], roots: List[int]) -> Dict[int, str]:
    """The role of every process under ``roots`` (this client first, then the sshds)."""
    children: Dict[int, List[int]] = {}
    for pid, (_, _, parent) in procs.items():
        children.setdefault(parent, []).append(pid)

    def is_python(pid: int) -> bool:
        return "python" in procs[pid][0].split(" ")[0]

    found: Dict[int, str] = {roots[0]: "client"}
    stack = list(roots)
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            command = procs[child][0]
            if command.startswith("ssh "):
                found[child] = "ssh"
            elif command.startswith("sshd"):
                found[child] = "sshd"
            elif is_python(child):
                pythons = [c for c in children.get(child, []) if is_python(c)]
                found[child] = "agent" if pythons else "worker"
            else:
                found[child] = "other"
            stack.append(child)
    return found


def measure(executor: Executor, roots: List[int], n: int, mode: str) -> Dict[str, float]:
    before = processes()
    start = time.perf_counter()
    if mode == "map":
        done = sum(1 for _ in executor.map(tasks.tiny, range(n), timeout=300))
    else:
        done = sum(1 for i in range(n) if executor.submit(tasks.tiny, i).result(60) == i)
    wall = time.perf_counter() - start
    after = processes()
    assert done == n, f"{done} of {n} tasks"
    split: Dict[str, float] = {"tasks/s": n / wall}
    for pid, role in roles(after, roots).items():
        if pid in before and before[pid][0] == after[pid][0]:
            used = after[pid][1] - before[pid][1]
            split[role] = split.get(role, 0.0) + used / n * 1e6
    split["total"] = sum(v for k, v in split.items() if k != "tasks/s")
    return split


def contenders(
    client: loopback.Client, ports: List[int], root: Path
) -> List[Tuple[str, Callable[[], Executor]]]:
    kwargs = client.executor_kwargs(ports)
    return [
        ("sshexec-ssh", lambda: SSHPoolExecutor(2, **kwargs)),
        ("sshexec-openssh", lambda: SSHPoolExecutor(2, transport="openssh", **kwargs)),
        ("execnet", lambda: ExecnetExecutor(client, ports, 2, root)),
        ("sshexec-local", lambda: SSHPoolExecutor(2)),
        ("ppe", lambda: ProcessPoolExecutor(2)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_split")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    columns = ["tasks/s", "client", "ssh", "sshd", "agent", "worker", "total"]
    with tempfile.TemporaryDirectory(prefix="sshexec-cpu-") as tmp:
        client = loopback.Client(Path(tmp) / "client")
        servers = [loopback.Sshd(Path(tmp), client, f"sshd{i}").start() for i in range(2)]
        roots = [os.getpid()] + [s.proc.pid for s in servers if s.proc is not None]
        try:
            for mode, n in (("map", args.tasks), ("submit", args.tasks // 10)):
                print(
                    f"\n{mode}: {n:,} tiny tasks, 2 workers, µs of CPU per task (median of {args.reps})\n"
                )
                print("| contender | " + " | ".join(columns) + " |")
                print("|---|" + "---:|" * len(columns))
                for name, make in contenders(client, [s.port for s in servers], Path(tmp)):
                    executor = make()
                    try:
                        settle(executor, 2)
                        runs = [measure(executor, roots, n, mode) for _ in range(args.reps)]
                    finally:
                        executor.shutdown(wait=True)
                    cells = [statistics.median(r.get(c, 0.0) for r in runs) for c in columns]
                    print(
                        f"| {name} | "
                        + " | ".join(
                            f"{v:,.0f}" if i == 0 else f"{v:.1f}" for i, v in enumerate(cells)
                        )
                        + " |"
                    )
        finally:
            for server in servers:
                server.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
