"""What ``sshexec check`` found on each host, the table it prints, and the exact fix
for every problem. Pure: no I/O beyond building strings. Must not import asyncssh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .._bootstrap import OLDEST

KNOWN_HOSTS = "~/.ssh/known_hosts"


@dataclass
class HostReport:
    """One host's probe results; ``problems`` holds (what is wrong, how to fix it)."""

    label: str
    hostname: str
    port: int
    user: Optional[str]
    transport: str = "asyncssh"  # what the probe went through: asyncssh or openssh
    stage: str = "connect"
    reachable: str = "-"
    host_key: str = "-"
    fingerprint: str = ""
    known_hosts: List[str] = field(default_factory=list)
    auth: str = "-"
    python: str = "-"
    python_fit: str = "-"  # same (the client's version), portable (3.9+), too old
    cores: str = "-"
    rtt_ms: Optional[float] = None
    mb_per_s: Optional[float] = None
    problems: List[Tuple[str, str]] = field(default_factory=list)
    jumps: str = ""  # the ProxyJump hosts on the way, "" for none
    proxy_command: str = ""
    via: str = ""  # the ssh config files that said where the name leads, "" when none did

    @property
    def is_usable(self) -> bool:
        return not self.problems

    @property
    def target(self) -> str:
        """How ssh-keygen and known_hosts name this host."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def login(self) -> str:
        return f"{self.user}@{self.hostname}" if self.user else self.hostname

    @property
    def destination(self) -> str:
        """Where the name led, e.g. ``127.0.0.1 port 2222, user bob, via ~/.ssh/config``;
        "" when it is the name as given, reached directly."""
        if not (self.via or self.jumps or self.proxy_command):
            return ""
        parts = [f"{self.hostname} port {self.port}"]
        parts += [f"user {self.user}"] if self.user else []
        parts += [f"through jump host {self.jumps}"] if self.jumps else []
        parts += [f"through ProxyCommand {self.proxy_command}"] if self.proxy_command else []
        parts += [f"via {self.via}"] if self.via else []
        return ", ".join(parts)

    def resolved(
        self,
        address: str,
        port: int,
        user: Optional[str],
        jumps: str = "",
        proxy_command: str = "",
        via: str = "",
    ) -> None:
        """Where the name leads, as the transport resolved it: what the probe reaches."""
        self.hostname, self.port, self.user = address, port, user
        self.jumps, self.proxy_command, self.via = jumps, proxy_command, via

    def problem(self, what: str, fix: str) -> None:
        self.problems.append((what, fix))

    def not_started(self, stage: str, reason: str, fix: str) -> None:
        """The transport's own error (the ssh config, a jump host), as the executor says it."""
        if stage == "connect" and self.reachable == "-":
            self.reachable = "no"
        self.problem(f"{stage} failed: {reason}", fix or "run `ssh -v` to the host to see why")

    def _known_hosts_file(self) -> str:
        path = self.known_hosts[0] if self.known_hosts else KNOWN_HOSTS
        home = os.path.expanduser("~")
        return "~" + path[len(home) :] if path.startswith(home + os.sep) else path

    def refused(self) -> None:
        self.reachable = "refused"
        right = f"fix Port in {self.via}" if self.via else "pass the right port: host:PORT"
        self.problem(
            f"connection refused by {self.hostname} port {self.port}: nothing listens there",
            f"check that sshd runs on {self.hostname} and listens on port {self.port} "
            f"(or {right}), and that no firewall rejects it",
        )

    def unreachable(self, reason: str) -> None:
        self.reachable = "no"
        self.problem(
            f"cannot reach {self.hostname} port {self.port}: {reason}",
            f"check the host name, that {self.hostname} is up, the port, and the "
            "firewall/route between here and there",
        )

    def unknown_name(self, reason: str) -> None:
        self.reachable = "no such host"
        self.problem(
            f"cannot resolve {self.hostname}: {reason}",
            "check the spelling, DNS or /etc/hosts, or the Host/HostName in ~/.ssh/config",
        )

    def timed_out(self, timeout: float) -> None:
        if self.stage == "connect":
            self.reachable = "timeout"
            self.problem(
                f"no answer from {self.hostname} port {self.port} within {timeout:g} s",
                f"check that {self.hostname} is up and the port is right; a firewall that "
                "drops packets looks like this (or raise --timeout for a slow link)",
            )
        else:
            self.problem(
                f"the {self.stage} step did not finish within {timeout:g} s",
                "the node or the link is very slow or overloaded; raise --timeout to see more",
            )

    def failed(self, reason: str) -> None:
        self.problem(f"{self.stage} failed: {reason}", "run `ssh -v` to the host to see why")

    def host_key_unknown(self) -> None:
        self.host_key = "UNKNOWN"
        path = self._known_hosts_file()
        self.problem(
            f"host key of {self.target} is not in {path}; the server offers {self.fingerprint}",
            f"verify that fingerprint on the node (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`"
            f" there), then: ssh-keyscan -p {self.port} {self.hostname} >> {path}",
        )

    def host_key_changed(self) -> None:
        self.host_key = "CHANGED"
        path = self._known_hosts_file()
        self.problem(
            f"host key of {self.target} has CHANGED: the server offers {self.fingerprint}, which "
            f"is not the key recorded in {path}; someone could be intercepting the connection",
            "find out why first (node reinstalled? new host keys?); only then: "
            f"ssh-keygen -R '{self.target}'{_file_option(path)}; "
            f"ssh-keyscan -p {self.port} {self.hostname} >> {path}",
        )

    def auth_refused(self, reason: str, offered: Sequence[str], identity: str = "") -> None:
        self.auth = "REFUSED"
        keys = ", ".join(offered) if offered else "no key at all (none found, no agent)"
        key = f"-i {identity} " if identity else ""
        self.problem(
            f"{self.login} refused every key offered: {keys} ({reason})",
            f"install your public key there: ssh-copy-id {key}-p {self.port} {self.login} "
            "(and check the user name)",
        )

    def python_missing(self, tried: Sequence[str], wanted: str) -> None:
        self.python = "missing"
        self.problem(
            f"no {' or '.join(tried)} on {self.hostname}",
            f"install python{wanted} there (e.g. apt-get install python{wanted}), "
            "or pass --python /path/to/python3 (a venv's bin/python works)",
        )

    def python_found(self, major: int, minor: int, wanted: str) -> None:
        """The node's Python: the client's version runs everything, another 3.9+ what
        travels between versions (lambdas and closures go to hosts of the client's)."""
        if f"{major}.{minor}" == wanted:
            self.python_fit = "same"
        elif (major, minor) >= OLDEST:
            self.python_fit = "portable"
        else:
            self.python_fit = "too old"
            oldest = "%d.%d" % OLDEST
            self.problem(
                f"{self.hostname} runs Python {self.python.split()[0]}; sshexec needs "
                f"{oldest} or newer on the nodes",
                f"install python{wanted} (best: everything runs there) or any Python {oldest}+ "
                f"on {self.hostname}, or pass --python with the path of one there",
            )

    def row(self) -> List[str]:
        match = self.python_fit
        rtt = "-" if self.rtt_ms is None else f"{self.rtt_ms:.2f}"
        speed = "-" if self.mb_per_s is None else f"{self.mb_per_s:.0f}"
        return [
            self.label,
            self.reachable,
            self.host_key,
            self.auth,
            self.python,
            match,
            self.cores,
            rtt,
            speed,
            self.transport,
        ]


def _file_option(path: str) -> str:
    return "" if path == KNOWN_HOSTS else f" -f {path}"


HEADER = [
    "host",
    "reachable",
    "host key",
    "auth",
    "python",
    "match",
    "cores",
    "rtt ms",
    "MB/s",
    "transport",
]
NUMBERS = range(6, 9)  # right-aligned columns


def render(reports: Sequence[HostReport]) -> str:
    """The table, then one block per problem with its fix, then a verdict line."""
    rows = [HEADER, *(r.row() for r in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in NUMBERS else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    routes = [r for r in reports if r.destination]
    if routes:
        lines += ["", "where the names lead:"]
        lines += [f"  {r.label} ({r.destination})" for r in routes]
    broken = [r for r in reports if not r.is_usable]
    for report in broken:
        lines.append("")
        for what, fix in report.problems:
            lines.append(f"{report.label}: {what}")
            lines.append(f"  fix: {fix}")
    lines.append("")
    usable = len(reports) - len(broken)
    lines.append(f"{usable} of {len(reports)} hosts usable")
    return "\n".join(lines)
