"""``sshexec clean``: empty the content cache of staged files (``files=``) on hosts.

Owns: running ``_node.staging.clean_cache`` once on every host (one worker each) and
the report, a line per host with the bytes freed. Must not import: executor internals.
"""

from __future__ import annotations

import sys
from typing import Any, Dict

from .._hosts import resolve_hosts
from .._node.staging import clean_cache


def run_clean(kwargs: Dict[str, Any], place: str) -> int:
    from .._executor import SSHPoolExecutor

    try:
        kwargs.setdefault("max_workers", max(1, len(resolve_hosts(kwargs["hosts"]) or [])))
    except (ValueError, TypeError, OSError):
        pass  # the executor reports it
    failed = 0
    with SSHPoolExecutor(**kwargs) as executor:
        for host, future in executor.run_on_hosts(clean_cache).items():
            try:
                freed = future.result()
            except Exception as exc:  # one host's failure is reported, the others go on
                print(f"{host}: could not clean: {type(exc).__name__}: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{host}: freed {freed} bytes of staged files")
    print(f"cleaned the content cache on {place}")
    return 1 if failed else 0
