"""``python -m benchmarks.actors``: what an actor's method call costs.

In one run, per target (local workers; one loopback sshd over the ``openssh``
transport, as ``benchmarks.sshd`` starts it; ``--asyncssh`` adds that transport):

- round trip: ``proxy.method(x).result()`` of a no-op method, one call at a time, p50
  and p99 over ``--calls`` calls, beside the pool's own ``submit(f, x).result()`` on the
  same executor, alternated in blocks so both see the same machine;
- pipelined: ``--pipelined`` calls made at once, then waited for, in calls per second
  (beside ``map`` of a no-op over as many items, chunksize 1).

A Ray baseline (``ray.remote`` actor, ``.method.remote(x)``; ``ray.get`` one at a time,
and pipelined) runs where ``ray`` imports, in this interpreter or the one given with
``--ray-python`` (a venv with ``pip install ray``); otherwise the reason is printed.
A table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sshexec import SSHPoolExecutor


class Echo:
    def ping(self, x: Any) -> Any:
        return x


def echo(x: Any) -> Any:
    return x


def _pcts(samples: List[float]) -> Tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) * 1e6, p99 * 1e6


def measure(ex: SSHPoolExecutor, calls: int, pipelined: int) -> Dict[str, Any]:
    actor = ex.actor(Echo)
    actor.ping(0).result(60)  # started
    ex.submit(echo, 0).result(60)
    actor_rt: List[float] = []
    task_rt: List[float] = []
    for block in range(10):  # alternated, so both see the same load
        for _ in range(calls // 10):
            t = time.perf_counter()
            actor.ping(block).result(60)
            actor_rt.append(time.perf_counter() - t)
        for _ in range(calls // 10):
            t = time.perf_counter()
            ex.submit(echo, block).result(60)
            task_rt.append(time.perf_counter() - t)
    t = time.perf_counter()
    futures = [actor.ping(i) for i in range(pipelined)]
    _, pending = wait(futures, timeout=300)
    actor_rate = pipelined / (time.perf_counter() - t)
    assert not pending and [f.result() for f in futures[:3]] == [0, 1, 2]
    t = time.perf_counter()
    assert len(list(ex.map(echo, range(pipelined)))) == pipelined
    map_rate = pipelined / (time.perf_counter() - t)
    actor.close()
    return {
        "actor": _pcts(actor_rt),
        "task": _pcts(task_rt),
        "actor_rate": actor_rate,
        "map_rate": map_rate,
    }


RAY_SCRIPT = r"""
import json, statistics, sys, time
import ray
calls, pipelined = int(sys.argv[1]), int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
@ray.remote
class Echo:
    def ping(self, x):
        return x
a = Echo.remote()
ray.get(a.ping.remote(0))
rt = []
for _ in range(calls):
    t = time.perf_counter(); ray.get(a.ping.remote(1)); rt.append(time.perf_counter() - t)
rt.sort()
t = time.perf_counter()
refs = [a.ping.remote(i) for i in range(pipelined)]
ray.get(refs)
rate = pipelined / (time.perf_counter() - t)
print(json.dumps({"p50": statistics.median(rt) * 1e6,
                  "p99": rt[min(len(rt) - 1, int(len(rt) * 0.99))] * 1e6, "rate": rate}))
ray.shutdown()
"""


def ray_baseline(python: str, calls: int, pipelined: int) -> Tuple[Optional[Dict[str, float]], str]:
    probe = subprocess.run([python, "-c", "import ray"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"ray does not import in {python} (pip install ray; or --ray-python)"
    try:
        done = subprocess.run(
            [python, "-c", RAY_SCRIPT, str(calls), str(pipelined)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        return None, "the Ray run took over 300 s"
    if done.returncode != 0:
        return None, f"the Ray run failed: {done.stderr.strip().splitlines()[-1:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.actors", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--calls", type=int, default=2000, help="round trips of each kind")
    parser.add_argument("--pipelined", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--asyncssh", action="store_true", help="also over asyncssh")
    parser.add_argument("--no-ssh", action="store_true", help="local workers only")
    parser.add_argument("--ray-python", default=sys.executable, help="an interpreter with ray")
    args = parser.parse_args(argv)
    rows: List[Tuple[str, Dict[str, Any]]] = []
    with SSHPoolExecutor(args.workers) as ex:
        rows.append(("local workers", measure(ex, args.calls, args.pipelined)))
    from . import sshd as loopback

    if not args.no_ssh and loopback.available():
        with tempfile.TemporaryDirectory(prefix="sshexec-actors-") as scratch:
            root = Path(scratch)
            client = loopback.Client(root / "client")
            server = loopback.Sshd(root, client, "sshd0").start()
            try:
                transports = ["openssh"] + (["asyncssh"] if args.asyncssh else [])
                for transport in transports:
                    kwargs = client.executor_kwargs([server.port], transport=transport)
                    with SSHPoolExecutor(args.workers, **kwargs) as ex:
                        rows.append(
                            (f"sshd ({transport})", measure(ex, args.calls, args.pipelined))
                        )
            finally:
                server.stop()
    elif not args.no_ssh:
        print("no sshd here: the ssh rows are skipped", file=sys.stderr)
    ray, why = ray_baseline(args.ray_python, args.calls, args.pipelined)
    print(
        "| target | actor call p50 / p99 (us) | submit().result() p50 / p99 (us) | "
        f"actor/submit p50 | {args.pipelined} pipelined actor calls/s | map calls/s |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        (a50, a99), (t50, t99) = r["actor"], r["task"]
        print(
            f"| {name} | {a50:.0f} / {a99:.0f} | {t50:.0f} / {t99:.0f} | {a50 / t50:.2f}x | "
            f"{r['actor_rate']:,.0f} | {r['map_rate']:,.0f} |"
        )
    if ray is not None:
        print(
            f"| Ray actor, local ({args.ray_python}) | {ray['p50']:.0f} / {ray['p99']:.0f} | - | - | "
            f"{ray['rate']:,.0f} | - |"
        )
    else:
        print(f"\nRay baseline skipped: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
