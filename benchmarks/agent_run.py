"""Running ``benchmarks.agent_probe`` against one sshexec tree, interleaved by rep, and
the network namespace the partition row cuts.

``Version`` names a tree holding an ``sshexec`` package (a ``git archive`` of the
commit before the node agent, or this checkout); ``probe`` runs one measurement in
a fresh interpreter with that tree first on ``PYTHONPATH`` and this repository's
``benchmarks`` importable, answers its ``MARK`` handshakes and kills its process
group past a timeout. ``Island`` is an sshd inside a namespace of its own behind a
veth pair (as in ``tests/test_faults.py``); ``cut()`` takes the inner end down, so
packets vanish without a reset.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .procs import descendants
from .sshd import Client, Sshd

REPO = Path(__file__).resolve().parent.parent
BEFORE = "900196b"  # the commit before the node agent
Sample = Dict[str, Any]


@dataclass
class Version:
    name: str  # "before" or "agent"
    tree: Path
    commit: str = ""


def before_tree(root: Path, commit: str = BEFORE) -> Version:
    """``commit``'s sshexec package, extracted from this repository into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "sshexec"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True, timeout=60)
    return Version("before", root, git("rev-parse", commit))


def this_tree() -> Version:
    return Version("agent", REPO, git("rev-parse", "HEAD"))


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return done.stdout.strip()


def probe(
    version: Version,
    args: Dict[str, Any],
    logs: Path,
    on_mark: Optional[Callable[[str], None]] = None,
    timeout: float = 240.0,
) -> Sample:
    """One probe run: its ``RESULT`` (with ``wall`` seconds), or ``{"error": ...}``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(version.tree), str(REPO)))}
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{args['kind']}-{version.name}-{uuid.uuid4().hex[:6]}.log"
    began = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.agent_probe",
                json.dumps({**args, "tree": str(version.tree)}),
            ],
            cwd="/",  # nothing from the current directory shadows the chosen tree
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
        timer = threading.Timer(timeout, _kill_group, (proc,))
        timer.start()
        result: Sample = {}
        try:
            assert proc.stdout is not None and proc.stdin is not None
            for line in proc.stdout:
                if line.startswith("MARK "):
                    if on_mark is not None:
                        on_mark(line.split()[1])
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            result.setdefault("error", f"probe: {type(exc).__name__}: {exc}")
        finally:
            timer.cancel()
            _kill_group(proc)
    result["wall"] = time.perf_counter() - began
    if not result.keys() - {"wall"}:
        result["error"] = f"no result (exit {proc.returncode}): {_tail(log)}"
    return result


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the probe and any ssh it started
    except OSError:
        pass
    proc.wait(10) if proc.poll() is None else None


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "pyenv" not in ln]
    return " | ".join(lines[-4:])[-600:]


def interleave(
    versions: List[Version], reps: int, run: Callable[[Version, int], Sample]
) -> Dict[str, List[Sample]]:
    """Every version once per rep, the first one rotating, so drift hits all alike."""
    samples: Dict[str, List[Sample]] = {v.name: [] for v in versions}
    for rep in range(reps):
        shift = rep % len(versions) if versions else 0
        for version in versions[shift:] + versions[:shift]:
            samples[version.name].append(run(version, rep))
    return samples


def netns_available() -> Optional[str]:
    """None if an Island can be built, else why not."""
    if os.geteuid() != 0:
        return "needs root (to build a network namespace)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip (ip netns)"
    return None


class Island:
    """An sshd in its own network namespace, reached over a veth pair."""

    SUBNET = "10.253.42"  # not the tests' 10.253.7: a test run may share the machine
    PORT = 2222

    def __init__(self, root: Path, client: Client) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.outside, self.inside = f"sxbench-{tag}", f"sbo{tag}", f"sbi{tag}"
        self.address = f"{self.SUBNET}.2"
        self.root, self.client = root, client
        self.sshd: Optional[Sshd] = None

    def ip(self, *args: str, inside: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.ns, "ip"] if inside else ["ip"]
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=30)

    def __enter__(self) -> Island:
        self.ip("netns", "add", self.ns)
        try:
            self.ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
            self.ip("link", "set", self.inside, "netns", self.ns)
            self.ip("addr", "add", f"{self.SUBNET}.1/30", "dev", self.outside)
            self.ip("link", "set", self.outside, "up")
            self.ip("addr", "add", f"{self.address}/30", "dev", self.inside, inside=True)
            self.ip("link", "set", self.inside, "up", inside=True)
            self.ip("link", "set", "lo", "up", inside=True)
            self.sshd = Sshd(
                self.root,
                self.client,
                "island",
                address=self.address,
                netns=self.ns,
                port=self.PORT,
            ).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def cut(self) -> None:
        self.ip("link", "set", self.inside, "down", inside=True)

    def heal(self) -> None:
        """Link up again and every process below the listener gone: the next rep's clean
        slate (sshd's per-connection processes would otherwise wait for TCP)."""
        self.ip("link", "set", self.inside, "up", inside=True)
        if self.sshd is not None and self.sshd.proc is not None:
            for pid in descendants(self.sshd.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            deadline = time.monotonic() + 5
            while descendants(self.sshd.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.sshd is not None:
                self.heal()
                self.sshd.stop()
        finally:
            subprocess.run(["ip", "link", "del", self.outside], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30)
