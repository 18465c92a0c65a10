"""Reading a pipe without a fresh big buffer per read: used by the agent and the workers.

Owns: ``Reader``. ``os.read(fd, 1 MiB)`` allocates a 1 MiB object for every call (on glibc
an ``mmap``, a ``mremap`` down to what arrived and a ``munmap``, three system calls and
a TLB flush per read, however small the frame); ``Reader`` reads into one preallocated
buffer and copies out only what arrived. Must not import: anything outside the standard
library.
"""

from __future__ import annotations

import os


class Reader:
    def __init__(self, size: int = 1 << 20) -> None:
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._vectored = hasattr(os, "readv")  # not on Windows: plain reads there

    def read(self, fd: int) -> bytes:
        """Up to ``size`` bytes from ``fd`` (b"" at its end), as ``os.read`` would."""
        if not self._vectored:
            return os.read(fd, len(self._buffer))
        count = os.readv(fd, [self._buffer])
        return self._view[:count].tobytes()
