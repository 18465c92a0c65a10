"""Real OpenSSH sshd processes for the tests: each on 127.0.0.1 with its own port,
host key and authorized key, started as children of the test run."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
REQUIRE_ENV = "SSHEXEC_REQUIRE_SSHD"  # set by .ci/run: a missing sshd fails instead of skipping


def sshd_available() -> bool:
    return os.path.exists(SSHD) and os.path.exists(SSH_KEYGEN)


def keygen(path: Path) -> str:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def descendants(root: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


@dataclass
class Client:
    """The test user's side: one key, one known_hosts, an empty ssh config."""

    root: Path
    key: Path = field(init=False)
    public_key: str = field(init=False)
    known_hosts: Path = field(init=False)
    config: Path = field(init=False)
    user: str = field(default_factory=getpass.getuser)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = self.root / "id_ed25519"
        self.public_key = keygen(self.key)
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.touch()
        self.config = self.root / "ssh_config"
        self.config.touch()

    def ssh_options(self, **extra: Any) -> Dict[str, Any]:
        options: Dict[str, Any] = {
            "client_keys": [str(self.key)],
            "config": [str(self.config)],
            "agent_path": None,
        }
        options.update(extra)
        return options

    def trust(self, server: SSHServer) -> None:
        with self.known_hosts.open("a") as f:
            f.write(f"[{server.address}]:{server.port} {server.host_key}\n")


@dataclass
class SSHServer:
    name: str
    root: Path
    client: Client
    extra_config: str = ""
    address: str = "127.0.0.1"
    netns: Optional[str] = None  # run sshd inside this network namespace (ip netns exec)
    port: int = 0
    host_key: str = ""
    proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def spec(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.client.user}@{host}:{self.port}"

    def start(self) -> SSHServer:
        self.root.mkdir(parents=True, exist_ok=True)
        key_path = self.root / "host_ed25519"
        if not key_path.exists():
            self.host_key = " ".join(keygen(key_path).split()[:2])
        (self.root / "authorized_keys").write_text(self.client.public_key + "\n")
        self.port = self.port or free_port(self.address)
        config = self.root / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress {self.address}\nHostKey {key_path}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nLogLevel ERROR\n"
            "MaxStartups 200:30:400\nAllowTcpForwarding yes\n"
            # root's ~/.bashrc on this image runs `pyenv init`, whose rehash waits up to 60 s
            # for a lock that a login killed mid-way leaves behind: 1 s is plenty here
            f"SetEnv SSHEXEC_TEST_HOST={self.name} PYENV_REHASH_TIMEOUT=1\n{self.extra_config}\n"
        )
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep directory
        with open(self.root / "sshd.log", "ab") as log_file:
            self.proc = subprocess.Popen(
                [*self.prefix, SSHD, "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.root / "sshd.log").read_text()
                raise RuntimeError(f"sshd {self.name} exited at start: {log}")
            if self.is_listening():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"sshd {self.name} did not listen on port {self.port}")

    def is_listening(self) -> bool:
        if self.netns:  # asked from inside: the namespace's loopback is not reachable from here
            probe = f"import socket; socket.create_connection(({self.address!r}, {self.port}), 0.5)"
            found = subprocess.run([*self.prefix, sys.executable, "-c", probe], capture_output=True)
            return found.returncode == 0
        try:
            with socket.create_connection((self.address, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def prefix(self) -> List[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def drop_connections(self) -> None:
        """Kill every process below the listener (each connection's monitor and session
        processes, and the workers they run): every TCP connection dies at once."""
        if self.proc is not None:
            _kill(descendants(self.proc.pid))

    def go_down(self) -> None:
        """The host vanishes: the listener stops first (so that no reconnect slips in),
        then every connection it had dies."""
        if self.proc is not None:
            sessions = descendants(self.proc.pid)
            self.stop()
            _kill(sessions)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def executor_kwargs(self, **extra: Any) -> Dict[str, Any]:
        return executor_kwargs([self], **extra)


def executor_kwargs(servers: List[SSHServer], **extra: Any) -> Dict[str, Any]:
    """Keyword arguments for SSHPoolExecutor over these servers, as the test user."""
    client = servers[0].client
    kwargs: Dict[str, Any] = {
        "hosts": [s.spec for s in servers],
        "known_hosts": str(client.known_hosts),
        "ssh_options": client.ssh_options(),
        "python": sys.executable,  # sshd's PATH may not hold this client's Python
        "connect_timeout": 10.0,
    }
    kwargs.update(extra)
    return kwargs


def _kill(pids: List[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    clear_stale_pyenv_lock()


def clear_stale_pyenv_lock() -> None:
    """A login shell whose ~/.bashrc runs ``pyenv init`` (root's on this machine image)
    takes pyenv's rehash lock at every login; killed mid-way, as ``drop_connections``
    kills, it leaves the lock behind and every later login waits 60 s for it. Remove it
    when no rehash is running."""
    lock = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "shims" / ".pyenv-shim"
    try:
        if not lock.exists():
            return
    except OSError:  # another user's pyenv (an ordinary user under root's PYENV_ROOT)
        return
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"pyenv-rehash" in f.read():
                    return
        except OSError:
            continue
    lock.unlink(missing_ok=True)
