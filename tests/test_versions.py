"""Any Python 3.9+ on the nodes: what travels between versions, and what needs the
client's. The nodes are real sshd hosts whose workers run another interpreter
(``Host(python=...)``: pyenv's 3.9, 3.10, 3.12, 3.13 beside the client's); run under
another client version (CI does, with 3.9 and 3.13) the same tests cover the others."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

from sshexec import Host, PythonVersionError, SSHPoolExecutor, WorkerStartupError, parse_host

from . import tasks
from .sshd import Client, SSHServer, executor_kwargs
from .test_cli import run_cli, ssh_args, table_row

CLIENT = "%d.%d" % sys.version_info[:2]
SUPPORTED = ("3.9", "3.10", "3.11", "3.12", "3.13")
REQUIRE_ENV = "SSHEXEC_REQUIRE_PYTHONS"  # set by .ci/run: a missing interpreter fails


def interpreter(minor: str) -> Optional[str]:
    """A Python of that minor version on this machine: pyenv's, else on PATH."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(glob.glob(str(root / f"{minor}.*" / "bin" / "python")))
    return found[-1] if found else shutil.which(f"python{minor}")


def need(minor: str) -> str:
    path = interpreter(minor)
    if path is None:
        message = (
            f"Python {minor} not found here (pyenv install {minor}, or put python{minor} on PATH)"
        )
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{message}; {REQUIRE_ENV} is set")
        pytest.skip(message)
    return path


@pytest.fixture(params=[v for v in SUPPORTED if v != CLIENT])
def other(request: pytest.FixtureRequest) -> str:
    """(A path to) a node Python of another minor version than the client's."""
    return need(request.param)


def on(server: SSHServer, python: Optional[str], workers: int = 2) -> Host:
    return dataclasses.replace(parse_host(server.spec), workers=workers, python=python)


def executor_on(servers: List[SSHServer], hosts: List[Host], made: List[Any]) -> SSHPoolExecutor:
    executor = SSHPoolExecutor(**executor_kwargs(servers, hosts=hosts))
    made.append(executor)
    return executor


def version_of(python: str) -> str:
    done = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def run_script(
    tmp_path: Path, text: str, kwargs: Dict[str, Any], timeout: float = 120, **env: str
) -> Any:
    """Run ``text`` as a script (its ``__main__``) with the executor's arguments in
    ``KW``; the JSON on its last line of output."""
    script = tmp_path / "job.py"
    script.write_text(text)
    done = subprocess.run(
        [sys.executable, str(script)],
        env={
            **os.environ,
            "KW": json.dumps(kwargs),
            "PYTHONPATH": str(Path(__file__).parent.parent),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def client_module(tmp_path: Path) -> Iterator[Any]:
    """A module importable here only: its functions travel by reference, its source is
    forwarded to a node that lacks it, and the node's Python compiles it."""
    name = f"only_here_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import platform, time\n\n"
        "def twice(x):\n    return 2 * x, platform.python_version()\n\n"
        "def python(seconds):\n    time.sleep(seconds)\n    return platform.python_version()\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield __import__(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


# ---- what travels --------------------------------------------------------------------


@pytest.mark.ssh
def test_a_client_only_modules_function_runs_there(
    sshd_pair: List[SSHServer], other: str, client_module: Any, made: List[Any]
) -> None:
    ex = executor_on(sshd_pair[:1], [on(sshd_pair[0], other)], made)
    got = list(ex.map(client_module.twice, range(6)))
    assert [x for x, _ in got] == [2 * i for i in range(6)]
    assert {v for _, v in got} == {version_of(other)}


SCRIPT = textwrap.dedent(
    """
    import json, os, platform, sys
    from dataclasses import dataclass
    from sshexec import SSHPoolExecutor

    @dataclass
    class Point:
        x: int
        y: int

    class Refused(Exception):
        def __init__(self, why):
            super().__init__(why)
            self.why = why

    def shifted(p):
        return Point(p.x + 1, p.y * 2), platform.python_version()

    def refuse(why):
        raise Refused(why)

    if __name__ == "__main__":  # as with multiprocessing's spawn: the nodes run the rest
        kwargs = json.loads(os.environ["KW"])
        with SSHPoolExecutor(**kwargs) as ex:
            results = list(ex.map(shifted, [Point(i, i) for i in range(4)]))
            assert all(type(p) is Point for p, _ in results)  # this script's class again
            try:
                ex.submit(refuse, "no thanks").result(timeout=60)
                raised = None
            except Refused as exc:  # the script's own exception class, rebuilt here
                raised = [type(exc).__name__, exc.why, "no thanks" in str(exc.__cause__)]
            stats = ex.stats(refresh=0)
        print(json.dumps({
            "points": [[p.x, p.y] for p, _ in results],
            "versions": sorted({v for _, v in results}),
            "raised": raised,
            "python": [h.python for h in stats.hosts.values()],
        }))
    """
)


@pytest.mark.ssh
def test_a_scripts_functions_classes_and_exceptions_travel(
    sshd_pair: List[SSHServer], other: str, tmp_path: Path
) -> None:
    """``__main__``'s functions, a dataclass as argument and result, and an exception class
    defined in the script: the node runs the script as ``__mp_main__`` (spawn's way)."""
    kwargs = executor_kwargs(sshd_pair[:1], python=other, max_workers=2)
    got = run_script(tmp_path, SCRIPT, kwargs)
    assert got["points"] == [[i + 1, 2 * i] for i in range(4)]
    assert got["versions"] == [version_of(other)]
    assert got["raised"] == ["Refused", "no thanks", True]
    assert got["python"] == [version_of(other)]


GLOBALS_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, os, platform
    from sshexec import SSHPoolExecutor, parse_host

    SCALE = 1
    STATE = "top level"

    def scaled(x):
        return x * SCALE, platform.python_version()

    def remember(value):
        global STATE
        STATE = value

    def state(_):
        return STATE, platform.python_version()

    if __name__ == "__main__":
        SCALE = 10  # the nodes of another Python run the top level, not this
        kwargs = json.loads(os.environ["KW"])
        pythons = json.loads(os.environ["PYTHONS"])
        kwargs["hosts"] = [
            dataclasses.replace(parse_host(h), python=p, workers=1)
            for h, p in zip(kwargs["hosts"], pythons)
        ]
        got = {}
        with SSHPoolExecutor(**kwargs) as ex:
            got["main"] = sorted(set(ex.map(scaled, [1] * 40, chunksize=1)))
            SCALE = 20  # changed between calls: the next calls see it everywhere
            got["changed"] = sorted(set(ex.map(scaled, [1] * 40, chunksize=1)))
            got["submitted"] = sorted({ex.submit(scaled, 1).result(60) for _ in range(20)})
        with SSHPoolExecutor(initializer=remember, initargs=("init",), **kwargs) as ex:
            got["initializer"] = sorted(set(ex.map(state, range(40), chunksize=1)))
        print(json.dumps(got))
    """
)


@pytest.mark.ssh
def test_main_globals_have_one_meaning_in_a_mixed_pool(
    sshd_pair: List[SSHServer], other: str, tmp_path: Path
) -> None:
    """A task sees the values of the ``__main__`` globals it reads that the client had
    when the call was pickled (a global changed under ``if __name__ == "__main__":`` or
    between calls), except names the initializer or an earlier task on that worker
    assigned: on workers of the client's Python and of another alike (those saw the
    script's top-level value, the client's Python the first value it was sent)."""
    pythons = json.dumps([sys.executable, other])
    got = run_script(tmp_path, GLOBALS_SCRIPT, executor_kwargs(sshd_pair), 300, PYTHONS=pythons)
    mine, theirs = version_of(sys.executable), version_of(other)
    both = sorted([mine, theirs])
    assert got["main"] == [[10, v] for v in both]
    assert got["changed"] == [[20, v] for v in both]
    assert {value for value, _ in got["submitted"]} == {20}
    assert got["initializer"] == [["init", v] for v in both]


NO_FORWARDING_SCRIPT = textwrap.dedent(
    """
    import json, os
    from sshexec import CallDecodeError, SSHPoolExecutor

    def echo(x):
        return x

    if __name__ == "__main__":
        with SSHPoolExecutor(forward_modules=False, **json.loads(os.environ["KW"])) as ex:
            try:
                print(json.dumps(["ran", ex.submit(echo, 1).result(timeout=60)]))
            except CallDecodeError as exc:
                print(json.dumps(["refused", str(exc)]))
    """
)


@pytest.mark.ssh
def test_without_forwarding_a_script_function_fails_naming_host_and_flag(
    sshd_pair: List[SSHServer], other: str, tmp_path: Path
) -> None:
    """A node of another Python needs the script to run its functions; with
    ``forward_modules=False`` the client does not send it (it used to, whatever the flag)."""
    kwargs = executor_kwargs(sshd_pair[:1], python=other, max_workers=1)
    outcome, message = run_script(tmp_path, NO_FORWARDING_SCRIPT, kwargs)
    assert outcome == "refused"
    assert f"host {sshd_pair[0].spec}" in message and "forward_modules=False" in message
    assert "__main__" in message


@pytest.mark.ssh
def test_a_lambda_runs_only_where_the_clients_python_runs(
    sshd_pair: List[SSHServer], other: str, client_module: Any, made: List[Any]
) -> None:
    """A mixed pool: code that exists only as code goes to the workers of the client's
    version; the rest runs everywhere."""
    ex = executor_on(sshd_pair, [on(sshd_pair[0], sys.executable), on(sshd_pair[1], other)], made)
    everywhere = set(ex.map(client_module.python, [0.05] * 40))
    assert everywhere == {version_of(sys.executable), version_of(other)}
    only_mine = set(ex.map(lambda _: __import__("platform").python_version(), range(40)))
    assert only_mine == {version_of(sys.executable)}


@pytest.mark.ssh
def test_a_lambda_no_host_can_run_fails_saying_why(
    sshd_pair: List[SSHServer], other: str, made: List[Any]
) -> None:
    ex = executor_on(sshd_pair[:1], [on(sshd_pair[0], other)], made)
    with pytest.raises(PythonVersionError) as info:
        ex.submit(lambda: 1).result(timeout=30)
    message = str(info.value)
    assert "<lambda>" in message and f"{Path(__file__).name}:" in message  # what and where
    assert CLIENT in message and version_of(other) in message  # both versions
    assert "module level" in message and f"python{CLIENT}" in message  # the fixes
    assert ex.submit(tasks.square, 7).result(timeout=30) == 49  # the pool is fine: a
    # function of a module pickled by value (tests.tasks is) travels by reference there


@pytest.mark.ssh
@pytest.mark.parametrize("old", ["2.7", "3.6"])
def test_too_old_a_python_is_refused(sshd_pair: List[SSHServer], old: str) -> None:
    python = need(old)
    with pytest.raises(WorkerStartupError) as info:
        SSHPoolExecutor(**executor_kwargs(sshd_pair[:1], hosts=[on(sshd_pair[0], python)]))
    error = info.value
    assert error.stage == "interpreter"
    assert f"Python {version_of(python)}" in str(error)
    assert "3.9 or newer" in str(error) and "python=" in str(error)


@pytest.mark.ssh
def test_each_hosts_python_is_shown(
    sshd_pair: List[SSHServer], other: str, made: List[Any]
) -> None:
    ex = executor_on(sshd_pair, [on(sshd_pair[0], sys.executable), on(sshd_pair[1], other)], made)
    versions = {h.host: h.python for h in ex.stats(refresh=0).hosts.values()}
    assert versions == {
        sshd_pair[0].spec: version_of(sys.executable),
        sshd_pair[1].spec: version_of(other),
    }
    assert version_of(other) in repr(ex) and version_of(sys.executable) in repr(ex)


@pytest.mark.ssh
@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])
def test_check_says_same_portable_or_too_old(
    sshd_pair: List[SSHServer], ssh_client: Client, transport: str
) -> None:
    server = sshd_pair[0]
    other = need(next(v for v in SUPPORTED if v != CLIENT))
    args = ssh_args(ssh_client, transport=transport)
    for python, fit, status in ((sys.executable, "same", 0), (other, "portable", 0)):
        result = run_cli("check", server.spec, *args, "--python", python)
        assert result.returncode == status, result.stdout + result.stderr
        assert table_row(result.stdout, server.spec)[5] == fit
    old = interpreter("3.6") or interpreter("2.7")
    if old is None:
        pytest.skip("no Python older than 3.9 here to check the refusal with")
    result = run_cli("check", server.spec, *args, "--python", old)
    assert result.returncode == 1
    assert table_row(result.stdout, server.spec)[5] == "too old"
    assert "3.9 or newer" in result.stdout
