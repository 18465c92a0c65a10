"""The joblib backend "sshexec": Parallel and delayed, generators, an exception aborting
the other calls, nested Parallel, the workers' thread limits, executor reuse and its
end, and scikit-learn's GridSearchCV and cross_val_score, on local workers and on the two
sshd hosts. Runs on the newest joblib and, from .ci/run, on joblib 1.3 (apply_async)."""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from . import tasks
from .procs import wait_gone
from .sshd import SSHServer, executor_kwargs

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402
from joblib.parallel import get_active_backend  # noqa: E402

import sshexec.joblib  # noqa: E402
from sshexec import WorkerLostError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
JOBLIB = tuple(int(part) for part in joblib.__version__.split(".")[:2])
THREAD_VARS: Tuple[str, ...] = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
THREAD_VARS += ("BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
CPUS = len(os.sched_getaffinity(0))


@pytest.fixture(params=["local", "ssh"])
def options(request: pytest.FixtureRequest) -> Iterator[Dict[str, Any]]:
    """parallel_config keywords for two workers: local, or one on each sshd host. Blocks
    whose calls raised leave a reference cycle; collect it, as the README says."""
    if request.param == "local":
        yield {"backend": "sshexec", "max_workers": 2}
    else:
        servers: List[SSHServer] = request.getfixturevalue("sshd_pair")
        yield {"backend": "sshexec", **executor_kwargs(servers, max_workers=2)}
    gc.collect()


def workers_per_host(options: Dict[str, Any]) -> int:
    return 1 if "hosts" in options else 2


def test_parallel_runs_the_calls_on_the_pool(options: Dict[str, Any]) -> None:
    with parallel_config(n_jobs=-1, **options):
        squares = Parallel()(delayed(tasks.square)(i) for i in range(40))
        kwargs = Parallel()(delayed(tasks.add)(i, b=1) for i in range(5))
        placed = Parallel(batch_size=1)(delayed(tasks.sleep_then_where)(0.3) for _ in range(6))
    assert squares == [i * i for i in range(40)]
    assert kwargs == [1, 2, 3, 4, 5]
    assert os.getpid() not in {pid for _, pid, _ in placed}
    expected = {"alpha", "beta"} if "hosts" in options else {"local"}
    assert {host for host, _, _ in placed} == expected


def test_auto_batching_groups_small_calls(options: Dict[str, Any]) -> None:
    with parallel_config(n_jobs=-1, **options):
        backend, _ = get_active_backend()
        out = Parallel()(delayed(tasks.square)(i) for i in range(3000))
        batches = backend._held.executor.stats(refresh=0).tasks_done  # the backend's own
    assert out == [i * i for i in range(3000)]
    assert batches < 300  # joblib grew the batches: far fewer tasks than calls


def test_one_executor_serves_the_block_and_ends_with_it(options: Dict[str, Any]) -> None:
    with parallel_config(n_jobs=-1, **options):
        first = Parallel(batch_size=1)(delayed(tasks.sleep_then_where)(0.3) for _ in range(4))
        second = Parallel(batch_size=1)(delayed(tasks.sleep_then_where)(0.3) for _ in range(4))
    pids = {pid for _, pid, _ in first}
    assert len(pids) == 2
    assert {pid for _, pid, _ in second} == pids  # the same workers: not started per call
    assert not wait_gone(sorted(pids), timeout=15), "the workers outlived the block"


def test_return_as_generator(options: Dict[str, Any]) -> None:
    with parallel_config(n_jobs=-1, **options):
        ordered = Parallel(return_as="generator")(delayed(tasks.square)(i) for i in range(20))
        assert not isinstance(ordered, list)
        assert list(ordered) == [i * i for i in range(20)]


@pytest.mark.skipif(JOBLIB < (1, 4), reason="return_as='generator_unordered' is joblib 1.4+")
def test_return_as_generator_unordered(options: Dict[str, Any]) -> None:
    with parallel_config(n_jobs=-1, **options):
        slow_first = [0.8] + [0.0] * 5
        out = Parallel(return_as="generator_unordered", batch_size=1)(
            delayed(tasks.sleep_then)(s, i) for i, s in enumerate(slow_first)
        )
        got = list(out)
    assert sorted(got) == list(range(6))
    assert got[-1] == 0  # the slow one came last


def failing_call(**config: Any) -> Dict[str, Any]:
    """One call raises at once while the others would sleep for 30 s."""
    calls = [delayed(tasks.raise_value_error)("bad value")]
    calls += [delayed(tasks.sleep_then)(30, i) for i in range(5)]
    start = time.monotonic()
    with parallel_config(n_jobs=2, **config):
        with pytest.raises(Exception) as raised:
            Parallel(batch_size=1)(calls)
        elapsed = time.monotonic() - start
        after = Parallel()(delayed(tasks.square)(i) for i in range(4))  # the block goes on
    cause = str(raised.value.__cause__)
    return {
        "type": type(raised.value),
        "message": str(raised.value),
        "remote_stack": "Traceback" in cause and "raise_value_error" in cause,
        "aborted": elapsed < 15,
        "after": after,
    }


def test_an_exception_aborts_the_other_calls_as_under_loky(options: Dict[str, Any]) -> None:
    got = failing_call(**options)
    expected = failing_call(backend="loky")
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)  # loky keeps idle workers for minutes
    assert got == expected
    assert got["type"] is ValueError and got["remote_stack"] and got["aborted"]


def test_nested_parallel_inside_a_task(options: Dict[str, Any]) -> None:
    with parallel_config(n_jobs=-1, **options):
        nested = Parallel()(delayed(tasks.nested_parallel)(4) for _ in range(3))
    assert nested == [([0, 1, 4, 9], "ThreadingBackend")] * 3  # threads on the worker


def thread_limits(options: Dict[str, Any], **extra: Any) -> List[Dict[str, Any]]:
    with parallel_config(n_jobs=-1, **options, **extra):
        seen = Parallel(batch_size=1)(delayed(tasks.thread_env)() for _ in range(6))
    return [env for _, env in seen]


def test_worker_thread_limits(options: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    share = str(max(CPUS // workers_per_host(options), 1))
    assert thread_limits(options) == [dict.fromkeys(THREAD_VARS, share)] * 6
    assert thread_limits(options, inner_max_num_threads=3) == [dict.fromkeys(THREAD_VARS, "3")] * 6
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the client's own value wins, as in joblib
    assert (
        thread_limits(options)
        == [{**dict.fromkeys(THREAD_VARS, share), "OMP_NUM_THREADS": "5"}] * 6
    )


def test_numpy_in_a_worker_runs_with_the_limit(
    options: Dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("threadpoolctl")
    pytest.importorskip("numpy")
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    with parallel_config(n_jobs=-1, inner_max_num_threads=1, **options):
        blas = Parallel(batch_size=1)(delayed(tasks.blas_threads)() for _ in range(2))
    assert blas == [[1], [1]]


def test_n_jobs(options: Dict[str, Any]) -> None:
    with parallel_config(**options):
        assert joblib.effective_n_jobs(-1) == 2
        assert joblib.effective_n_jobs(8) == 2  # at most the pool's workers
        assert joblib.effective_n_jobs(1) == 1
        here = Parallel(n_jobs=1)(delayed(tasks.pid_in)(i) for i in range(3))
        there = Parallel()(delayed(tasks.pid_in)(i) for i in range(3))  # default: the pool
    assert set(here) == {os.getpid()}  # n_jobs=1 runs in this process, as joblib always does
    assert os.getpid() not in there
    with pytest.raises(ValueError, match="n_jobs == 0"):
        with parallel_config(n_jobs=0, **options):
            Parallel()(delayed(tasks.square)(1) for _ in range(2))


def test_a_backend_made_by_hand_ends_its_workers_where_its_block_does() -> None:
    with sshexec.joblib.Backend(max_workers=2) as backend:
        with parallel_config(backend=backend, n_jobs=-1):
            pids = Parallel(batch_size=1)(delayed(tasks.sleep_then_where)(0.2) for _ in range(4))
        running = sorted({pid for _, pid, _ in pids})
    assert not wait_gone(running, timeout=15)


def test_unknown_options_fail_at_parallel_config() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        parallel_config(backend="sshexec", hots=["node1"])


def test_a_lost_worker_fails_the_call(options: Dict[str, Any]) -> None:
    with parallel_config(n_jobs=-1, max_retries=0, **options):
        with pytest.raises(WorkerLostError):
            Parallel(batch_size=1)(delayed(tasks.hard_exit)(3) for _ in range(2))


def test_registration_on_first_use_and_make_default(tmp_path: Path) -> None:
    """joblib imported before sshexec: parallel_config finds "sshexec" without the import
    of sshexec.joblib (joblib's EXTERNAL_BACKENDS); register(make_default=True) makes it
    Parallel's default."""
    script = tmp_path / "first_use.py"
    script.write_text(
        "import os\n"
        "import joblib\n"
        "import sshexec\n"
        "from joblib import Parallel, delayed, parallel_config\n"
        "assert 'sshexec.joblib' not in __import__('sys').modules\n"
        "with parallel_config(backend='sshexec', max_workers=2, n_jobs=-1):\n"
        "    pids = Parallel(batch_size=1)(delayed(os.getpid)() for _ in range(4))\n"
        "assert os.getpid() not in pids, pids\n"
        "import sshexec.joblib\n"
        "sshexec.joblib.register(make_default=True)\n"
        "pids = Parallel(n_jobs=2, batch_size=1)(delayed(os.getpid)() for _ in range(4))\n"
        "assert os.getpid() not in pids, pids\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SSHEXEC_HOSTS", None)
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_active_backend_is_sshexec() -> None:
    with parallel_config(backend="sshexec", max_workers=1):
        backend, _ = get_active_backend()
    assert isinstance(backend, sshexec.joblib.Backend)
    assert "sshexec" in joblib.parallel.BACKENDS


# -- scikit-learn, unchanged, on the pool


def test_grid_search_gives_the_scores_of_n_jobs_1(options: Dict[str, Any]) -> None:
    sklearn = pytest.importorskip("sklearn")
    del sklearn
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "kernel": ["linear", "rbf"]}
    alone = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)
    with parallel_config(n_jobs=-1, **options):
        spread = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    assert list(spread.cv_results_["mean_test_score"]) == list(alone.cv_results_["mean_test_score"])
    assert spread.best_params_ == alone.best_params_
    assert spread.best_score_ == alone.best_score_


def test_cross_val_score_gives_the_scores_of_n_jobs_1(options: Dict[str, Any]) -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    X, y = load_iris(return_X_y=True)
    model = DecisionTreeClassifier(random_state=0)
    alone = cross_val_score(model, X, y, cv=5, n_jobs=1)
    with parallel_config(n_jobs=-1, **options):
        spread = cross_val_score(model, X, y, cv=5, n_jobs=-1)
    assert list(spread) == list(alone)


def test_parallel_timeout(options: Dict[str, Any]) -> None:
    start = time.monotonic()
    with parallel_config(n_jobs=-1, **options):
        with pytest.raises(multiprocessing.TimeoutError):  # what joblib raises
            Parallel(timeout=0.5, batch_size=1)(delayed(tasks.sleep_then)(30) for _ in range(3))
    assert time.monotonic() - start < 15  # the sleeping calls were aborted


def test_a_training_set_passed_to_every_call_crosses_once_per_host(
    options: Dict[str, Any],
) -> None:
    numpy = pytest.importorskip("numpy")
    X = numpy.arange(1 << 18, dtype=numpy.float64)  # 2 MiB, passed to each of 60 calls
    with parallel_config(n_jobs=-1, **options):
        backend, _ = get_active_backend()
        got = Parallel(batch_size=1)(delayed(tasks.sum_at)(X, i) for i in range(60))
        stats = backend._held.executor.stats(refresh=0)
    assert got == [float(X[i]) + 1 for i in range(60)]
    hosts = [h for h in stats.hosts.values() if h.tasks_done]
    for host in hosts:
        assert host.bytes_sent < 2 * X.nbytes, host  # once (plus small frames), not 60 times
    assert sum(h.bytes_saved for h in hosts) >= (60 - len(hosts)) * X.nbytes
    assert Parallel(n_jobs=2)(delayed(tasks.is_writeable)(X) for _ in range(2)) == [False] * 2


def test_an_array_changed_in_place_is_seen_by_every_later_call(options: Dict[str, Any]) -> None:
    """A shared array is named by its content when each batch is pickled (as joblib's
    memmapping names its file), and only by the Parallel call that shared it: changed in
    place, the next call and a plain submit see the change (it was shared by id for its
    lifetime: both summed the stale zeros)."""
    numpy = pytest.importorskip("numpy")
    a = numpy.zeros(200_000)  # 1.6 MB: over joblib's 1 MB, so shared
    with parallel_config(n_jobs=-1, **options):
        backend, _ = get_active_backend()
        assert Parallel()(delayed(tasks.total)(a) for _ in range(3)) == [0.0] * 3
        a[:] = 1
        assert Parallel()(delayed(tasks.total)(a) for _ in range(3)) == [200_000.0] * 3
        executor = backend._held.executor
        assert executor.submit(tasks.total, a).result(timeout=60) == 200_000.0
        a[:] = 5
        assert Parallel()(delayed(tasks.total)(a) for _ in range(3)) == [1_000_000.0] * 3
        a[:] = 1  # back to content that was shared before: named by that key again
        assert Parallel()(delayed(tasks.total)(a) for _ in range(3)) == [200_000.0] * 3
