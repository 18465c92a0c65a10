"""Where the machine's CPU goes while a benchmark runs: ``python -m benchmarks.sampler OUT``.

Every second, appends one JSON line to OUT: the machine's busy share (``/proc/stat``)
and the CPU seconds each kind of process used in that second, from ``/proc``: sshexec's
node agents (a Python under sshd), its workers (a Python under a Python under sshd),
``ssh``, sshd's sessions, and everything else by command name (the client and the
harness are ``client/harness``). Run it beside ``python -m benchmarks.agent --only
scale`` to see what limits many sleeping workers on one machine; stop it with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, List

from .procs import Proc, processes


def kind(pid: int, procs: Dict[int, Proc]) -> str:
    name = os.path.basename(procs[pid][0].split(" ")[0]) or "?"
    if "python" not in name:
        return name
    chain: List[str] = []
    parent = procs[pid][2]
    for _ in range(4):
        command, _, grandparent = procs.get(parent, ("", 0.0, 0))
        chain.append(os.path.basename(command.split(" ")[0]))
        parent = grandparent
    if chain[0].startswith("sshd") or (chain[0] in ("sh", "bash") and chain[1].startswith("sshd")):
        return "agent"
    if "python" in chain[0] and any(c.startswith("sshd") for c in chain[1:]):
        return "worker"
    return "client/harness"


def machine() -> List[int]:
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def main() -> None:
    with open(sys.argv[1], "a") as out:
        before, cpu_before = processes(), machine()
        while True:
            time.sleep(1.0)
            now, cpu_now = processes(), machine()
            spent = [a - b for a, b in zip(cpu_now, cpu_before)]
            idle = spent[3] + spent[4]
            kinds: Dict[str, float] = {}
            for pid, (command, cpu, _) in now.items():
                if pid in before and before[pid][0] == command and cpu > before[pid][1]:
                    name = kind(pid, now)
                    kinds[name] = round(kinds.get(name, 0.0) + cpu - before[pid][1], 3)
            busy = 100.0 * (1 - idle / max(1, sum(spent)))
            out.write(json.dumps({"t": time.time(), "busy": round(busy, 1), "cpu": kinds}) + "\n")
            out.flush()
            before, cpu_before = now, cpu_now


if __name__ == "__main__":
    main()
