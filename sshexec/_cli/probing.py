"""What both probes of ``sshexec check`` share: the settings from the command line, the
Python probe and the sizes of the round-trip and throughput measures, so that the
asyncssh probe (``check``) and the ssh-binary probe (``sshprobe``) measure the same
things. Must not import: asyncssh, the executor or the pool, or either probe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

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
    """What every probe uses: the command line's SSH options."""

    timeout: float = 10.0
    python: Optional[str] = None
    known_hosts: Optional[str] = None
    identities: Sequence[str] = ()
    ssh_config: Sequence[str] = ()
    extra: Dict[str, Any] = field(default_factory=dict)
    transport: str = "asyncssh"  # for hosts without their own Host(transport=...)


def home(path: str) -> str:
    """``path`` with the user's home directory written ``~``."""
    user = os.path.expanduser("~")
    return "~" + path[len(user) :] if path.startswith(user + os.sep) else path
