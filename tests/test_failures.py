"""The crash matrix: one row per stage where a call can go wrong, on real workers
(local and over sshd) and, for SSH-only stages, on purpose-built sshd hosts."""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from pathlib import Path
from typing import Callable, List, Set

import pytest

from sshexec import (
    BrokenPool,
    CallDecodeError,
    RemoteError,
    ResultDecodeError,
    SSHPoolExecutor,
    WorkerLostError,
    WorkerStartupError,
)

from . import tasks
from .procs import agents_and_workers
from .sshd import SSHServer, executor_kwargs

Make = Callable[..., SSHPoolExecutor]
StartServer = Callable[..., SSHServer]


# ---- the call and its result ------------------------------------------------------------


def test_call_that_cannot_pickle(executor: SSHPoolExecutor) -> None:
    future = executor.submit(tasks.square, threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pickle"):
        future.result(timeout=30)
    assert executor.submit(tasks.square, 3).result(timeout=30) == 9


def test_worker_cannot_unpickle_the_call(
    make_executor: Callable[..., SSHPoolExecutor], tmp_path: Path
) -> None:
    executor = make_executor(forward_modules=False)  # with forwarding the module travels
    (tmp_path / "only_here_mod.py").write_text("def f():\n    return 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        only_here_mod = importlib.import_module("only_here_mod")
        future = executor.submit(only_here_mod.f)
        with pytest.raises(CallDecodeError, match=r"ModuleNotFoundError: .*only_here_mod") as info:
            future.result(timeout=30)
        assert isinstance(info.value, BrokenProcessPool)
        cause = info.value.__cause__  # loky's convention: the remote traceback
        assert type(cause) is _RemoteTraceback
        assert str(cause).lstrip('\n"').startswith("host ")
        assert "Traceback (most recent call last):" in str(cause)
        assert "ModuleNotFoundError: No module named 'only_here_mod'" in str(cause)
        original = info.value.original  # and the node's exception itself
        assert type(original) is ModuleNotFoundError and original.name == "only_here_mod"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here_mod", None)
    assert executor.submit(tasks.square, 4).result(timeout=30) == 16


def test_callable_raises(executor: SSHPoolExecutor) -> None:
    with pytest.raises(ValueError, match="kaboom"):
        executor.submit(tasks.raise_value_error, "kaboom").result(timeout=30)


def test_sys_exit_in_task_is_an_exception(executor: SSHPoolExecutor) -> None:
    with pytest.raises(SystemExit) as info:
        executor.submit(tasks.exit_with, 3).result(timeout=30)
    assert info.value.code == 3
    assert executor.submit(tasks.square, 5).result(timeout=30) == 25


def test_os_exit_fails_only_that_future(make_executor: Make) -> None:
    executor = make_executor(2, max_retries=0)
    others = [executor.submit(tasks.sleep_then, 0.3, i) for i in range(4)]
    doomed = executor.submit(tasks.hard_exit, 7)
    with pytest.raises(WorkerLostError) as info:
        doomed.result(timeout=30)
    assert isinstance(info.value, BrokenProcessPool)
    text = str(info.value)
    assert "exit status 7" in text and "pid " in text
    assert info.value.host in text
    assert [f.result(timeout=30) for f in others] == [0, 1, 2, 3]
    assert executor.submit(tasks.square, 6).result(timeout=30) == 36  # replaced


def test_segfault_names_the_signal(make_executor: Make) -> None:
    executor = make_executor(1, max_retries=0)
    with pytest.raises(WorkerLostError, match="SIGSEGV"):
        executor.submit(tasks.segfault).result(timeout=30)
    assert executor.submit(tasks.square, 7).result(timeout=30) == 49


def test_task_that_kills_every_worker_stops_after_retries(make_executor: Make) -> None:
    executor = make_executor(2, max_retries=2)
    with pytest.raises(WorkerLostError) as info:
        executor.submit(tasks.hard_exit, 9).result(timeout=60)
    assert len(info.value.attempts) == 3
    assert all("exit status 9" in how for _, how in info.value.attempts)
    assert executor.submit(tasks.square, 2).result(timeout=30) == 4


def test_result_that_cannot_pickle(executor: SSHPoolExecutor) -> None:
    with pytest.raises(TypeError, match="pickle"):
        executor.submit(tasks.return_lambda).result(timeout=30)
    assert executor.submit(tasks.square, 8).result(timeout=30) == 64


def test_host_cannot_unpickle_the_result(executor: SSHPoolExecutor) -> None:
    def make_remote_only() -> object:
        import sys as remote_sys
        import types

        module = types.ModuleType("remote_only_mod")
        exec("class Thing:\n    pass\n", module.__dict__)
        module.Thing.__module__ = "remote_only_mod"
        remote_sys.modules["remote_only_mod"] = module
        return module.Thing()

    with pytest.raises(ResultDecodeError, match="remote_only_mod"):
        executor.submit(make_remote_only).result(timeout=30)
    assert executor.submit(tasks.square, 9).result(timeout=30) == 81


def test_exception_that_cannot_be_rebuilt(executor: SSHPoolExecutor) -> None:
    with pytest.raises(RemoteError) as info:
        executor.submit(tasks.raise_needs_args).result(timeout=30)
    assert info.value.type_name.endswith("NeedsArgs")
    assert "3: needs args" in info.value.message
    assert "raise_needs_args" in info.value.remote_traceback
    with pytest.raises(RemoteError, match="lock inside"):
        executor.submit(tasks.raise_unpicklable).result(timeout=30)


def test_done_callbacks_that_raise_or_exit(
    executor: SSHPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    """A done-callback raising, even SystemExit, on the executor's callback thread: it is
    logged, and that thread runs the callbacks after it; the pool goes on."""
    caplog.set_level(logging.CRITICAL, logger="concurrent.futures")
    caplog.set_level(logging.CRITICAL, logger="sshexec.callbacks")
    ran: List[int] = []

    def raise_it(error: BaseException) -> Callable[[cf.Future[int]], None]:
        def callback(_: cf.Future[int]) -> None:
            raise error

        return callback

    first = executor.submit(tasks.sleep_then, 0.3, 1)
    first.add_done_callback(raise_it(ValueError("callback")))
    second = executor.submit(tasks.sleep_then, 0.3, 2)
    second.add_done_callback(raise_it(SystemExit(3)))
    third = executor.submit(tasks.sleep_then, 0.6, 3)
    third.add_done_callback(lambda f: ran.append(f.result()))
    _, not_done = cf.wait([first, second, third], timeout=30)
    assert not not_done
    deadline = time.monotonic() + 10
    while not ran and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ran == [3]
    assert executor.submit(tasks.square, 4).result(timeout=30) == 16


def test_call_over_the_frame_limit_fails_before_sending(make_executor: Make) -> None:
    executor = make_executor(1, max_frame=1 << 20)
    with pytest.raises(ValueError, match="max_frame"):
        executor.submit(bytes, b"x" * (2 << 20)).result(timeout=30)
    assert executor.submit(tasks.square, 3).result(timeout=30) == 9


def test_worker_killed_mid_task_from_outside(make_executor: Make) -> None:
    executor = make_executor(1, max_retries=0)
    _, pid, _ = executor.submit(tasks.where).result(timeout=30)
    running = executor.submit(tasks.sleep_then, 30)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerLostError, match=rf"pid {pid}.*SIGKILL|pid {pid}.*KILL"):
        running.result(timeout=30)
    assert executor.submit(tasks.square, 3).result(timeout=30) == 9


def test_killed_worker_task_is_retried(make_executor: Make) -> None:
    executor = make_executor(1, max_retries=1)
    _, pid, _ = executor.submit(tasks.where).result(timeout=30)
    running = executor.submit(tasks.sleep_then, 1.0, "second try")
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    assert running.result(timeout=30) == "second try"


def test_initializer_failure_breaks_the_pool(make_executor: Make) -> None:
    executor = make_executor(2, initializer=tasks.fail_init)
    try:
        future = executor.submit(tasks.square, 2)
    except BrokenPool as exc:  # the pool may already know: submit() refuses, as in PPE
        assert "initializer" in str(exc)
    else:
        with pytest.raises(BrokenProcessPool, match="initializer"):
            future.result(timeout=30)
    deadline = time.monotonic() + 10
    while executor._pool.broken is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(BrokenPool):
        executor.submit(tasks.square, 3)


# ---- SSH: the connection and the node ---------------------------------------------------


def test_connection_drop_requeues_and_reconnects(start_server: StartServer) -> None:
    server = start_server("dropper")
    with SSHPoolExecutor(2, **server.executor_kwargs(max_retries=1)) as executor:
        futures = [executor.submit(tasks.sleep_then, 0.5, i) for i in range(6)]
        time.sleep(0.3)
        server.drop_connections()  # the TCP connections die under the workers
        assert [f.result(timeout=60) for f in futures] == list(range(6))
        assert executor.submit(tasks.square, 5).result(timeout=30) == 25


def test_noisy_login_shell_is_skipped(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server(
        "noisy",
        'ForceCommand echo "Welcome to the noisy node"; echo motd >&2; eval "$SSH_ORIGINAL_COMMAND"',
    )
    with caplog.at_level(logging.WARNING, logger="sshexec"):
        with SSHPoolExecutor(1, **server.executor_kwargs()) as executor:
            assert executor.submit(tasks.square, 12).result(timeout=30) == 144
    assert any("Welcome to the noisy node" in r.getMessage() for r in caplog.records)


def _too_old_python() -> str:
    """An interpreter older than the nodes' minimum, 3.9 (pyenv's 3.6 to 3.8, or 2.7)."""
    candidates: List[Path] = []
    for folder, pattern in (("/root/.pyenv/versions", "*/bin/python"), ("/usr/bin", "python3.*")):
        try:
            candidates += sorted(Path(folder).glob(pattern))
        except OSError:  # not readable by an ordinary user
            pass
    for path in candidates:
        found = re.search(r"(?:versions/|python)([23])\.(\d+)", str(path))
        if (
            found
            and (int(found.group(1)), int(found.group(2))) < (3, 9)
            and os.access(path, os.X_OK)
        ):
            return str(path)
    pytest.skip("no Python older than 3.9 here (pyenv install 3.6)")


def test_too_old_remote_python(sshd_pair: List[SSHServer]) -> None:
    old = _too_old_python()
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **sshd_pair[0].executor_kwargs(python=old))
    text = str(info.value)
    assert info.value.stage == "interpreter"
    assert "3.9 or newer" in text and "python=" in text
    assert sshd_pair[0].spec.split("@")[1] in text


def test_default_remote_python_choice(sshd_pair: List[SSHServer]) -> None:
    """No python= given: python3.X, then python3, as found on the node's PATH."""
    kwargs = sshd_pair[0].executor_kwargs()
    del kwargs["python"]
    found = [
        p
        for p in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}",)
        if os.path.exists(p)
    ]
    if found:
        with SSHPoolExecutor(1, **kwargs) as executor:
            assert executor.submit(tasks.square, 3).result(timeout=30) == 9
    else:
        with pytest.raises(WorkerStartupError, match="python="):
            SSHPoolExecutor(1, **kwargs)


def test_missing_remote_python(sshd_pair: List[SSHServer]) -> None:
    with pytest.raises(WorkerStartupError, match="no usable Python") as info:
        SSHPoolExecutor(1, **sshd_pair[0].executor_kwargs(python="/nonexistent/python3"))
    assert info.value.stage == "interpreter"


def test_unknown_host_key(start_server: StartServer) -> None:
    server = start_server("stranger", trusted=False)
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **server.executor_kwargs())
    assert info.value.stage == "host key"
    assert "ssh-keyscan" in str(info.value) and str(server.port) in str(info.value)


def test_changed_host_key_is_refused(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server("changeling", trusted=False)
    impostor_key = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    del impostor_key
    fake = " ".join((tmp_path / "k.pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {fake}\n")
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **server.executor_kwargs(known_hosts=str(known)))
    assert "changed" in str(info.value) and "ssh-keygen -R" in str(info.value)


def test_unsafe_skip_host_key_check(start_server: StartServer) -> None:
    server = start_server("unverified", trusted=False)
    kwargs = server.executor_kwargs(unsafe_skip_host_key_check=True)
    with SSHPoolExecutor(1, **kwargs) as executor:
        assert executor.submit(tasks.square, 4).result(timeout=30) == 16


def test_refused_authentication(start_server: StartServer) -> None:
    server = start_server("locked")
    (server.root / "authorized_keys").write_text("")  # sshd rereads it at every login
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **server.executor_kwargs())
    assert info.value.stage == "authentication" and "authorized_keys" in str(info.value)


def test_unreachable_port(sshd_pair: List[SSHServer]) -> None:
    from .sshd import free_port

    kwargs = executor_kwargs(sshd_pair, hosts=[f"127.0.0.1:{free_port()}"])
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(1, **kwargs)
    assert info.value.stage == "connect" and "port" in str(info.value)


def test_one_bad_host_is_left_out(
    sshd_pair: List[SSHServer], caplog: pytest.LogCaptureFixture
) -> None:
    from .sshd import free_port

    bad = f"127.0.0.1:{free_port()}"
    kwargs = executor_kwargs(sshd_pair[:1], hosts=[sshd_pair[0].spec, bad])
    with caplog.at_level(logging.WARNING, logger="sshexec"):
        with SSHPoolExecutor(2, **kwargs) as executor:
            assert {h for h, _, _ in executor.map(tasks.where, range(6))} == {"alpha"}
    assert any(bad in r.getMessage() for r in caplog.records)


def test_every_host_bad_lists_each_reason(sshd_pair: List[SSHServer]) -> None:
    from .sshd import free_port

    bad = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    with pytest.raises(BrokenPool) as info:
        SSHPoolExecutor(2, **executor_kwargs(sshd_pair, hosts=bad))
    assert set(info.value.reasons) == set(bad)


def test_more_workers_than_max_sessions(start_server: StartServer) -> None:
    """One session per host: the agent forks the workers, so sshd's MaxSessions (2 here)
    does not bound them; the node's process table shows one agent with all 12 below it."""
    server = start_server("narrow", "MaxSessions 2")
    with SSHPoolExecutor(12, **server.executor_kwargs()) as executor:
        pids: Set[int] = set()
        deadline = time.monotonic() + 30
        while len(pids) < 12 and time.monotonic() < deadline:  # the rest fork in the background
            pids |= {pid for _, pid, _ in executor.map(tasks.sleep_then_where, [0.2] * 24)}
        assert len(pids) == 12
        assert server.proc is not None
        tree = agents_and_workers(server.proc.pid)
        assert list(tree) and len(tree) == 1, tree  # one agent: one SSH session
        assert set(next(iter(tree.values()))) == pids


def test_every_future_resolves_when_all_hosts_die(
    start_server: StartServer, made: List[SSHPoolExecutor]
) -> None:
    """Past ``reconnect_grace`` (3 s here; 60 by default) with no host back, every
    Future ends: a result, or BrokenProcessPool."""
    server = start_server("doomed")
    executor = SSHPoolExecutor(2, **server.executor_kwargs(max_retries=0, reconnect_grace=3.0))
    made.append(executor)
    futures = [executor.submit(tasks.sleep_then, 0.5, i) for i in range(8)]
    time.sleep(0.2)
    server.go_down()  # listener first, then every connection: reconnecting fails
    _, not_done = cf.wait(futures, timeout=90)
    assert not not_done
    assert all(
        f.exception() is None or isinstance(f.exception(), BrokenProcessPool) for f in futures
    )
    executor.shutdown(wait=True)
