"""The same scenarios on ProcessPoolExecutor and SSHPoolExecutor: equal results and
exception types, so switching the import changes nothing."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Tuple

import pytest

from sshexec import SSHPoolExecutor

from . import tasks
from .sshd import SSHServer, executor_kwargs


def outcome(call: Callable[[], Any]) -> Tuple[str, Any]:
    try:
        return "ok", call()
    except BaseException as exc:  # the comparison is about which exception, not handling it
        return "raised", type(exc)


def scenarios(executor: cf.Executor) -> Dict[str, Tuple[str, Any]]:
    ex: Any = executor
    results: Dict[str, Tuple[str, Any]] = {}
    results["map"] = outcome(lambda: list(ex.map(tasks.square, range(50))))
    results["map_chunks"] = outcome(
        lambda: list(ex.map(tasks.add, range(40), range(40), chunksize=6))
    )
    results["map_two_iterables"] = outcome(lambda: list(ex.map(tasks.add, [1, 2, 3], [4, 5])))
    results["submit_kwargs"] = outcome(lambda: ex.submit(tasks.add, 1, b=2).result())
    results["value_error"] = outcome(lambda: ex.submit(tasks.raise_value_error).result())
    results["sys_exit"] = outcome(lambda: ex.submit(tasks.exit_with, 2).result())
    results["type_error_in_map"] = outcome(lambda: list(ex.map(tasks.square, [1, "a"])))
    results["unpicklable_arg"] = outcome(lambda: ex.submit(tasks.square, threading.Lock()).result())
    results["unpicklable_result"] = outcome(lambda: ex.submit(tasks.return_lambda).result())
    results["as_completed"] = outcome(
        lambda: sorted(
            f.result() for f in cf.as_completed([ex.submit(tasks.square, i) for i in range(9)])
        )
    )
    results["map_timeout"] = outcome(lambda: list(ex.map(tasks.sleep_then, [3.0], timeout=0.3)))
    results["bad_chunksize"] = outcome(lambda: ex.map(tasks.square, [1], chunksize=0))
    results["cause_type"] = outcome(
        lambda: type(ex.submit(tasks.raise_value_error).exception().__cause__)
    )
    ex.shutdown(wait=True)
    results["after_shutdown"] = outcome(lambda: ex.submit(tasks.square, 1))
    return results


def initializer_scenario(executor: cf.Executor) -> List[str]:
    with executor:
        return sorted(set(executor.map(tasks.read_marker, range(6))))


@pytest.fixture(params=["local", "ssh"])
def sshexec_kwargs(request: pytest.FixtureRequest) -> Dict[str, Any]:
    if request.param == "local":
        return {}
    servers: List[SSHServer] = request.getfixturevalue("sshd_pair")
    return executor_kwargs(servers)


def test_same_outcomes(sshexec_kwargs: Dict[str, Any]) -> None:
    expected = scenarios(ProcessPoolExecutor(2))
    got = scenarios(SSHPoolExecutor(2, **sshexec_kwargs))
    assert got == expected


def test_same_initializer_behaviour(sshexec_kwargs: Dict[str, Any]) -> None:
    args: Dict[str, Any] = dict(initializer=tasks.init_marker, initargs=("set",))
    assert initializer_scenario(
        SSHPoolExecutor(2, **args, **sshexec_kwargs)
    ) == initializer_scenario(ProcessPoolExecutor(2, **args))


def test_same_argument_errors() -> None:
    cases: Tuple[Dict[str, Any], ...] = (
        {"max_workers": 0},
        {"max_workers": -1},
        {"initializer": 3},
        {"max_tasks_per_child": 0},
    )
    for kwargs in cases:
        with pytest.raises(Exception) as theirs:
            ProcessPoolExecutor(**kwargs)
        with pytest.raises(type(theirs.value)) as ours:
            SSHPoolExecutor(**kwargs)
        assert str(ours.value) == str(theirs.value)
