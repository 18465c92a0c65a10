"""Classes the actor tests keep on hosts (sent by value: nodes have no copy of tests/)."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.total = start
        self.seen: Dict[int, List[int]] = {}
        self.closed_file = ""

    def add(self, thread: int = 0, index: int = 0) -> int:
        self.total += 1
        self.seen.setdefault(thread, []).append(index)
        return self.total

    def order(self, thread: int) -> List[int]:
        return self.seen.get(thread, [])

    def value(self) -> int:
        return self.total

    def pid(self) -> int:
        return os.getpid()

    def fail(self, text: str) -> None:
        raise ValueError(text)

    def sum_of(self, values: Any) -> float:
        return float(values.sum())

    def nap(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.total

    def is_me(self, other: Any) -> bool:
        return other is self

    def note_close_in(self, path: str) -> None:
        self.closed_file = path

    def hog(self, size: int) -> int:
        self.kept = b"x" * size  # resident at once
        time.sleep(5)
        return len(self.kept)

    def hang_on_close(self) -> None:
        self.closed_file = "hang"

    def close(self) -> None:
        if self.closed_file == "hang":
            time.sleep(600)
        if self.closed_file:
            with open(self.closed_file, "w") as f:
                f.write(str(self.total))


class Holder:
    """Keeps a big array; answers small questions about it."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def size(self) -> int:
        return int(self.data.nbytes)

    def at(self, index: int) -> float:
        return float(self.data[index])


class Broken:
    def __init__(self, text: str) -> None:
        raise RuntimeError(text)

    def anything(self) -> None:
        pass
