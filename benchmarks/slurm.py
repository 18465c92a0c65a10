"""``python -m benchmarks.slurm``: transport="srun" beside transport="openssh" on the same
three-node allocation of a Slurm started here (tests/slurm.py: node1..3 with 2, 2 and 1
CPUs, all on this machine), with three loopback sshd standing for the nodes' sshd.

Inside ``salloc -N3 -n5`` it measures, for each transport, construction until every
worker is up, then ``map`` throughput of empty tasks; and the raw byte throughput of
one ``srun -u cat`` step against one ``ssh cat`` channel (64 MiB each way at once).
Prints a markdown table of medians over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from sshexec import Host, SSHPoolExecutor

from . import sshd as loopback

REPO = Path(__file__).resolve().parent.parent
GRANT = {"node1": 2, "node2": 2, "node3": 1}
MIB = 1 << 20


def noop(i: int) -> int:
    return i


def pool_times(hosts: List[Host], tasks: int, **kwargs: Any) -> Dict[str, float]:
    start = time.perf_counter()
    with SSHPoolExecutor(hosts=hosts, **kwargs) as executor:
        while sum(w.is_alive for w in executor.stats(refresh=0).workers.values()) < 5:
            time.sleep(0.002)
        up = time.perf_counter() - start
        list(executor.map(noop, range(200)))  # warm
        start = time.perf_counter()
        list(executor.map(noop, range(tasks), chunksize=1))
        rate = tasks / (time.perf_counter() - start)
    return {"up_s": up, "tasks_per_s": rate}


def echo_rate(argv: List[str], size: int) -> float:
    """MiB/s of ``size`` bytes through ``argv`` (a ``cat``) and back, both ways at once."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"R")  # the command runs: not timing its start
    proc.stdin.flush()
    assert os.read(proc.stdout.fileno(), 1) == b"R"
    block = bytes(range(256)) * 4096
    start = time.perf_counter()

    def feed() -> None:
        assert proc.stdin is not None
        for _ in range(size // len(block)):
            proc.stdin.write(block)
        proc.stdin.close()

    writer = threading.Thread(target=feed)
    writer.start()
    got = 0
    while chunk := os.read(proc.stdout.fileno(), MIB):
        got += len(chunk)
    writer.join()
    proc.wait(30)
    seconds = time.perf_counter() - start
    assert got == size, (got, size)
    return size / MIB / seconds


def inside(config: Dict[str, Any], repeat: int, tasks: int) -> Dict[str, List[Dict[str, float]]]:
    ports: List[int] = config["ports"]
    srun_hosts = [Host(node, transport="srun", workers=n) for node, n in GRANT.items()]
    ssh_hosts = [
        Host("127.0.0.1", user=config["user"], port=port, workers=n, transport="openssh")
        for port, n in zip(ports, GRANT.values())
    ]
    ssh_kwargs = {k: v for k, v in config["ssh"].items() if k != "hosts"}
    ssh_argv = [
        "ssh", "-F", config["ssh_config"], "-i", config["key"], "-p", str(ports[1]),
        "-o", f"UserKnownHostsFile={config['known_hosts']}", "-o", "BatchMode=yes",
        "-T", f"{config['user']}@127.0.0.1", "cat",
    ]  # fmt: skip
    srun_argv = ["srun", "--overlap", "-N1", "-n1", "-w", "node2", "-u", "cat"]
    found: Dict[str, List[Dict[str, float]]] = {"srun": [], "openssh": []}
    for _ in range(repeat):
        found["srun"].append(
            {**pool_times(srun_hosts, tasks), "echo_mib_s": echo_rate(srun_argv, 64 * MIB)}
        )
        found["openssh"].append(
            {
                **pool_times(ssh_hosts, tasks, **ssh_kwargs),
                "echo_mib_s": echo_rate(ssh_argv, 64 * MIB),
            }
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.slurm")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        config = json.loads(Path(args.inside).read_text())
        found = inside(config, args.repeat, args.tasks)
        Path(config["out"]).write_text(json.dumps(found))
        return
    sys.path.insert(0, str(REPO))
    from tests.slurm import Cluster  # the suite's Slurm, not a second copy

    with tempfile.TemporaryDirectory(prefix="sshexec-slurm-bench-") as tmp:
        root = Path(tmp)
        cluster = Cluster(root / "slurm")
        client = loopback.Client(root / "client")
        servers: List[loopback.Sshd] = []
        try:
            cluster.start()
            servers = [loopback.Sshd(root, client, f"node{k}").start() for k in (1, 2, 3)]
            config = {
                "ports": [s.port for s in servers],
                "user": client.user,
                "ssh": client.executor_kwargs([s.port for s in servers]),
                "ssh_config": str(client.config),
                "key": str(client.key),
                "known_hosts": str(client.known_hosts),
                "out": str(root / "found.json"),
            }
            (root / "config.json").write_text(json.dumps(config))
            argv = [sys.executable, "-m", "benchmarks.slurm", "--inside", str(root / "config.json")]
            argv += ["--repeat", str(args.repeat), "--tasks", str(args.tasks)]
            env = {**cluster.env, "PYTHONPATH": str(REPO)}
            subprocess.run(["salloc", "-N3", "-n5", *argv], env=env, cwd=REPO, check=True)
            found = json.loads((root / "found.json").read_text())
        finally:
            for server in servers:
                server.stop()
            cluster.stop()
    print("| transport | all 5 workers up (s) | map, tasks/s | one channel echo, MiB/s |")
    print("|---|---|---|---|")
    for kind, runs in found.items():
        cells = [
            statistics.median(r[key] for r in runs) for key in ("up_s", "tasks_per_s", "echo_mib_s")
        ]
        print(f"| {kind} | {cells[0]:.3f} | {cells[1]:.0f} | {cells[2]:.0f} |")
    print(f"\n(medians of {args.repeat}; {os.cpu_count()} cores; {loopback.openssh_version()})")


if __name__ == "__main__":
    main()
