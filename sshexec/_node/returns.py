"""Files a task wrote, sent back to the client before the task's reply (``return_files=``).

Owns: ``Returns``, the worker's side: the return patterns (globs relative to the
worker's working directory, from the agent's ``SSHEXEC_RETURN``), a look at what matches
them before each task and after it, and every file created or changed in between sent
as ``FileBack`` pieces (at most ``CHUNK`` bytes each, read piece by piece: never whole
in memory; the worker's pipe and the agent's window pace them). A match that leads
outside the working directory (a symlink) fails the task instead, naming the file.
Must not import: any client module, asyncio.
"""

from __future__ import annotations

import glob
import os
import stat
from typing import Callable, Dict, List, Optional, Tuple

from .._wire import messages as msgs
from .._wire import protocol as proto
from .staging import RETURN_ENV

Seen = Dict[str, Tuple[int, int, int, int]]  # path -> (device, inode, size, mtime_ns)


class ReturnError(PermissionError):
    """A file matching a return pattern cannot be sent back."""


class Returns:
    def __init__(self, patterns: List[str], root: str) -> None:
        self.patterns, self.root = patterns, root
        self.real_root = os.path.realpath(root)

    @classmethod
    def from_environ(cls) -> Optional[Returns]:
        """The patterns the agent set for this worker, if any (taken out of the
        environment: the tasks' own subprocesses need not see them)."""
        patterns = [p for p in os.environ.pop(RETURN_ENV, "").split("\0") if p]
        return cls(patterns, os.getcwd()) if patterns else None

    def look(self) -> Seen:
        seen: Seen = {}
        base = glob.escape(self.root)
        for pattern in self.patterns:
            for found in glob.glob(os.path.join(base, pattern), recursive=True):
                try:
                    info = os.lstat(found)
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                    path = os.path.relpath(found, self.root)
                    seen[path] = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        return seen

    def send_back(
        self, task_id: int, before: Seen, send: Callable[[proto.Message], None], piece: int
    ) -> Optional[BaseException]:
        """Send what the task created or changed; the error that fails it, if any."""
        after = self.look()
        changed = sorted(path for path, seen in after.items() if before.get(path) != seen)
        host = os.uname().nodename
        for path in changed:
            full = os.path.join(self.root, path)
            real = os.path.realpath(full)
            if not real.startswith(self.real_root + os.sep):
                return ReturnError(
                    f"{path} (matching return_files) leads to {real}, outside the working "
                    f"directory on {host}: it is not sent back"
                )
            if os.path.isdir(real):
                continue
            try:
                self._send_file(task_id, path, real, send, piece)
            except OSError as exc:
                return ReturnError(
                    f"{path} (matching return_files) could not be read on {host}: "
                    f"{exc.strerror or exc}"
                )
        return None

    @staticmethod
    def _send_file(
        task_id: int, path: str, real: str, send: Callable[[proto.Message], None], piece: int
    ) -> None:
        with open(real, "rb") as source:
            info = os.fstat(source.fileno())
            size, mode = info.st_size, stat.S_IMODE(info.st_mode)
            left = size
            while True:
                data = source.read(min(piece, left)) if left else b""
                if left and not data:
                    raise OSError(f"it shrank while being sent ({size - left} of {size} bytes)")
                send(msgs.FileBack(task_id, path, mode, size, data))
                left -= len(data)
                if not left:
                    return
