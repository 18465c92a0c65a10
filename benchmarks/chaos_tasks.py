"""What the chaos run's tasks do on the workers: compute, sleep, flood output, leave a
child behind (in the worker's group, or in a session of its own), raise, or outlive
their limits: hang past a time limit with a child (``hang``), eat memory past a memory
limit (``hog``), or wait to be ended by ``kill()`` (``doomed``); and ``Tally``, the
actors' class.

Travels by value to workers of the client's Python and by source (forwarded) to the
others, so it uses the standard library only. Every child a task starts carries the
run's tag on its command line: the driver finds any that outlive the job by it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

KINDS = ("compute", "sleep", "flood", "child", "orphan", "raise", "hang", "hog", "doomed")
STOPPED = {"hang": "TaskTimeout", "hog": "TaskMemoryError", "doomed": "TaskKilled"}


def expected(kind: str, i: int) -> int:
    """What a task of this kind returns for ``i`` (``raise`` raises ``ValueError(i)``)."""
    return i * i + len(kind)


def run(kind: str, i: int, tag: str, arg: float) -> int:
    if kind == "sleep":
        time.sleep(arg)
    elif kind == "flood":  # arg: bytes of output, half by print(), half straight to fd 2
        line = ("x" * 99 + "\n").encode()
        for _ in range(int(arg) // 200):
            sys.stdout.write(line.decode())
        sys.stdout.flush()
        chunk = line * 100
        for _ in range(int(arg) // 2 // len(chunk)):
            os.write(2, chunk)
    elif kind in ("child", "orphan"):  # a child still running when the task returns
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)", tag],
            start_new_session=kind == "orphan",  # out of the worker's group
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    elif kind == "raise":
        raise ValueError(i)
    elif kind == "hang":  # with a child of its own, which must go with it
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)", tag],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(600)
    elif kind == "hog":  # arg: bytes, every page touched
        block = b"x" * int(arg)
        time.sleep(600)
        return len(block)
    elif kind == "doomed":
        time.sleep(600)
    else:
        total = 0
        for k in range(int(arg)):
            total += k * k
    return expected(kind, i)


def square(x: int) -> int:
    return x * x


class Tally:
    """The chaos run's actor: counts its calls; ``pid`` says where it lives."""

    def __init__(self, start: int = 0) -> None:
        self.count = start

    def add(self, pause: float = 0.0) -> int:
        if pause:
            time.sleep(pause)
        self.count += 1
        return self.count

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.count = -1
