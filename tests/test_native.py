"""Issue #5 on local workers and real sshd hosts: modules that exist only on the client,
remote output and logging, stats(), run_on_hosts() and repr()."""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures.process import _RemoteTraceback
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

from sshexec import BrokenPool, CallDecodeError, SSHPoolExecutor, Stats, WorkerLostError

from . import tasks
from .sshd import executor_kwargs

PACKAGE = {
    "__init__.py": "from .core import double, fail_on\nVERSION = '1.0'\n",
    "core.py": textwrap.dedent(
        """\
        from . import helpers
        from .sub.deep import triple


        def double(x):
            return helpers.twice(x)


        def fail_on(x):
            if x == 3:
                raise ValueError(f"three is not allowed ({x})")
            return triple(x)
        """
    ),
    "helpers.py": "def twice(x):\n    return 2 * x\n",
    "sub/__init__.py": "",
    "sub/deep.py": "import json\n\n\ndef triple(x):\n    return json.loads(json.dumps(3 * x))\n",
}


@pytest.fixture
def client_only_package(tmp_path: Path) -> Iterator[Any]:
    """A package importable in this process only: a fresh name in a temporary directory."""
    name = f"onlyhere_{os.getpid()}_{tmp_path.name.replace('-', '_')}"
    for rel, text in PACKAGE.items():
        path = tmp_path / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def test_a_package_that_exists_only_here_travels(
    make_executor: Callable[..., SSHPoolExecutor], client_only_package: Any
) -> None:
    executor = make_executor()
    assert list(executor.map(client_only_package.double, range(6))) == [0, 2, 4, 6, 8, 10]
    assert executor.submit(client_only_package.fail_on, 2).result(timeout=30) == 6
    with pytest.raises(ValueError, match="three is not allowed") as info:
        executor.submit(client_only_package.fail_on, 3).result(timeout=30)
    remote = str(info.value.__cause__)
    # the forwarded source is known to the worker's linecache: the traceback shows the line
    assert "core.py" in remote and 'raise ValueError(f"three is not allowed' in remote


def test_code_on_the_node_may_import_sshexec_itself(
    make_executor: Callable[..., SSHPoolExecutor], python_without_numpy: str
) -> None:
    # the venv has no sshexec installed: its public names come through forwarding
    executor = make_executor(max_workers=1, python=python_without_numpy)
    assert executor.submit(tasks.public_names_on_the_node).result(timeout=30) == (
        "SSHPoolExecutor Stats"
    )


def test_forwarding_can_be_switched_off(
    make_executor: Callable[..., SSHPoolExecutor], client_only_package: Any
) -> None:
    executor = make_executor(forward_modules=False)
    with pytest.raises(CallDecodeError, match=client_only_package.__name__) as info:
        executor.submit(client_only_package.double, 1).result(timeout=30)
    assert isinstance(info.value.original, ModuleNotFoundError)
    assert type(info.value.__cause__) is _RemoteTraceback
    assert f"No module named '{client_only_package.__name__}'" in str(info.value.__cause__)


def test_with_forwarding_off_the_client_looks_nothing_up_for_a_node(
    make_executor: Callable[..., SSHPoolExecutor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node may ask whatever it was told: with ``forward_modules=False`` the client
    answers "not forwarded" for its script, the stdlib and its own packages alike, and
    looks nothing up (no find_spec, so no package's ``__init__`` runs; no file read)."""
    import sshexec._pool.link as link

    name = f"probe_{os.getpid()}_{tmp_path.name.replace('-', '_')}"
    imported = tmp_path / "imported"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(f"open({str(imported)!r}, 'a').close()\n")
    (tmp_path / name / "sub.py").write_text("SECRET = 1\n")
    import sshexec._forward

    looked_up: List[str] = []

    def recorded(asked: str) -> Any:
        looked_up.append(asked)
        return sshexec._forward.find_source(asked)

    monkeypatch.setattr(link, "find_source", recorded)
    monkeypatch.syspath_prepend(str(tmp_path))
    executor = make_executor(max_workers=1, forward_modules=False)
    asked = ["__main__", "os", f"{name}.sub", "sshexec._executor"]
    replies = executor.submit(tasks.fetch_from_client, asked).result(timeout=60)
    assert [kind for kind, _ in replies] == ["missing"] * len(asked)
    assert all("forward_modules=False" in detail for _, detail in replies)
    assert looked_up == [] and not imported.exists()
    assert name not in sys.modules


@pytest.fixture(scope="session")
def python_without_numpy(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("numpy")  # the client must have it for the message to name it
    venv = tmp_path_factory.mktemp("venv-no-numpy")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode != 0
    return python


def test_a_missing_compiled_package_names_package_host_and_interpreter(
    make_executor: Callable[..., SSHPoolExecutor], python_without_numpy: str
) -> None:
    executor = make_executor(max_workers=1, python=python_without_numpy)
    with pytest.raises(ModuleNotFoundError) as info:
        executor.submit(tasks.uses_numpy).result(timeout=30)
    message = str(info.value)
    assert "No module named 'numpy' on host " in message
    assert python_without_numpy in message  # the remote interpreter
    assert "compiled code" in message and "-m pip install numpy" in message
    host = executor.stats().hosts
    assert any(f"on host {name} " in message for name in host)


def test_prints_reach_stdout_and_stderr_prefixed_in_order(
    make_executor: Callable[..., SSHPoolExecutor], capfd: pytest.CaptureFixture[str]
) -> None:
    executor = make_executor()
    capfd.readouterr()
    assert executor.submit(tasks.say_lines, 50).result(timeout=30) == 50
    captured = capfd.readouterr()
    out = captured.out.splitlines()
    assert len(out) == 50, captured.out[-500:]
    prefixes = {line.split("] ", 1)[0] + "]" for line in out}
    assert len(prefixes) == 1 and re.fullmatch(r"\[.+:\d+\]", prefixes.pop())
    assert [line.split("] ", 1)[1] for line in out] == [f"out {i}" for i in range(50)]
    assert [line.split("] ", 1)[1] for line in captured.err.splitlines()] == ["err 49"]


def test_output_without_prefix(
    make_executor: Callable[..., SSHPoolExecutor], capfd: pytest.CaptureFixture[str]
) -> None:
    executor = make_executor(remote_output="plain")
    capfd.readouterr()
    executor.submit(tasks.say_lines, 3).result(timeout=30)
    captured = capfd.readouterr()
    assert captured.out.splitlines() == ["out 0", "out 1", "out 2"]
    assert captured.err.splitlines() == ["err 2"]


def test_output_only_to_logging(
    make_executor: Callable[..., SSHPoolExecutor],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sshexec.remote")
    executor = make_executor(remote_output="logging")
    capfd.readouterr()
    executor.submit(tasks.say_lines, 2).result(timeout=30)
    captured = capfd.readouterr()
    assert "out 0" not in captured.out and "err 1" not in captured.err
    records = [r for r in caplog.records if r.name == "sshexec.remote"]
    assert [(r.levelno, r.getMessage().split("] ", 1)[1]) for r in records] == [
        (logging.INFO, "out 0"),
        (logging.INFO, "out 1"),
        (logging.WARNING, "err 1"),
    ]
    assert all(r.worker.startswith(r.host + "#") for r in records)  # type: ignore[attr-defined]


def test_log_records_are_re_emitted_with_host_and_worker(
    make_executor: Callable[..., SSHPoolExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # before the executor: workers log at the client's level
    executor = make_executor(max_workers=1)
    executor.submit(tasks.log_things, "hello").result(timeout=30)
    mine = [r for r in caplog.records if r.name == "tests.remote"]
    assert [(r.levelname, r.getMessage()) for r in mine] == [
        ("INFO", "info hello 1"),
        ("ERROR", "failed hello"),
    ]
    info, error = mine
    assert info.funcName == "log_things" and info.pathname.endswith("tasks.py")
    assert error.exc_text is not None and "ZeroDivisionError" in error.exc_text
    host = next(iter(executor.stats().hosts))
    assert info.host == host and info.worker.startswith(host + "#")  # type: ignore[attr-defined]


def test_stats_per_host_and_worker(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    executor = make_executor(max_workers=2)
    assert sorted(executor.map(tasks.sleep_then, [0.05] * 6, range(6))) == list(range(6))
    with pytest.raises(ValueError):
        executor.submit(tasks.raise_value_error).result(timeout=30)
    stats = executor.stats()
    assert isinstance(stats, Stats)
    assert stats.tasks_done == 6 and stats.tasks_failed == 1
    assert stats.busy_seconds >= 6 * 0.05
    for host in stats.hosts.values():
        assert host.workers >= 1 and host.bytes_sent > 0 and host.bytes_received > 0
        assert host.rtt_seconds is not None and 0 < host.rtt_seconds < 5
    workers = list(stats.workers.values())
    assert sum(w.tasks_done for w in workers) == 6
    assert all(w.is_alive and w.pid > 0 for w in workers)
    busy = [w for w in workers if w.tasks_done]
    assert all(w.busy_seconds >= 0.045 * w.tasks_done for w in busy)
    assert all(
        w.mean_task_seconds == w.busy_seconds / (w.tasks_done + w.tasks_failed) for w in busy
    )
    table = stats.table(per_worker=True)
    assert all(name in table for name in stats.hosts) and "rtt ms" in table
    executor.shutdown()
    after = executor.stats()  # still available, with the workers gone
    assert after.tasks_done == 6 and all(not w.is_alive for w in after.workers.values())


def test_stats_count_retries_of_lost_tasks(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    executor = make_executor(max_workers=1, max_retries=1)
    with pytest.raises(WorkerLostError):
        executor.submit(tasks.hard_exit).result(timeout=60)
    assert executor.submit(tasks.square, 3).result(timeout=60) == 9
    host = next(iter(executor.stats().hosts.values()))
    assert (host.tasks_retried, host.tasks_failed, host.tasks_done) == (1, 1, 1)


def test_run_on_hosts_runs_once_on_every_host(
    make_executor: Callable[..., SSHPoolExecutor],
) -> None:
    executor = make_executor(max_workers=4)
    futures = executor.run_on_hosts(tasks.where)
    assert set(futures) == set(executor.stats().hosts)
    seen = {name: f.result(timeout=30) for name, f in futures.items()}
    if make_executor.kind == "ssh":  # type: ignore[attr-defined]
        # each sshd sets SSHEXEC_TEST_HOST: the task really ran on its own host
        assert sorted(where[0] for where in seen.values()) == ["alpha", "beta"]
    assert len({where[1] for where in seen.values()}) == len(seen)  # distinct pids


def test_repr_shows_hosts_and_workers(make_executor: Callable[..., SSHPoolExecutor]) -> None:
    executor = make_executor(max_workers=2)
    executor.submit(tasks.square, 1).result(timeout=30)
    text = repr(executor)
    assert text.startswith("<SSHPoolExecutor running workers=")
    assert all(f"{name}: " in text for name in executor.stats().hosts)
    executor.shutdown()
    assert "shut down" in repr(executor)


def test_a_pinned_task_fails_when_its_host_stays_down(start_server: Callable[..., Any]) -> None:
    good = start_server("pin-good")
    doomed = start_server("pin-doomed")
    kwargs = executor_kwargs([good, doomed], max_workers=2, reconnect_grace=2.0)
    with SSHPoolExecutor(**kwargs) as executor:
        executor.submit(tasks.square, 2).result(timeout=30)
        doomed.go_down()  # no new connections, and the open ones die
        futures = executor.run_on_hosts(tasks.sleep_then, 0.0, "ran")
        assert futures[good.spec].result(timeout=30) == "ran"
        # the stopped host never comes back: its task fails once the host is given up
        with pytest.raises((BrokenPool, WorkerLostError)):
            futures[doomed.spec].result(timeout=90)
