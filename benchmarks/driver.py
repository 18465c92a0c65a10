"""Running the interleaved workloads: build, warm up, measure round-robin, close.

Order matters for one reason, found by this benchmark: a process forked while an
``SSHPoolExecutor`` is alive hangs when it exits (sshexec's interpreter-exit hook
waits on the parent's loop thread, which does not exist in the child; see
``fork_exit_hangs``). ``ProcessPoolExecutor`` forks its workers on Linux before
3.14, so its pools are built before any sshexec executor and the start-up
workload runs in a phase of its own, after the long-lived executors are closed.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from typing import Dict, List, Optional, Tuple

from . import contenders as cs
from . import report
from .workloads import WORKLOADS, Context, Sizes, Workload, takes_part

SPECIAL = ("many", "slowlink", "memory")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pick(only: str, contenders: List[cs.Contender]) -> Tuple[List[str], List[cs.Contender]]:
    """``--only``: workload names and/or contender names (none of a kind: all of it)."""
    tokens = [t.strip() for t in only.split(",") if t.strip()]
    known = {w.name for w in WORKLOADS} | set(SPECIAL)
    names = {c.name for c in contenders}
    unknown = [t for t in tokens if t not in known and t not in names]
    if unknown:
        raise SystemExit(
            f"--only: unknown name(s) {unknown}; workloads {sorted(known)}, contenders {sorted(names)}"
        )
    chosen_w = [t for t in tokens if t in known] or [w.name for w in WORKLOADS] + list(SPECIAL)
    chosen_c = [c for c in contenders if c.name in tokens] or list(contenders)
    if "serial" not in tokens:  # the CPU-bound baseline goes wherever the cpu workload goes
        chosen_c += [c for c in contenders if c.name == "serial" and c not in chosen_c]
    return chosen_w, chosen_c


def _child() -> None:
    pass


def fork_exit_hangs(timeout: float = 5.0) -> Optional[bool]:
    """Does a process forked while an SSHPoolExecutor is alive fail to exit?

    multiprocessing's fork child runs ``threading._shutdown()`` when its target
    returns, which runs sshexec's exit hook (``_runtime._shutdown_at_exit``) over
    runtimes inherited from the parent; their loop threads do not exist in the
    child, so ``Runtime.shutdown(wait=True)`` waits forever. None: cannot fork here.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    from sshexec import SSHPoolExecutor

    with SSHPoolExecutor(1) as ex:
        ex.submit(int).result(60)
        child = multiprocessing.get_context("fork").Process(target=_child)
        child.start()
        child.join(timeout)
        hangs = child.is_alive()
        if hangs:
            child.kill()
            child.join(5)
    return hangs


def run_one(w: Workload, c: cs.Contender, ctx: Context, errors: List[str]) -> Dict[str, float]:
    try:
        return w.run(c, ctx)
    except Exception as exc:
        c.failures += 1
        errors.append(f"{w.name} / {c.name}: {type(exc).__name__}: {exc}")
        say(f"  ERROR {w.name} / {c.name}: {type(exc).__name__}: {exc}")
        c.discard()
        return {}


def build(contenders: List[cs.Contender], errors: List[str]) -> None:
    """Build every long-lived executor (ProcessPoolExecutor first, see above) and wait
    until both of its workers answer."""
    for c in sorted(contenders, key=lambda c: c.kind != "ppe"):
        if not c.is_executor or c.only == ("startup",):
            continue
        for attempt in range(2):
            try:
                start = time.perf_counter()
                info = cs.settle(c.get(), cs.WORKERS)
                took = time.perf_counter() - start
                say(f"  {c.name}: {info['workers_seen']} workers answering after {took:.2f} s")
                break
            except Exception as exc:
                c.discard()
                if c.kind == "dask" and attempt == 0 and "SSHCluster" in c.label:
                    cs.dask_fallback(c, f"{type(exc).__name__}: {exc}")
                    continue
                c.failures = 99
                errors.append(f"{c.name} could not start: {type(exc).__name__}: {exc}")
                say(f"  {c.name} could not start: {exc}")
                break


def warm(
    workloads: List[Workload], contenders: List[cs.Contender], ctx: Context, errors: List[str]
) -> None:
    """Each workload once per contender at a small size, unrecorded."""
    small = Sizes(map1=200, map256=5000, roundtrip=20, payload=1 << 20)
    light = Context(small, ctx.raw_options, ctx.scratch, ctx.numpy, ctx.data[: 1 << 20])
    light.primes, light.prime_chunksize = ctx.primes[:300], 10
    for w in workloads:
        for c in contenders:
            if takes_part(w, c) and c.failures < 2:
                run_one(w, c, light if w.name != "startup" else ctx, errors)


def measure(
    workloads: List[Workload],
    contenders: List[cs.Contender],
    ctx: Context,
    reps: int,
    errors: List[str],
    samples: report.Samples,
) -> None:
    """Every workload for every contender, rep after rep; the first contender rotates."""
    for rep in range(reps):
        for w in workloads:
            players = [c for c in contenders if takes_part(w, c) and c.failures < 2]
            shift = rep % len(players) if players else 0
            for c in players[shift:] + players[:shift]:
                values = run_one(w, c, ctx, errors)
                for key, value in values.items():
                    samples.setdefault(key, {}).setdefault(c.name, [None] * reps)[rep] = value
                shown = ", ".join(f"{k} {report.fmt(v)}" for k, v in values.items())
                say(f"  rep {rep + 1}/{reps} {w.name:9} {c.name:13} {shown}")


def close(contenders: List[cs.Contender], errors: List[str]) -> None:
    """Shut every long-lived executor down and wait for it (bounded by each executor)."""
    for c in contenders:
        executor, c.executor = c.executor, None
        if executor is None:
            continue
        try:
            executor.shutdown(wait=True)
        except Exception as exc:
            errors.append(f"{c.name} shutdown: {type(exc).__name__}: {exc}")


def run_workloads(
    workloads: List[Workload], contenders: List[cs.Contender], ctx: Context, errors: List[str]
) -> report.Samples:
    samples: report.Samples = {}
    reps = ctx.sizes.reps
    steady = [w for w in workloads if w.name != "startup"]
    if steady:
        say("building the long-lived executors")
        build(contenders, errors)
        say("warming up")
        warm(steady, contenders, ctx, errors)
        say(f"measuring: {reps} reps, round-robin")
        try:
            measure(steady, contenders, ctx, reps, errors, samples)
        finally:
            close(contenders, errors)
    startup = [w for w in workloads if w.name == "startup"]
    if startup:
        say("start-up: a fresh executor per sample, nothing else alive")
        warm(startup, contenders, ctx, errors)
        measure(startup, contenders, ctx, reps, errors, samples)
    report.cpu_speedups(samples)
    return samples
