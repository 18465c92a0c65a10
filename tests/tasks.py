"""Callables the tests run on workers. conftest registers this module with
cloudpickle.register_pickle_by_value, so nodes need no copy of the test suite."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, List, Tuple


def square(x: int) -> int:
    return x * x


def add(a: Any, b: Any = 0) -> Any:
    return a + b


def nbytes(data: Any) -> int:
    """Size of a bytes-like or numpy argument."""
    return int(getattr(data, "nbytes", None) or len(data))


def where(x: Any = None) -> Tuple[str, int, Any]:
    """Which host (sshd's SSHEXEC_TEST_HOST, or 'local') and pid ran this."""
    return os.environ.get("SSHEXEC_TEST_HOST", "local"), os.getpid(), x


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def raise_value_error(message: str = "boom") -> None:
    raise ValueError(message)


def say(text: str) -> str:
    print(text)
    print(f"err:{text}", file=sys.stderr)
    sys.stdout.flush()
    return text


def exit_with(code: int) -> None:
    sys.exit(code)


def hard_exit(code: int = 7) -> None:
    os._exit(code)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def kill_self_after(seconds: float) -> None:
    time.sleep(seconds)
    os.kill(os.getpid(), 9)


def return_lambda() -> Any:
    import threading

    return threading.Lock()  # cannot be pickled back


class NeedsArgs(Exception):
    """An exception whose __init__ needs arguments: pickles, but cannot be unpickled."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(f"{code}: {why}")
        self.code = code


def raise_needs_args() -> None:
    raise NeedsArgs(3, "needs args")


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        import threading

        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise Unpicklable("lock inside")


def record_pid(path: str) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def init_marker(value: str) -> None:
    os.environ["SSHEXEC_INIT_MARKER"] = value


def read_marker(_: Any = None) -> str:
    return os.environ.get("SSHEXEC_INIT_MARKER", "")


def fail_init() -> None:
    raise RuntimeError("initializer refuses")


def big(n: int) -> bytes:
    return b"x" * n


def sleep_then_where(seconds: float) -> Tuple[str, int, Any]:
    time.sleep(seconds)
    return where()


def allocate_in_cgroup(group: str, size: int) -> int:
    """Join a memory cgroup, then allocate past its limit: the kernel OOM-kills us."""
    with open(os.path.join(group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    chunks = [bytearray(16 << 20) for _ in range(size // (16 << 20))]
    return len(chunks)


def slow_on(spec: Tuple[str, float, float]) -> str:
    """Sleep ``slow`` seconds on the named test host, ``fast`` elsewhere."""
    host, slow, fast = spec
    here = os.environ.get("SSHEXEC_TEST_HOST", "local")
    time.sleep(slow if here == host else fast)
    return here


def write_garbage_frame() -> None:
    """Write a frame header claiming 4 GiB onto the worker's private frame fd."""
    for fd in range(3, 64):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == os.readlink("/proc/self/fd/2") or target.startswith("/"):
            continue
        try:
            os.fstat(fd)
            if fd > 3:  # frames_in is dup(0) == 3; frames_out is dup(1) == 4
                os.write(fd, b"\xff\xff\xff\xffgarbage")
                time.sleep(5)
                return
        except OSError:
            continue


def say_lines(n: int) -> int:
    for i in range(n):
        print(f"out {i}")
    print(f"err {n - 1}", file=sys.stderr)
    return n


def log_things(word: str) -> str:
    log = logging.getLogger("tests.remote")
    log.info("info %s %d", word, 1)
    log.debug("below the client's level: never sent")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("failed %s", word)
    return word


def uses_numpy() -> float:
    import numpy

    return float(numpy.ones(3).sum())


def public_names_on_the_node() -> str:
    """What a forwarded module that does ``from sshexec import ...`` would see."""
    from sshexec import SSHPoolExecutor, Stats

    return f"{SSHPoolExecutor.__name__} {Stats.__name__}"


def die_once(marker: str, value: Any) -> Any:
    """Kills its worker the first time it runs (the marker file records that), then
    returns ``value`` when run again on another worker."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return value
    os.close(fd)
    os._exit(9)


def sleep_then_say(seconds: float, text: str) -> str:
    time.sleep(seconds)
    print(text)
    return text


class ExitOnPickle:
    """An argument whose pickling raises SystemExit (a __reduce__ calling sys.exit)."""

    def __reduce__(self) -> Any:
        raise SystemExit(3)


_GLOBAL = "unset"


def set_global(value: str) -> None:
    """An initializer that sets a module global (Ray's Pool cannot: ray#37705)."""
    global _GLOBAL
    _GLOBAL = value


def read_global(_: Any = None) -> str:
    return _GLOBAL


def thread_env(_: Any = None) -> Tuple[str, Any]:
    """The thread-limit variables joblib's process backends set, as this worker sees them."""
    names: Tuple[str, ...] = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    names += ("BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
    return os.environ.get("SSHEXEC_TEST_HOST", "local"), {n: os.environ.get(n) for n in names}


def blas_threads(_: Any = None) -> Any:
    """Threads numpy's BLAS runs with here: what the limit does, numpy imported after it."""
    import numpy  # noqa: F401
    from threadpoolctl import threadpool_info

    return sorted({pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"})


def nested_parallel(n: int) -> Tuple[List[int], str]:
    """A joblib Parallel inside a task: its results and the backend it ran on."""
    from joblib import Parallel, delayed
    from joblib.parallel import get_active_backend

    inner = Parallel(n_jobs=2)(delayed(square)(i) for i in range(n))
    return list(inner), type(get_active_backend()[0]).__name__


def pid_in(_: Any = None) -> int:
    return os.getpid()


def raise_on(bad: int, x: int) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x * x


def failing_input(n: int) -> Any:
    """An input iterable that raises after ``n`` items."""
    yield from range(n)
    raise KeyError("input ran dry")


def sleep_after_writing_pid(path: str, seconds: float) -> int:
    """Writes this worker's pid to ``path``, then sleeps (to be killed from outside)."""
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(seconds)
    return os.getpid()


def loaded_module(name: str) -> bool:
    return name in sys.modules


def sum_at(data: Any, i: int) -> float:
    return float(data[i]) + 1


def is_writeable(data: Any) -> bool:
    """Whether a shared array arrived writeable (it should not: read-only, as memmaps)."""
    return bool(data.flags.writeable)


def fetch_from_client(names: List[str]) -> List[Tuple[str, str]]:
    """A hostile node: asks the client for modules through the worker's own Fetch
    machinery, whatever ``forward_modules`` told it. (kind, detail) per name."""
    import gc

    from sshexec._node.worker import Worker

    worker = next(o for o in gc.get_objects() if isinstance(o, Worker) and o.worker_id != "?")
    replies = [worker.fetch(name) for name in names]
    return [(r.kind, r.detail) if r is not None else ("no answer", "") for r in replies]


def total(data: Any) -> float:
    return float(data.sum())


def note_run_then_sleep(path: str, seconds: float, value: Any = None) -> Any:
    """Appends a line to ``path`` (one per run: a rerun shows), then sleeps."""
    with open(path, "a") as f:
        f.write(f"run {os.getpid()}\n")
    time.sleep(seconds)
    return value


def hang_with_child(path: str) -> None:
    """Starts a child (in this worker's process group) and a grandchild in a session of
    its own, writes "worker child grandchild" pids to ``path``, then hangs for good."""
    import subprocess

    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleeper)
    away = subprocess.Popen(sleeper, start_new_session=True)
    with open(path + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid} {away.pid}")
    os.replace(path + ".tmp", path)
    while True:
        time.sleep(600)


def hog(size: int, hold: float = 30.0) -> int:
    """Touches ``size`` bytes (every page: resident), then holds them."""
    block = b"\x01" * size
    time.sleep(hold)
    return len(block)


def hog_in_child(size: int) -> int:
    """A child process of the task touches ``size`` bytes; the task waits for it."""
    import subprocess

    code = f"import time; b = b'x' * {size}; time.sleep(60)"
    return subprocess.run([sys.executable, "-c", code]).returncode


def leave_a_big_child(size: int) -> int:
    """Starts a child that holds ``size`` bytes and keeps running, and returns (its pid)
    once the child holds them."""
    import subprocess

    code = f"import time; b = b'x' * {size}; time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code])
    page = os.sysconf("SC_PAGE_SIZE")
    for _ in range(3000):
        with open(f"/proc/{child.pid}/statm") as f:
            if int(f.read().split()[1]) * page >= size:
                return child.pid
        time.sleep(0.01)
    raise TimeoutError("the child did not fill its memory")
