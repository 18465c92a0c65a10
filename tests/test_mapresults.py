"""map's per-item slots: the Future behaviour the pool and map's iterator rely on."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any, List

import pytest

from sshexec._mapresults import MapItem, MapResults


def item() -> MapItem:
    return MapItem(MapResults())


def test_a_result_goes_from_pending_through_running_to_done() -> None:
    slot = item()
    assert not slot.done() and not slot.running() and not slot.cancelled()
    assert slot.set_running_or_notify_cancel()
    assert slot.running() and not slot.cancel()  # running: too late to cancel
    slot.set_result(42)
    assert slot.done() and not slot.running() and slot.result(timeout=0) == 42
    with pytest.raises(cf.InvalidStateError):
        slot.set_result(43)
    with pytest.raises(cf.InvalidStateError):
        slot.set_exception(ValueError())


def test_an_exception_is_raised_by_result_each_time() -> None:
    slot = item()
    slot.set_exception(KeyError("k"))  # from pending: an unpicklable call fails at once
    for _ in range(2):
        with pytest.raises(KeyError):
            slot.result()


def test_a_cancelled_item_is_not_started() -> None:
    slot = item()
    assert slot.cancel() and slot.cancel()  # cancelling twice is fine
    assert slot.cancelled() and slot.done()
    assert not slot.set_running_or_notify_cancel()  # the pool drops it
    with pytest.raises(cf.CancelledError):
        slot.result()
    with pytest.raises(cf.InvalidStateError):
        slot.set_result(1)


def test_result_times_out_and_leaves_the_item_pending() -> None:
    slot = item()
    started = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        slot.result(timeout=0.05)
    assert 0.04 <= time.monotonic() - started < 2
    assert not slot.done() and slot.owner.waiting == 0


@pytest.mark.parametrize("how", ["result", "exception", "cancel"])
def test_a_waiting_consumer_wakes_when_its_item_settles(how: str) -> None:
    shared = MapResults()
    first, second = MapItem(shared), MapItem(shared)
    seen: List[Any] = []

    def consume() -> None:
        try:
            seen.append(second.result(timeout=10))
        except BaseException as exc:
            seen.append(type(exc))

    waiter = threading.Thread(target=consume)
    waiter.start()
    while shared.waiting == 0:
        time.sleep(0.001)
    first.set_result("other")  # another item settling wakes it; it waits on
    time.sleep(0.02)
    assert seen == [] and shared.waiting == 1
    if how == "result":
        second.set_result("mine")
    elif how == "exception":
        second.set_exception(ValueError("bad"))
    else:
        second.cancel()
    waiter.join(5)
    assert seen == [{"result": "mine", "exception": ValueError, "cancel": cf.CancelledError}[how]]
    assert shared.waiting == 0
