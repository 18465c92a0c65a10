"""The ``ssh`` binary's command line for one host, and what its exit status 255 means.

Owns: ``translate`` (sshexec's asyncssh-style ``ssh_options`` as ssh_config lines; a
keyword with no ssh equivalent is a ``ValueError``), ``CommandLine`` (the private config
file that carries sshexec's own options to the host *and* to every ProxyJump hop, since
ssh hands only ``-F`` on to the ``ssh -W`` it runs for a hop; then ``Include``s the
config files ssh would have read; the argv for a remote command; ``ssh -G``'s view of
the host) and ``diagnose`` (ssh's stderr at exit 255 as a ``Finding``: host key unknown
or changed, authentication, or connect). Must not import: asyncio, asyncssh, or know
about channels, tasks or Futures.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Final, List, Mapping, Optional, Sequence, Tuple

Line = Tuple[str, str]  # (ssh_config keyword, value as ssh_config spells it)

DEFAULT_KNOWN_HOSTS: Final = "~/.ssh/known_hosts"
# What ssh reads without -F: the user's file, then the system's (first value wins).
DEFAULT_CONFIG: Final = ("~/.ssh/config", "/etc/ssh/ssh_config")
# asyncssh keywords with an ssh_config equivalent that concern the host itself, never a
# jump host on the way (as in the asyncssh transport, whose hops leave them out too).
HOST_ONLY: Final = {
    "username": "User",
    "port": "Port",
    "host_key_alias": "HostKeyAlias",
    "proxy_command": "ProxyCommand",
    "tunnel": "ProxyJump",
}
EVERY_HOP: Final = {
    "connect_timeout": "ConnectTimeout",
    "keepalive_interval": "ServerAliveInterval",
    "keepalive_count_max": "ServerAliveCountMax",
    "agent_forwarding": "ForwardAgent",
    "encryption_algs": "Ciphers",
}
TRANSLATED: Final = tuple(
    sorted({*HOST_ONLY, *EVERY_HOP, "client_keys", "agent_path", "known_hosts", "config"})
)
# Values of these options go through ssh's %-token expansion: a literal % is %%.
EXPANDS_TOKENS: Final = frozenset(
    {"IdentityFile", "CertificateFile", "UserKnownHostsFile", "IdentityAgent"}
)
UNSAFE_LINES: Final = (
    ("StrictHostKeyChecking", "no"),
    ("UserKnownHostsFile", "/dev/null"),
    ("GlobalKnownHostsFile", "/dev/null"),
    ("LogLevel", "ERROR"),  # no "Permanently added ... to the list of known hosts" per worker
)


@dataclass(frozen=True)
class Translated:
    """``ssh_options`` as ssh_config lines: for every hop, for the host only, and the config
    files to read (None: ssh's own; empty: none, as asyncssh's ``config=None``)."""

    every_hop: List[Line]
    host_only: List[Line]
    config: Optional[List[str]]


def _word(value: str, keyword: str) -> str:
    if any(c in value for c in '"\n\r\0'):
        raise ValueError(f"{keyword}: {value!r} cannot be written in an ssh config")
    if keyword in EXPANDS_TOKENS:
        value = value.replace("%", "%%")
    return f'"{value}"' if not value or any(c.isspace() or c in "=#" for c in value) else value


def _path(value: Any, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{what} must be a file path with transport='openssh', got {value!r}")
    return os.fspath(value)


def _paths(value: Any, what: str) -> List[str]:
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)):
        return [_path(v, what) for v in value]
    raise ValueError(f"{what} must be a path or a list of paths, got {value!r}")


def _seconds(value: Any, what: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    return str(math.ceil(value))  # ssh takes whole seconds


def translate(options: Mapping[str, Any], owner: str) -> Translated:
    """asyncssh keyword arguments as ssh_config lines; ``owner`` names them in errors.

    Raises:
        ValueError: A keyword with no ssh equivalent, or a value ssh cannot take.
    """
    unknown = sorted(k for k in options if k not in TRANSLATED)
    if unknown:
        raise ValueError(
            f"{owner}: {', '.join(map(repr, unknown))} "
            f"{'has' if len(unknown) == 1 else 'have'} no ssh(1) equivalent with "
            f"transport='openssh' (it translates {', '.join(TRANSLATED)}); set it in an "
            "ssh config file (ssh_options={'config': [path]}) or use transport='asyncssh'"
        )
    every: List[Line] = []
    host: List[Line] = []
    config: Optional[List[str]] = None
    for key, value in options.items():
        what = f"{owner}: {key}"
        if key in HOST_ONLY:
            if key == "port" and not (isinstance(value, int) and 0 < value < 65536):
                raise ValueError(f"{what} must be a port number, got {value!r}")
            if key == "proxy_command" and isinstance(value, (list, tuple)):
                value = shlex.join(str(v) for v in value)
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ValueError(f"{what} must be a string for ssh(1), got {value!r}")
            host.append((HOST_ONLY[key], str(value)))
        elif key in ("connect_timeout", "keepalive_interval"):
            every.append((EVERY_HOP[key], _seconds(value, what)))
        elif key == "keepalive_count_max":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{what} must be a count, got {value!r}")
            every.append(("ServerAliveCountMax", str(value)))
        elif key == "agent_forwarding":
            every.append(("ForwardAgent", "yes" if value else "no"))
        elif key == "encryption_algs":
            names = [value] if isinstance(value, str) else list(value)
            every.append(("Ciphers", ",".join(str(n) for n in names)))
        elif key == "client_keys":
            every += _client_keys(value, what)
        elif key == "agent_path":
            every.append(("IdentityAgent", "none" if value is None else _path(value, what)))
        elif key == "known_hosts":
            if value is None:  # asyncssh's "do not check host keys"
                every += UNSAFE_LINES
            else:
                every += [
                    ("UserKnownHostsFile", " ".join(_paths(value, what))),
                    ("GlobalKnownHostsFile", "/dev/null"),
                ]
        elif key == "config":
            config = [] if value is None else _paths(value, what) or None
    return Translated(every, host, config)


def _client_keys(value: Any, what: str) -> List[Line]:
    if value is None:
        raise ValueError(f"{what}: None (no keys) has no ssh(1) equivalent; leave it out")
    keys = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    lines: List[Line] = []
    for key in keys:
        if isinstance(key, tuple) and len(key) == 2:  # (private key, certificate)
            lines += [
                ("IdentityFile", _path(key[0], what)),
                ("CertificateFile", _path(key[1], what)),
            ]
        else:
            lines.append(("IdentityFile", _path(key, what)))
    return [*lines, ("IdentitiesOnly", "yes")]  # these keys, as asyncssh's client_keys means


def sshexec_lines(
    known_hosts: Optional[str], unsafe: bool, connect_timeout: float, keepalive_interval: float
) -> List[Line]:
    """sshexec's own settings: never a prompt, host keys checked (or UNSAFE: not at all),
    its timeouts and keepalives."""
    lines: List[Line] = [("BatchMode", "yes")]
    if unsafe:
        lines += UNSAFE_LINES
    else:
        lines.append(("StrictHostKeyChecking", "yes"))
        if known_hosts is not None:
            lines += [("UserKnownHostsFile", known_hosts), ("GlobalKnownHostsFile", "/dev/null")]
    return [
        *lines,
        ("ConnectTimeout", _seconds(connect_timeout, "connect_timeout")),
        ("ServerAliveInterval", _seconds(keepalive_interval, "keepalive_interval")),
        ("ServerAliveCountMax", "3"),
    ]


class CommandLine:
    """``ssh -F <private config> -T ... -- <host> <command>`` for one host.

    The private config holds what applies to every hop: the executor-wide
    ``ssh_options``, then sshexec's own settings (first value wins, so ``ssh_options``
    override them, as with asyncssh), then ``Include`` lines for the config files ssh
    would read. What applies to the host alone (``Host(options=...)``, the spec's user
    and port, ``ssh_options``' user and port) is on the command line, which ssh reads
    before any file.
    """

    def __init__(
        self, hostname: str, config: Sequence[str], words: Sequence[str], ssh: str
    ) -> None:
        self.hostname, self.ssh = hostname, ssh
        self.config = list(config)  # the private config's lines
        self.words = list(words)  # argv words for this host alone
        self.directory: Optional[str] = None

    @classmethod
    def build(
        cls,
        label: str,
        hostname: str,
        *,
        port: Optional[int],
        username: Optional[str],
        known_hosts: Optional[str],
        unsafe: bool,
        connect_timeout: float,
        keepalive_interval: float,
        shared_options: Mapping[str, Any],
        host_options: Mapping[str, Any],
        ssh: str = "ssh",
    ) -> CommandLine:
        """Raises ValueError naming any option ssh has no equivalent for."""
        shared = translate(shared_options, "ssh_options")
        own = translate(host_options, f"host {label}: options")
        words: List[str] = []
        for key, value in own.host_only + own.every_hop:  # the most specific first
            words += ["-o", f"{key}={_word(value, key)}"]
        words += ["-p", str(port)] if port is not None else []
        words += ["-l", username] if username is not None else []
        for key, value in shared.host_only:
            words += ["-o", f"{key}={_word(value, key)}"]
        lines = shared.every_hop + sshexec_lines(
            known_hosts, unsafe, connect_timeout, keepalive_interval
        )
        files = own.config if own.config is not None else shared.config
        config = [f"{key} {_word(value, key)}" for key, value in lines]
        config += [
            f"Include {_word(path, 'Include')}"
            for path in (DEFAULT_CONFIG if files is None else files)
        ]
        return cls(hostname, config, words, ssh)

    @property
    def config_path(self) -> str:
        if self.directory is None:
            raise RuntimeError("CommandLine.write() first")
        return os.path.join(self.directory, "ssh_config")

    def write(self) -> str:
        """Write the private config (once) and return its path."""
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="sshexec-ssh-")  # 0700
            text = "# sshexec's options for this host and every jump host on the way to it\n"
            text += "".join(line + "\n" for line in self.config)
            descriptor = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(descriptor, "w", encoding="utf-8") as f:
                f.write(text)
        return self.config_path

    def remove(self) -> None:
        directory, self.directory = self.directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def argv(self, command: Optional[str], *flags: str) -> List[str]:
        """ssh running ``command`` on the host: no tty, no escape character (frames are
        binary), no RemoteCommand or port forwardings from the config."""
        return [
            self.ssh,
            "-F",
            self.write(),
            *flags,
            "-T",
            "-e",
            "none",
            "-o",
            "RemoteCommand=none",
            "-o",
            "ClearAllForwardings=yes",
            *self.words,
            "--",
            self.hostname,
            *([command] if command is not None else []),
        ]

    def resolve_argv(self) -> List[str]:
        """``ssh -G``: what the config makes of the host, without connecting."""
        return [self.ssh, "-G", "-F", self.write(), *self.words, "--", self.hostname]


def parse_resolved(text: str) -> Dict[str, str]:
    """``ssh -G`` output as {keyword: value}, keywords lowercase, first value kept."""
    found: Dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            found.setdefault(key.lower(), value.strip())
    return found


# ---- what ssh said at exit 255 -----------------------------------------------------------

_CHANGED = re.compile(r"Host key for (\S+) has changed")
_OFFENDING = re.compile(r"Offending \S+ key in (.+):\d+$")
_UNKNOWN = re.compile(r"No \S+ host key is known for (\S+) and")
_RESOLVE = re.compile(r"Could not resolve hostname (\S+?): (.+)$")
_CONNECT = re.compile(r"connect to host (\S+) port (\d+): (.+)$")
_TARGET = re.compile(r"^\[(.+)\]:(\d+)$")


@dataclass(frozen=True)
class Finding:
    """What ssh's stderr says went wrong. ``kind`` is one of: ``changed``, ``unknown``,
    ``host key``, ``authentication``, ``resolve``, ``refused``, ``timeout``,
    ``unreachable``, ``other``."""

    kind: str
    line: str  # ssh's own words, one line
    target: str = ""  # the host key's owner as ssh names it: host or [host]:port
    path: str = ""  # the known_hosts file ssh named
    name: str = ""  # host name or address (resolve, refused, unreachable)
    port: str = ""

    @property
    def stage(self) -> str:
        if self.kind in ("changed", "unknown", "host key"):
            return "host key"
        return "authentication" if self.kind == "authentication" else "connect"

    def target_parts(self, default_port: int = 22) -> Tuple[str, int]:
        """(host, port) of ``target``."""
        bracketed = _TARGET.match(self.target)
        if bracketed:
            return bracketed.group(1), int(bracketed.group(2))
        return self.target, default_port


def ssh_lines(stderr: str) -> List[str]:
    """ssh's messages without ``ssh -v``'s debug lines and the host-key banner's art."""
    kept = []
    for raw in stderr.splitlines():
        line = raw.strip()
        if line and not line.startswith(("debug1:", "debug2:", "debug3:", "@")):
            kept.append(line)
    return kept


def diagnose(stderr: str) -> Finding:
    """What went wrong, from everything ssh (and any jump host's ssh) wrote to stderr
    before exiting 255; the gravest finding wins, the last line when nothing is known."""
    lines = ssh_lines(stderr)
    for line in lines:
        changed = _CHANGED.search(line)
        if changed or "REMOTE HOST IDENTIFICATION HAS CHANGED" in line:
            path = next((m.group(1) for m in map(_OFFENDING.search, lines) if m), "")
            target = changed.group(1) if changed else ""
            if not target:
                target = next((m.group(1) for m in map(_CHANGED.search, lines) if m), "")
            return Finding("changed", line, target=target, path=path)
    for line in lines:
        unknown = _UNKNOWN.search(line)
        if unknown:
            return Finding("unknown", line, target=unknown.group(1))
    for kind, words in (
        ("host key", ("Host key verification failed",)),
        ("authentication", ("Permission denied", "Too many authentication failures")),
    ):
        for line in lines:
            if any(w in line for w in words):
                return Finding(kind, line)
    for line in lines:
        resolve = _RESOLVE.search(line)
        if resolve:
            return Finding("resolve", line, name=resolve.group(1), port="")
        connect = _CONNECT.search(line)
        if connect:
            why = connect.group(3)
            kind = (
                "refused"
                if "refused" in why.lower()
                else "timeout"
                if "timed out" in why.lower()
                else "unreachable"
            )
            return Finding(kind, line, name=connect.group(1), port=connect.group(2))
        if "timed out" in line.lower():
            return Finding("timeout", line)
    return Finding("other", lines[-1] if lines else "")
