"""The worker loop, driven in-process over os.pipe() pairs: frames in, frames out."""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
from typing import Any, Callable, Iterator, List, Optional

import cloudpickle
import msgpack
import numpy
import pytest

from sshexec._node.namespaces import Namespaces
from sshexec._node.worker import Worker
from sshexec._wire import protocol as proto
from sshexec._wire.calls import loads, process_chunk, split_call

from . import tasks

TIMEOUT = 5.0
SEEN: List[Any] = []  # written by initializers that run in this same process


def remember(value: Any) -> None:
    SEEN.append(value)


def recall() -> List[Any]:
    return list(SEEN)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bytes:
    data: bytes = cloudpickle.dumps((fn, args, kwargs))
    return data


class Host:
    """The host's end of two pipes, with a Worker serving the other end in two threads."""

    def __init__(self, max_frame: int = proto.DEFAULT_MAX_FRAME) -> None:
        self.commands_r, self.commands_w = os.pipe()
        self.replies_r, self.replies_w = os.pipe()
        self.worker = Worker(self.commands_r, self.replies_w, eof_grace=0.0, max_frame=max_frame)
        self.decoder = proto.FrameDecoder()
        self.serve_error: Optional[BaseException] = None
        self.reader = threading.Thread(
            target=self.worker.watch,
            kwargs={"exit_on_eof": False},
            name="test-worker-watch",
            daemon=True,
        )
        self.server = threading.Thread(target=self._serve, name="test-worker-serve", daemon=True)
        self.reader.start()
        self.server.start()

    def _serve(self) -> None:
        try:
            self.worker.serve()
        except BaseException as exc:  # surfaced by the test through serve_error
            self.serve_error = exc

    def send(self, *messages: proto.Message) -> None:
        data = proto.frames(list(messages))
        while data:
            data = data[os.write(self.commands_w, data) :]

    def send_raw(self, data: bytes) -> None:
        os.write(self.commands_w, data)

    def receive(self, timeout: float = TIMEOUT) -> proto.Message:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.decoder.messages():
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.replies_r], [], [], remaining)[0]:
                raise AssertionError(f"no reply within {timeout}s")
            chunk = os.read(self.replies_r, 1 << 16)
            assert chunk, "reply stream closed"
            self.decoder.feed(chunk)

    def nothing_more(self, wait: float = 0.2) -> bool:
        if list(self.decoder.messages()):
            return False
        return not select.select([self.replies_r], [], [], wait)[0]

    def start(
        self,
        worker_id: str = "node1#0",
        initializer: bytes = b"",
        max_frame: int = proto.DEFAULT_MAX_FRAME,
        *then: proto.Message,
    ) -> None:
        """Take Hello, send Init and, in the same write, the messages ``then``."""
        hello = self.receive()
        assert isinstance(hello, proto.Hello)
        self.send(proto.Init(worker_id, initializer, max_frame, True, 30), *then)

    def run(self, task_id: int, payload: bytes) -> proto.Message:
        self.send(proto.Run(task_id, payload))
        return self.receive()

    def close_commands(self) -> None:
        if self.commands_w >= 0:
            os.close(self.commands_w)
            self.commands_w = -1

    def served(self, timeout: float = TIMEOUT) -> bool:
        self.server.join(timeout)
        return not self.server.is_alive()

    def close(self) -> None:
        self.close_commands()  # EOF: the reader ends, and serve() with it
        self.reader.join(TIMEOUT)
        self.server.join(TIMEOUT)
        for fd in (self.commands_r, self.replies_w, self.replies_r):
            os.close(fd)
        assert not self.reader.is_alive(), "reader did not end at EOF"
        assert not self.server.is_alive(), "serve() did not end at EOF"
        if self.serve_error is not None:
            raise self.serve_error


@pytest.fixture
def host() -> Iterator[Host]:
    # Init installs a FrameLogHandler on the root logger and a ClientFinder on
    # sys.meta_path, as it should in a worker process; here the worker shares the test
    # process, so both are taken back. Left behind, the handler wrote later tests' log
    # records as frames to its closed pipe's fd number, reused by then (e.g. by capfd).
    root = logging.getLogger()
    handlers, level, finders = root.handlers[:], root.level, sys.meta_path[:]
    h = Host()
    try:
        yield h
        h.close()
    finally:
        root.handlers[:], sys.meta_path[:] = handlers, finders
        root.setLevel(level)


@pytest.fixture
def ready(host: Host) -> Host:
    host.start()
    assert host.receive() == proto.Ready()
    return host


# ---- hello and init -------------------------------------------------------------------


def test_hello_comes_first_unasked(host: Host) -> None:
    hello = host.receive()
    assert isinstance(hello, proto.Hello)
    assert hello == proto.Hello(
        protocol=proto.PROTOCOL_VERSION,
        python="%d.%d.%d" % sys.version_info[:3],
        cloudpickle=cloudpickle.__version__,
        msgpack="%d.%d.%d" % msgpack.version[:3],
        pid=os.getpid(),
        hostname=socket.gethostname(),
        cpus=hello.cpus,
        executable=sys.executable,
    )
    assert 1 <= hello.cpus <= (os.cpu_count() or 1)
    assert host.nothing_more()


def test_init_without_initializer(host: Host) -> None:
    host.start("beta#4")
    assert host.receive() == proto.Ready()
    assert host.worker.worker_id == "beta#4"


def test_init_runs_the_initializer(host: Host) -> None:
    SEEN.clear()
    host.start(initializer=cloudpickle.dumps((remember, ("init-arg",))))
    assert host.receive() == proto.Ready()
    assert SEEN == ["init-arg"]
    done = host.run(1, call(recall))
    assert isinstance(done, proto.Done)
    assert cloudpickle.loads(done.payload) == ["init-arg"]
    SEEN.clear()


def test_failing_initializer_ends_serve(host: Host) -> None:
    host.start(initializer=cloudpickle.dumps((tasks.fail_init, ())))
    failed = host.receive()
    assert isinstance(failed, proto.Failed)
    assert failed.task_id == proto.INIT_TASK_ID == 0
    assert failed.type_name == "RuntimeError"
    assert failed.message == "initializer refuses"
    assert failed.traceback.startswith("host node1 ")
    assert "fail_init" in failed.traceback
    assert host.served(), "serve() kept going after its initializer failed"
    host.send(proto.Run(1, call(tasks.square, 3)))
    assert host.nothing_more()  # a worker whose initializer failed serves nothing


def test_unloadable_initializer_is_reported(host: Host) -> None:
    host.start(initializer=b"not a pickle")
    failed = host.receive()
    assert isinstance(failed, proto.Failed) and failed.task_id == 0
    assert host.served()


# ---- the command limit comes with Init -------------------------------------------------

MIB = 1 << 20


def big_run(task_id: int, size: int) -> proto.Run:
    """A Run whose frame is a little over ``size`` bytes: a call of ``tasks.nbytes``."""
    return proto.Run(task_id, call(tasks.nbytes, b"x" * size))


def frame_size(message: proto.Message) -> int:
    return len(proto.encode(message)) - proto.HEADER.size  # what the limit is checked on


@pytest.fixture
def small_default() -> Iterator[Host]:
    """A worker whose limit before Init is 1 MiB, in place of the 1 GiB default: frames
    "over the default" stay small enough for a test."""
    root = logging.getLogger()
    handlers, level, finders = root.handlers[:], root.level, sys.meta_path[:]
    h = Host(max_frame=MIB)
    try:
        yield h
        h.close()
    finally:
        root.handlers[:], sys.meta_path[:] = handlers, finders
        root.setLevel(level)


def test_a_call_over_the_default_limit_is_taken_when_init_allows_it(
    small_default: Host,
) -> None:
    run = big_run(1, 3 * MIB)
    assert frame_size(run) > small_default.worker.decoder.max_frame  # over the default
    # Init and the big Run in one write: the limit changes between two frames of a chunk
    small_default.start("node1#0", b"", 4 * MIB, run)
    assert small_default.receive() == proto.Ready()
    done = small_default.receive()
    assert isinstance(done, proto.Done) and cloudpickle.loads(done.payload) == 3 * MIB
    assert small_default.worker.max_frame == 4 * MIB  # and results may be as big


def test_without_init_raising_it_the_default_limit_holds(
    small_default: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    small_default.start("node1#0", b"", MIB)
    assert small_default.receive() == proto.Ready()
    frame = proto.encode(big_run(1, 3 * MIB))
    small_default.send_raw(frame[: 1 << 15])  # the claim alone is refused: no need for more
    assert small_default.served(), "the worker kept reading an oversize command stream"
    assert f"is outside 1..{MIB}" in capsys.readouterr().err


def test_a_call_over_inits_limit_is_refused(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    host.start("node1#0", b"", 2 * MIB)
    assert host.receive() == proto.Ready()
    assert host.run(1, call(tasks.nbytes, b"x" * MIB)) == proto.Done(1, cloudpickle.dumps(MIB))
    frame = proto.encode(big_run(2, 3 * MIB))
    assert 2 * MIB < len(frame) < proto.DEFAULT_MAX_FRAME  # under the default limit
    host.send_raw(frame[: 1 << 15])
    assert host.served(), "a command over Init's max_frame was not refused"
    assert "command stream broken" in (err := capsys.readouterr().err)
    assert f"is outside 1..{2 * MIB}" in err
    assert host.nothing_more()  # the Run was never answered


def test_an_init_with_an_impossible_limit_breaks_the_stream(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.start("node1#0", b"", 0)
    assert host.served()
    assert "Init: max_frame must be in 1.." in capsys.readouterr().err
    assert host.nothing_more()  # not even Ready: the Init was not taken


# ---- running tasks --------------------------------------------------------------------


def test_run_returns_done_with_the_pickled_result(ready: Host) -> None:
    done = ready.run(7, call(tasks.add, 2, b=40))
    assert isinstance(done, proto.Done)
    assert done.task_id == 7
    assert cloudpickle.loads(done.payload) == 42


def test_run_takes_a_split_call(ready: Host) -> None:
    by_value = cloudpickle.dumps(lambda a, b: (a, b))  # defined here: pickled by value
    array = numpy.arange(1 << 16, dtype=numpy.float64)
    pieces, sizes = split_call(by_value, ("x", array))
    assert len(pieces) == 2 and len(sizes) == 8  # the array travels out of band
    ready.send(proto.Run(8, pieces, sizes))
    done = ready.receive()
    assert isinstance(done, proto.Done) and len(done.buffers) == 8  # and comes back so
    text, back = loads(done.payload, done.buffers)
    assert text == "x" and numpy.array_equal(back, array)


def test_pipelined_runs_reply_in_order(ready: Host) -> None:
    ready.send(*(proto.Run(i, call(tasks.square, i)) for i in range(1, 21)))
    replies = [ready.receive() for _ in range(20)]
    assert [(r.task_id, cloudpickle.loads(r.payload)) for r in replies] == [  # type: ignore[union-attr]
        (i, i * i) for i in range(1, 21)
    ]


def test_a_run_the_watcher_queued_while_the_main_thread_waited_to_read_is_served(
    ready: Host,
) -> None:
    """The main thread found nothing queued and waited for the read lock while the
    watcher held it and queued a Run: it must serve that Run, not block in a read (a
    map's second item hung so, with every process idle)."""
    worker = ready.worker
    ready.send(proto.Run(1, call(tasks.sleep_then, 0.5, "first")))
    time.sleep(0.2)  # the main thread took Run 1 and runs it: it holds no lock
    with worker.read_lock:  # the watcher's place: it holds the lock while it reads
        ready.send(proto.Run(2, call(tasks.square, 3)))
        assert ready.receive() == proto.Done(1, cloudpickle.dumps("first"))
        time.sleep(0.3)  # the main thread found nothing queued and waits for the lock
        assert worker._read(0.0)  # as the watcher does: Run 2 is queued now
    assert ready.receive() == proto.Done(2, cloudpickle.dumps(9))


def test_raising_callable_returns_failed(ready: Host) -> None:
    failed = ready.run(3, call(tasks.raise_value_error, "bad value"))
    assert isinstance(failed, proto.Failed)
    assert failed.task_id == 3
    assert failed.type_name == "ValueError"
    assert failed.message == "bad value"
    first_line = failed.traceback.splitlines()[0]
    assert failed.traceback.startswith("host ")
    assert first_line == (
        f"host node1 (hostname {socket.gethostname()}), pid {os.getpid()}, worker node1#0"
    )
    assert "Traceback (most recent call last):" in failed.traceback
    assert "raise_value_error" in failed.traceback
    assert failed.traceback.rstrip().endswith("ValueError: bad value")
    exc = pickle.loads(failed.exception)
    assert type(exc) is ValueError and exc.args == ("bad value",)
    # the worker carries on
    assert ready.run(4, call(tasks.square, 5)) == proto.Done(4, cloudpickle.dumps(25))


def test_type_name_of_a_non_builtin_exception(ready: Host) -> None:
    failed = ready.run(1, call(tasks.raise_needs_args))
    assert isinstance(failed, proto.Failed)
    assert failed.type_name == "tests.tasks.NeedsArgs"
    assert failed.message == "3: needs args"
    assert failed.exception  # it pickles; whether it unpickles is the host's problem


def test_unpicklable_exception_gives_empty_blob(ready: Host) -> None:
    failed = ready.run(2, call(tasks.raise_unpicklable))
    assert isinstance(failed, proto.Failed)
    assert failed.exception == b""
    assert failed.type_name == "tests.tasks.Unpicklable"
    assert failed.message == "lock inside"
    assert failed.traceback.startswith("host node1 ")
    assert "raise_unpicklable" in failed.traceback


def test_unpicklable_result_gives_failed(ready: Host) -> None:
    failed = ready.run(5, call(tasks.return_lambda))
    assert isinstance(failed, proto.Failed)
    assert failed.task_id == 5
    assert failed.type_name == "TypeError"
    assert "pickle" in failed.message
    assert pickle.loads(failed.exception).args == (failed.message,)
    assert ready.run(6, call(tasks.square, 2)) == proto.Done(6, cloudpickle.dumps(4))


def test_unloadable_call_gives_failed(ready: Host) -> None:
    failed = ready.run(8, b"\x80\x05 this is not a pickle")
    assert isinstance(failed, proto.Failed) and failed.task_id == 8
    assert failed.type_name == "_pickle.UnpicklingError"
    assert "load key" in failed.message
    assert ready.run(9, call(tasks.square, 3)) == proto.Done(9, cloudpickle.dumps(9))


def test_system_exit_in_a_task_is_a_failure_not_an_exit(ready: Host) -> None:
    failed = ready.run(1, call(tasks.exit_with, 3))
    assert isinstance(failed, proto.Failed)
    assert failed.type_name == "SystemExit"
    assert pickle.loads(failed.exception).code == 3
    assert ready.run(2, call(tasks.square, 4)) == proto.Done(2, cloudpickle.dumps(16))


def test_exception_whose_str_fails(ready: Host) -> None:
    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    def raise_bad_str() -> None:
        raise BadStr()

    failed = ready.run(1, call(raise_bad_str))
    assert isinstance(failed, proto.Failed)
    assert failed.message == "<str() of BadStr failed>"
    assert failed.type_name.endswith("BadStr")


# ---- process_chunk --------------------------------------------------------------------


def test_process_chunk_directly() -> None:
    assert process_chunk(tasks.add, [(1, 2), (3, 4), (5,)]) == [3, 7, 5]
    assert process_chunk(tasks.square, []) == []
    assert process_chunk(tasks.square, iter([(2,), (3,)])) == [4, 9]
    with pytest.raises(ValueError, match="boom"):
        process_chunk(tasks.raise_value_error, [(), ()])


def test_process_chunk_as_a_task(ready: Host) -> None:
    done = ready.run(1, call(process_chunk, tasks.square, [(i,) for i in range(10)]))
    assert isinstance(done, proto.Done)
    assert cloudpickle.loads(done.payload) == [i * i for i in range(10)]


# ---- ending ---------------------------------------------------------------------------


def test_shutdown_ends_serve(ready: Host) -> None:
    ready.send(proto.Shutdown())
    assert ready.served()
    ready.reader.join(TIMEOUT)  # the watcher ends with serve(): the process ends next
    assert not ready.reader.is_alive()
    ready.send(proto.Run(1, call(tasks.square, 2)))
    assert ready.nothing_more()


def test_shutdown_after_queued_runs_answers_them_first(ready: Host) -> None:
    ready.send(proto.Run(1, call(tasks.square, 2)), proto.Run(2, call(tasks.square, 3)))
    ready.send(proto.Shutdown())
    assert [ready.receive(), ready.receive()] == [
        proto.Done(1, cloudpickle.dumps(4)),
        proto.Done(2, cloudpickle.dumps(9)),
    ]
    assert ready.served()


def test_eof_ends_serve(ready: Host) -> None:
    ready.close_commands()
    assert ready.served()
    ready.reader.join(TIMEOUT)
    assert not ready.reader.is_alive()


def test_broken_command_stream_ends_serve(ready: Host, capsys: pytest.CaptureFixture[str]) -> None:
    ready.send_raw(proto.HEADER.pack(4, 0) + b"\xc1\xc1\xc1\xc1")
    assert ready.served()
    ready.reader.join(TIMEOUT)
    assert not ready.reader.is_alive()
    assert "command stream broken" in capsys.readouterr().err


def test_unexpected_message_is_skipped(ready: Host, capsys: pytest.CaptureFixture[str]) -> None:
    ready.send(proto.Ready(), proto.Run(1, call(tasks.square, 6)))
    assert ready.receive() == proto.Done(1, cloudpickle.dumps(36))
    assert "unexpected Ready" in capsys.readouterr().err


# ---- stdio hygiene (needs its own process: it rewires fds 0 and 1) ---------------------


def test_claim_stdio_moves_frames_off_fd_1() -> None:
    script = textwrap.dedent(
        """
        import os, sys
        from sshexec._node.worker import _claim_stdio
        frames_in, frames_out = _claim_stdio()
        print("chatter", flush=True)      # fd 1 now goes to stderr
        os.write(1, b"raw chatter\\n")
        assert os.read(0, 10) == b""      # fd 0 is /dev/null now
        os.write(frames_out, b"FRAMES:" + os.read(frames_in, 100))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=b"from host",
        capture_output=True,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"FRAMES:from host"
    assert result.stderr == b"chatter\nraw chatter\n"


def test_a_task_sees_the_clients_values_except_what_the_worker_assigned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """By value (the client's Python): each call brings the values its globals had when
    it was pickled; what the initializer or a task assigned here wins from then on. (The
    worker's copy used to win after the first call: a changed global went unseen.)"""
    namespaces = Namespaces(lambda: types.ModuleType("unused"))

    def run(fn: Any, *args: Any) -> Any:
        fresh = cloudpickle.loads(cloudpickle.dumps(fn))  # tests.tasks: by value
        watched = namespaces.adopt((fresh, *args), {})
        try:
            return fresh(*args)
        finally:
            namespaces.keep(watched)

    monkeypatch.setattr(tasks, "_GLOBAL", "client 1")
    assert run(tasks.read_global) == "client 1"
    monkeypatch.setattr(tasks, "_GLOBAL", "client 2")
    assert run(tasks.read_global) == "client 2"
    run(tasks.set_global, "set here")  # an initializer's or a task's assignment
    monkeypatch.setattr(tasks, "_GLOBAL", "client 3")
    assert run(tasks.read_global) == "set here"


def test_carried_values_are_set_on_the_module_except_what_the_worker_assigned() -> None:
    """Another Python: the functions are the module's own, the values come with the call."""
    module: Any = types.ModuleType("__mp_main__")
    module.X, module.Y = "top level", "top level"
    namespaces = Namespaces(lambda: module)
    watched = namespaces.adopt((), {"__main__": {"X": "client", "Y": "client"}})
    assert (module.X, module.Y) == ("client", "client")
    module.X = "assigned here"  # what a task's `global X; X = ...` does
    namespaces.keep(watched)
    namespaces.keep(namespaces.adopt((), {"__main__": {"X": "client 2", "Y": "client 2"}}))
    assert (module.X, module.Y) == ("assigned here", "client 2")
