"""The scripts in examples/, run as a user runs them: ``python examples/NAME.py``.

Each runs in a subprocess on local workers with small sizes, and several run over the
test sshd hosts the way a real user's setup is honoured: ``HOME`` points at a directory
whose ``.ssh/config`` names the hosts by alias (HostName, Port, User, IdentityFile,
UserKnownHostsFile), and the example gets only ``--hosts alias``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from .sshd import SSHServer

REPO = Path(__file__).resolve().parent.parent


def run_example(
    name: str, *args: str, home: Optional[Path] = None, env: Optional[Dict[str, str]] = None
) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ)
    for name_ in ("SSHEXEC_HOSTS", "SSH_AUTH_SOCK"):  # no agent, no hosts from the caller
        environ.pop(name_, None)
    environ["PYTHONPATH"] = str(REPO)
    if home is not None:
        environ["HOME"] = str(home)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, f"examples/{name}.py", *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
    )


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def error_text(stderr: str) -> str:
    """What the example printed after ``error:`` (possibly several lines), before its hint."""
    assert "error: " in stderr, stderr
    return stderr.split("error: ", 1)[1].split("\nhint: ", 1)[0]


def is_prime(n: int) -> bool:
    return n > 1 and all(n % k for k in range(2, math.isqrt(n) + 1))


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A venv interpreter without numpy (no pip, no system site-packages)."""
    root = tmp_path_factory.mktemp("bare-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = str(root / "bin" / "python")
    probe = subprocess.run([python, "-c", "import numpy"], capture_output=True)
    assert probe.returncode != 0, "the bare venv must not see numpy"
    return python


@pytest.fixture(scope="module")
def ssh_home(sshd_pair: List[SSHServer], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HOME whose ~/.ssh/config has the aliases node-alpha and node-beta."""
    home = tmp_path_factory.mktemp("home")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    client = sshd_pair[0].client
    blocks = [
        f"Host node-{server.name}\n"
        f"    HostName {server.address}\n"
        f"    Port {server.port}\n"
        f"    User {client.user}\n"
        f"    IdentityFile {client.key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {client.known_hosts}\n"
        for server in sshd_pair
    ]
    config = ssh_dir / "config"
    config.write_text("\n".join(blocks))
    config.chmod(0o600)
    return home


# --- local workers -------------------------------------------------------------------


def test_nth_prime_local() -> None:
    out = succeeded(run_example("nth_prime", "1", "10", "1000"))
    found = dict(re.findall(r"^nth_prime\((\d+)\) = (\d+)", out, re.M))
    assert found == {"1": "2", "10": "29", "1000": "7919"}
    assert re.search(r"^3 primes in [\d.]+ s in total$", out, re.M)


def test_sum_primes_local_in_input_order() -> None:
    out = succeeded(run_example("sum_primes", "1000", "10", "100", "2"))
    assert re.findall(r"^Sum of primes below (\d+) is (\d+)$", out, re.M) == [
        ("1000", "76127"),
        ("10", "17"),
        ("100", "1060"),
        ("2", "0"),
    ]


def test_prime_blocks_local() -> None:
    out = succeeded(run_example("prime_blocks", "--start", "0", "--stop", "1000", "--block", "97"))
    assert "168 primes in [0, 1000)" in out
    assert "smallest: 2, largest: 997, sum: 76127" in out
    assert "11 blocks of 97" in out


def test_prime_blocks_merges_small_blocks_in_order() -> None:
    out = succeeded(
        run_example("prime_blocks", "--start", "1000", "--stop", "3001", "--block", "7")
    )
    expected = [n for n in range(1000, 3001) if is_prime(n)]
    assert f"{len(expected)} primes in [1000, 3001)" in out
    assert f"smallest: {expected[0]}, largest: {expected[-1]}, sum: {sum(expected)}" in out


def test_eigenvalues_local_match_numpy_here() -> None:
    numpy = pytest.importorskip("numpy")
    out = succeeded(run_example("eigenvalues", "--count", "3", "--size", "40", "--seed", "5"))
    found = re.findall(
        r"^matrix seed=(\d+) \(40x40\): largest \|eigenvalue\| = ([\d.]+)$", out, re.M
    )
    assert [int(seed) for seed, _ in found] == [5, 6, 7]
    for seed, value in found:
        matrix = numpy.random.default_rng(int(seed)).standard_normal((40, 40))
        expected = float(numpy.abs(numpy.linalg.eigvals(matrix)).max())
        assert float(value) == pytest.approx(expected, abs=1e-4)
        assert 0.5 * math.sqrt(40) < float(value) < 2 * math.sqrt(40)  # the circular law
    assert "sqrt(40) = 6.3246" in out


def test_eigenvalues_without_numpy_on_the_workers(bare_python: str) -> None:
    result = run_example("eigenvalues", "--count", "2", "--size", "5", "--python", bare_python)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    error = error_text(result.stderr)
    assert "numpy" in error
    assert bare_python in error  # the forwarding error names the remote interpreter
    assert "hint: numpy must already be installed on every node" in result.stderr
    assert "largest |eigenvalue|" not in result.stdout


def test_host_facts_local() -> None:
    out = succeeded(run_example("host_facts"))
    assert f"(hostname {socket.gethostname()})" in out
    assert re.search(rf"^  cores     {os.cpu_count()} \(\d+ usable\)$", out, re.M)
    assert f"  python    {platform.python_version()} ({platform.python_implementation()})" in out
    assert re.search(r"^  memory    [\d.]+ GB total, [\d.]+ GB available$", out, re.M)
    assert out.count("(hostname ") == 1  # local workers are one host: one call


def sklearn_grid_expected(cv: int) -> List[str]:
    """The example's per-candidate and best lines, from the same search run with n_jobs=1."""
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("sklearn_grid", REPO / "examples/sklearn_grid.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    search = GridSearchCV(SVC(), example.GRID, cv=cv, n_jobs=1).fit(X, y)
    lines = [
        f"C={params['C']:<6} gamma={params['gamma']!s:<6} mean accuracy {score:.4f}"
        for params, score in zip(
            search.cv_results_["params"], search.cv_results_["mean_test_score"]
        )
    ]
    return [*lines, f"best: {search.best_params_} with mean accuracy {search.best_score_:.4f}"]


def test_sklearn_grid_local_scores_as_n_jobs_1() -> None:
    expected = sklearn_grid_expected(3)
    out = succeeded(run_example("sklearn_grid", "--cv", "3"))
    assert out.splitlines()[: len(expected)] == expected
    assert re.search(r"^16 candidates x 3 folds = 48 fits in [\d.]+ s$", out, re.M)


# --- over sshd, set up through ~/.ssh/config ---------------------------------------------


@pytest.mark.ssh
def test_sklearn_grid_over_two_aliases(ssh_home: Path) -> None:
    expected = sklearn_grid_expected(3)
    result = run_example(
        "sklearn_grid",
        "--hosts",
        "node-alpha,node-beta",
        "--python",
        sys.executable,
        "--cv",
        "3",
        home=ssh_home,
    )
    out = succeeded(result)
    assert out.splitlines()[: len(expected)] == expected


@pytest.mark.ssh
def test_nth_prime_over_an_ssh_config_alias(ssh_home: Path) -> None:
    result = run_example(
        "nth_prime",
        "--hosts",
        "node-alpha",
        "--python",
        sys.executable,
        "100",
        "1000",
        home=ssh_home,
    )
    out = succeeded(result)
    found = dict(re.findall(r"^nth_prime\((\d+)\) = (\d+)", out, re.M))
    assert found == {"100": "541", "1000": "7919"}


@pytest.mark.ssh
def test_sum_primes_over_two_aliases_from_sshexec_hosts(ssh_home: Path) -> None:
    ns = ["1000", "2000", "3000", "4000"]
    result = run_example(
        "sum_primes",
        "--python",
        sys.executable,
        *ns,
        home=ssh_home,
        env={"SSHEXEC_HOSTS": "node-alpha,node-beta"},
    )
    out = succeeded(result)
    expected = [(n, str(sum(x for x in range(int(n)) if is_prime(x)))) for n in ns]
    assert re.findall(r"^Sum of primes below (\d+) is (\d+)$", out, re.M) == expected


@pytest.mark.ssh
def test_eigenvalues_over_ssh(ssh_home: Path) -> None:
    pytest.importorskip("numpy")
    result = run_example(
        "eigenvalues",
        "--hosts",
        "node-alpha,node-beta",
        "--python",
        sys.executable,
        "--count",
        "4",
        "--size",
        "30",
        home=ssh_home,
    )
    out = succeeded(result)
    values = [float(v) for v in re.findall(r"largest \|eigenvalue\| = ([\d.]+)$", out, re.M)]
    assert len(values) == 4
    assert all(0.5 * math.sqrt(30) < v < 2 * math.sqrt(30) for v in values)


@pytest.mark.ssh
def test_eigenvalues_without_numpy_on_the_node(ssh_home: Path, bare_python: str) -> None:
    result = run_example(
        "eigenvalues",
        "--hosts",
        "node-alpha",
        "--python",
        bare_python,
        "--count",
        "2",
        "--size",
        "5",
        home=ssh_home,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    error = error_text(result.stderr)
    assert "numpy" in error
    assert "node-alpha" in error  # names the host ...
    assert bare_python in error  # ... and the remote interpreter
    assert "hint: numpy must already be installed" in result.stderr


@pytest.mark.ssh
def test_host_facts_on_each_alias(ssh_home: Path) -> None:
    result = run_example(
        "host_facts",
        "--hosts",
        "node-alpha,node-beta",
        "--python",
        sys.executable,
        home=ssh_home,
    )
    out = succeeded(result)
    for alias in ("node-alpha", "node-beta"):
        assert re.search(rf"^{alias} \(hostname {re.escape(socket.gethostname())}\)$", out, re.M)
    assert out.count(f"  python    {platform.python_version()}") == 2


@pytest.mark.ssh
def test_the_known_hosts_named_in_ssh_config_is_what_vouches_for_the_node(
    ssh_home: Path, tmp_path: Path
) -> None:
    # The same aliases without UserKnownHostsFile: the empty ~/.ssh/known_hosts of this
    # HOME does not know the node, so the example must refuse it rather than connect.
    (tmp_path / ".ssh").mkdir(mode=0o700)
    config = (ssh_home / ".ssh" / "config").read_text()
    (tmp_path / ".ssh" / "config").write_text(
        "\n".join(line for line in config.splitlines() if "UserKnownHostsFile" not in line)
    )
    result = run_example(
        "nth_prime", "--hosts", "node-alpha", "--python", sys.executable, "10", home=tmp_path
    )
    assert result.returncode != 0
    assert "WorkerStartupError" in result.stderr
    assert "host key" in result.stderr
    assert "nth_prime(10)" not in result.stdout
