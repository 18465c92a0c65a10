"""Host specs and the SSHEXEC_HOSTS variable."""

from __future__ import annotations

from typing import Optional

import pytest

from sshexec import Host, SSHPoolExecutor, parse_host
from sshexec._hosts import hosts_from_env, share_workers


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
