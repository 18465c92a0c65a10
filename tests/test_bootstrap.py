"""Stage 1, the bundle and the node cache, run for real in local interpreters."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import io
import marshal
import os
import re
import select
import shlex
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

import cloudpickle
import msgpack
import pytest

from sshexec import _bootstrap
from sshexec._bootstrap import (
    BUNDLE_LENGTH_BYTES,
    HAVE,
    MISSING_PYTHON_EXIT,
    NEED,
    NEED_SOURCE,
    WRONG_VERSION,
    bundle,
    bundle_hash,
    bundle_message,
    loader,
    remote_command,
    stage1_code,
)
from sshexec._wire import protocol as _protocol
from sshexec._wire.protocol import START_MARKER, FrameDecoder, Hello

TIMEOUT = 10.0


class Node:
    """One stage-1 run: an interpreter started with the loader, talked to over pipes."""

    def __init__(
        self, argv: Sequence[str], home: Path, tmp: Path, env: Optional[Dict[str, str]] = None
    ):
        self.stderr_path = tmp / f"stderr-{time.monotonic_ns()}.txt"
        self._stderr: IO[bytes] = open(self.stderr_path, "wb")  # closed in close()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=tmp,  # not /work/main: the worker must import sshexec from the bundle
            env=dict(env or os.environ, HOME=str(home)),
        )
        self.decoder = FrameDecoder()
        self.send(stage1_code())

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:  # the process already exited (e.g. no Python): its exit says why
            pass

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    @property
    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def _read_some(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no output from stage 1 within {TIMEOUT}s; stderr: {self.stderr}")
            if select.select([fd], [], [], remaining)[0]:
                return os.read(fd, n)

    def read_exact(self, n: int) -> bytes:
        deadline = time.monotonic() + TIMEOUT
        data = b""
        while len(data) < n:
            chunk = self._read_some(n - len(data), deadline)
            if not chunk:
                pytest.fail(f"EOF after {data!r}; stderr: {self.stderr}")
            data += chunk
        return data

    def read_to_eof(self) -> bytes:
        deadline = time.monotonic() + TIMEOUT
        data = b""
        while chunk := self._read_some(1 << 16, deadline):
            data += chunk
        return data

    def answer(self) -> bytes:
        """The byte after the start marker: HAVE or NEED."""
        data = self.read_exact(len(START_MARKER) + 1)
        assert data[: len(START_MARKER)] == START_MARKER, (data, self.stderr)
        return data[len(START_MARKER) :]

    def read_message(self) -> _protocol.Message:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for message in self.decoder.messages():
                return message
            chunk = self._read_some(1 << 16, deadline)
            if not chunk:
                pytest.fail(f"EOF before a frame; stderr: {self.stderr}")
            self.decoder.feed(chunk)

    def wait(self, timeout: float = 5.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"stage 1 / worker still running {timeout}s later; stderr: {self.stderr}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
        self._stderr.close()


@pytest.fixture
def nodes(tmp_path: Path) -> Any:
    started: List[Node] = []

    def start(home: Path, argv: Optional[Sequence[str]] = None, **kwargs: Any) -> Node:
        node = Node(argv or [sys.executable, "-c", loader()], home, tmp_path, **kwargs)
        started.append(node)
        return node

    yield start
    for node in started:
        node.close()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def cache_dir(home: Path) -> Path:
    return home / ".cache" / "sshexec"


def cache_file(home: Path) -> Path:
    return cache_dir(home) / f"{bundle_hash()}.zip"


def check_hello(message: _protocol.Message, node: Node, executable: str = sys.executable) -> None:
    assert isinstance(message, Hello)
    assert message == Hello(
        protocol=_protocol.PROTOCOL_VERSION,
        python="%d.%d.%d" % sys.version_info[:3],
        cloudpickle=cloudpickle.__version__,
        msgpack="%d.%d.%d" % msgpack.version[:3],
        pid=node.proc.pid,
        hostname=socket.gethostname(),
        cpus=message.cpus,
        executable=executable,
    )
    assert message.cpus >= 1


def hand_over_bundle(node: Node) -> None:
    assert node.answer() == NEED
    node.send(bundle_message())
    check_hello(node.read_message(), node)


def worker_replies(node: Node, commands: List[_protocol.Message], count: int) -> List[Any]:
    """Have the node's agent fork a worker, send it ``commands``, and return its first
    ``count`` replies after its Hello (the agent relays them in Data frames)."""
    node.send(_protocol.encode(_protocol.Spawn(1)))
    spawned = node.read_message()
    assert isinstance(spawned, _protocol.Spawned) and spawned.slot == 1, spawned
    node.send(_protocol.encode(_protocol.Data(1, 0, _protocol.frames(commands))))
    worker = FrameDecoder()
    replies: List[Any] = []
    while len(replies) < count + 1:
        message = node.read_message()
        if isinstance(message, _protocol.Data) and message.stream == 1:
            worker.feed(bytes(message.data))  # type: ignore[arg-type]
            replies += list(worker.messages())
    hello = replies.pop(0)
    assert isinstance(hello, Hello) and hello.pid == spawned.pid  # forked: a pid of its own
    return replies


def finish(node: Node) -> None:
    """Close stdin after the Hello: the agent (and any worker it forked) must go, promptly
    and cleanly, saying nothing more than how its workers ended."""
    node.close_stdin()
    node.decoder.feed(node.read_to_eof())
    said = list(node.decoder.messages())
    node.decoder.end()
    assert all(isinstance(m, (_protocol.Exited, _protocol.Data)) for m in said), said
    assert node.wait() == 0, node.stderr


# ---- the bundle -----------------------------------------------------------------------


def test_bundle_is_deterministic() -> None:
    fresh = [_bootstrap.bundle.__wrapped__() for _ in range(2)]  # bypass the lru_cache
    assert fresh[0] == fresh[1] == bundle()
    assert bundle_hash() == hashlib.sha256(fresh[0]).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", bundle_hash())


def test_bundle_contents() -> None:
    archive = zipfile.ZipFile(io.BytesIO(bundle()))
    assert archive.testzip() is None
    names = archive.namelist()
    assert len(names) == len(set(names))
    here = Path(_bootstrap.__file__).parent
    shipped = sorted(
        f"sshexec/{p.relative_to(here).as_posix()}"
        for folder in ("_wire", "_node")
        for p in (here / folder).glob("*.py")
    )
    assert "sshexec/_wire/protocol.py" in shipped and "sshexec/_node/worker.py" in shipped
    for name in shipped:  # the two folders, whole, as they are in this checkout
        assert archive.read(name) == (here / name[len("sshexec/") :]).read_bytes()
    ours = sorted(n for n in names if n.startswith("sshexec/") and n.endswith(".py"))
    assert ours == sorted(["sshexec/__init__.py", "sshexec/_public.py", *shipped])
    assert not any(n.startswith("sshexec/") and "_executor" in n for n in names)
    for needed in (
        "cloudpickle/__init__.py",
        "cloudpickle/cloudpickle.py",
        "msgpack/__init__.py",
        "msgpack/fallback.py",
        "msgpack/exceptions.py",
        "msgpack/ext.py",
    ):
        assert needed in names, needed
    sources = [n for n in names if n.endswith(".py")]
    # beside each source, its code for this interpreter; no .so, .pyd, .pyx
    assert sorted(names) == sorted(sources + [n + "c" for n in sources]), names
    assert not [n for n in names if "_cmsgpack" in n or "__pycache__" in n]
    for name in sources:
        compiled = archive.read(name + "c")
        assert compiled[:4] == importlib.util.MAGIC_NUMBER
        code = marshal.loads(compiled[4:])
        assert code.co_filename == "sshexec-bundle/" + name
    for info in archive.infolist():
        assert info.date_time == (2020, 1, 1, 0, 0, 0)


def test_bundle_message_is_length_prefixed() -> None:
    message = bundle_message()
    length = int.from_bytes(message[:BUNDLE_LENGTH_BYTES], "big")
    assert length == len(bundle())
    assert message[BUNDLE_LENGTH_BYTES:] == bundle()


# ---- the command line -----------------------------------------------------------------


def test_remote_command_keeps_stage1_off_the_command_line() -> None:
    command = remote_command(None)
    assert len(command) < 1024
    assert stage1_code() not in command.encode()
    for piece in (bundle_hash(), "MetaPathFinder", "makedirs", "sshexec._node.worker"):
        assert piece not in command
    words = shlex.split(command)
    assert words[:3] == ["exec", "/bin/sh", "-c"] and len(words) == 4
    script = words[3]
    assert shlex.quote(loader()) in script
    assert f"python{_bootstrap.client_version()} python3" in script
    assert str(len(stage1_code())) in loader()  # the loader reads exactly stage 1


def test_interpreters_and_local_argv() -> None:
    version = "%d.%d" % sys.version_info[:2]
    assert _bootstrap.interpreters(None) == (f"python{version}", "python3")
    assert _bootstrap.interpreters("/opt/py/bin/python3") == ("/opt/py/bin/python3",)
    assert list(_bootstrap.local_argv()) == [sys.executable, "-c", loader()]
    assert list(_bootstrap.local_argv("/x/python")) == ["/x/python", "-c", loader()]
    command = remote_command("/opt/my python/bin/python3")
    assert "python3.11 python3" not in command
    assert shlex.quote("/opt/my python/bin/python3") in shlex.split(command)[3]


def test_remote_command_runs_under_sh(nodes: Any, home: Path) -> None:
    node = nodes(home, ["/bin/sh", "-c", remote_command(sys.executable)])
    hand_over_bundle(node)
    finish(node)


def test_remote_command_falls_back_to_python3(nodes: Any, home: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)  # no python3.X on this PATH
    env = dict(os.environ, PATH=str(bin_dir))
    node = nodes(home, ["/bin/sh", "-c", remote_command(None)], env=env)
    assert node.answer() == NEED
    node.send(bundle_message())
    check_hello(node.read_message(), node, executable=str(bin_dir / "python3"))
    finish(node)


def test_remote_command_without_python(nodes: Any, home: Path, tmp_path: Path) -> None:
    node = nodes(home, ["/bin/sh", "-c", remote_command("sshexec-no-such-python")])
    assert node.read_to_eof() == b""
    assert node.wait() == MISSING_PYTHON_EXIT
    assert "no usable Python on PATH (tried sshexec-no-such-python)" in node.stderr


# ---- stage 1 and the cache ------------------------------------------------------------


def test_first_run_takes_the_bundle_and_fills_the_cache(nodes: Any, home: Path) -> None:
    assert not cache_dir(home).exists()
    node = nodes(home)
    hand_over_bundle(node)
    assert stat.S_IMODE(cache_dir(home).stat().st_mode) == 0o700
    assert stat.S_IMODE(cache_file(home).stat().st_mode) == 0o600
    assert cache_file(home).read_bytes() == bundle()
    assert [p.name for p in cache_dir(home).iterdir()] == [cache_file(home).name]  # no temp left
    finish(node)


def fake_packages(root: Path) -> Path:
    """A msgpack too old for the protocol and a cloudpickle of another version."""
    for name, text in (
        ("msgpack", "version = (0, 6, 2)\n"),
        ("cloudpickle", "__version__ = '0.0'\n"),
    ):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(text)
    return root


@pytest.mark.parametrize("node_has", ["same-packages", "no-site-packages", "other-versions"])
def test_second_run_hits_the_cache_and_picks_the_codec(
    nodes: Any, home: Path, tmp_path: Path, node_has: str
) -> None:
    first = nodes(home)
    hand_over_bundle(first)
    finish(first)

    argv, env = [sys.executable, "-c", loader()], None
    if node_has == "no-site-packages":
        argv.insert(1, "-S")
    elif node_has == "other-versions":
        env = dict(os.environ, PYTHONPATH=str(fake_packages(tmp_path / "old")))
    second = nodes(home, argv, env=env)
    assert second.answer() == HAVE  # nothing more is sent before the Hello
    check_hello(second.read_message(), second)
    probe = (
        "(__import__('msgpack').Unpacker.__module__,"
        " __import__('msgpack').__spec__.origin,"
        " __import__('sshexec._node.worker').__spec__.origin,"
        " __import__('cloudpickle').__spec__.origin)"
    )
    payload = cloudpickle.dumps((eval, (probe,), {}))
    init = _protocol.Init("local#0", b"", 1 << 20, True, 30)
    ready, done = worker_replies(second, [init, _protocol.Run(1, payload)], 2)
    assert ready == _protocol.Ready()
    assert isinstance(done, _protocol.Done) and done.task_id == 1
    unpacker, codec, worker, pickler = cloudpickle.loads(done.payload)
    assert worker == "sshexec-bundle/sshexec/__init__.py"  # the bundle's, never this checkout
    if node_has == "same-packages":
        # the node's own msgpack (compiled, unless it is one whose C extension does not build
        # for this Python, as msgpack < 1.0.4 on 3.11) and identical cloudpickle
        assert codec == msgpack.__spec__.origin
        assert unpacker == msgpack.Unpacker.__module__
        assert pickler == cloudpickle.__spec__.origin
    else:  # the C extension never ships: the bundle's pure-Python copies run
        assert (unpacker, codec, pickler) == (
            "msgpack.fallback",
            "sshexec-bundle/msgpack/__init__.py",
            "sshexec-bundle/cloudpickle/__init__.py",
        )
    second.send(_protocol.encode(_protocol.Shutdown()))
    assert second.wait() == 0, second.stderr


@pytest.mark.parametrize("magic", ["this-python", "another-python"])
def test_the_bundle_code_runs_uncompiled_when_the_magic_matches(
    nodes: Any, home: Path, monkeypatch: pytest.MonkeyPatch, magic: str
) -> None:
    real = _bootstrap._compiled

    def marked(name: str, source: bytes) -> bytes:  # code that says it was not compiled
        compiled = real(name, source + b"\nFROM_BUNDLE_CODE = True\n")
        return compiled if magic == "this-python" else b"\x00\x00\r\n" + compiled[4:]

    caches = (_bootstrap.bundle, _bootstrap.bundle_hash, _bootstrap.stage1_code)
    monkeypatch.setattr(_bootstrap, "_compiled", marked)
    for cached in caches:
        cached.cache_clear()
    try:
        node = nodes(home)
        hand_over_bundle(node)
        probe = "hasattr(__import__('sshexec._node.worker').__dict__['_node'].worker, 'FROM_BUNDLE_CODE')"
        commands: List[_protocol.Message] = [
            _protocol.Init("local#0", b"", 1 << 20, True, 30),
            _protocol.Run(1, cloudpickle.dumps((eval, (probe,), {}))),
        ]
        ready, done = worker_replies(node, commands, 2)
        assert ready == _protocol.Ready()
        assert isinstance(done, _protocol.Done), done
        assert cloudpickle.loads(done.payload) is (magic == "this-python")
        finish(node)
    finally:
        for cached in caches:
            cached.cache_clear()


def test_tampered_cache_file_is_not_used(nodes: Any, home: Path) -> None:
    cache_dir(home).mkdir(parents=True, mode=0o700)
    cache_dir(home).chmod(0o700)
    cache_file(home).write_bytes(b"PK\x03\x04 not the bundle")
    node = nodes(home)
    hand_over_bundle(node)
    assert cache_file(home).read_bytes() == bundle()  # replaced by the verified bundle
    finish(node)


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701], ids=oct)
def test_cache_dir_open_to_others_is_not_trusted(nodes: Any, home: Path, mode: int) -> None:
    cache_dir(home).mkdir(parents=True)
    cache_file(home).write_bytes(bundle())  # even the right bundle is ignored there
    cache_dir(home).chmod(mode)
    node = nodes(home)
    hand_over_bundle(node)
    assert stat.S_IMODE(cache_dir(home).stat().st_mode) == mode  # left as it was
    assert [p.name for p in cache_dir(home).iterdir()] == [cache_file(home).name]
    finish(node)


def test_unusable_home_still_starts(nodes: Any, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "home-is-a-file"
    not_a_dir.write_text("")
    node = nodes(not_a_dir)
    hand_over_bundle(node)
    finish(node)


def test_bundle_with_wrong_hash_is_refused(nodes: Any, home: Path) -> None:
    node = nodes(home)
    assert node.answer() == NEED
    forged = bundle()[:-1] + bytes([bundle()[-1] ^ 1])
    node.send(len(forged).to_bytes(BUNDLE_LENGTH_BYTES, "big") + forged)
    assert node.read_to_eof() == b""
    assert node.wait() == 1
    assert "bundle hash mismatch" in node.stderr
    assert not cache_file(home).exists()


def test_eof_instead_of_bundle(nodes: Any, home: Path) -> None:
    node = nodes(home)
    assert node.answer() == NEED
    node.send(bundle_message()[:1000])
    node.close_stdin()
    assert node.read_to_eof() == b""
    assert node.wait() == 4


# ---- a Python of another version ------------------------------------------------------


def other_pythons() -> List[Tuple[str, str]]:
    """(path, "3.X") of installed interpreters whose minor differs from ours, one per minor,
    in glob order (the first is the brief's "first whose minor differs")."""
    found: List[Tuple[str, str]] = []
    seen = {"%d.%d" % sys.version_info[:2]}
    for path in [
        *glob.glob("/root/.pyenv/versions/*/bin/python3.*"),
        *glob.glob("/usr/bin/python3.*"),
    ]:
        match = re.search(r"python(3\.\d+)$", path)
        if match and match.group(1) not in seen and os.access(path, os.X_OK):
            seen.add(match.group(1))
            found.append((path, match.group(1)))
    return found


OTHER_PYTHONS = other_pythons()


def test_there_is_another_python_to_check_against() -> None:
    if not OTHER_PYTHONS:
        pytest.skip("no python3.X of another minor version in /root/.pyenv/versions or /usr/bin")
    assert OTHER_PYTHONS[0][1] != "%d.%d" % sys.version_info[:2]


def version_of(python: str) -> str:
    return subprocess.run(
        [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True,
        check=True,
        timeout=TIMEOUT,
        text=True,
    ).stdout.strip()


@pytest.mark.parametrize("python, minor", OTHER_PYTHONS, ids=[m for _, m in OTHER_PYTHONS])
def test_another_python_gets_the_sources_alone(
    nodes: Any, home: Path, python: str, minor: str
) -> None:
    version = version_of(python)
    assert version.startswith(minor + ".")
    node = nodes(home, [python, "-c", loader()])
    if tuple(map(int, minor.split("."))) < _bootstrap.OLDEST:  # too old: reported, no bundle
        assert node.read_to_eof() == START_MARKER + WRONG_VERSION + version.encode()
        assert node.wait() == 3, node.stderr
        assert node.stderr == ""  # reported, not a SyntaxError
        assert not cache_dir(home).exists()
        return
    assert node.answer() == NEED_SOURCE  # this client's byte code is of no use there
    node.send(bundle_message(compiled=False))
    hello = node.read_message()
    assert isinstance(hello, Hello) and hello.python == version and hello.pid == node.proc.pid
    finish(node)
    cached = cache_dir(home) / f"{bundle_hash(compiled=False)}.zip"
    assert cached.read_bytes() == bundle(compiled=False)
    names = zipfile.ZipFile(cached).namelist()
    assert "sshexec/_node/agent.py" in names and not any(n.endswith(".pyc") for n in names)


@pytest.mark.parametrize("old", ["2.7", "3.6"])
def test_too_old_a_python_is_reported(nodes: Any, home: Path, old: str) -> None:
    paths = sorted(glob.glob(f"/root/.pyenv/versions/{old}.*/bin/python"))
    if not paths:
        pytest.skip(f"no Python {old} in /root/.pyenv/versions")
    node = nodes(home, [paths[-1], "-c", loader()])
    assert node.read_to_eof() == START_MARKER + WRONG_VERSION + version_of(paths[-1]).encode()
    assert node.wait() == 3, node.stderr
    assert node.stderr == ""  # reported, not a SyntaxError (stage 1 parses on any Python)
