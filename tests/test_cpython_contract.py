"""CPython's own ``concurrent.futures`` tests, run against ``SSHPoolExecutor`` on two sshd hosts.

The reference is ``test/test_concurrent_futures.py`` exactly as Debian's
``libpython3.11-testsuite`` installs it (``/usr/lib/python3.11/test/``). It is loaded
by path, never copied, and registered with ``cloudpickle.register_pickle_by_value``
so that its helpers (``mul``, ``init``, ``_crash``, ``ErrorAtPickle``...) and the test
classes built here travel to the workers by value: nodes cannot import either.

Each process-pool test class there that exercises public behaviour is subclassed
on CPython's own 'spawn' variant (``create_executor_tests`` does the same with its
mixins). The only change is the executor: an autouse fixture sets the test
instance's ``executor_type`` to a factory building ``SSHPoolExecutor`` over the
``sshd_pair`` hosts, so ``ExecutorMixin.setUp`` and the tests that construct their
own executors (``self.executor_type(max_workers=2, mp_context=...)``) all get one.
It is set on the instance, not the class, so pickling a test class by value
(``submit(self._test_traceback)``) never drags the client-only ``sshexec._executor``
into a task.

``EXCLUDED`` names the tests that only inspect ProcessPoolExecutor's private
attributes or multiprocessing plumbing, one reason each. ``REPLACED`` names
tests that check public behaviour but cannot run as written (a child interpreter
imports the executor from ``concurrent.futures`` by name, or a private attribute
sits beside the public assertions); each is re-run as a ``test_adapted_*``
function below that keeps the public assertions and says what it dropped.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
import re
import sys
import textwrap
import time
import unittest
import weakref
from concurrent.futures import BrokenExecutor
from pathlib import Path
from pickle import PicklingError
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Tuple

import cloudpickle
import pytest

from sshexec import SSHPoolExecutor

from .sshd import REQUIRE_ENV, SSHServer, executor_kwargs
from .waits import shut_down

PYTHON = "%d.%d" % sys.version_info[:2]
REFERENCE_PYTHON = "3.11"  # 3.12 split the file into a test_concurrent_futures/ package
DEBIAN_PACKAGE = f"libpython{PYTHON}-testsuite"
REFERENCE = Path(f"/usr/lib/python{PYTHON}/test/test_concurrent_futures.py")
MODULE_NAME = "cpython_test_concurrent_futures"  # not test.*: the interpreter's own package
WORKERS = 2  # per executor built by ExecutorMixin.setUp: one on each sshd host


def _load_reference() -> ModuleType:
    if PYTHON != REFERENCE_PYTHON:
        pytest.skip(
            f"the reference is CPython {REFERENCE_PYTHON}'s test_concurrent_futures.py; "
            f"this is Python {PYTHON}",
            allow_module_level=True,
        )
    if not REFERENCE.is_file():
        message = (
            f"{REFERENCE} not found: install Debian's {DEBIAN_PACKAGE} "
            f"(apt-get install {DEBIAN_PACKAGE})"
        )
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{message} ({REQUIRE_ENV} is set)", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # cloudpickle needs it there to pickle it by value
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[MODULE_NAME]
        raise
    return module


cf = _load_reference()
cloudpickle.register_pickle_by_value(cf)  # nodes cannot import the reference tests
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # nor the classes built here


# ---- what does not run as written ---------------------------------------------------------

EXCLUDED: Dict[str, Dict[str, str]] = {
    "ProcessPoolExecutorTest": {
        "test_killed_child": "finds a worker through executor._processes (sshexec replaces a "
        "killed worker rather than breaking the pool: test_failures.py's crash matrix)",
        "test_saturation": "counts executor._processes, fed by a multiprocessing Semaphore "
        "that only crosses to multiprocessing children",
        "test_idle_process_reuse_one": "counts executor._processes",
        "test_idle_process_reuse_multiple": "counts executor._processes",
        "test_max_tasks_per_child_defaults_to_spawn_context": "reads executor._mp_context's "
        "start method",
    },
    "ProcessPoolShutdownTest": {
        "test_processes_terminate": "counts and joins executor._processes, fed by a "
        "multiprocessing Semaphore",
    },
    "ExecutorDeadlockTest": {},
    "WaitTests": {},
    "AsCompletedTests": {},
    "InitializerMixin": {},
}

REPLACED: Dict[str, Dict[str, str]] = {
    "ProcessPoolExecutorTest": {
        "test_max_tasks_per_child": "asserts len(executor._processes) beside the worker pids",
        "test_ressources_gced_in_workers": "a multiprocessing Manager proxy authenticates "
        "with the authkey only multiprocessing children inherit",
    },
    "ProcessPoolShutdownTest": {
        "test_interpreter_shutdown": "the child imports the executor from concurrent.futures",
        "test_submit_after_interpreter_shutdown": "the child imports the executor from "
        "concurrent.futures",
        "test_hang_gh83386": "the child imports the executor from concurrent.futures",
        "test_context_manager_shutdown": "builds a ProcessPoolExecutor and joins its _processes",
        "test_del_shutdown": "builds a ProcessPoolExecutor and joins its _processes, "
        "_call_queue and _executor_manager_thread",
        "test_shutdown_no_wait": "builds a ProcessPoolExecutor and joins its _processes, "
        "_call_queue and _executor_manager_thread",
    },
    "ExecutorDeadlockTest": {
        "test_shutdown_deadlock_pickle": "joins executor._executor_manager_thread",
    },
    "FailingInitializerMixin": {
        "test_initializer": "polls executor._broken and reads worker logs through a "
        "multiprocessing Queue, which only crosses to multiprocessing children",
    },
}


def _run_under_pytest(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(
        "run this module with pytest: the SSHPoolExecutor factory comes from its fixtures"
    )


def _fail_on_deadlock(self: Any, executor: Any) -> None:
    """CPython's version terminates ``executor._processes``; ``kill_workers()`` is public."""
    import faulthandler
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as f:
        faulthandler.dump_traceback(file=f)
        f.seek(0)
        tb = f.read()
    try:
        executor.kill_workers()
    except Exception as exc:  # reported with the deadlock, not instead of it
        tb += f"\nkill_workers() then raised {type(exc).__name__}: {exc}"
    print(f"\nTraceback:\n {tb}", file=sys.__stderr__)
    self.fail(f"Executor deadlock:\n\n{tb}")


def _ssh_variant(mixin_name: str, **extra: Any) -> type:
    """``create_executor_tests``' spawn variant of one mixin, minus EXCLUDED and REPLACED."""
    mixin = getattr(cf, mixin_name)
    name = "SSH" + re.sub(r"(Mixin|Tests|Test)$", "", mixin_name) + "Test"
    namespace: Dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"CPython's {mixin_name} (spawn variant) on SSHPoolExecutor over two sshd hosts.",
        "executor_type": staticmethod(_run_under_pytest),  # the fixture sets the real one
        "worker_count": WORKERS,
        **extra,
    }
    for skipped in (EXCLUDED, REPLACED):
        for test_name in skipped.get(mixin_name, {}):
            namespace[test_name] = None  # not callable: unittest's loader leaves it out
    return type(name, (mixin, cf.ProcessPoolSpawnMixin, cf.BaseTestCase), namespace)


SSHWaitTest = _ssh_variant("WaitTests")
SSHAsCompletedTest = _ssh_variant("AsCompletedTests")
SSHProcessPoolExecutorTest = _ssh_variant("ProcessPoolExecutorTest")
SSHProcessPoolShutdownTest = _ssh_variant("ProcessPoolShutdownTest")
SSHInitializerTest = _ssh_variant("InitializerMixin")
SSHExecutorDeadlockTest = _ssh_variant("ExecutorDeadlockTest", _fail_on_deadlock=_fail_on_deadlock)
# FailingInitializerMixin's only test is in REPLACED: test_adapted_failing_initializer.


# ---- fixtures --------------------------------------------------------------------------

ExecutorFactory = Callable[..., SSHPoolExecutor]


@pytest.fixture
def ssh_executor_type(sshd_pair: List[SSHServer]) -> Iterator[ExecutorFactory]:
    """``SSHPoolExecutor`` with ProcessPoolExecutor's signature, over the two sshd hosts.
    Executors a test leaves running (a failed assertion before its shutdown) are shut
    down afterwards; they are held weakly, so tests of garbage collection still work."""
    made: weakref.WeakSet[SSHPoolExecutor] = weakref.WeakSet()

    def SSHPoolExecutor_over_sshd(max_workers: Any = None, *args: Any, **kwargs: Any) -> Any:
        executor = SSHPoolExecutor(max_workers, *args, **executor_kwargs(sshd_pair, **kwargs))
        made.add(executor)
        return executor

    yield SSHPoolExecutor_over_sshd
    for executor in list(made):
        shut_down(executor)


@pytest.fixture(autouse=True)
def _reference_tests_use_ssh(request: pytest.FixtureRequest) -> None:
    case = request.instance
    if isinstance(case, unittest.TestCase):
        case.executor_type = request.getfixturevalue("ssh_executor_type")  # type: ignore[attr-defined]


def test_exclusions_name_reference_tests() -> None:
    """Every EXCLUDED or REPLACED name is a test of that reference class, so an upstream
    rename cannot silently widen what is skipped."""
    for table in (EXCLUDED, REPLACED):
        for mixin_name, tests in table.items():
            mixin = getattr(cf, mixin_name)
            for test_name in tests:
                assert callable(getattr(mixin, test_name, None)), (mixin_name, test_name)


# ---- REPLACED tests, adapted -------------------------------------------------------------


def _reference_prelude() -> str:
    """Child-interpreter lines loading the reference by path, as this module does."""
    return textwrap.dedent(
        f"""\
        import importlib.util, sys
        import cloudpickle
        _spec = importlib.util.spec_from_file_location({MODULE_NAME!r}, {str(REFERENCE)!r})
        _reference = importlib.util.module_from_spec(_spec)
        sys.modules[_spec.name] = _reference
        _spec.loader.exec_module(_reference)
        cloudpickle.register_pickle_by_value(_reference)
        sleep_and_print = _reference.sleep_and_print
        """
    )


def _run_child(script: str) -> Tuple[bytes, bytes]:
    _, out, err = cf.assert_python_ok("-c", script)  # the reference's own import
    return out, err


def _task_printed(out: bytes, err: bytes, text: bytes) -> None:
    """A task's ``print(text)`` reached the parent's stdout and nothing else was written,
    as the reference expects; sshexec prefixes each line with ``[host:N] `` by default."""
    assert not err, err
    assert re.fullmatch(rb"(\[\S+:\d+\] )?" + re.escape(text), out.strip()), out


def test_adapted_interpreter_shutdown(sshd_pair: List[SSHServer]) -> None:
    """ExecutorShutdownTest.test_interpreter_shutdown: the exit hook lets a pending task
    finish before the interpreter ends."""
    script = _reference_prelude() + textwrap.dedent(
        f"""\
        from sshexec import SSHPoolExecutor
        if __name__ == "__main__":
            from multiprocessing import get_context
            context = get_context("spawn")
            t = SSHPoolExecutor(5, mp_context=context, **{executor_kwargs(sshd_pair)!r})
            t.submit(sleep_and_print, 1.0, "apple")
        """
    )
    out, err = _run_child(script)
    _task_printed(out, err, b"apple")


def test_adapted_submit_after_interpreter_shutdown(sshd_pair: List[SSHServer]) -> None:
    """ExecutorShutdownTest.test_submit_after_interpreter_shutdown: an atexit hook that
    runs after the executor's own gets RuntimeError from submit()."""
    script = textwrap.dedent(
        f"""\
        import atexit
        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise
        from sshexec import SSHPoolExecutor
        if __name__ == "__main__":
            from multiprocessing import get_context
            context = get_context("spawn")
            t = SSHPoolExecutor(5, mp_context=context, **{executor_kwargs(sshd_pair)!r})
            t.submit(id, 42).result()
        """
    )
    out, err = _run_child(script)
    assert "RuntimeError: cannot schedule new futures" in err.decode()
    assert out.strip() == b"runtime-error"


def test_adapted_hang_gh83386(sshd_pair: List[SSHServer]) -> None:
    """ExecutorShutdownTest.test_hang_gh83386 (skipped for ProcessPoolExecutor, which
    hangs): shutdown(wait=False) with a running task does not hang the exit."""
    script = _reference_prelude() + textwrap.dedent(
        f"""\
        from sshexec import SSHPoolExecutor
        if __name__ == "__main__":
            t = SSHPoolExecutor(max_workers=3, **{executor_kwargs(sshd_pair)!r})
            t.submit(sleep_and_print, 1.0, "apple")
            t.shutdown(wait=False)
        """
    )
    out, err = _run_child(script)
    _task_printed(out, err, b"apple")


def test_adapted_context_manager_shutdown(ssh_executor_type: ExecutorFactory) -> None:
    """ProcessPoolShutdownTest.test_context_manager_shutdown. Instead of joining
    ``e._processes``, the autouse leak check asserts every worker has ended."""
    spawn = multiprocessing.get_context("spawn")
    with ssh_executor_type(max_workers=5, mp_context=spawn) as e:
        assert list(e.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]


def test_adapted_del_shutdown(ssh_executor_type: ExecutorFactory) -> None:
    """ProcessPoolShutdownTest.test_del_shutdown: dropping the executor with a map
    pending still computes every result. The leak check stands in for joining the
    private threads, queues and processes."""
    executor = ssh_executor_type(max_workers=5, mp_context=multiprocessing.get_context("spawn"))
    res = executor.map(abs, range(-5, 5))
    del executor
    cf.support.gc_collect()
    assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])


def test_adapted_shutdown_no_wait(ssh_executor_type: ExecutorFactory) -> None:
    """ProcessPoolShutdownTest.test_shutdown_no_wait, with the leak check in place of
    joining the private threads, queues and processes."""
    executor = ssh_executor_type(max_workers=5, mp_context=multiprocessing.get_context("spawn"))
    res = executor.map(abs, range(-5, 5))
    executor.shutdown(wait=False)
    assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])


def test_adapted_max_tasks_per_child(ssh_executor_type: ExecutorFactory) -> None:
    """ProcessPoolExecutorTest.test_max_tasks_per_child without the two
    ``len(executor._processes) == 1`` checks."""
    context = multiprocessing.get_context("spawn")
    executor = ssh_executor_type(1, mp_context=context, max_tasks_per_child=3)
    f1 = executor.submit(os.getpid)
    original_pid = f1.result()
    f2 = executor.submit(os.getpid)
    assert f2.result() == original_pid
    f3 = executor.submit(os.getpid)
    assert f3.result() == original_pid
    f4 = executor.submit(os.getpid)
    new_pid = f4.result()
    assert original_pid != new_pid
    executor.shutdown()


def _adopt_authkey(authkey: bytes) -> None:
    """Worker initializer: what a multiprocessing child inherits from its parent."""
    multiprocessing.current_process().authkey = authkey


def test_adapted_ressources_gced_in_workers(ssh_executor_type: ExecutorFactory) -> None:
    """ProcessPoolExecutorTest.test_ressources_gced_in_workers: a task's arguments are
    released on the worker once it is done. The workers adopt this process's
    multiprocessing authkey so that the reference's Manager proxy can connect back."""
    authkey = bytes(multiprocessing.current_process().authkey)
    executor = ssh_executor_type(WORKERS, initializer=_adopt_authkey, initargs=(authkey,))
    mgr = multiprocessing.get_context("spawn").Manager()
    try:
        obj = cf.EventfulGCObj(mgr)
        future = executor.submit(id, obj)
        future.result()
        assert obj.event.wait(timeout=1)
        obj = None
        cf.support.gc_collect()
    finally:
        executor.shutdown()
        mgr.shutdown()
        mgr.join()


def test_adapted_shutdown_deadlock_pickle(ssh_executor_type: ExecutorFactory) -> None:
    """ExecutorDeadlockTest.test_shutdown_deadlock_pickle: a call that fails to pickle
    right before shutdown(wait=False) fails its own Future and does not hang. The leak
    check stands in for joining ``executor._executor_manager_thread``."""
    with ssh_executor_type(
        max_workers=2, mp_context=multiprocessing.get_context("spawn")
    ) as executor:
        executor.submit(id, 42).result()
        f = executor.submit(id, cf.ErrorAtPickle())
        executor.shutdown(wait=False)
        with pytest.raises(PicklingError):
            f.result()


def test_adapted_failing_initializer(
    ssh_executor_type: ExecutorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """FailingInitializerMixin.test_initializer: an initializer that raises breaks the
    pool, and says why in the log. ``submit()`` raising BrokenExecutor stands in for
    polling ``executor._broken``; the reason is logged by the client (logger
    ``sshexec``) rather than by the worker into a multiprocessing Queue."""
    with caplog.at_level(logging.ERROR, logger="sshexec"):
        executor = ssh_executor_type(
            WORKERS, mp_context=multiprocessing.get_context("spawn"), initializer=cf.init_fail
        )
        try:
            future = executor.submit(cf.get_init_status)
        except BrokenExecutor:
            pass  # perhaps the executor is already broken
        else:
            with pytest.raises(BrokenExecutor):
                future.result()
        deadline = time.monotonic() + 5  # at some point the executor should break
        while True:
            try:
                future = executor.submit(cf.get_init_status)
            except BrokenExecutor:
                break
            with pytest.raises(BrokenExecutor):
                future.result()
            if time.monotonic() > deadline:
                pytest.fail("executor not broken after 5 s.")
            time.sleep(0.01)
        with pytest.raises(BrokenExecutor):  # and from this point submit() fails
            executor.submit(cf.get_init_status)
    executor.shutdown()
    assert any("ValueError: error in initializer" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
