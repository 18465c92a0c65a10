"""What the chaos run's tasks do on the workers: compute, sleep, flood output, leave a
child behind (in the worker's group, or in a session of its own), raise, or outlive
their limits: hang past a time limit with a child (``hang``), eat memory past a memory
limit (``hog``), or wait to be ended by ``kill()`` (``doomed``); read a staged input
(``files=``) where they run and write an output that ``return_files=`` brings back
(``read``; ``late``: an input ``send_files`` put there while the job ran); and ``Tally``,
the actors' class.

Travels by value to workers of the client's Python and by source (forwarded) to the
others, so it uses the standard library only. Every child a task starts carries the
run's tag on its command line: the driver finds any that outlive the job by it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

KINDS = (
    "compute", "sleep", "flood", "child", "orphan", "raise", "hang", "hog", "doomed", "read"
)  # fmt: skip
INPUTS = 8  # files staged in inputs/ (files=): f0.dat .. f7.dat
LATE = "inputs/late.bin"  # sent by send_files while the job runs
LATE_SIZE = 4 << 20


def input_bytes(k: int, size: int = 0) -> bytes:
    """What inputs/f{k}.dat holds (``size``: that many bytes instead), checkable where
    the task runs."""
    seed = hashlib.sha256(b"chaos-%d" % k).digest()
    size = size or 32 * (1 + k * 997)
    return (seed * (size // 32 + 1))[:size]


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
    elif kind in ("read", "late"):  # the input where it runs, the output brought back
        path, want = (
            (LATE, input_bytes(99, LATE_SIZE))
            if kind == "late"
            else (f"inputs/f{i % INPUTS}.dat", input_bytes(i % INPUTS))
        )
        with open(path, "rb") as f:
            if f.read() != want:
                raise ValueError(f"{path} is not what was staged")
        os.makedirs("out", exist_ok=True)
        with open(f"out/r{i}.txt", "w") as f:
            f.write(str(expected(kind, i)))
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
