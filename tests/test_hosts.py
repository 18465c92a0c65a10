"""Host specs, host files, per-host env and cwd, and the SSHEXEC_HOSTS variable."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

import cloudpickle
import pytest

import sshexec
from sshexec import Host, SSHPoolExecutor, WorkerStartupError, parse_host, read_hosts
from sshexec._bootstrap import remote_command
from sshexec._hosts import build_transports, hosts_from_env, resolve_hosts, share_workers
from sshexec._transports.local import LocalTransport

from .sshd import SSHServer, executor_kwargs

if TYPE_CHECKING:
    from sshexec._hosts import HostsArg

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # nodes have no copy of the tests


def whereabouts(seconds: float = 0.0) -> Tuple[str, str, str, int]:
    """(sshd's SSHEXEC_TEST_HOST or 'local', $SITE, working directory, pid) of a worker."""
    time.sleep(seconds)
    site = os.environ.get("SITE", "")
    return os.environ.get("SSHEXEC_TEST_HOST", "local"), site, os.getcwd(), os.getpid()


@pytest.mark.parametrize(
    ("spec", "hostname", "user", "port"),
    [
        ("node1", "node1", None, None),
        ("me@node1", "node1", "me", None),
        ("node2:2222", "node2", None, 2222),
        ("me@node2:2222", "node2", "me", 2222),
        ("[2001:db8::7]", "2001:db8::7", None, None),
        ("[2001:db8::7]:2200", "2001:db8::7", None, 2200),
        ("u@[::1]:22", "::1", "u", 22),
        ("2001:db8::8", "2001:db8::8", None, None),
        ("  10.0.0.5  ", "10.0.0.5", None, None),
        ("alias-from-ssh-config", "alias-from-ssh-config", None, None),
    ],
)
def test_parse_host(spec: str, hostname: str, user: Optional[str], port: Optional[int]) -> None:
    host = parse_host(spec)
    assert (host.hostname, host.user, host.port) == (hostname, user, port)


@pytest.mark.parametrize(
    "spec",
    ["", "me@", "node:", "node:abc", "node:0", "node:70000", "a b", "[::1", "@node", "a@b@c"],
)
def test_malformed_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="host"):
        parse_host(spec)


def test_host_values_validate_and_label() -> None:
    assert Host("n", user="u", port=2).label == "u@n:2"
    assert Host("::1").label == "[::1]"
    assert parse_host(Host("x")) == Host("x")
    with pytest.raises(ValueError, match="workers"):
        Host("n", workers=0)
    with pytest.raises(ValueError, match="port"):
        Host("n", port=0)
    with pytest.raises(TypeError):
        parse_host(42)  # type: ignore[arg-type]


def test_executor_refuses_bad_host_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        SSHPoolExecutor(hosts=[])
    with pytest.raises(ValueError, match="listed twice"):
        SSHPoolExecutor(hosts=["a", "a"])
    with pytest.raises(ValueError, match="invalid host spec"):
        SSHPoolExecutor(hosts=["node:notaport"])


def test_workers_are_shared_over_hosts() -> None:
    hosts = [Host("a"), Host("b", workers=3), Host("c")]
    assert share_workers(None, hosts) == [None, 3, None]
    assert share_workers(7, hosts) == [2, 3, 2]
    assert share_workers(5, [Host("a"), Host("b")]) == [3, 2]
    assert share_workers(1, [Host("a"), Host("b")]) == [1, 0]


def test_hosts_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSHEXEC_HOSTS", raising=False)
    assert hosts_from_env() is None
    monkeypatch.setenv("SSHEXEC_HOSTS", " me@node1, node2:2222 ,,")
    assert hosts_from_env() == ["me@node1", "node2:2222"]


def test_env_hosts_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSHEXEC_HOSTS", "bad spec with spaces")
    with pytest.raises(ValueError, match="invalid host spec"):
        SSHPoolExecutor()


# ---- specs with counts, and ':' for this machine -------------------------------------------


@pytest.mark.parametrize(
    ("spec", "hostname", "user", "port", "workers"),
    [
        ("4/me@node1", "node1", "me", None, 4),
        ("12/node2:2222", "node2", None, 2222, 12),
        ("2/[::1]:22", "::1", None, 22, 2),
        ("1/2001:db8::8", "2001:db8::8", None, None, 1),
        (":", ":", None, None, None),
        ("3/:", ":", None, None, 3),
    ],
)
def test_parse_counted_and_local_specs(
    spec: str, hostname: str, user: Optional[str], port: Optional[int], workers: Optional[int]
) -> None:
    host = parse_host(spec)
    assert (host.hostname, host.user, host.port, host.workers) == (hostname, user, port, workers)
    assert host.is_local == (hostname == ":")


@pytest.mark.parametrize("spec", ["0/node", "x/node", "/node", "-1/node", "4/", "4/me@"])
def test_bad_counts_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid host"):
        parse_host(spec)


def test_env_and_cwd_are_validated() -> None:
    host = Host("n", env={"OMP_NUM_THREADS": "1", "_x2": ""}, cwd="~/data")
    assert host.env == {"OMP_NUM_THREADS": "1", "_x2": ""} and host.cwd == "~/data"
    given = {"A": "1"}
    copied = Host("n", env=given)
    given["B"] = "2"
    assert copied.env == {"A": "1"}  # a private copy
    for bad in ("1X", "A-B", "A B", "", "A=B"):
        with pytest.raises(ValueError, match="environment variable name"):
            Host("n", env={bad: "1"})
    with pytest.raises(ValueError, match="str"):
        Host("n", env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="NUL"):
        Host("n", env={"A": "a\0b"})
    with pytest.raises(ValueError, match="cwd"):
        Host("n", cwd="")
    with pytest.raises(ValueError, match="this machine"):
        Host(":", user="me")
    assert Host(":").label == "local"


# ---- host files ------------------------------------------------------------------------------

HOST_FILE = """\
# the cluster, GNU parallel style

4/me@node1                    # four workers
node2:2222  python=/opt/venv/bin/python   cwd="/data/my runs" env.OMP_NUM_THREADS=1
   # an indented comment
[2001:db8::7]:22 slots=8 env.MSG='a # not a comment'
2/:   env.SITE=here
"""


def test_read_hosts_parses_counts_options_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(HOST_FILE)
    assert read_hosts(path) == [
        Host("node1", user="me", workers=4),
        Host(
            "node2",
            port=2222,
            python="/opt/venv/bin/python",
            cwd="/data/my runs",
            env={"OMP_NUM_THREADS": "1"},
        ),
        Host("2001:db8::7", port=22, workers=8, env={"MSG": "a # not a comment"}),
        Host(":", workers=2, env={"SITE": "here"}),
    ]
    assert read_hosts(str(path)) == read_hosts(path)
    assert "read_hosts" in sshexec.__all__ and sshexec.read_hosts.__doc__


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("node3:notaport", "invalid host spec"),
        ("node3 pyton=/usr/bin/python3", "unknown option 'pyton'"),
        ("node3 /usr/bin/python3", "expected key=value"),
        ("node3 env.9LIVES=1", "environment variable name"),
        ("node3 cwd='/unclosed", "No closing quotation"),
        ("2/node3 workers=4", "given once"),
        ("node3 slots=many", "positive number"),
        ("0/node3", "worker count"),
    ],
)
def test_bad_host_file_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "cluster.txt"
    path.write_text(f"# header\nnode1\n\n{line}  # the bad one\nnode9\n")
    with pytest.raises(ValueError, match=message) as info:
        read_hosts(path)
    assert str(info.value).startswith(f"{path}:4: ")


def test_hosts_argument_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts"
    path.write_text("2/node1\nnode2 env.A=1\n")
    from_file = [Host("node1", workers=2), Host("node2", env={"A": "1"})]
    assert resolve_hosts(path) == from_file
    assert resolve_hosts(f"@{path}") == from_file
    assert resolve_hosts(f" node0 , @{path},4/: ") == [
        Host("node0"),
        *from_file,
        Host(":", workers=4),
    ]
    assert resolve_hosts("node1") == [Host("node1")]  # a str is never split into characters
    assert resolve_hosts(["me@a", Host("b"), path]) == [Host("a", user="me"), Host("b"), *from_file]
    monkeypatch.setenv("SSHEXEC_HOSTS", f"@{path}")
    assert resolve_hosts(None) == from_file
    monkeypatch.setenv("SSHEXEC_HOSTS", "  ")
    assert resolve_hosts(None) is None
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n")
    with pytest.raises(ValueError, match=f"host file {empty} lists no hosts"):
        resolve_hosts(empty)
    nothings: List[HostsArg] = ["", " , ", []]
    for nothing in nothings:
        with pytest.raises(ValueError, match="hosts is empty"):
            resolve_hosts(nothing)
    with pytest.raises(FileNotFoundError):
        resolve_hosts("@/nonexistent/hosts")


def test_local_entry_builds_a_local_transport_beside_ssh_hosts() -> None:
    built = build_transports(
        [Host(":", workers=2, env={"A": "1"}, cwd="/tmp"), "3/node1"],
        None,
        None,
        None,
        False,
        5.0,
        5.0,
        None,
    )
    (local, local_count, local_python), (remote, remote_count, _) = built
    assert isinstance(local, LocalTransport) and local.host == "local"
    assert (local.env, local.cwd, local_count, local_python) == (
        {"A": "1"},
        "/tmp",
        2,
        sys.executable,
    )
    assert type(remote).__name__ == "SSHTransport" and remote.host == "node1"
    assert remote_count == 3
    with pytest.raises(ValueError, match="listed twice"):
        build_transports([":", "2/:"], None, None, None, False, 5.0, 5.0, None)


# ---- the remote command, run by a real /bin/sh --------------------------------------------


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """Stands in for the interpreter: prints its directory and $SITE, then exits."""
    script = tmp_path / "fake-python"
    script.write_text('#!/bin/sh\nprintf "%s|%s" "$(pwd)" "$SITE"\n')
    script.chmod(0o755)
    return script


def test_remote_command_sets_env_and_cwd_literally(tmp_path: Path, fake_python: Path) -> None:
    where = tmp_path / "a dir with 'quotes' and $dollars"
    where.mkdir()
    value = 'it\'s "quoted" $HOME `date` ; exit 3'
    command = remote_command(str(fake_python), {"SITE": value}, str(where))
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{where}|{value}"


def test_remote_command_expands_home_and_reports_a_missing_cwd(
    tmp_path: Path, fake_python: Path
) -> None:
    home = tmp_path / "home"
    (home / "runs").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home)}
    done = subprocess.run(
        remote_command(str(fake_python), {}, "~/runs"),
        shell=True,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.stdout.split("|")[0] == str(home / "runs")
    done = subprocess.run(
        remote_command(str(fake_python), {}, "~/gone"),
        shell=True,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 125 and done.stdout == ""
    assert f"cannot change to the working directory: {home}/gone" in done.stderr


# ---- against local workers and real sshd hosts -----------------------------------------------


def run_everywhere(executor: SSHPoolExecutor, n: int = 12) -> List[Tuple[str, str, str, int]]:
    return list(executor.map(whereabouts, [0.05] * n))


def test_local_workers_get_env_and_cwd(tmp_path: Path, made: List[SSHPoolExecutor]) -> None:
    made.append(
        SSHPoolExecutor(hosts=[Host(":", workers=2, env={"SITE": "den"}, cwd=str(tmp_path))])
    )
    seen = run_everywhere(made[0], 6)
    assert {(h, site, cwd) for h, site, cwd, _ in seen} == {("local", "den", str(tmp_path))}
    assert made[0]._max_workers == 2


def test_ssh_workers_get_env_and_cwd(
    sshd_pair: List[SSHServer], tmp_path: Path, made: List[SSHPoolExecutor]
) -> None:
    host = dataclasses.replace(
        parse_host(sshd_pair[0].spec), env={"SITE": "it's here"}, cwd=str(tmp_path)
    )
    made.append(SSHPoolExecutor(2, **executor_kwargs(sshd_pair[:1], hosts=[host])))
    seen = run_everywhere(made[0], 6)
    assert {(h, site, cwd) for h, site, cwd, _ in seen} == {("alpha", "it's here", str(tmp_path))}


def test_missing_cwd_names_the_host(sshd_pair: List[SSHServer], tmp_path: Path) -> None:
    gone = str(tmp_path / "not-there")
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(hosts=[Host(":", cwd=gone)])
    assert info.value.host == "local" and info.value.stage == "working directory"
    assert gone in str(info.value)
    alpha = dataclasses.replace(parse_host(sshd_pair[0].spec), cwd=gone)
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **executor_kwargs(sshd_pair[:1], hosts=[alpha]))
    assert info.value.host == sshd_pair[0].spec and info.value.stage == "working directory"
    assert gone in str(info.value) and "Host(cwd=...)" in str(info.value)


def test_host_file_with_counts_and_comments(
    sshd_pair: List[SSHServer], tmp_path: Path, made: List[SSHPoolExecutor]
) -> None:
    alpha, beta = sshd_pair
    path = tmp_path / "cluster"
    path.write_text(
        f"# two test hosts\n\n2/{alpha.spec}    # both cores\n"
        f"{beta.spec} workers=1 env.SITE=beta-site cwd={tmp_path}  # one, in the tmp dir\n"
    )
    made.append(SSHPoolExecutor(**executor_kwargs(sshd_pair, hosts=path)))
    assert made[0]._max_workers == 3
    seen = run_everywhere(made[0])
    by_host = {h: {(site, cwd) for h2, site, cwd, _ in seen if h2 == h} for h, _, _, _ in seen}
    assert by_host["beta"] == {("beta-site", str(tmp_path))}
    assert by_host["alpha"] and ("beta-site", str(tmp_path)) not in by_host["alpha"]


def test_sshexec_hosts_names_a_host_file(
    sshd_pair: List[SSHServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    made: List[SSHPoolExecutor],
) -> None:
    path = tmp_path / "hosts"
    path.write_text("\n".join(f"1/{s.spec}" for s in sshd_pair) + "\n")
    monkeypatch.setenv("SSHEXEC_HOSTS", f"@{path}")
    kwargs = executor_kwargs(sshd_pair)
    del kwargs["hosts"]
    made.append(SSHPoolExecutor(**kwargs))
    assert made[0]._max_workers == 2
    assert {h for h, _, _, _ in run_everywhere(made[0])} == {"alpha", "beta"}


def test_comma_separated_string_of_hosts(
    sshd_pair: List[SSHServer], made: List[SSHPoolExecutor]
) -> None:
    spec = ",".join(f"1/{s.spec}" for s in sshd_pair)
    made.append(SSHPoolExecutor(**executor_kwargs(sshd_pair, hosts=spec)))
    assert {h for h, _, _, _ in run_everywhere(made[0])} == {"alpha", "beta"}


def test_this_machine_beside_an_sshd_host(
    sshd_pair: List[SSHServer], tmp_path: Path, made: List[SSHPoolExecutor]
) -> None:
    path = tmp_path / "mixed"
    path.write_text(f"1/:   env.SITE=home cwd={tmp_path}\n1/{sshd_pair[0].spec} env.SITE=away\n")
    made.append(SSHPoolExecutor(**executor_kwargs(sshd_pair[:1], hosts=f"@{path}")))
    seen = run_everywhere(made[0])
    assert {(h, site) for h, site, _, _ in seen} == {("local", "home"), ("alpha", "away")}
    assert {cwd for h, _, cwd, _ in seen if h == "local"} == {str(tmp_path)}
    local_pids = {pid for h, _, _, pid in seen if h == "local"}
    agents = {parent_of(pid) for pid in local_pids}  # forked by this machine's agent...
    assert len(agents) == 1 and {parent_of(a) for a in agents} == {os.getpid()}  # ...ours


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])
