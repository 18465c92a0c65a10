"""Bounded waits: a hang fails the test with a message instead of timing out the suite."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict

import pytest


def bounded(call: Callable[[], Any], seconds: float, what: str) -> Any:
    """``call()`` on a thread; fails the test if it has not returned after ``seconds``."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised on the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="bounded-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{what} did not return within {seconds:g} s: it hangs")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def eventually(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not so after {seconds:g} s")
        time.sleep(0.05)


def shut_down(executor: Any, seconds: float = 60.0) -> None:
    """End an executor as users do (plain ``shutdown()``), failing the test if it hangs."""
    bounded(lambda: executor.shutdown(wait=True), seconds, f"shutdown() of {executor!r}")
