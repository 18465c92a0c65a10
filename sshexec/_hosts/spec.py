"""``Host`` and host specs.

Owns: the ``Host`` value (one machine and its own options, validated) and
``parse_host`` (``[N/][user@]host[:port]``, IPv6 in brackets, ``:`` for this machine).
Must not import: transports, asyncio, the pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

LOCAL = ":"  # GNU parallel's name for this machine
TRANSPORTS = ("asyncssh", "openssh", "srun")  # what carries a remote host's bytes
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Host:
    """One machine to run workers on, with its own options.

    Args:
        hostname: A name or address ssh can reach, a ``~/.ssh/config`` alias, or ``":"``
            for this machine (local worker subprocesses, as in GNU parallel).
        user: Login name; default from ``~/.ssh/config``, else the local user.
        port: SSH port; default from ``~/.ssh/config``, else 22.
        workers: Worker processes on this host; default its usable cores.
        python: Remote interpreter (e.g. a venv's ``bin/python``); default
            ``python3.<client minor>``, then ``python3``.
        options: Extra keyword arguments for ``asyncssh.connect``, for this host only
            (with ``transport="openssh"``: translated to ssh options where ssh has them).
        env: Environment variables for the workers, e.g. ``{"OMP_NUM_THREADS": "1"}``;
            set by the remote command (sshd's ``AcceptEnv`` is not needed). Values are
            literal, never expanded.
        cwd: The workers' working directory (``~/`` is the remote home); a host where
            it does not exist fails to start with a ``WorkerStartupError`` naming it.
        transport: ``"asyncssh"``, ``"openssh"`` (the ``ssh`` binary) or ``"srun"`` (a
            Slurm job step, inside an allocation) for this host; default the executor's
            ``transport=``.

    Raises:
        ValueError: An invalid name, port, worker count, variable name, directory or
            transport.
    """

    hostname: str
    user: Optional[str] = None
    port: Optional[int] = None
    workers: Optional[int] = None
    python: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Optional[str] = None
    transport: Optional[str] = None

    __module__ = "sshexec"

    def __post_init__(self) -> None:
        name = self.hostname
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"invalid host name {name!r}")
        if self.port is not None and not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise ValueError(f"host {name}: port must be 1..65535, got {self.port!r}")
        if self.workers is not None and not (
            isinstance(self.workers, int)
            and not isinstance(self.workers, bool)
            and self.workers > 0
        ):
            raise ValueError(f"host {name}: workers must be a positive int, got {self.workers!r}")
        if self.transport is not None and self.transport not in TRANSPORTS:
            raise ValueError(
                f"host {name}: transport must be one of {', '.join(TRANSPORTS)}, "
                f"got {self.transport!r}"
            )
        if self.is_local and (
            self.user is not None
            or self.port is not None
            or self.options
            or self.transport is not None
        ):
            raise ValueError(
                "host ':' is this machine: user, port, options and transport do not apply"
            )
        env = dict(self.env)
        for key, value in env.items():
            if not isinstance(key, str) or not _ENV_NAME.match(key):
                raise ValueError(
                    f"host {name}: invalid environment variable name {key!r} "
                    "(letters, digits and _, not starting with a digit)"
                )
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"host {name}: env[{key!r}] must be a str without NUL bytes")
        object.__setattr__(self, "env", env)  # a private copy: later edits cannot leak in
        if self.cwd is not None and (
            not isinstance(self.cwd, str) or not self.cwd or "\0" in self.cwd
        ):
            raise ValueError(f"host {name}: cwd must be a non-empty path, got {self.cwd!r}")

    @property
    def is_local(self) -> bool:
        """True for ``":"``: workers are subprocesses of this machine."""
        return self.hostname == LOCAL

    @property
    def label(self) -> str:
        """``user@host:port`` as given (``local`` for ``":"``), used in worker ids, logs
        and errors."""
        if self.is_local:
            return "local"
        name = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        if self.user:
            name = f"{self.user}@{name}"
        return f"{name}:{self.port}" if self.port is not None else name


_SPEC = re.compile(
    r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]\s]+)\]|(?P<name>[^:\s\[\]@]+))"
    r"(?::(?P<port>[^:\s]*))?$"
)
_COUNT = re.compile(r"^(?P<count>[^/@\s]*)/(?P<rest>.*)$")


def parse_host(spec: Union[str, Host]) -> Host:
    """A ``Host`` from ``[N/][user@]host[:port]`` (IPv6 in brackets: ``[2001:db8::7]:22``).

    ``N/`` sets the worker count, as in GNU parallel's ``4/me@node1``; ``:`` alone is this
    machine (``2/:`` for two local workers). A ``Host`` is returned unchanged.

    Raises:
        ValueError: A malformed spec. TypeError: neither a str nor a ``Host``.
    """
    if isinstance(spec, Host):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a host must be a str or sshexec.Host, got {type(spec).__name__}")
    text = spec.strip()
    workers: Optional[int] = None
    counted = _COUNT.match(text)
    if counted is not None:
        if not counted.group("count").isdigit() or int(counted.group("count")) == 0:
            raise ValueError(
                f"invalid host spec {spec!r}: the worker count before '/' must be a positive number"
            )
        workers, text = int(counted.group("count")), counted.group("rest")
    if text == LOCAL:
        return Host(LOCAL, workers=workers)
    if text.count(":") > 1 and "[" not in text and "@" not in text:
        return Host(text, workers=workers)  # a bare IPv6 address
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(
            f"invalid host spec {spec!r}: expected [N/][user@]host[:port], IPv6 in brackets"
        )
    port: Optional[int] = None
    if match.group("port") is not None:
        if not match.group("port").isdigit() or not 0 < int(match.group("port")) < 65536:
            raise ValueError(f"invalid host spec {spec!r}: port must be a number in 1..65535")
        port = int(match.group("port"))
    name = match.group("v6") or match.group("name")
    return Host(name, user=match.group("user"), port=port, workers=workers)
