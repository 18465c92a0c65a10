"""One chaos run's client: ``python -m benchmarks.chaos_client``, driven by ``chaos.py``.

Reads its plan from ``CHAOS_PLAN`` (JSON), uses the executor as users do (``submit``
with done-callbacks, some of which block, some through ``options()`` views with a time
or a memory limit; random ``cancel()``; ``kill()`` of the tasks meant for it; staged
inputs, ``files=`` and a ``send_files`` while the job runs, with outputs brought back by
``return_files=``; ``as_completed`` and ``wait``; a chunked ``map``; two actors, one
with ``restart=1``, called between the submits, one ``kill -9``ed by the client midway
and dropped, the other closed; the ``with`` block to end it) and writes what it saw to
``CHAOS_OUT``, one JSON object per line, flushed at once: ``started`` (the executor is
up; the driver may start killing), ``seen`` (every outcome), ``ended`` (the executor
is shut down, every callback has run). A killed client leaves a partial file, which is
the point: the driver then checks the nodes only.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import json
import os
import random
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

import cloudpickle

from sshexec import Host, SSHExecError, SSHPoolExecutor, parse_host

from . import chaos_tasks

cloudpickle.register_pickle_by_value(chaos_tasks)  # the nodes have no copy of it


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def actor_round(ex: SSHPoolExecutor, plan: Dict[str, Any], rng: random.Random) -> Dict[str, Any]:
    """Two actors: ``kept`` (``restart=1``) and ``doomed``, each called ``actor_calls``
    times; ``doomed``'s process is killed (``kill -9``) by the client after a third of
    its calls. Every call's outcome, in call order; ``kept`` is closed, ``doomed``
    dropped without ``close()``."""
    calls = plan.get("actor_calls", 30)
    kept = ex.actor(chaos_tasks.Tally, restart=1)
    doomed = ex.actor(chaos_tasks.Tally)
    made: Dict[str, List[cf.Future[Any]]] = {"kept": [], "doomed": []}
    killed_at = -1
    for k in range(calls):
        pause = rng.uniform(0.0, 0.05)  # the calls outlast the driver's first kill
        made["kept"].append(kept.add(pause))
        made["doomed"].append(doomed.add(pause))
        if k == calls // 3:
            try:
                pid = doomed.pid().result(plan["deadline"])
                os.kill(pid, 9)
                killed_at = k
            except Exception:  # dead already (the driver killed it): nothing to kill
                pass
    every = [f for fs in made.values() for f in fs]
    completed = sum(1 for _ in cf.as_completed(every, timeout=plan["deadline"]))
    kept.close()
    del doomed  # ended by the collector

    def outcome(future: cf.Future[Any]) -> Tuple[str, Any]:
        exc = future.exception()
        return ("result", future.result()) if exc is None else (type(exc).__name__, str(exc)[:200])

    return {
        "completed": completed,
        "calls": len(every),
        "killed_at": killed_at,
        "outcomes": {name: [outcome(f) for f in fs] for name, fs in made.items()},
        "listed": sorted(a.state for a in ex.actors()),
    }


def main() -> None:
    plan: Dict[str, Any] = json.loads(os.environ["CHAOS_PLAN"])
    out = open(os.environ["CHAOS_OUT"], "a", buffering=1)

    def say(event: str, **fields: Any) -> None:
        out.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
        out.flush()

    rng = random.Random(plan["seed"])
    tag, n = plan["tag"], plan["tasks"]
    kinds = [rng.choice(plan["kinds"]) for _ in range(n)]
    long = min(plan.get("long_tasks", 0), n)
    kinds[:long] = ["sleep"] * long  # the job outlasts the driver's first kill
    args = {
        "compute": lambda: rng.randrange(1000, 50_000),
        "sleep": lambda: rng.uniform(0.05, plan["max_sleep"]),
        "flood": lambda: float(plan["flood_bytes"]),
        "hog": lambda: float(plan.get("hog_bytes", 300 << 20)),
    }
    delivered: Dict[int, int] = {}
    lock = threading.Lock()
    blocked = [0]

    def on_done(i: int, block: float, future: cf.Future[Any]) -> None:
        with lock:
            delivered[i] = delivered.get(i, 0) + 1
        if block:
            blocked[0] += 1
            time.sleep(block)  # a slow database write, say: must delay only other callbacks

    started = time.monotonic()
    futures: Dict[cf.Future[Any], int] = {}
    kwargs = dict(plan["executor"])
    if "hosts" in kwargs:  # Host values travel as dicts of their fields
        kwargs["hosts"] = [Host(**h) if isinstance(h, dict) else h for h in kwargs["hosts"]]
    if plan.get("files_dir"):  # inputs/ staged on every host, out/* brought back
        os.chdir(plan["files_dir"])
        os.environ["XDG_CACHE_HOME"] = plan["cache"]  # local workers' cache
        kwargs.update(files=["inputs"], return_files=["out/*"])
        if "hosts" in kwargs:
            kwargs["hosts"] = [with_cache(h, plan["cache"]) for h in kwargs["hosts"]]
    else:
        kinds = [kind if kind != "read" else "compute" for kind in kinds]
    late_error = ""
    with SSHPoolExecutor(plan.get("max_workers"), **kwargs) as ex:
        say("started", pid=os.getpid())
        # one limit each, so which fires first is never a race on a loaded machine
        views = {
            "hang": ex.options(timeout=plan.get("hang_timeout", 0.5)),
            "hog": ex.options(memory="100M", timeout=60.0),
        }
        doomed: List[cf.Future[Any]] = []
        for i, kind in enumerate(kinds):
            arg = plan["long_sleep"] if i < long else args.get(kind, lambda: 0.0)()
            view = views.get(kind, ex)
            future = view.submit(chaos_tasks.run, kind, i, tag, arg)
            if kind == "doomed":
                doomed.append(future)
            block = plan["callback_block"] if rng.random() < plan["block_fraction"] else 0.0
            future.add_done_callback(functools.partial(on_done, i, block))
            futures[future] = i
        actors = actor_round(ex, plan, rng)
        cancelled: List[int] = []
        for future, i in list(futures.items()):
            if rng.random() < plan["cancel_fraction"] and future.cancel():
                cancelled.append(i)
        for future in doomed:  # kill(): cancelled while queued, else TaskKilled
            if ex.kill(future) and future.cancelled():
                cancelled.append(futures[future])
        if plan.get("files_dir"):  # an input sent while the job runs, then read
            with open(chaos_tasks.LATE, "wb") as f:
                f.write(chaos_tasks.input_bytes(99, chaos_tasks.LATE_SIZE))
            try:
                ex.send_files([chaos_tasks.LATE])
            except SSHExecError as exc:  # a host lost meanwhile: it gets it on reconnecting
                late_error = str(exc)[:300]
            for _ in range(plan.get("late_tasks", 4)):
                i = len(kinds)
                kinds.append("late")
                future = ex.submit(chaos_tasks.run, "late", i, tag, 0.0)
                future.add_done_callback(functools.partial(on_done, i, 0.0))
                futures[future] = i
        completed = 0
        try:
            for _ in cf.as_completed(futures, timeout=plan["deadline"]):
                completed += 1
        except cf.TimeoutError:
            pass
        _, not_done = cf.wait(futures, timeout=5)
        mapped = list(ex.map(chaos_tasks.square, range(plan["map_items"]), chunksize=7))
        outcomes: Dict[int, Tuple[str, Any]] = {}
        for future, i in futures.items():
            if future.cancelled():
                outcomes[i] = ("cancelled", None)
            elif not future.done():
                outcomes[i] = ("not done", None)
            elif future.exception() is not None:
                exc = future.exception()
                outcomes[i] = (type(exc).__name__, str(exc)[:300])
            else:
                outcomes[i] = ("result", future.result())
        say(
            "seen",
            kinds=kinds,
            outcomes={str(i): o for i, o in outcomes.items()},
            cancelled=cancelled,
            as_completed=completed,
            not_done=len(not_done),
            tasks=len(kinds),
            map_ok=mapped == [x * x for x in range(plan["map_items"])],
            returned_bad=returned_bad(kinds, outcomes),
            late_error=late_error,
            actors=actors,
        )
    with lock:
        counts = dict(delivered)
    say(
        "ended",
        delivered={str(i): c for i, c in counts.items()},
        blocked=blocked[0],
        peak_rss_mb=peak_rss_mb(),
        seconds=time.monotonic() - started,
    )
    out.close()


def with_cache(host: Any, cache: str) -> Host:
    """The host, its agent keeping staged files in ``cache`` (XDG_CACHE_HOME)."""
    host = host if isinstance(host, Host) else parse_host(host)
    return dataclasses.replace(host, env={**dict(host.env or {}), "XDG_CACHE_HOME": cache})


def returned_bad(kinds: List[str], outcomes: Dict[int, Tuple[str, Any]]) -> List[str]:
    """Outputs of tasks that returned, missing or wrong here (they come back before the
    Future ends)."""
    bad = []
    for i, (how, _) in outcomes.items():
        if kinds[i] in ("read", "late") and how == "result":
            try:
                with open(f"out/r{i}.txt") as f:
                    text = f.read()
            except OSError as exc:
                bad.append(f"out/r{i}.txt: {exc.strerror}")
                continue
            if text != str(chaos_tasks.expected(kinds[i], i)):
                bad.append(f"out/r{i}.txt holds {text[:40]!r}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
