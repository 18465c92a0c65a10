"""The exception hierarchy and ``rebuild()``: user types survive, the stack is the cause."""

from __future__ import annotations

import json
import linecache
import os
import pickle
import re
import subprocess
import sys
import textwrap
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import cloudpickle
import pytest

import sshexec
from sshexec import SSHPoolExecutor, _errors
from sshexec._errors import (
    ActorDiedError,
    BrokenPool,
    CallDecodeError,
    ProtocolError,
    PythonVersionError,
    RemoteError,
    ResultDecodeError,
    SSHExecError,
    TaskKilled,
    TaskMemoryError,
    TaskTimeout,
    WorkerLostError,
    WorkerStartupError,
    rebuild,
    with_source_lines,
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
    ActorDiedError,
    BrokenPool,
    CallDecodeError,
    ProtocolError,
    PythonVersionError,
    RemoteError,
    ResultDecodeError,
    SSHExecError,
    TaskKilled,
    TaskMemoryError,
    TaskTimeout,
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
    for cls in (ProtocolError, RemoteError, WorkerStartupError, TaskTimeout, TaskKilled):
        assert not issubclass(cls, BrokenProcessPool), cls
    assert not issubclass(ActorDiedError, BrokenProcessPool)  # one actor, not the pool


def test_actor_died_names_host_class_and_how() -> None:
    error = ActorDiedError("node1", "Lattice", "killed by signal 9 (SIGKILL)")
    assert str(error) == "actor Lattice on host node1 died: killed by signal 9 (SIGKILL)"


def test_errors_all_matches_the_classes() -> None:
    assert set(_errors.__all__) == {c.__name__ for c in PUBLIC} | {"rebuild", "with_source_lines"}


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
    PythonVersionError("task 5: <lambda> (job.py:3) exists only as code ..."),
    ResultDecodeError("task 3: No module named 'numpy'"),
    CallDecodeError("task 4: worker node1#0 could not unpickle the call: ModuleNotFoundError"),
    RemoteError("mod.Err", "it broke", TRACEBACK),
    TaskTimeout(9, "node1", "node1#2", 2.0, "ran 2.01 s, over its limit of 2 s"),
    TaskMemoryError(10, "node1", "node1#3", 500 << 20, "612.0 MB resident in 2 processes"),
    TaskKilled(11, "node2", "node2#0", None, "killed while running"),
    ActorDiedError("node1", "Lattice", "killed by signal 9 (SIGKILL)"),
]

ATTRIBUTES = ["reasons", "task_id", "attempts", "host", "stage", "reason", "fix"]
ATTRIBUTES += ["worker_id", "limit", "detail"]
ATTRIBUTES += ["type_name", "message", "remote_traceback"]
ATTRIBUTES += ["cls", "how"]


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


CALL_TRACEBACK = (
    "host node1 (hostname n1.example), pid 4242, worker node1#2\n"
    "Traceback (most recent call last):\n"
    '  File "/opt/node-only/lib.py", line 1, in load\n'
    "ModuleNotFoundError: No module named 'mylib'\n"
)


def test_call_stage_failure_is_a_call_decode_error() -> None:
    original = ModuleNotFoundError("No module named 'mylib'")
    error = rebuild(failed(original, stage="call", traceback=CALL_TRACEBACK), "node1#2")
    assert type(error) is CallDecodeError and isinstance(error, BrokenProcessPool)
    assert str(error) == (
        "task 5: worker node1#2 could not unpickle the call: ModuleNotFoundError: "
        "No module named 'mylib' (is everything it needs importable on that node?)"
    )
    # loky's convention: the cause is the remote traceback, type and message included
    cause = error.__cause__
    assert type(cause) is _RemoteTraceback
    assert cause.tb == f'\n"""\n{CALL_TRACEBACK}"""'
    assert "ModuleNotFoundError: No module named 'mylib'" in str(cause)
    # the remote exception itself stays reachable, as result() would raise it
    assert type(error.original) is ModuleNotFoundError
    assert error.original.args == original.args
    assert error.original.__cause__ is cause


def test_call_stage_failure_whose_exception_cannot_cross() -> None:
    failure = failed(None, stage="call", type_name="mod.Odd", message="odd", exception=b"")
    error = rebuild(failure)
    assert type(error) is CallDecodeError and "the worker could not unpickle" in str(error)
    assert "mod.Odd: odd" in str(error)
    assert type(error.__cause__) is _RemoteTraceback and TRACEBACK in error.__cause__.tb
    assert type(error.original) is RemoteError
    assert (error.original.type_name, error.original.message) == ("mod.Odd", "odd")


def test_call_decode_error_pickles_with_its_original() -> None:
    error = CallDecodeError("task 1: could not unpickle", KeyError("k"))
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is CallDecodeError and str(copy) == str(error)
    assert type(copy.original) is KeyError and copy.original.args == ("k",)
    assert CallDecodeError("by hand").original is None


# ---- source lines the node did not have -----------------------------------------------

# A notebook cell: in the client's linecache only (mtime None, as IPython registers its
# cells), never on disk, so a worker elsewhere has no lines for it. Filling its lines in
# gives what the worker would have printed had it had the file, except for the carets
# CPython >= 3.11 draws under some of them (3.13 under every call): only lines are added.
CELL = "/tmp/sshexec-notebook/cell_12.py"
CELL_SOURCE = textwrap.dedent(
    """\
    def leaf(x):
        raise ValueError(f"bad {x}")


    def simple():
        leaf(1)


    def chained():
        try:
            leaf(2)
        except ValueError as exc:
            raise KeyError("k") from exc


    def during():
        from helper import divide

        try:
            leaf(3)
        except ValueError:
            divide(0)


    def recurse(n):
        if n:
            recurse(n - 1)
        leaf(n)


    def group():
        errors = []
        for n in (4, 5):
            try:
                leaf(n)
            except ValueError as exc:
                errors.append(exc)
        raise ExceptionGroup("outer", [ExceptionGroup("inner", errors), KeyError("x")])


    def unpicklable():
        import threading

        class Holder(Exception):
            pass

        error = Holder("holds a lock")
        error.lock = threading.Lock()
        raise error
    """
)
# A module both ends have on disk: the worker shows its lines (and its carets) itself.
HELPER = "def divide(x):\n    return 1 / x\n"
CASES = ["simple", "chained", "during", "recurse"] + ["group"] * (sys.version_info >= (3, 11))

# Formats each case's traceback in a fresh interpreter, as a worker would (the cell's
# lines unknown), then again with the cell in its linecache: what it would have been.
GENERATE = textwrap.dedent(
    """\
    import json, linecache, sys, traceback
    cell, source, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    namespace = {"__name__": "__main__"}
    exec(compile(source, cell, "exec"), namespace)
    texts = {}
    for case in cases:
        try:
            namespace[case](10) if case == "recurse" else namespace[case]()
        except BaseException as exc:
            texts[case] = ["".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
            linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)
            texts[case].append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            del linecache.cache[cell]
    print(json.dumps(texts))
    """
)


@pytest.fixture
def notebook_cell() -> Iterator[Dict[str, Any]]:
    """The cell's functions, its source registered in this process's linecache."""
    linecache.cache[CELL] = (len(CELL_SOURCE), None, CELL_SOURCE.splitlines(True), CELL)
    namespace: Dict[str, Any] = {"__name__": "__main__"}  # as a notebook's: pickled by value
    exec(compile(CELL_SOURCE, CELL, "exec"), namespace)
    try:
        yield namespace
    finally:
        linecache.cache.pop(CELL, None)


@pytest.fixture(scope="module")
def worker_tracebacks(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, List[str]]:
    """case -> [as the worker formats it, as it would be with the cell's source]."""
    where = tmp_path_factory.mktemp("helper")
    (where / "helper.py").write_text(HELPER)
    run = subprocess.run(
        [sys.executable, "-c", GENERATE, CELL, CELL_SOURCE, *CASES],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=where,
        env={**os.environ, "PYTHONPATH": str(where)},
    )
    texts: Dict[str, List[str]] = json.loads(run.stdout)
    return texts


CARETS = re.compile(r"[ |]*[~^]+[ ~^]*")  # a line of carets, in a group's margin or not


def filled(with_source: str) -> str:
    """What ``with_source_lines`` must make of a worker's text, given that text as CPython
    prints it with the cell's source: the same, less the carets under the cell's lines."""
    lines = with_source.split("\n")
    kept = [
        line
        for at, line in enumerate(lines)
        if not (CARETS.fullmatch(line) and at >= 2 and f'File "{CELL}"' in lines[at - 2])
    ]
    return "\n".join(kept)


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_source_lines_are_filled_in_from_the_client(
    case: str, notebook_cell: Dict[str, Any], worker_tracebacks: Dict[str, List[str]]
) -> None:
    remote, expected = worker_tracebacks[case]
    assert remote != expected and f'File "{CELL}"' in remote  # the premise: lines missing
    assert with_source_lines(remote) == filled(expected)
    assert with_source_lines(expected) == expected  # nothing is added twice


def test_every_layout_was_generated(worker_tracebacks: Dict[str, List[str]]) -> None:
    remote = worker_tracebacks
    assert "The above exception was the direct cause" in remote["chained"][0]
    assert "During handling of the above exception" in remote["during"][0]
    assert "ZeroDivisionError" in remote["during"][0] and "return 1 / x" in remote["during"][0]
    assert "[Previous line repeated" in remote["recurse"][0]
    if sys.version_info >= (3, 11):
        assert "^" in remote["during"][0]  # carets under the helper's line, from the worker
        assert '      |   File "' in remote["group"][0]  # a frame two groups deep


def test_rebuild_fills_in_the_cause_and_the_remote_error(
    notebook_cell: Dict[str, Any], worker_tracebacks: Dict[str, List[str]]
) -> None:
    origin = "host node1 (hostname n1), pid 7, worker node1#0\n"
    remote, expected = worker_tracebacks["chained"]
    expected = filled(expected)
    exc = rebuild(failed(KeyError("k"), traceback=origin + remote))
    assert exc.__cause__.tb == f'\n"""\n{origin}{expected}"""'  # type: ignore[union-attr]
    lost = rebuild(failed(None, type_name="KeyError", message="'k'", traceback=origin + remote))
    assert isinstance(lost, RemoteError) and lost.remote_traceback == origin + expected
    call = rebuild(failed(KeyError("k"), stage="call", traceback=origin + remote))
    assert call.__cause__.tb == f'\n"""\n{origin}{expected}"""'  # type: ignore[union-attr]


def test_lines_the_client_lacks_are_never_invented(tmp_path: Path) -> None:
    gone = tmp_path / "gone.py"
    gone.write_text("def f():\n    raise ValueError\n")
    assert linecache.getline(str(gone), 2)  # cached here...
    gone.unlink()  # ...then deleted: the cache is stale, as the traceback module decides
    text = (
        "Traceback (most recent call last):\n"
        '  File "/nonexistent/job.py", line 3, in work\n'
        f'  File "{gone}", line 2, in f\n'
        '  File "<frozen importlib._bootstrap>", line 1178, in _find_and_load\n'
        '  File "<string>", line 1, in <module>\n'
        f'  File "{CELL}", line 9999, in beyond\n'
        '  File "relative/not/here.py", line 1, in g\n'
        "ValueError\n"
    )
    assert with_source_lines(text) == text


def test_exception_text_that_looks_like_a_frame_is_kept_as_it_is() -> None:
    text = "Traceback (most recent call last):\n" + "ValueError: line 1\n"
    assert with_source_lines(text, lambda file, line: "invented") == text
    # a SyntaxError's location line has no ", in name": its text came with the exception
    syntax = '  File "x.py", line 1\n    1 +\n       ^\nSyntaxError: invalid syntax\n'
    assert with_source_lines(syntax, lambda file, line: "invented") == syntax


def test_python_3_13_layout_with_carets_and_several_lines() -> None:
    # What 3.13 prints for a call spanning lines inside a group; the worker had that
    # file but not the cell; the cell's frame gets its line, the rest is left alone.
    text = (
        "  + Exception Group Traceback (most recent call last):\n"
        '  |   File "/srv/lib/run.py", line 4, in main\n'
        "  |     total = combine(\n"
        "  |             ~~~~~~~^\n"
        "  |         1,\n"
        "  |         ^^\n"
        "  |     )\n"
        "  |     ^\n"
        '  |   File "cell.py", line 2, in combine\n'
        "  | ExceptionGroup: two (1 sub-exception)\n"
        "  +-+---------------- 1 ----------------\n"
        "    | Traceback (most recent call last):\n"
        '    |   File "cell.py", line 5, in part\n'
        '    |   File "/srv/lib/run.py", line 9, in leaf\n'
        "    |     return 1 / x\n"
        "    |            ~~^~~\n"
        "    | ZeroDivisionError: division by zero\n"
        "    +------------------------------------"  # no final newline
    )
    cell = {2: "raise ExceptionGroup('two', [part()])", 5: "    leaf(0)  "}
    lines = {("cell.py", n): line for n, line in cell.items()}
    lines[("/srv/lib/run.py", 4)] = "never asked for: the worker showed it"
    filled = with_source_lines(text, lambda file, n: lines.get((file, n), ""))
    assert filled == text.replace(
        '  |   File "cell.py", line 2, in combine\n',
        '  |   File "cell.py", line 2, in combine\n'
        "  |     raise ExceptionGroup('two', [part()])\n",
    ).replace(
        '    |   File "cell.py", line 5, in part\n',
        '    |   File "cell.py", line 5, in part\n    |     leaf(0)\n',
    )


def test_a_last_frame_without_newline_gets_its_line() -> None:
    text = '  File "cell.py", line 1, in f'
    assert with_source_lines(text, lambda file, n: "go()\n") == text + "\n    go()"


def frame(name: str, statement: str) -> str:
    """The cell's frame of ``name`` stopped at ``statement``, with its source line."""
    lineno = next(n for n, line in enumerate(CELL_SOURCE.splitlines(), 1) if statement in line)
    return f'  File "{CELL}", line {lineno}, in {name}\n    {statement}\n'


def test_remote_tracebacks_show_the_clients_lines(
    make_executor: Callable[..., SSHPoolExecutor], notebook_cell: Dict[str, Any]
) -> None:
    executor = make_executor(max_workers=1)
    with pytest.raises(KeyError) as raised:
        executor.submit(notebook_cell["chained"]).result(timeout=30)
    remote = str(raised.value.__cause__)
    assert remote.count(f'File "{CELL}"') == 3
    assert frame("chained", "leaf(2)") in remote
    assert frame("leaf", 'raise ValueError(f"bad {x}")') in remote
    assert frame("chained", 'raise KeyError("k") from exc') in remote
    with pytest.raises(RemoteError) as lost:  # its exception cannot be pickled back
        executor.submit(notebook_cell["unpicklable"]).result(timeout=30)
    assert frame("unpicklable", "raise error") in lost.value.remote_traceback
    assert frame("unpicklable", "raise error") in str(lost.value.__cause__)


def test_a_maps_remote_traceback_shows_the_clients_lines(
    make_executor: Callable[..., SSHPoolExecutor], notebook_cell: Dict[str, Any]
) -> None:
    executor = make_executor(max_workers=1)
    with pytest.raises(ValueError) as mapped:  # a map's function travels on its own
        list(executor.map(notebook_cell["leaf"], [6]))
    assert frame("leaf", 'raise ValueError(f"bad {x}")') in str(mapped.value.__cause__)
