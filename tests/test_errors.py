"""The exception hierarchy and ``rebuild()``: user types survive, the stack is the cause."""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import Any, Dict, List

import cloudpickle
import pytest

import sshexec
from sshexec import _errors
from sshexec._errors import (
    BrokenPool,
    CallDecodeError,
    ProtocolError,
    RemoteError,
    ResultDecodeError,
    SSHExecError,
    WorkerLostError,
    WorkerStartupError,
    rebuild,
)
from sshexec._wire.protocol import Failed

from . import tasks

TRACEBACK = (
    "host node1 (hostname n1.example), pid 4242, worker node1#0\n"
    "Traceback (most recent call last):\n"
    '  File "job.py", line 3, in work\n'
    "ValueError: boom\n"
)

PUBLIC = [
    BrokenPool,
    CallDecodeError,
    ProtocolError,
    RemoteError,
    ResultDecodeError,
    SSHExecError,
    WorkerLostError,
    WorkerStartupError,
]


def failed(exc: BaseException | None, **overrides: Any) -> Failed:
    fields: Dict[str, Any] = {
        "task_id": 5,
        "type_name": "ValueError" if exc is None else type(exc).__qualname__,
        "message": "" if exc is None else str(exc),
        "traceback": TRACEBACK,
        "exception": b"" if exc is None else cloudpickle.dumps(exc),
        "stage": "run",
    }
    fields.update(overrides)
    return Failed(**fields)


# ---- rebuild() ------------------------------------------------------------------------


def test_rebuild_gives_the_users_own_exception() -> None:
    exc = rebuild(failed(ValueError("boom")))
    assert type(exc) is ValueError
    assert str(exc) == "boom"
    cause = exc.__cause__
    assert type(cause) is _RemoteTraceback
    assert TRACEBACK in cause.tb
    assert TRACEBACK in str(cause)
    assert cause.tb.lstrip('\n"').startswith("host node1")


def test_rebuild_keeps_custom_exception_attributes() -> None:
    class Custom(Exception):
        pass

    original = Custom("odd", 1)
    original.extra = [1, 2]  # type: ignore[attr-defined]
    exc = rebuild(failed(original))
    assert type(exc).__name__ == "Custom"
    assert exc.args == ("odd", 1)
    assert exc.extra == [1, 2]  # type: ignore[attr-defined]
    assert isinstance(exc.__cause__, _RemoteTraceback)


def test_rebuild_of_base_exceptions() -> None:
    exc = rebuild(failed(SystemExit(3)))
    assert type(exc) is SystemExit
    assert isinstance(exc, SystemExit) and exc.code == 3
    assert isinstance(exc.__cause__, _RemoteTraceback)


def test_rebuild_matches_process_pool_layout() -> None:
    # ProcessPoolExecutor quotes its remote traceback between triple quotes.
    cause = rebuild(failed(KeyError("k"))).__cause__
    assert isinstance(cause, _RemoteTraceback)
    assert cause.tb == f'\n"""\n{TRACEBACK}"""'


def test_unloadable_exception_becomes_remote_error() -> None:
    original = tasks.NeedsArgs(3, "needs args")
    blob = cloudpickle.dumps(original)
    with pytest.raises(TypeError):
        pickle.loads(blob)  # the premise: it pickles but cannot be unpickled
    exc = rebuild(failed(original, type_name="tests.tasks.NeedsArgs"))
    assert type(exc) is RemoteError
    assert exc.type_name == "tests.tasks.NeedsArgs"
    assert exc.message == "3: needs args"
    assert exc.remote_traceback == TRACEBACK
    assert str(exc) == "tests.tasks.NeedsArgs: 3: needs args"
    assert isinstance(exc.__cause__, _RemoteTraceback)
    assert TRACEBACK in exc.__cause__.tb


@pytest.mark.parametrize(
    "blob",
    [
        b"",  # the worker could not pickle it at all
        b"not a pickle",
        pickle.dumps("a string, not an exception"),
        pickle.dumps(ValueError)[:-3],  # truncated
    ],
    ids=["empty", "garbage", "not-an-exception", "truncated"],
)
def test_missing_or_bad_exception_blob_becomes_remote_error(blob: bytes) -> None:
    exc = rebuild(failed(None, type_name="mod.Err", message="it broke", exception=blob))
    assert type(exc) is RemoteError
    assert (exc.type_name, exc.message, exc.remote_traceback) == ("mod.Err", "it broke", TRACEBACK)
    assert str(exc) == "mod.Err: it broke"


def test_remote_error_without_message() -> None:
    exc = RemoteError("mod.Err", "", TRACEBACK)
    assert str(exc) == "mod.Err"


# ---- the hierarchy --------------------------------------------------------------------


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda c: c.__name__)
def test_public_classes_are_sshexec_errors_from_module_sshexec(cls: type) -> None:
    assert issubclass(cls, SSHExecError)
    assert issubclass(cls, Exception)
    assert cls.__module__ == "sshexec"
    assert getattr(sshexec, cls.__name__) is cls
    assert cls.__name__ in sshexec.__all__


@pytest.mark.parametrize(
    "cls",
    [BrokenPool, WorkerLostError, ResultDecodeError, CallDecodeError],  # PPE's types there
    ids=lambda c: c.__name__,
)
def test_broken_pool_family(cls: type) -> None:
    assert issubclass(cls, BrokenProcessPool)
    assert issubclass(cls, RuntimeError)  # BrokenProcessPool's own base chain


def test_other_errors_are_not_broken_pool() -> None:
    for cls in (ProtocolError, RemoteError, WorkerStartupError):
        assert not issubclass(cls, BrokenProcessPool), cls


def test_errors_all_matches_the_classes() -> None:
    assert set(_errors.__all__) == {c.__name__ for c in PUBLIC} | {"rebuild"}


# ---- messages and attributes ----------------------------------------------------------


def test_broken_pool_lists_every_host() -> None:
    exc = BrokenPool("no usable worker", {"alpha": "auth refused", "beta": "no python3"})
    assert exc.reasons == {"alpha": "auth refused", "beta": "no python3"}
    assert str(exc) == "no usable worker\n  alpha: auth refused\n  beta: no python3"
    assert BrokenPool("just this").reasons == {}
    assert str(BrokenPool("just this")) == "just this"


def test_worker_lost_error_single_attempt() -> None:
    exc = WorkerLostError(4, [("node1#2", "killed by SIGKILL")])
    assert exc.task_id == 4
    assert exc.attempts == (("node1#2", "killed by SIGKILL"),)
    assert exc.host == "node1"
    assert "task 4" in str(exc) and "node1#2" in str(exc) and "SIGKILL" in str(exc)


def test_worker_lost_error_several_attempts() -> None:
    exc = WorkerLostError(4, [("a#0", "exit 1"), ("b.example#3", "connection lost")])
    assert exc.host == "b.example"
    assert "2 attempts" in str(exc)
    assert "a#0: exit 1" in str(exc) and "b.example#3: connection lost" in str(exc)
    assert WorkerLostError(1, []).host == ""


def test_worker_startup_error() -> None:
    exc = WorkerStartupError("node1", "host key", "unknown host key", "add it to known_hosts")
    assert (exc.host, exc.stage, exc.reason, exc.fix) == (
        "node1",
        "host key",
        "unknown host key",
        "add it to known_hosts",
    )
    assert str(exc) == "node1: host key failed: unknown host key. add it to known_hosts"
    assert str(WorkerStartupError("n", "connect", "refused")) == "n: connect failed: refused"


# ---- pickling -------------------------------------------------------------------------

INSTANCES: List[BaseException] = [
    SSHExecError("base failure"),
    BrokenPool("no usable worker", {"alpha": "auth refused", "beta": "timeout"}),
    BrokenPool("bare"),
    WorkerLostError(7, [("node1#0", "exit status 1")]),
    WorkerLostError(8, [("a#0", "signal 9"), ("b#1", "connection lost")]),
    WorkerStartupError("node1", "interpreter", "python3.11 not found", "install it"),
    WorkerStartupError("node2", "connect", "refused"),
    ProtocolError("oversize frame from node1#0"),
    ResultDecodeError("task 3: No module named 'numpy'"),
    CallDecodeError("task 4: worker node1#0 could not unpickle the call: ModuleNotFoundError"),
    RemoteError("mod.Err", "it broke", TRACEBACK),
]

ATTRIBUTES = ["reasons", "task_id", "attempts", "host", "stage", "reason", "fix"]
ATTRIBUTES += ["type_name", "message", "remote_traceback"]


@pytest.mark.parametrize("exc", INSTANCES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_errors_pickle_round_trip(exc: BaseException, dumps: Any) -> None:
    copy = pickle.loads(dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.args == exc.args
    for name in ATTRIBUTES:
        assert getattr(copy, name, None) == getattr(exc, name, None), name
    again = pickle.loads(pickle.dumps(copy))  # and a second hop
    assert str(again) == str(exc)


def test_every_public_class_has_a_pickle_case() -> None:
    assert {type(e) for e in INSTANCES} == set(PUBLIC)


def test_call_stage_failure_is_a_call_decode_error() -> None:
    error = rebuild(failed(ModuleNotFoundError("No module named 'mylib'"), stage="call"), "node1#2")
    assert isinstance(error, CallDecodeError) and isinstance(error, BrokenProcessPool)
    assert "node1#2" in str(error) and "mylib" in str(error)
    assert isinstance(error.__cause__, ModuleNotFoundError)
    assert type(error.__cause__.__cause__) is _RemoteTraceback
