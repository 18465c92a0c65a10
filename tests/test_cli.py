"""The ``sshexec`` command, run as a subprocess (``python -m sshexec``) against real
sshd hosts and local workers: ``check``, ``map`` and ``demo``."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from .sshd import SSH_KEYGEN, Client, SSHServer, free_port, keygen

REPO = Path(__file__).resolve().parents[1]
MODULE = """\
import os

def square(line):
    n = int(line)
    if n == 13:
        raise ValueError("unlucky " + line)
    return n * n

def where(line):
    return line + " " + os.environ.get("SSHEXEC_TEST_HOST", "local")
"""


def run_cli(
    *args: str,
    cwd: Path = REPO,
    stdin: Optional[str] = None,
    timeout: float = 90,
    env: Optional[Dict[str, str]] = None,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("SSHEXEC_HOSTS", None)
    return subprocess.run(
        [sys.executable, "-m", "sshexec", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TRANSPORTS = pytest.mark.parametrize("transport", ["asyncssh", "openssh"])


def ssh_args(
    client: Client, known_hosts: Optional[Path] = None, transport: str = "asyncssh"
) -> List[str]:
    return [
        "--transport",
        transport,
        "-i",
        str(client.key),
        "-F",
        str(client.config),
        "--known-hosts",
        str(known_hosts or client.known_hosts),
        "--python",
        sys.executable,  # sshd's PATH may not hold this client's Python
    ]


def table_row(output: str, label: str) -> List[str]:
    for line in output.splitlines():
        if line.startswith(label + " "):
            return re.split(r"\s{2,}", line.strip())
    raise AssertionError(f"no row for {label} in:\n{output}")


def fingerprint(server: SSHServer) -> str:
    out = subprocess.run(
        [SSH_KEYGEN, "-lf", str(server.root / "host_ed25519.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()[1]


@pytest.fixture
def module_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_tasks_mod.py").write_text(MODULE)
    return tmp_path


# --- check -----------------------------------------------------------------------


@TRANSPORTS
def test_check_good_host(sshd_pair: List[SSHServer], ssh_client: Client, transport: str) -> None:
    server = sshd_pair[0]
    result = run_cli("check", server.spec, *ssh_args(ssh_client, transport=transport))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    row = table_row(result.stdout, server.spec)
    _host, reachable, key, auth, python, match, cores, rtt, speed, via = row
    assert (reachable, key, match, via) == ("yes", "known", "same", transport)
    assert auth == f"publickey ({ssh_client.key})"
    assert python == f"{platform.python_version()} {sys.executable}"
    assert int(cores) >= 1
    assert 0 < float(rtt) < 1000 and float(speed) > 0
    assert "1 of 1 hosts usable" in result.stdout
    assert "fix:" not in result.stdout


@TRANSPORTS
def test_check_unknown_host_key(
    start_server: Callable[..., SSHServer], ssh_client: Client, transport: str
) -> None:
    stranger = start_server(f"stranger-{transport}", trusted=False)
    result = run_cli("check", stranger.spec, *ssh_args(ssh_client, transport=transport))
    assert result.returncode == 1
    row = table_row(result.stdout, stranger.spec)
    assert row[1:3] == ["yes", "UNKNOWN"] and row[3] == "-"  # never authenticates to it
    assert fingerprint(stranger) in result.stdout
    fix = f"ssh-keyscan -p {stranger.port} 127.0.0.1 >> {ssh_client.known_hosts}"
    assert fix in result.stdout
    assert "0 of 1 hosts usable" in result.stdout


@TRANSPORTS
def test_check_changed_key_and_refused_auth(
    sshd_pair: List[SSHServer], ssh_client: Client, tmp_path: Path, transport: str
) -> None:
    alpha, beta = sshd_pair
    known = tmp_path / "known_hosts"  # beta recorded with alpha's key: a changed key
    known.write_text(
        f"[127.0.0.1]:{alpha.port} {alpha.host_key}\n[127.0.0.1]:{beta.port} {alpha.host_key}\n"
    )
    stranger_key = tmp_path / "id_other"
    keygen(stranger_key)
    args = ssh_args(ssh_client, known, transport)
    args[args.index("-i") + 1] = str(stranger_key)  # a key that no host accepts
    result = run_cli("check", alpha.spec, beta.spec, *args)
    assert result.returncode == 1
    assert table_row(result.stdout, alpha.spec)[2:4] == ["known", "REFUSED"]
    assert table_row(result.stdout, beta.spec)[2] == "CHANGED"
    assert f"ssh-copy-id -i {stranger_key} -p {alpha.port} {alpha.spec.rsplit(':', 1)[0]}" in (
        result.stdout
    )
    assert f"ssh-keygen -R '[127.0.0.1]:{beta.port}' -f {known}" in result.stdout
    assert fingerprint(beta) in result.stdout


@TRANSPORTS
def test_check_unreachable_port_is_quick(ssh_client: Client, transport: str) -> None:
    port = free_port()
    started = time.monotonic()
    args = ssh_args(ssh_client, transport=transport)
    result = run_cli("check", f"127.0.0.1:{port}", *args, "--timeout", "5")
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert table_row(result.stdout, f"127.0.0.1:{port}")[1] == "refused"
    assert f"connection refused by 127.0.0.1 port {port}" in result.stdout
    assert f"listens on port {port}" in result.stdout


@TRANSPORTS
def test_check_silent_server_times_out(ssh_client: Client, transport: str) -> None:
    """A port that accepts TCP but never speaks SSH: reported within --timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        started = time.monotonic()
        args = ssh_args(ssh_client, transport=transport)
        result = run_cli("check", f"127.0.0.1:{port}", *args, "--timeout", "1.5")
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed < 8
    assert table_row(result.stdout, f"127.0.0.1:{port}")[1] == "timeout"
    assert f"no answer from 127.0.0.1 port {port} within 1.5 s" in result.stdout


def test_check_reads_a_host_file(
    sshd_pair: List[SSHServer], ssh_client: Client, tmp_path: Path
) -> None:
    host_file = tmp_path / "hosts.txt"
    alpha, beta = sshd_pair
    host_file.write_text(
        f"# the test cluster\n2/{beta.spec}\n{alpha.spec} transport=openssh\n1/:\n"
    )
    result = run_cli("check", "--hosts", f"@{host_file}", *ssh_args(ssh_client))
    assert result.returncode == 0, result.stdout + result.stderr
    assert table_row(result.stdout, beta.spec)[1:3] == ["yes", "known"]
    assert table_row(result.stdout, beta.spec)[-1] == "asyncssh"  # --transport's
    assert table_row(result.stdout, alpha.spec)[1:3] == ["yes", "known"]
    assert table_row(result.stdout, alpha.spec)[-1] == "openssh"  # the line's own
    assert "2 of 2 hosts usable" in result.stdout  # ":" (this machine) is not probed


def test_check_needs_hosts() -> None:
    result = run_cli("check")
    assert result.returncode == 2 and "give hosts to check" in result.stderr


# --- map -------------------------------------------------------------------------


def test_map_local_in_order(module_dir: Path) -> None:
    numbers = [n for n in range(1, 41) if n != 13]
    stdin = "".join(f"{n}\n" for n in numbers)
    for extra in ([], ["--chunksize", "3", "--buffersize", "2"]):
        result = run_cli(
            "map", "cli_tasks_mod:square", "--workers", "2", *extra, cwd=module_dir, stdin=stdin
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [str(n * n) for n in numbers]


def test_map_error_stops_with_traceback(module_dir: Path) -> None:
    stdin = "".join(f"{n}\n" for n in range(1, 21))
    result = run_cli("map", "cli_tasks_mod:square", "--workers", "2", cwd=module_dir, stdin=stdin)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [str(n * n) for n in range(1, 13)]
    assert "line 13 failed" in result.stderr
    assert 'cli_tasks_mod.py", line 6, in square' in result.stderr
    assert "ValueError: unlucky 13" in result.stderr


def test_map_keep_going(module_dir: Path) -> None:
    stdin = "".join(f"{n}\n" for n in range(1, 21))
    result = run_cli(
        "map",
        "cli_tasks_mod:square",
        "--keep-going",
        "--chunksize",
        "4",
        cwd=module_dir,
        stdin=stdin,
    )
    assert result.returncode == 1
    expected = [str(n * n) if n != 13 else "" for n in range(1, 21)]
    assert result.stdout.splitlines() == expected
    assert "ValueError: unlucky 13" in result.stderr and "1 of 20 lines failed" in result.stderr


def test_map_bad_target(module_dir: Path) -> None:
    result = run_cli("map", "no_such_module_here:f", cwd=module_dir, stdin="1\n")
    assert result.returncode == 1 and "No module named 'no_such_module_here'" in result.stderr


def test_map_over_sshd(module_dir: Path, sshd_pair: List[SSHServer], ssh_client: Client) -> None:
    """The module exists only in a temporary directory on the client."""
    hosts = ",".join(s.spec for s in sshd_pair)
    stdin = "".join(f"{n}\n" for n in range(30))
    result = run_cli(
        "map",
        "cli_tasks_mod:where",
        "--hosts",
        hosts,
        "--workers",
        "2",
        *ssh_args(ssh_client),
        cwd=module_dir,
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [str(n) for n in range(30)]
    assert {line.split()[1] for line in lines} <= {"alpha", "beta"}
    stdin = "".join(f"{n}\n" for n in range(1, 16))
    result = run_cli(
        "map",
        "cli_tasks_mod:square",
        "--hosts",
        hosts,
        *ssh_args(ssh_client),
        cwd=module_dir,
        stdin=stdin,
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [str(n * n) for n in range(1, 13)]
    assert "line 13 failed" in result.stderr and "ValueError: unlucky 13" in result.stderr
    assert 'cli_tasks_mod.py", line 6, in square' in result.stderr


def test_map_over_sshd_through_openssh(
    module_dir: Path, sshd_pair: List[SSHServer], ssh_client: Client
) -> None:
    hosts = ",".join(s.spec for s in sshd_pair)
    stdin = "".join(f"{n}\n" for n in range(12))
    result = run_cli(
        "map",
        "cli_tasks_mod:where",
        "--hosts",
        hosts,
        "--workers",
        "2",
        *ssh_args(ssh_client, transport="openssh"),
        cwd=module_dir,
        stdin=stdin,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [str(n) for n in range(12)]
    assert {line.split()[1] for line in lines} <= {"alpha", "beta"}


# --- demo ------------------------------------------------------------------------


def test_demo_local() -> None:
    result = run_cli("demo", "--limit", "20000", "--block", "2000", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "Counting primes below 20,000 in 10 blocks of 2,000 on local workers" in result.stdout
    assert "2,262 primes below 20,000" in result.stdout
    assert re.search(r"^host\s+workers\s+done\s+failed", result.stdout, re.M)
    assert re.search(r"speedup \d+\.\d\dx", result.stdout)
    assert "blocks: 100%|" in result.stderr and "10/10" in result.stderr


def test_demo_over_sshd(sshd_pair: List[SSHServer], ssh_client: Client) -> None:
    server = sshd_pair[1]
    result = run_cli(
        "demo",
        "--limit",
        "10000",
        "--block",
        "1000",
        "--workers",
        "1",
        "--no-serial",
        "--hosts",
        server.spec,
        *ssh_args(ssh_client),
    )
    assert result.returncode == 0, result.stderr
    assert "1,229 primes below 10,000" in result.stdout
    row = table_row(result.stdout, server.spec)
    assert row[1:4] == ["1", "10", "0"]  # one worker, ten blocks done, none failed
    assert "speedup" not in result.stdout
    assert "blocks: 100%|" in result.stderr


# --- ssh config aliases: check and the executor resolve a name the same way -------


def alias_home(tmp_path: Path, ssh_client: Client, aliases: Dict[str, int]) -> Dict[str, str]:
    """A HOME whose ~/.ssh/config names each alias's HostName, Port, User and IdentityFile
    (and the test known_hosts): what a user has, with nothing on the command line."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    config = home / ".ssh" / "config"
    config.write_text(
        "".join(
            f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {ssh_client.user}\n"
            f"  IdentityFile {ssh_client.key}\n  UserKnownHostsFile {ssh_client.known_hosts}\n"
            for alias, port in aliases.items()
        )
    )
    config.chmod(0o600)
    return {"HOME": str(home)}


@TRANSPORTS
def test_check_and_demo_resolve_an_ssh_config_alias(
    sshd_pair: List[SSHServer], ssh_client: Client, tmp_path: Path, transport: str
) -> None:
    """Nothing but the alias on the command line: check goes where demo's workers go."""
    alpha = sshd_pair[0]
    env = alias_home(tmp_path, ssh_client, {"node1": alpha.port})
    common = ["--hosts", "node1", "--python", sys.executable, "--transport", transport]
    result = run_cli("check", *common, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    row = table_row(result.stdout, "node1")
    assert row[1:4] == ["yes", "known", f"publickey ({ssh_client.key})"]
    where = f"node1 (127.0.0.1 port {alpha.port}, user {ssh_client.user}, via ~/.ssh/config"
    assert where in result.stdout
    demo = ["--limit", "2000", "--block", "1000", "--workers", "1", "--no-serial"]
    result = run_cli("demo", *demo, *common, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "303 primes below 2,000" in result.stdout


@TRANSPORTS
def test_check_reports_the_port_an_alias_resolves_to(
    ssh_client: Client, tmp_path: Path, transport: str
) -> None:
    port = free_port()
    env = alias_home(tmp_path, ssh_client, {"closed": port})
    result = run_cli("check", "closed", "--transport", transport, "--timeout", "5", env=env)
    assert result.returncode == 1
    assert table_row(result.stdout, "closed")[1] == "refused"
    assert f"connection refused by 127.0.0.1 port {port}" in result.stdout
    assert f"closed (127.0.0.1 port {port}, user {ssh_client.user}, via ~/.ssh/config" in (
        result.stdout
    )
    assert "or fix Port in ~/.ssh/config" in result.stdout
    assert "port 22" not in result.stdout
