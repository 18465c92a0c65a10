"""What ``sshexec map`` runs on the workers: the user's function on one line, with any
exception turned into text so the other lines go on. Travels by value (nodes have no
sshexec); imports only the standard library.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Callable, Tuple


def call_line(fn: Callable[[str], object], line: str) -> Tuple[bool, str]:
    """``(True, str(fn(line)))``, or ``(False, where and the remote traceback)``."""
    try:
        return True, str(fn(line))
    except Exception as exc:
        stack = traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)  # type: ignore[union-attr]
        return False, f"on {socket.gethostname()} pid {os.getpid()}:\n{''.join(stack)}"
