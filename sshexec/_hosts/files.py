"""Host files: one host per line, as GNU parallel's ``--sshloginfile``.

Owns: ``read_hosts`` and the line format (``[N/][user@]host[:port]`` then ``key=value``
options). Must not import: transports, asyncio, the pool.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .spec import Host, parse_host


def _parse_line(line: str) -> Optional[Host]:
    try:
        words = shlex.split(line, comments=True)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"{exc}: {line.strip()!r}") from None
    if not words:
        return None
    host = parse_host(words[0])
    changes: Dict[str, Any] = {}
    env: Dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"expected key=value after the host, got {word!r}")
        if key.startswith("env."):
            env[key[4:]] = value
        elif key in ("python", "cwd", "transport"):
            changes[key] = value
        elif key in ("workers", "slots"):  # slots= as in MPI host files
            if not value.isdigit() or host.workers is not None or "workers" in changes:
                raise ValueError(f"{key}= must be a positive number, given once, got {value!r}")
            changes["workers"] = int(value)
        else:
            raise ValueError(
                f"unknown option {key!r} "
                "(expected python=, cwd=, workers=, slots=, transport= or env.NAME=)"
            )
    return dataclasses.replace(host, env=env, **changes) if changes or env else host


def read_hosts(path: Union[str, os.PathLike[str]]) -> List[Host]:
    """Read a host file: one host per line, as GNU parallel's ``--sshloginfile``.

    Each line is ``[N/][user@]host[:port]`` (``N`` workers; ``:`` is this machine)
    followed by optional ``key=value`` options: ``python=``, ``cwd=``, ``workers=``
    (or MPI's ``slots=``), ``transport=`` (``asyncssh`` or ``openssh``) and
    ``env.NAME=value``. Words are split as by a shell, so
    values may be quoted; ``#`` starts a comment (whole-line or trailing) unless
    quoted; blank lines are ignored. Example::

        # the cluster
        4/me@node1                       # 4 workers
        node2:2222 python=/opt/venv/bin/python cwd=/data env.OMP_NUM_THREADS=1
        node3 transport=openssh          # through the ssh binary
        2/:                              # and 2 workers on this machine

    Args:
        path: The file (``~`` is expanded).

    Returns:
        The hosts in file order (an empty list for a file of comments only).

    Raises:
        ValueError: A malformed line; the message starts with ``path:line:``.
        OSError: The file cannot be read.
    """
    where = Path(path).expanduser()
    hosts: List[Host] = []
    for number, line in enumerate(where.read_text(encoding="utf-8").splitlines(), 1):
        try:
            host = _parse_line(line)
        except ValueError as exc:
            raise ValueError(f"{where}:{number}: {exc}") from None
        if host is not None:
            hosts.append(host)
    return hosts
