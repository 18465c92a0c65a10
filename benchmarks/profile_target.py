"""A target for py-spy: one sshexec workload in a loop (``python -m benchmarks.profile_target
map1|roundtrip|payload ssh|local SECONDS``). Starts its own loopback sshd for ``ssh``."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from sshexec import SSHPoolExecutor

from . import sshd as loopback
from . import tasks


def main() -> None:
    what, where, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with tempfile.TemporaryDirectory(prefix="sshexec-prof-") as tmp:
        kwargs = {}
        servers = []
        if where == "ssh":
            client = loopback.Client(Path(tmp) / "client")
            servers = [loopback.Sshd(Path(tmp), client, f"sshd{i}").start() for i in range(2)]
            kwargs = client.executor_kwargs([s.port for s in servers])
        try:
            with SSHPoolExecutor(2, **kwargs) as ex:
                list(ex.map(tasks.tiny, range(2000)))
                end = time.perf_counter() + seconds
                done = 0
                blob = tasks.blob(64 << 20) if what == "payload" else b""
                while time.perf_counter() < end:
                    if what == "map1":
                        done += sum(1 for _ in ex.map(tasks.tiny, range(5000)))
                    elif what == "roundtrip":
                        ex.submit(tasks.tiny, 1).result()
                        done += 1
                    else:
                        ex.submit(tasks.nbytes, blob).result()
                        ex.submit(tasks.make_blob, len(blob)).result()
                        done += 1
                print(f"{what} {where}: {done} in {seconds} s", file=sys.stderr)
        finally:
            for s in servers:
                s.stop()


if __name__ == "__main__":
    main()
