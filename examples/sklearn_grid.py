"""A scikit-learn grid search whose fits run on the hosts, through joblib's backend.

    python examples/sklearn_grid.py                               # local workers
    python examples/sklearn_grid.py --hosts me@node1,node2
    python examples/sklearn_grid.py --hosts node1 --python /opt/venv/bin/python --cv 10

scikit-learn's own code is unchanged: ``GridSearchCV(..., n_jobs=-1)`` hands its fits to
joblib, and ``parallel_config(backend="sshexec", hosts=...)`` sends them to the hosts.
scikit-learn (and so numpy and scipy) must be installed on every node for the
interpreter the workers run (``--python``); the data set (iris, shipped with
scikit-learn) travels with every fit.
"""

from __future__ import annotations

import argparse
import time
from typing import List, Optional

from joblib import parallel_config
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import sshexec.joblib  # noqa: F401  (registers the "sshexec" backend with joblib)

GRID = {"C": [0.1, 1.0, 10.0, 100.0], "gamma": ["scale", 0.01, 0.1, 1.0], "kernel": ["rbf"]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument(
        "--hosts",
        help="comma-separated [user@]host[:port] or ~/.ssh/config aliases "
        "(default: $SSHEXEC_HOSTS, else local workers)",
    )
    parser.add_argument("--python", help="the nodes' Python interpreter, e.g. a venv's")
    args = parser.parse_args(argv)
    if args.cv < 2:
        parser.error("--cv must be at least 2")

    X, y = load_iris(return_X_y=True)
    hosts = args.hosts.split(",") if args.hosts else None  # None: SSHEXEC_HOSTS or local
    start = time.perf_counter()
    # The three lines that move the search onto the hosts: the import above, this block,
    # and n_jobs=-1 (scikit-learn's own code is unchanged).
    with parallel_config(backend="sshexec", hosts=hosts, python=args.python, n_jobs=-1):
        search = GridSearchCV(SVC(), GRID, cv=args.cv, n_jobs=-1).fit(X, y)
    elapsed = time.perf_counter() - start

    scores = search.cv_results_["mean_test_score"]
    for params, score in zip(search.cv_results_["params"], scores):
        print(f"C={params['C']:<6} gamma={params['gamma']!s:<6} mean accuracy {score:.4f}")
    print(f"best: {search.best_params_} with mean accuracy {search.best_score_:.4f}")
    fits = len(scores) * args.cv
    print(f"{len(scores)} candidates x {args.cv} folds = {fits} fits in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
