"""SSH specifics on real sshd hosts: ~/.ssh/config names, per-host options, IPv6,
the node cache, connections closed at shutdown, and what never reaches the logs."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Callable, Collection, List, Set

import pytest

from sshexec import Host, SSHPoolExecutor, WorkerStartupError
from sshexec._bootstrap import bundle_hash

from . import tasks
from .sshd import SSHServer, executor_kwargs, free_port

StartServer = Callable[..., SSHServer]


def established_ports() -> Set[int]:
    """Remote ports of this process's established TCP connections (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and fields[9] in inodes:  # 01 = ESTABLISHED
                    ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def test_ssh_config_alias_is_resolved(sshd_pair: List[SSHServer], tmp_path: Path) -> None:
    alpha = sshd_pair[0]
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host lab-alpha\n  HostName 127.0.0.1\n  Port {alpha.port}\n  User {alpha.client.user}\n"
        f"  IdentityFile {alpha.client.key}\n"
    )
    kwargs = executor_kwargs([alpha], hosts=["lab-alpha"])
    kwargs["ssh_options"] = {"config": [str(config)], "agent_path": None}  # no client_keys
    with SSHPoolExecutor(1, **kwargs) as executor:
        assert executor.submit(tasks.where).result(timeout=30)[0] == "alpha"


def test_default_ssh_config_names_the_address_a_failure_is_about(
    sshd_pair: List[SSHServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no config= at all, ~/.ssh/config is the config (as for asyncssh.connect and
    ssh), for the route too: a refused alias names the address and port it leads to."""
    client, port = sshd_pair[0].client, free_port()
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        f"Host closed-node\n  HostName 127.0.0.1\n  Port {port}\n  User {client.user}\n"
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(
            1,
            hosts=["closed-node"],
            known_hosts=str(client.known_hosts),
            ssh_options={"client_keys": [str(client.key)], "agent_path": None},
        )
    assert info.value.stage == "connect"
    assert f"cannot reach 127.0.0.1 port {port}" in info.value.reason


def test_per_host_worker_counts(sshd_pair: List[SSHServer]) -> None:
    alpha, beta = sshd_pair
    hosts = [Host("127.0.0.1", user=alpha.client.user, port=alpha.port, workers=3), beta.spec]
    with SSHPoolExecutor(None, **executor_kwargs(sshd_pair, hosts=hosts)) as executor:
        seen = executor.map(tasks.sleep_then_where, [0.2] * 30)
        pids = {(host, pid) for host, pid, _ in seen}
        assert sum(1 for host, _ in pids if host == "alpha") == 3
        assert executor._max_workers == 3 + (os.cpu_count() or 1)


def test_ipv6_host(start_server: StartServer) -> None:
    server = start_server("sixer", address="::1")
    assert server.spec.endswith(f"@[::1]:{server.port}")
    with SSHPoolExecutor(1, **server.executor_kwargs()) as executor:
        assert executor.submit(tasks.where).result(timeout=30)[0] == "sixer"


def test_shutdown_closes_every_connection(
    sshd_pair: List[SSHServer], made: List[SSHPoolExecutor]
) -> None:
    ports = {s.port for s in sshd_pair}
    executor = SSHPoolExecutor(4, **executor_kwargs(sshd_pair))
    made.append(executor)
    assert executor.submit(tasks.square, 2).result(timeout=30) == 4
    assert ports <= established_ports()
    executor.shutdown(wait=True)
    assert not ports & established_ports()


def test_node_cache_is_private_and_verified(sshd_pair: List[SSHServer]) -> None:
    with SSHPoolExecutor(1, **sshd_pair[0].executor_kwargs()) as executor:
        executor.submit(tasks.square, 1).result(timeout=30)
    cache = Path.home() / ".cache" / "sshexec"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert (cache / f"{bundle_hash()}.zip").is_file()


def test_logs_never_carry_payloads(
    make_executor: Callable[..., SSHPoolExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "SECRET-PAYLOAD-8841"
    with caplog.at_level(logging.DEBUG):
        executor = make_executor(2)
        assert executor.submit(tasks.add, secret, "-x").result(timeout=30) == secret + "-x"
        with pytest.raises(ValueError):
            executor.submit(tasks.raise_value_error, secret).result(timeout=30)
        executor.shutdown()
    logged: Collection[str] = [r.getMessage() for r in caplog.records]
    assert logged, "expected sshexec's lifecycle logs"
    assert not [m for m in logged if secret in m]


def test_first_ssh_use_prints_no_third_party_warnings(sshd_pair: List[SSHServer]) -> None:
    """cryptography 51 deprecates DSA, which asyncssh still registers at import: five
    warnings on the user's stderr at the first SSH use, about nothing the user did."""
    import json
    import subprocess
    import sys

    code = (
        "import json, os, sys\n"
        "from sshexec import SSHPoolExecutor\n"
        "with SSHPoolExecutor(1, **json.loads(os.environ['KW'])) as ex:\n"
        "    assert ex.submit(abs, -3).result(timeout=30) == 3\n"
        "import sshexec._cli.check\n"
    )
    kwargs = executor_kwargs(sshd_pair[:1])
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        env={**os.environ, "KW": json.dumps(kwargs), "PYTHONWARNINGS": "default"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
