"""``python -m benchmarks.staging``: ``files=`` beside ``rsync -a`` and ``scp -r`` over one sshd.

A tree of many small files and a few big ones goes to a loopback sshd three ways: by
sshexec (``SSHPoolExecutor(files=[tree])``: the constructor's time with the files less
its time without them; every first run in fresh caches on both ends, the client's
hashes forgotten as in a new process, a rerun reading them from its cache on disk), by
``rsync -a`` and by ``scp -r`` (same cipher, same host); then an unchanged rerun of sshexec (a new executor, the host's cache warm) and of rsync. Prints
the medians of ``--rounds`` interleaved rounds (times, throughputs, bytes sent, the
ratios to rsync), from this one run. Targets
(issue 20): first run >= 0.8x rsync's throughput; a rerun sends <= 1 % of the tree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sshexec import SSHPoolExecutor, parse_host
from sshexec._pool import hashes as client_hashes

from . import sshd as loopback

MiB = 1 << 20


def make_tree(root: Path, total_mib: int) -> int:
    """A quarter of ``total_mib`` in 32 KiB files, the rest in four big files."""
    small = total_mib * MiB // 4 // (32 * 1024)
    size = 0
    for index in range(small):
        folder = root / f"d{index // 64:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index % 64:02d}.dat").write_bytes(os.urandom(32 * 1024))
        size += 32 * 1024
    block = os.urandom(MiB)
    big = (total_mib * MiB - size) // 4 // MiB
    for index in range(4):
        with open(root / f"big{index}.bin", "wb") as f:
            for at in range(big):
                f.write(block[:-8] + (index * 100_000 + at).to_bytes(8, "big"))
        size += big * MiB
    return size


def ssh_command(client: loopback.Client, port: int) -> List[str]:
    return [
        "ssh",
        "-F",
        str(client.config),
        "-i",
        str(client.key),
        "-o",
        f"UserKnownHostsFile={client.known_hosts}",
        "-o",
        "BatchMode=yes",
        "-o",
        f"Ciphers={loopback.CIPHER}",
        "-p",
        str(port),
    ]


def run_rsync(client: loopback.Client, port: int, tree: Path, dest: Path) -> Tuple[float, int]:
    shell = " ".join(ssh_command(client, port))
    target = f"{client.user}@{loopback.ADDRESS}:{dest}/"
    started = time.perf_counter()
    done = subprocess.run(
        ["rsync", "-a", "--stats", "-e", shell, f"{tree}/", target],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    found = re.search(r"Total bytes sent: ([\d,.]+)", done.stdout)
    return seconds, int(re.sub(r"[,.]", "", found.group(1))) if found else -1


def run_scp(client: loopback.Client, port: int, tree: Path, dest: Path) -> float:
    ssh = ssh_command(client, port)
    options = [part for part in ssh[1:] if part != "-p" and part != str(port)]
    started = time.perf_counter()
    subprocess.run(
        [
            "scp",
            "-O",  # the scp protocol: the loopback sshd has no sftp subsystem
            "-q",
            "-r",
            "-P",
            str(port),
            *options,
            str(tree),
            f"{client.user}@{loopback.ADDRESS}:{dest}",
        ],
        check=True,
    )
    return time.perf_counter() - started


def sshexec_start(
    kwargs: Dict[str, Any], cache: Path, files: Optional[List[str]]
) -> Tuple[float, int]:
    """Seconds the constructor took, and the bytes the host's stats say were sent."""
    # as a new process: what the client's hashes remember comes from its cache on disk,
    # empty at a first run (every file hashed), kept for the rerun
    os.environ["XDG_CACHE_HOME"] = str(cache) + "-client"
    client_hashes.forget()
    env = {"XDG_CACHE_HOME": str(cache)}
    host = dataclasses.replace(parse_host(kwargs["hosts"][0]), workers=1, env=env)
    options = {k: v for k, v in kwargs.items() if k != "hosts"}
    started = time.perf_counter()
    executor = SSHPoolExecutor(hosts=[host], files=files, **options)
    seconds = time.perf_counter() - started
    try:
        sent = sum(h.bytes_sent for h in executor.stats(0).hosts.values())
    finally:
        executor.shutdown()
    return seconds, sent


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.staging", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--mib", type=int, default=512, help="size of the tree (default 512 MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--transport", action="append", choices=("asyncssh", "openssh"), help="default: both"
    )
    args = parser.parse_args(argv)
    if not loopback.available() or not shutil.which("rsync") or not shutil.which("scp"):
        print("needs sshd, ssh-keygen, rsync and scp", file=sys.stderr)
        return 2
    transports = args.transport or ["asyncssh", "openssh"]
    with tempfile.TemporaryDirectory(prefix="sshexec-staging-") as scratch:
        root = Path(scratch)
        client = loopback.Client(root / "client")
        server = loopback.Sshd(root, client, "sshd0").start()
        try:
            tree = root / "src" / "tree"
            size = make_tree(tree, args.mib)
            files = sum(len(f) for _, _, f in os.walk(tree))
            print(
                f"tree: {size / MiB:.0f} MiB in {files} files; one loopback sshd, {loopback.CIPHER}"
            )
            os.chdir(root / "src")
            times: Dict[str, List[float]] = {}
            sent_by: Dict[str, int] = {}

            def note(name: str, seconds: float, sent: int) -> None:
                times.setdefault(name, []).append(seconds)
                sent_by[name] = sent

            for round_ in range(args.rounds):  # interleaved: a burst of load hits all alike
                dest = root / f"rsync{round_}"
                note("rsync -a, first", *run_rsync(client, server.port, tree, dest))
                note("rsync -a, unchanged rerun", *run_rsync(client, server.port, tree, dest))
                shutil.rmtree(dest)
                dest = root / f"scp{round_}"
                note("scp -r, first", run_scp(client, server.port, tree, dest), size)
                shutil.rmtree(dest)
                for transport in transports:
                    kwargs = client.executor_kwargs([server.port], transport=transport)
                    cache = root / f"cache-{transport}-{round_}"
                    base, base_sent = sshexec_start(kwargs, root / "cache-empty", None)
                    for run in ("first", "unchanged rerun"):
                        seconds, sent = sshexec_start(kwargs, cache, ["tree"])
                        note(
                            f"sshexec files= ({transport}), {run}", seconds - base, sent - base_sent
                        )
                    shutil.rmtree(cache)
            median = {name: statistics.median(values) for name, values in times.items()}
            rows = [(name, median[name], sent_by[name]) for name in times]
            rsync_first = median["rsync -a, first"]
            rsync_rerun = median["rsync -a, unchanged rerun"]
            print(f"\nmedians of {args.rounds} interleaved rounds (each row's range in brackets)")
            print("\n| how | seconds | MiB/s | bytes sent | % of tree | throughput vs rsync |")
            print("|---|---|---|---|---|---|")
            for name, seconds, sent in rows:
                reference = rsync_rerun if "rerun" in name else rsync_first
                spread = f"{min(times[name]):.2f}-{max(times[name]):.2f}"
                print(
                    f"| {name} | {seconds:.2f} ({spread}) | {size / MiB / max(seconds, 1e-9):.0f} "
                    f"| {sent} | {100 * sent / size:.2f} | {reference / max(seconds, 1e-9):.2f}x |"
                )
            print("\n(time vs rsync > 1: faster than rsync; the throughput target is >= 0.8x)")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
