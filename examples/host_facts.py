"""Call a function once on every host to collect each machine's facts.

    python examples/host_facts.py                                 # this machine
    python examples/host_facts.py --hosts me@node1,node2,gpu-box

``executor.run_on_hosts(fn)`` runs ``fn`` once on one worker of each host and
returns ``{host: Future}``: the way to take an inventory, warm a cache, or check
that every node has what the job needs before sending it.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
from typing import Any, Dict, List, Optional

from sshexec import SSHPoolExecutor


def memory_bytes() -> Dict[str, int]:
    """Total and available memory in bytes ({} when the system does not say)."""
    try:
        with open("/proc/meminfo") as f:  # Linux: available counts reclaimable caches too
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return {"total": info["MemTotal"], "available": info["MemAvailable"]}
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:  # other Unixes: total only
        return {"total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    except (AttributeError, ValueError, OSError):
        return {}


def facts() -> Dict[str, Any]:
    """What this machine is; runs on the node."""
    affinity = getattr(os, "sched_getaffinity", None)
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):  # Windows has no load average
        load = []
    return {
        "hostname": socket.gethostname(),
        "cores": os.cpu_count(),
        "usable_cores": len(affinity(0)) if affinity else os.cpu_count(),
        "load": load,
        "memory": memory_bytes(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "executable": sys.executable,
        "platform": platform.platform(),
    }


def gigabytes(n: Optional[int]) -> str:
    return "?" if n is None else f"{n / 1e9:.1f} GB"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hosts",
        help="comma-separated [user@]host[:port] or ~/.ssh/config aliases "
        "(default: $SSHEXEC_HOSTS, else local workers)",
    )
    parser.add_argument("--python", help="the nodes' Python interpreter, e.g. a venv's")
    args = parser.parse_args(argv)

    hosts = args.hosts.split(",") if args.hosts else None  # None: SSHEXEC_HOSTS or local
    failed = 0
    with SSHPoolExecutor(hosts=hosts, python=args.python) as executor:
        futures = executor.run_on_hosts(facts)  # {host label: Future}, one call per host
        for host, future in futures.items():
            try:
                f = future.result()
            except Exception as exc:  # one host failing does not hide the others' facts
                print(f"{host}: failed: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            load = " ".join(f"{x:.2f}" for x in f["load"]) or "?"
            memory = f["memory"]
            print(f"{host} (hostname {f['hostname']})")
            print(f"  cores     {f['cores']} ({f['usable_cores']} usable)")
            print(f"  load      {load}")
            print(
                f"  memory    {gigabytes(memory.get('total'))} total, "
                f"{gigabytes(memory.get('available'))} available"
            )
            print(f"  python    {f['python']} {f['executable']}")
            print(f"  platform  {f['platform']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
