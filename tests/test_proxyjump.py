"""``~/.ssh/config`` aliases and ProxyJump through a real bastion sshd.

The bastion runs in a network namespace of its own, reached over a veth pair; the target
sshd listens on that namespace's loopback, which this process cannot reach at all. Tasks
prove where they ran by the inode of their network namespace.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import cloudpickle
import pytest

from sshexec import Host, SSHPoolExecutor, WorkerStartupError

from .sshd import Client, SSHServer, descendants, free_port
from .test_cli import TRANSPORTS, run_cli, table_row

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # nodes have no copy of the tests

BASTION_ADDRESS = "10.253.9.2"  # the namespace's end of the veth pair (10.253.9.1 is ours)


def net_namespace(_: Any = None) -> Tuple[int, str, str]:
    """(inode of this process's network namespace, sshd's SSHEXEC_TEST_HOST, $SITE)."""
    env = os.environ
    return (
        os.stat("/proc/self/ns/net").st_ino,
        env.get("SSHEXEC_TEST_HOST", ""),
        env.get("SITE", ""),
    )


@dataclass
class JumpSite:
    netns: str
    bastion: SSHServer
    target: SSHServer
    root: Path
    client: Client

    def known_hosts(self, *servers: SSHServer) -> str:
        path = self.root / f"known_hosts-{'-'.join(s.name for s in servers) or 'none'}"
        path.write_text("".join(f"[{s.address}]:{s.port} {s.host_key}\n" for s in servers))
        return str(path)

    def config(
        self, name: str, known_hosts: Optional[Dict[str, str]] = None, jump: bool = True
    ) -> str:
        """An ssh config with aliases ``bastion`` and ``target`` (ProxyJump bastion);
        ``known_hosts`` maps an alias to its UserKnownHostsFile line."""
        known_hosts = known_hosts or {}
        text = ""
        for alias, server, extra in (
            ("bastion", self.bastion, ""),
            ("target", self.target, "    ProxyJump bastion\n" if jump else ""),
        ):
            text += (
                f"Host {alias}\n    HostName {server.address}\n    Port {server.port}\n"
                f"    User {self.client.user}\n    IdentityFile {self.client.key}\n{extra}"
            )
            if alias in known_hosts:
                text += f"    UserKnownHostsFile {known_hosts[alias]}\n"
        path = self.root / name
        path.write_text(text)
        return str(path)

    def namespace_inode(self) -> int:
        return os.stat(f"/run/netns/{self.netns}").st_ino


@pytest.fixture(scope="module")
def site(ssh_client: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JumpSite]:
    if shutil.which("ip") is None:
        pytest.skip("ip (iproute2) is not installed: cannot build the network namespace")
    tag = uuid.uuid4().hex[:6]
    ns, outside, inside = f"sshexec-jump-{tag}", f"sjo{tag}", f"sji{tag}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"`ip netns add` is unavailable here: {exc.stderr.decode().strip()}")
    root = tmp_path_factory.mktemp("jump")
    servers: List[SSHServer] = []
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", ns)
        ip("addr", "add", "10.253.9.1/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{BASTION_ADDRESS}/30", "dev", inside)
        ip("netns", "exec", ns, "ip", "link", "set", inside, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        for name, address in (("bastion", BASTION_ADDRESS), ("target", "127.0.0.1")):
            server = SSHServer(name, root / name, ssh_client, address=address)
            # Free here, so nothing in this namespace answers on it: the target stays unreachable.
            server.netns, server.port = ns, free_port()
            servers.append(server.start())
        yield JumpSite(ns, servers[0], servers[1], root, ssh_client)
    finally:
        for server in servers:
            server.stop()
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def connections(server: SSHServer) -> List[int]:
    """The listener's direct children: one sshd process per TCP connection."""
    assert server.proc is not None
    return [p for p in descendants(server.proc.pid) if parent_of(p) == server.proc.pid]


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def options(config: str) -> Dict[str, Any]:
    return {"config": [config], "agent_path": None}


def test_target_is_unreachable_except_through_the_bastion(site: JumpSite) -> None:
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", site.target.port), timeout=2).close()
    assert site.target.is_listening()  # from inside the namespace it is there


def test_proxyjump_from_ssh_config(site: JumpSite) -> None:
    """As `ssh target` would: everything from the config, host keys from its
    UserKnownHostsFile lines, per-host env from Host()."""
    config = site.config(
        "config-plain",
        {"bastion": site.known_hosts(site.bastion), "target": site.known_hosts(site.target)},
    )
    host = Host("target", workers=2, env={"SITE": "behind the bastion"})
    with SSHPoolExecutor(hosts=[host], ssh_options=options(config), python=sys.executable) as ex:
        seen = set(ex.map(net_namespace, range(8)))
        assert ex._max_workers == 2
        assert len(connections(site.bastion)) == 1  # one hop, shared by the node's channels
    assert seen == {(site.namespace_inode(), "target", "behind the bastion")}
    assert site.namespace_inode() != os.stat("/proc/self/ns/net").st_ino
    assert site.bastion.proc is not None
    deadline = time.monotonic() + 10  # closing the target's connection closed the hop's
    while descendants(site.bastion.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert descendants(site.bastion.proc.pid) == []


def test_known_hosts_option_covers_the_jump_host(site: JumpSite) -> None:
    """asyncssh alone opens a ProxyJump hop with its defaults (~/.ssh/known_hosts), not
    with known_hosts=; sshexec opens the hop itself, with its own options."""
    config = site.config("config-no-known-hosts")
    both = site.known_hosts(site.bastion, site.target)
    with SSHPoolExecutor(
        1, hosts="target", known_hosts=both, ssh_options=options(config), python=sys.executable
    ) as ex:
        assert ex.submit(net_namespace).result(timeout=30)[:2] == (site.namespace_inode(), "target")


def test_proxyjump_from_the_default_ssh_config_uses_sshexec_options(
    site: JumpSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No config= at all: ~/.ssh/config's ProxyJump is still followed by sshexec, which
    opens the hop with known_hosts= (asyncssh alone would check it against the empty
    ~/.ssh/known_hosts and refuse it)."""
    (tmp_path / ".ssh").mkdir()
    shutil.copy(site.config("config-for-home"), tmp_path / ".ssh" / "config")
    monkeypatch.setenv("HOME", str(tmp_path))
    both = site.known_hosts(site.bastion, site.target)
    with SSHPoolExecutor(
        1, hosts="target", known_hosts=both, ssh_options={"agent_path": None}, python=sys.executable
    ) as ex:
        assert ex.submit(net_namespace).result(timeout=30)[:2] == (site.namespace_inode(), "target")


def test_unknown_jump_host_key_is_refused_naming_the_hop(site: JumpSite) -> None:
    config = site.config("config-no-known-hosts")
    only_target = site.known_hosts(site.target)
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(
            1,
            hosts="target",
            known_hosts=only_target,
            ssh_options=options(config),
            python=sys.executable,
        )
    error = info.value
    assert error.host == "target" and error.stage == "host key"
    assert "jump host bastion" in str(error)
    assert f"[{BASTION_ADDRESS}]:{site.bastion.port} is not in {only_target}" in str(error)
    assert f"ssh-keyscan -p {site.bastion.port} {BASTION_ADDRESS}" in str(error)


def test_unsafe_skip_covers_the_jump_host(site: JumpSite) -> None:
    config = site.config("config-no-known-hosts")
    nobody = site.known_hosts()  # an empty known_hosts: neither key is recorded anywhere
    with SSHPoolExecutor(
        1,
        hosts="target",
        known_hosts=nobody,
        unsafe_skip_host_key_check=True,
        ssh_options=options(config),
        python=sys.executable,
    ) as ex:
        assert ex.submit(net_namespace).result(timeout=30)[0] == site.namespace_inode()


def test_tunnel_option_string_is_a_jump_list(site: JumpSite) -> None:
    """asyncssh's own ``tunnel="bastion"`` connect option is treated as a ProxyJump list."""
    config = site.config("config-no-jump", jump=False)
    both = site.known_hosts(site.bastion, site.target)
    host = Host("target", options={"tunnel": "bastion"})
    with SSHPoolExecutor(
        1, hosts=[host], known_hosts=both, ssh_options=options(config), python=sys.executable
    ) as ex:
        assert ex.submit(net_namespace).result(timeout=30)[0] == site.namespace_inode()


@pytest.mark.parametrize(
    ("target_jump", "again_jump"),
    [
        ("bastion,again", ""),  # a chain: the second hop goes through the first
        ("again", "bastion"),  # a hop with a ProxyJump of its own
    ],
)
def test_jump_chains_are_followed_and_closed(
    site: JumpSite, tmp_path: Path, target_jump: str, again_jump: str
) -> None:
    """``again`` is the bastion once more, reached from inside the namespace."""
    bastion, target, client = site.bastion, site.target, site.client
    text = ""
    for alias, server, jump in (
        ("bastion", bastion, ""),
        ("again", bastion, again_jump),
        ("target", target, target_jump),
    ):
        text += f"Host {alias}\n    HostName {server.address}\n    Port {server.port}\n"
        text += f"    User {client.user}\n    IdentityFile {client.key}\n"
        text += f"    ProxyJump {jump}\n" if jump else ""
    config = tmp_path / "config"
    config.write_text(text)
    both = site.known_hosts(bastion, target)
    with SSHPoolExecutor(
        1, hosts="target", known_hosts=both, ssh_options=options(str(config)), python=sys.executable
    ) as ex:
        assert ex.submit(net_namespace).result(timeout=30)[0] == site.namespace_inode()
        assert bastion.proc is not None
        assert len(connections(bastion)) == 2  # both hops are sessions of the bastion
    deadline = time.monotonic() + 10
    while descendants(bastion.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert descendants(bastion.proc.pid) == []


def test_proxyjump_in_a_host_file_line(site: JumpSite, tmp_path: Path) -> None:
    """``user@alias`` entries in a host file resolve through the config like any other."""
    config = site.config("config-no-known-hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"2/{site.client.user}@target env.SITE=filed   # via the bastion\n")
    both = site.known_hosts(site.bastion, site.target)
    with SSHPoolExecutor(
        hosts=hosts, known_hosts=both, ssh_options=options(config), python=sys.executable
    ) as ex:
        assert set(ex.map(net_namespace, range(4))) == {(site.namespace_inode(), "target", "filed")}


# ---- sshexec check goes the workers' way ------------------------------------------------


@TRANSPORTS
def test_check_goes_through_the_jump_host(site: JumpSite, transport: str) -> None:
    """The probe opens the hop as the executor does: known_hosts= covers the bastion."""
    config = site.config("config-no-known-hosts")
    both = site.known_hosts(site.bastion, site.target)
    args = ["-F", config, "--known-hosts", both, "--python", sys.executable]
    result = run_cli("check", "target", *args, "--transport", transport)
    assert result.returncode == 0, result.stdout + result.stderr
    assert table_row(result.stdout, "target")[1:3] == ["yes", "known"]
    target = site.target
    assert (
        f"target ({target.address} port {target.port}, user {site.client.user}, "
        f"through jump host bastion, via {config})"
    ) in result.stdout


@TRANSPORTS
def test_check_names_the_jump_host_whose_key_is_unknown(site: JumpSite, transport: str) -> None:
    config = site.config("config-no-known-hosts")
    only_target = site.known_hosts(site.target)
    args = ["-F", config, "--known-hosts", only_target, "--python", sys.executable]
    result = run_cli("check", "target", *args, "--transport", transport)
    assert result.returncode == 1
    assert "jump host" in result.stdout
    assert f"[{BASTION_ADDRESS}]:{site.bastion.port}" in result.stdout
    assert f"ssh-keyscan -p {site.bastion.port} {BASTION_ADDRESS} >> {only_target}" in (
        result.stdout
    )


# ---- the same through the ssh binary (transport="openssh") ---------------------------------


def test_openssh_follows_proxyjump_with_sshexec_options_on_the_hop(site: JumpSite) -> None:
    """ssh(1) does the ProxyJump itself; known_hosts= and the no-agent setting reach the
    hop's ``ssh -W`` through the private -F file, the only option ssh passes on."""
    config = site.config("config-no-known-hosts")
    both = site.known_hosts(site.bastion, site.target)
    host = Host("target", workers=2, env={"SITE": "via ssh"}, transport="openssh")
    with SSHPoolExecutor(
        hosts=[host], known_hosts=both, ssh_options=options(config), python=sys.executable
    ) as ex:
        seen = set(ex.map(net_namespace, range(8)))
        assert len(connections(site.bastion)) == 1  # one hop: one ssh client for the host
    assert seen == {(site.namespace_inode(), "target", "via ssh")}
    assert site.bastion.proc is not None
    deadline = time.monotonic() + 10
    while descendants(site.bastion.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert descendants(site.bastion.proc.pid) == []


def test_openssh_unknown_jump_host_key_is_refused_naming_the_hop(site: JumpSite) -> None:
    config = site.config("config-no-known-hosts")
    only_target = site.known_hosts(site.target)
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(
            1,
            hosts="target",
            known_hosts=only_target,
            ssh_options=options(config),
            python=sys.executable,
            transport="openssh",
        )
    error, hop = info.value, f"[{BASTION_ADDRESS}]:{site.bastion.port}"
    assert (error.host, error.stage) == ("target", "host key")
    assert f"{hop} (a jump host on the way) is not in {only_target}" in error.reason
    assert f"ssh-keyscan -p {site.bastion.port} {BASTION_ADDRESS} >> {only_target}" in error.fix
