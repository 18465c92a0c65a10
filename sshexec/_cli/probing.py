"""What both probes of ``sshexec check`` share: the settings from the command line, the
host's transport built by the executor's own ``build_transports`` from them (so a probe
goes where the workers would: same ssh config, HostName, Port, User, keys, ProxyJump),
the Python probe and the sizes of the round-trip and throughput measures, so that the
asyncssh probe (``check``) and the ssh-binary probe (``sshprobe``) measure the same
things. Must not import: asyncssh (``build_transports`` does, for hosts that use it),
the executor or the pool, or either probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from .._hosts import Host, build_transports

if TYPE_CHECKING:
    from .._transports.base import Transport

RTT_ROUNDS = 9  # small echo round trips on one channel; the first warms up and is dropped
THROUGHPUT_BYTES = 16 * 1024 * 1024
THROUGHPUT_BUDGET = 3.0  # seconds: a slow link reports what it managed in this time
PY_PROBE = (
    "import os, sys; v = sys.version_info; "
    "n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); "
    "print(v[0], v[1], sys.version.split()[0], sys.executable, n or 1)"
)


@dataclass
class CheckSettings:
    """What every probe uses: the executor arguments the command line makes (``python``,
    ``known_hosts``, ``ssh_options``, ``transport``, as ``demo`` and ``map`` get them)
    and the probe's time limit, also its connect timeout."""

    timeout: float = 10.0
    python: Optional[str] = None
    known_hosts: Optional[str] = None
    ssh_options: Dict[str, Any] = field(default_factory=dict)
    transport: str = "asyncssh"  # for hosts without their own Host(transport=...)

    @property
    def identities(self) -> List[str]:
        """The key files given (-i), for the report's labels and fixes."""
        keys = self.ssh_options.get("client_keys") or ()
        keys = [keys] if isinstance(keys, (str, os.PathLike)) else keys
        return [os.fspath(k) for k in keys if isinstance(k, (str, os.PathLike))]


def transport_for(host: Host, settings: CheckSettings) -> Transport:
    """``host``'s transport exactly as ``SSHPoolExecutor(hosts=[host], ...)`` builds it
    from the same arguments: the probe and the workers can never disagree on where a
    name leads.

    Raises:
        ValueError: An option the transport does not take (named).
    """
    ((transport, _, _),) = build_transports(
        [host],
        None,
        settings.python,
        settings.known_hosts,
        False,  # check never skips the host key check
        settings.timeout,
        max(settings.timeout, 1.0),
        settings.ssh_options,
        settings.transport,
    )
    return transport


def home(path: str) -> str:
    """``path`` with the user's home directory written ``~``."""
    user = os.path.expanduser("~")
    return "~" + path[len(user) :] if path.startswith(user + os.sep) else path
