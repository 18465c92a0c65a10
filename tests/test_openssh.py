"""The OpenSSH-binary transport: option translation and ssh's error messages (pure), then
a slice of the executor contract and the crash matrix on real sshd hosts reached through
``ssh``, host files, and that asyncssh is never imported for it.

The contract tests are test_executor's, test_failures', test_lifecycle's and
test_exit's own, collected here again: this module's ``make_executor`` and
``child_kwargs`` fixtures build their executors with ``transport="openssh"``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from sshexec import Host, SSHPoolExecutor, WorkerStartupError, read_hosts
from sshexec._transports.openssh import OpenSSHTransport
from sshexec._transports.ssh_command import CommandLine, diagnose, translate

from . import tasks
from .sshd import SSHServer, executor_kwargs, free_port
from .test_executor import (
    test_exception_keeps_type_and_carries_remote_traceback,
    test_initializer_runs_in_every_worker,
    test_large_payload_round_trip,
    test_map_keeps_input_order,
    test_max_tasks_per_child_replaces_workers,
    test_print_inside_tasks_does_not_corrupt_frames,
    test_shutdown_cancel_futures,
    test_submit_returns_result,
)
from .test_exit import test_killed_client_leaves_no_worker
from .test_failures import (
    test_os_exit_fails_only_that_future,
    test_segfault_names_the_signal,
    test_worker_killed_mid_task_from_outside,
)
from .test_lifecycle import test_kill_workers_starts_nothing_and_charges_nothing
from .waits import eventually, shut_down

REPO = Path(__file__).resolve().parents[1]
Make = Callable[..., SSHPoolExecutor]
StartServer = Callable[..., SSHServer]

# Collected here, on this module's fixtures: the tests where the transport matters
# (exit statuses and signals, kills, stdout/stderr, payload sizes, worker replacement).
CONTRACT = [
    test_submit_returns_result,
    test_map_keeps_input_order,
    test_exception_keeps_type_and_carries_remote_traceback,
    test_shutdown_cancel_futures,
    test_print_inside_tasks_does_not_corrupt_frames,
    test_initializer_runs_in_every_worker,
    test_max_tasks_per_child_replaces_workers,
    test_large_payload_round_trip,
    test_os_exit_fails_only_that_future,
    test_segfault_names_the_signal,
    test_worker_killed_mid_task_from_outside,
    test_kill_workers_starts_nothing_and_charges_nothing,
    test_killed_client_leaves_no_worker,
]


def openssh_kwargs(servers: List[SSHServer], **extra: Any) -> Dict[str, Any]:
    """As the other SSH tests, through ssh(1): the test client's key, known_hosts and
    (empty) ssh config, no agent."""
    return executor_kwargs(servers, **{"transport": "openssh", **extra})


@pytest.fixture
def make_executor(sshd_pair: List[SSHServer]) -> Iterator[Make]:
    made: List[SSHPoolExecutor] = []

    def make(max_workers: Any = 2, **kwargs: Any) -> SSHPoolExecutor:
        executor = SSHPoolExecutor(max_workers, **openssh_kwargs(sshd_pair, **kwargs))
        made.append(executor)
        assert {h.transport.kind for h in executor._pool.hosts} == {"openssh"}
        return executor

    make.kind = "openssh"  # type: ignore[attr-defined]
    yield make
    for executor in made:
        shut_down(executor)


@pytest.fixture
def executor(make_executor: Make) -> SSHPoolExecutor:
    return make_executor()


@pytest.fixture
def child_kwargs(sshd_pair: List[SSHServer]) -> Dict[str, Any]:
    return openssh_kwargs(sshd_pair)


# ---- pure: options, command line, ssh's messages ------------------------------------------


def test_ssh_options_translate_to_ssh_config_lines(tmp_path: Path) -> None:
    key, cert = tmp_path / "id key", tmp_path / "id key-cert.pub"
    done = translate(
        {
            "client_keys": [str(key), (key, cert)],
            "agent_path": None,
            "known_hosts": [str(tmp_path / "kh"), "/etc/ssh/100%_known"],
            "username": "me",
            "port": 2200,
            "config": [str(tmp_path / "cfg")],
            "keepalive_interval": 2.5,
        },
        "ssh_options",
    )
    assert done.every_hop == [
        ("IdentityFile", str(key)),
        ("IdentityFile", str(key)),
        ("CertificateFile", str(cert)),
        ("IdentitiesOnly", "yes"),
        ("IdentityAgent", "none"),
        ("UserKnownHostsFile", f"{tmp_path / 'kh'} /etc/ssh/100%_known"),
        ("GlobalKnownHostsFile", "/dev/null"),
        ("ServerAliveInterval", "3"),
    ]
    assert done.host_only == [("User", "me"), ("Port", "2200")]
    assert done.config == [str(tmp_path / "cfg")]
    assert translate({"known_hosts": None}, "x").every_hop[0] == ("StrictHostKeyChecking", "no")
    assert translate({"config": None}, "x").config == []  # asyncssh's "no config file"
    assert translate({}, "x").config is None  # ssh's own files


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"password": "secret", "client_keys": ["k"]}, "'password' has no ssh(1) equivalent"),
        ({"passphrase": "x", "login_timeout": 3}, "'login_timeout', 'passphrase' have no"),
        ({"client_keys": [object()]}, "client_keys must be a file path"),
        ({"client_keys": None}, "client_keys: None"),
        ({"tunnel": object()}, "tunnel must be a string"),
        ({"port": "22"}, "port must be a port number"),
    ],
)
def test_untranslatable_ssh_options_are_refused_at_construction(
    options: Dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=r"^ssh_options: .*" + re.escape(named)):
        SSHPoolExecutor(hosts=["node1"], transport="openssh", ssh_options=options)
    with pytest.raises(ValueError, match=r"^host node2: options: .*" + re.escape(named)):
        SSHPoolExecutor(hosts=[Host("node2", options=options, transport="openssh")])


def test_transport_is_validated() -> None:
    with pytest.raises(ValueError, match="transport must be one of asyncssh, openssh, srun"):
        SSHPoolExecutor(hosts=["node1"], transport="paramiko")
    with pytest.raises(ValueError, match="host n: transport must be"):
        Host("n", transport="ssh")
    with pytest.raises(ValueError, match="transport do not apply"):
        Host(":", transport="openssh")


def test_private_config_carries_sshexec_options_to_every_hop(tmp_path: Path) -> None:
    """ssh passes only -F on to the ``ssh -W`` of a ProxyJump hop: sshexec's own settings
    live in the -F file (first value wins, so they precede the Included configs); what
    concerns the host alone is on the command line."""
    line = CommandLine.build(
        "me@node1:2200",
        "node1",
        port=2200,
        username="me",
        known_hosts=str(tmp_path / "known hosts"),
        unsafe=False,
        connect_timeout=7.5,
        keepalive_interval=10,
        shared_options={"agent_path": None, "username": "shared"},
        host_options={"client_keys": ["~/.ssh/node1_key"]},
    )
    try:
        argv = line.argv("true")
        config = Path(argv[argv.index("-F") + 1])
        assert config.stat().st_mode & 0o777 == 0o600
        assert config.parent.stat().st_mode & 0o777 == 0o700
        assert config.read_text().splitlines()[1:] == [
            "IdentityAgent none",
            "BatchMode yes",
            "StrictHostKeyChecking yes",
            f'UserKnownHostsFile "{tmp_path / "known hosts"}"',
            "GlobalKnownHostsFile /dev/null",
            "ConnectTimeout 8",
            "ServerAliveInterval 10",
            "ServerAliveCountMax 3",
            "Include ~/.ssh/config",
            "Include /etc/ssh/ssh_config",
        ]
        after = argv[argv.index("ClearAllForwardings=yes") + 1 :]
        assert after == [
            "-o",
            "IdentityFile=~/.ssh/node1_key",  # Host(options=...): the node only, and first
            "-o",
            "IdentitiesOnly=yes",
            "-p",
            "2200",
            "-l",
            "me",  # the spec's user wins over ssh_options' (first value wins)
            "-o",
            "User=shared",
            "--",
            "node1",
            "true",
        ]
        assert argv[argv.index("-T") : argv.index("-T") + 3] == ["-T", "-e", "none"]
    finally:
        line.remove()
    assert not config.exists()


UNKNOWN = """\
No ED25519 host key is known for [127.0.0.1]:50223 and you have requested strict checking.
Host key verification failed.
"""
CHANGED = """\
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!
Someone could be eavesdropping on you right now (man-in-the-middle attack)!
It is also possible that a host key has just been changed.
The fingerprint for the ED25519 key sent by the remote host is
SHA256:iprrdahX3zdxViRSA/aaGLzJdG5Eq8fr1TXFKvyI8DY.
Please contact your system administrator.
Add correct host key in /tmp/kh_bad to get rid of this message.
Offending ED25519 key in /tmp/kh_bad:1
  remove with:
  ssh-keygen -f "/tmp/kh_bad" -R "[127.0.0.1]:50223"
Host key for [127.0.0.1]:50223 has changed and you have requested strict checking.
Host key verification failed.
"""
JUMP_UNKNOWN = """\
No ED25519 host key is known for [10.253.9.2]:41000 and you have requested strict checking.
Host key verification failed.
kex_exchange_identification: Connection closed by remote host
Connection closed by UNKNOWN port 65535
"""


@pytest.mark.parametrize(
    ("stderr", "kind", "stage", "detail"),
    [
        (UNKNOWN, "unknown", "host key", "[127.0.0.1]:50223"),
        (CHANGED, "changed", "host key", "/tmp/kh_bad"),
        (JUMP_UNKNOWN, "unknown", "host key", "[10.253.9.2]:41000"),
        ("Host key verification failed.\n", "host key", "host key", ""),
        ("me@127.0.0.1: Permission denied (publickey).\n", "authentication", "authentication", ""),
        (
            "ssh: connect to host 127.0.0.1 port 1: Connection refused\n",
            "refused",
            "connect",
            "1",
        ),
        (
            "ssh: Could not resolve hostname nosuch.invalid: Name or service not known\n",
            "resolve",
            "connect",
            "nosuch.invalid",
        ),
        ("Connection timed out during banner exchange\n", "timeout", "connect", ""),
        ("ssh: connect to host 10.0.0.1 port 22: No route to host\n", "unreachable", "connect", ""),
        (
            "debug1: Reading configuration\n/x: line 3: Bad configuration option: foo\n",
            "other",
            "connect",
            "",
        ),
        ("", "other", "connect", ""),
    ],
)
def test_diagnose_reads_what_ssh_said(stderr: str, kind: str, stage: str, detail: str) -> None:
    finding = diagnose(stderr)
    assert (finding.kind, finding.stage) == (kind, stage)
    if detail:
        assert detail in {finding.target, finding.path, finding.name, finding.port}
    if kind == "other" and stderr:
        assert finding.line == "/x: line 3: Bad configuration option: foo"


def test_host_file_transport_option(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("2/me@node1 transport=openssh\nnode2 transport=asyncssh\n")
    assert read_hosts(path) == [
        Host("node1", user="me", workers=2, transport="openssh"),
        Host("node2", transport="asyncssh"),
    ]
    path.write_text("node1\nnode3 transport=telnet\n")
    with pytest.raises(ValueError, match=r"hosts:2: host node3: transport must be"):
        read_hosts(path)


# ---- real sshd hosts ------------------------------------------------------------------------


def test_workers_run_through_the_ssh_binary(sshd_pair: List[SSHServer]) -> None:
    with SSHPoolExecutor(4, **openssh_kwargs(sshd_pair)) as executor:
        assert {h for h, _, _ in executor.map(tasks.sleep_then_where, [0.2] * 8)} == {
            "alpha",
            "beta",
        }
        hosts = executor._pool.hosts
        eventually(lambda: sum(len(h.links) for h in hosts) == 4, 30, "four workers up")
        transports = [h.transport for h in hosts]
        assert {t.kind for t in transports} == {"openssh"}
        assert all(isinstance(t, OpenSSHTransport) for t in transports)
        config = Path(transports[0].command_line.config_path)  # type: ignore[attr-defined]
        assert config.is_file()
        ssh_processes = [
            p
            for p in os.listdir("/proc")
            if p.isdigit() and _cmdline(int(p)).startswith("ssh\0-F\0" + str(config))
        ]
        assert len(ssh_processes) == 1  # one ssh client per host: its agent forks the workers
    assert not config.exists()  # the private config goes with the executor


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def test_every_host_openssh_imports_no_asyncssh(sshd_pair: List[SSHServer]) -> None:
    code = (
        "import json, os, sys\n"
        "from sshexec import SSHPoolExecutor\n"
        "kw = json.loads(os.environ['KW'])\n"
        "kw['hosts'] = kw['hosts'][:1] + [':']\n"
        "with SSHPoolExecutor(2, **kw) as ex:\n"
        "    assert ex.submit(pow, 2, 10).result(timeout=30) == 1024\n"
        "assert 'asyncssh' not in sys.modules, 'asyncssh was imported'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "KW": json.dumps(openssh_kwargs(sshd_pair))}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_host_file_chooses_the_transport_per_host(
    sshd_pair: List[SSHServer], tmp_path: Path
) -> None:
    alpha, beta = sshd_pair
    hosts = tmp_path / "hosts"
    hosts.write_text(f"1/{alpha.spec} transport=openssh\n1/{beta.spec}\n")
    with SSHPoolExecutor(**executor_kwargs(sshd_pair, hosts=hosts)) as executor:
        kinds = {h.name: h.transport.kind for h in executor._pool.hosts}
        assert kinds == {alpha.spec: "openssh", beta.spec: "asyncssh"}
        assert {h for h, _, _ in executor.map(tasks.sleep_then_where, [0.2] * 6)} == {
            "alpha",
            "beta",
        }


def test_ssh_config_alias_through_F(sshd_pair: List[SSHServer], tmp_path: Path) -> None:
    """A name only the ssh config knows, its key from IdentityFile there: ssh reads it."""
    alpha = sshd_pair[0]
    config = tmp_path / "ssh config"  # a space in the path, on purpose
    config.write_text(
        f"Host lab-alpha\n  HostName 127.0.0.1\n  Port {alpha.port}\n  User {alpha.client.user}\n"
        f"  IdentityFile {alpha.client.key}\n  UserKnownHostsFile {alpha.client.known_hosts}\n"
    )
    kwargs = openssh_kwargs([alpha], hosts=["lab-alpha"], known_hosts=None)
    kwargs["ssh_options"] = {"config": [str(config)], "agent_path": None}
    with SSHPoolExecutor(1, **kwargs) as executor:
        assert executor.submit(tasks.where).result(timeout=30)[0] == "alpha"
        transport = executor._pool.hosts[0].transport
        assert transport.resolved["port"] == str(alpha.port)  # type: ignore[attr-defined]


def test_match_exec_in_the_ssh_config_is_honoured(
    sshd_pair: List[SSHServer], tmp_path: Path
) -> None:
    """``Match host ... exec`` picks the port, user and key, as ssh evaluates it."""
    alpha = sshd_pair[0]
    marker = tmp_path / "use-alpha"
    marker.touch()
    config = tmp_path / "config"
    config.write_text(
        f'Match host 127.0.0.1 exec "test -e {marker}"\n  Port {alpha.port}\n'
        f"  User {alpha.client.user}\n  IdentityFile {alpha.client.key}\n"
    )
    kwargs = openssh_kwargs([alpha], hosts=["127.0.0.1"])  # no port: only the Match has it
    kwargs["ssh_options"] = {"config": [str(config)], "agent_path": None}
    with SSHPoolExecutor(1, **kwargs) as executor:
        assert executor.submit(tasks.where).result(timeout=30)[0] == "alpha"


def test_ipv6_host(start_server: StartServer) -> None:
    server = start_server("sixer-openssh", address="::1")
    with SSHPoolExecutor(1, **openssh_kwargs([server])) as executor:
        assert executor.submit(tasks.where).result(timeout=30)[0] == "sixer-openssh"


def test_noisy_login_shell_on_stdout_and_stderr(
    start_server: StartServer,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(
        "noisy-openssh",
        'ForceCommand echo "Welcome"; echo motd >&2; eval "$SSH_ORIGINAL_COMMAND"',
    )
    with caplog.at_level(logging.WARNING, logger="sshexec"):
        with SSHPoolExecutor(1, **openssh_kwargs([server])) as executor:
            assert executor.submit(tasks.square, 12).result(timeout=30) == 144
    assert any("Welcome" in r.getMessage() for r in caplog.records)  # chatter, skipped
    assert "motd" in capfd.readouterr().err  # held back until the node answered, then relayed


def test_connection_drop_reconnects(start_server: StartServer) -> None:
    server = start_server("dropper-openssh")
    with SSHPoolExecutor(2, **openssh_kwargs([server], max_retries=1)) as executor:
        futures = [executor.submit(tasks.sleep_then, 0.5, i) for i in range(6)]
        time.sleep(0.3)
        server.drop_connections()  # every ssh client's connection dies under its worker
        assert [f.result(timeout=60) for f in futures] == list(range(6))
        assert executor.submit(tasks.square, 5).result(timeout=30) == 25


# ---- the crash matrix's SSH rows, through ssh(1) ------------------------------------------


def test_unknown_host_key(start_server: StartServer) -> None:
    server = start_server("stranger-openssh", trusted=False)
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **openssh_kwargs([server]))
    error, known = info.value, server.client.known_hosts
    assert (error.host, error.stage) == (server.spec, "host key")
    assert f"[127.0.0.1]:{server.port} is not in {known}" in error.reason
    assert f"ssh-keyscan -p {server.port} 127.0.0.1 >> {known}" in error.fix


def test_changed_host_key_is_refused(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("changeling-openssh", trusted=False)
    impostor = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(
        f"[127.0.0.1]:{server.port} {' '.join(Path(f'{impostor}.pub').read_text().split()[:2])}\n"
    )
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **openssh_kwargs([server], known_hosts=str(known)))
    assert info.value.stage == "host key"
    assert "has changed, and someone could be intercepting" in info.value.reason
    assert f"ssh-keygen -R '[127.0.0.1]:{server.port}' -f {known}" in info.value.fix


def test_unsafe_skip_host_key_check_says_nothing_per_worker(
    start_server: StartServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server = start_server("unverified-openssh", trusted=False)
    kwargs = openssh_kwargs([server], unsafe_skip_host_key_check=True)
    with SSHPoolExecutor(2, **kwargs) as executor:
        assert executor.submit(tasks.square, 4).result(timeout=30) == 16
    assert "Permanently added" not in capfd.readouterr().err


def test_refused_authentication(start_server: StartServer) -> None:
    server = start_server("locked-openssh")
    (server.root / "authorized_keys").write_text("")
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **openssh_kwargs([server]))
    assert info.value.stage == "authentication"
    assert "Permission denied (publickey)" in info.value.reason
    assert "authorized_keys" in info.value.fix


def test_unreachable_port(sshd_pair: List[SSHServer]) -> None:
    port = free_port()
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **openssh_kwargs(sshd_pair, hosts=[f"127.0.0.1:{port}"]))
    assert info.value.stage == "connect"
    assert f"cannot reach 127.0.0.1 port {port}: connection refused" in info.value.reason


def test_missing_and_too_old_remote_python_and_cwd(sshd_pair: List[SSHServer]) -> None:
    """The remote command's own failures reach handshake() as with the other transports."""
    from .test_failures import _too_old_python

    with pytest.raises(WorkerStartupError, match="no usable Python") as info:
        SSHPoolExecutor(1, **openssh_kwargs(sshd_pair[:1], python="/nonexistent/python3"))
    assert info.value.stage == "interpreter"
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **openssh_kwargs(sshd_pair[:1], python=_too_old_python()))
    assert info.value.stage == "interpreter"
    assert "3.9 or newer" in str(info.value)
    missing = Host(
        "127.0.0.1", user=sshd_pair[0].client.user, port=sshd_pair[0].port, cwd="/no/such/dir"
    )
    with pytest.raises(WorkerStartupError, match="/no/such/dir") as info:
        SSHPoolExecutor(1, **openssh_kwargs(sshd_pair[:1], hosts=[missing]))
    assert info.value.stage == "working directory"


def test_bad_ssh_config_fails_at_connect(sshd_pair: List[SSHServer], tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host *\n  NoSuchOption yes\n")
    kwargs = openssh_kwargs(sshd_pair[:1])
    kwargs["ssh_options"] = {**kwargs["ssh_options"], "config": [str(config)]}
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **kwargs)
    assert info.value.stage == "connect"
    assert "Bad configuration option" in info.value.reason or "nosuchoption" in info.value.reason


def test_one_bad_host_is_left_out(sshd_pair: List[SSHServer]) -> None:
    bad = f"127.0.0.1:{free_port()}"
    kwargs = openssh_kwargs(sshd_pair[:1], hosts=[sshd_pair[0].spec, bad], reconnect_grace=2)
    with SSHPoolExecutor(2, **kwargs) as executor:
        assert {h for h, _, _ in executor.map(tasks.where, range(6))} == {"alpha"}
        assert executor._pool.hosts[1].last_error is not None
        assert "connection refused" in executor._pool.hosts[1].last_error
