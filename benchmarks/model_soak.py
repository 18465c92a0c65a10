"""``python -m benchmarks.model_soak [examples] [steps]``: the pool-core model test
(tests/test_pool_model.py) with many more examples than the suite runs (40): random
submits, maps, lambdas, cancels, map breaks, worker deaths, hangs, late revokes, failed
starts, kills and shutdowns against in-memory workers of two Python versions, checking
after every step that every pending Future's task is queued or on a live worker, that
table and scheduler agree, that no Future ends twice, that nothing goes to a forgotten
worker or a bound task to a worker of another Python, and that shutdown returns with
every Future ended. Exits with pytest's status; prints hypothesis' statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    examples = sys.argv[1] if len(sys.argv) > 1 else "2000"
    steps = sys.argv[2] if len(sys.argv) > 2 else "60"
    env = {**os.environ, "SSHEXEC_MODEL_EXAMPLES": examples, "SSHEXEC_MODEL_STEPS": steps}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "timeout=0",
        "--hypothesis-show-statistics",
        "tests/test_pool_model.py",
    ]
    return subprocess.run(command, cwd=REPO, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
