"""Loopback OpenSSH sshd processes for the benchmarks (127.0.0.1 only).

The same approach as ``tests/sshd.py`` (own host key, user key, known_hosts and
empty ssh config per run), plus what a benchmark needs: the repository on the
sessions' ``PYTHONPATH`` (``SetEnv``: workers import ``benchmarks.tasks`` by
reference), an optional ``MaxSessions``, and sshd dying with this process.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
ADDRESS = "127.0.0.1"
REPO = str(Path(__file__).resolve().parent.parent)
CIPHER = "aes128-gcm@openssh.com"


def available() -> bool:
    return os.path.exists(SSHD) and os.path.exists(SSH_KEYGEN)


def openssh_version() -> str:
    try:
        done = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (done.stderr or done.stdout).strip()


def _keygen(path: Path) -> str:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30
    )
    return path.with_suffix(".pub").read_text().strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((ADDRESS, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Optional[Callable[[], None]]:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def prctl() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a killed benchmark leaves no sshd

    return prctl


class Client:
    """The benchmark user's side: one key, one known_hosts, an empty ssh config."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.key = root / "id_ed25519"
        self.public_key = _keygen(self.key)
        self.known_hosts = root / "known_hosts"
        self.known_hosts.touch()
        self.config = root / "ssh_config"
        self.config.touch()

    def trust(self, port: int, host_key: str, address: str = ADDRESS) -> None:
        with self.known_hosts.open("a") as f:
            f.write(f"[{address}]:{port} {host_key}\n")

    def ssh_options(self) -> Dict[str, Any]:
        return {"client_keys": [str(self.key)], "config": [str(self.config)], "agent_path": None}

    def connect_options(self, port: int) -> Dict[str, Any]:
        """Keyword arguments for ``asyncssh.connect`` to a loopback port."""
        return {
            "port": port,
            "username": self.user,
            "known_hosts": str(self.known_hosts),
            "encryption_algs": [CIPHER],
            **self.ssh_options(),
        }

    def executor_kwargs(self, ports: List[int], **extra: Any) -> Dict[str, Any]:
        """Keyword arguments for ``SSHPoolExecutor`` over these loopback ports."""
        kwargs: Dict[str, Any] = {
            "hosts": [f"{self.user}@{ADDRESS}:{port}" for port in ports],
            "known_hosts": str(self.known_hosts),
            "ssh_options": self.ssh_options(),
            "python": sys.executable,  # sshd's PATH may not hold this interpreter
            "connect_timeout": 10.0,
        }
        kwargs.update(extra)
        return kwargs


class Sshd:
    """One sshd on 127.0.0.1 that trusts ``client``'s key; ``client`` trusts its host key.
    With ``netns`` it runs inside that network namespace (``ip netns exec``), listening
    on ``address`` there, on ``port`` (0: a free port here, which suits loopback only)."""

    def __init__(
        self,
        root: Path,
        client: Client,
        name: str,
        max_sessions: Optional[int] = None,
        address: str = ADDRESS,
        netns: Optional[str] = None,
        port: int = 0,
    ) -> None:
        self.root, self.client, self.name = root / name, client, name
        self.max_sessions = max_sessions
        self.address, self.netns = address, netns
        self.port = port
        self.host_key = ""
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> Sshd:
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.root / "host_ed25519"
        self.host_key = " ".join(_keygen(key).split()[:2])
        (self.root / "authorized_keys").write_text(self.client.public_key + "\n")
        self.port = self.port or _free_port()
        sessions = f"MaxSessions {self.max_sessions}\n" if self.max_sessions else ""
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress {self.address}\nHostKey {key}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n"
            f"MaxStartups 200:30:400\n{sessions}"
            f'SetEnv "PYTHONPATH={REPO}" DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False '
            "PYENV_REHASH_TIMEOUT=1\n"  # a stale pyenv rehash lock costs 1 s, not 60
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep directory
        with open(self.root / "sshd.log", "ab") as log_file:
            prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
            self.proc = subprocess.Popen(  # ip netns exec execs sshd: proc.pid is sshd's
                [*prefix, SSHD, "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                preexec_fn=_die_with_parent(),
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sshd {self.name} exited: {(self.root / 'sshd.log').read_text()}"
                )
            try:
                with socket.create_connection((self.address, self.port), timeout=0.5):
                    self.client.trust(self.port, self.host_key, self.address)
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd {self.name} did not listen on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
