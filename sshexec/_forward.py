"""Module forwarding, client side: answering a worker's ``Fetch`` for a module it lacks.

Owns: deciding what this interpreter can send for a module name — the pure-Python
source of a module or package importable here, or why not (missing here; part of
the standard library; contains compiled code, named by its distribution). Must not
import: asyncio, the pool, or anything that does I/O beyond reading source files.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from typing import Any, Dict, List, Optional, Tuple

from ._wire import protocol as proto

MAX_SCAN_FILES = 5000  # files looked at when searching a package directory for extensions


def find_source(name: str) -> proto.Source:
    """What to answer a worker that cannot import ``name``; ``"__main__"`` asks for the
    client's main script (a worker of another Python version runs it as ``__mp_main__``)."""
    if name == "__main__":
        return _main_script()
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError) as exc:
        return _missing(name, f"it cannot be found on the client either ({exc})")
    except Exception as exc:  # importing a parent package ran user code that failed
        return _missing(name, f"finding it on the client failed: {type(exc).__name__}: {exc}")
    if spec is None:
        return _missing(name, "")
    top = name.partition(".")[0]
    if top in _stdlib_names() or _is_stdlib(spec.origin):
        return _missing(
            name,
            "it is part of the standard library on the client; the node's Python lacks it "
            "(a different or stripped-down Python?)",
        )
    is_package = spec.submodule_search_locations is not None
    compiled = _compiled_in(top)
    if compiled is not None:
        dist, where = compiled
        return proto.Source(name, "compiled", where, "", is_package, dist)
    loader = spec.loader
    if spec.origin in (None, "namespace") and is_package:  # a namespace package
        return proto.Source(name, "source", "", "", True, "")
    if isinstance(loader, importlib.machinery.SourceFileLoader):
        code = loader.get_source(name) or ""
        return proto.Source(name, "source", spec.origin or "", code, is_package, "")
    if isinstance(loader, importlib.machinery.ExtensionFileLoader):
        return proto.Source(name, "compiled", spec.origin or "", "", is_package, top)
    get_source = getattr(loader, "get_source", None)
    if get_source is not None:  # e.g. a zip import: still pure Python
        try:
            found: Optional[str] = get_source(name)
        except ImportError:
            found = None
        if found is not None:
            return proto.Source(name, "source", spec.origin or "", found, is_package, "")
    kind = type(loader).__name__ if loader is not None else "no loader"
    return _missing(name, f"the client imports it with {kind}, which has no source to send")


def _main_script() -> proto.Source:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path:
        return _missing(
            "__main__",
            "the client's __main__ is not a script (an interactive session, a notebook, "
            "python -c): what it defines can run only on nodes of the client's Python version",
        )
    try:
        with open(path, encoding="utf-8") as f:
            code = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        return _missing("__main__", f"the client cannot read its script {path}: {exc}")
    return proto.Source("__main__", "source", os.path.abspath(path), code, False, "")


def _missing(name: str, why: str) -> proto.Source:
    return proto.Source(name, "missing", "", "", False, why)


@functools.cache
def _stdlib_names() -> frozenset[str]:
    names = set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)
    return frozenset(names)


@functools.cache
def _stdlib_dirs() -> Tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(
        os.path.realpath(paths[key]) + os.sep for key in ("stdlib", "platstdlib") if key in paths
    )


def _is_stdlib(origin: Optional[str]) -> bool:
    if not origin or origin in ("built-in", "frozen"):
        return origin in ("built-in", "frozen")
    real = os.path.realpath(origin)
    return any(real.startswith(d) for d in _stdlib_dirs()) and "-packages" not in real


@functools.lru_cache(maxsize=1)
def _distributions() -> Dict[str, List[str]]:
    try:
        from importlib.metadata import packages_distributions  # 3.10+
    except ImportError:  # 3.9: no mapping; packages are scanned on disk instead
        return {}
    return {k: list(v) for k, v in packages_distributions().items()}


@functools.cache
def _compiled_in(top: str) -> Optional[Tuple[str, str]]:
    """(distribution, an extension file) when the top-level package ``top`` contains
    compiled code on the client, else None. Cached per top-level name."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for dist in _distributions().get(top, []):
        try:
            from importlib.metadata import files

            for path in files(dist) or []:
                if str(path).endswith(suffixes):
                    return dist, str(path)
        except Exception:  # a broken distribution record: fall back to the directory
            break
    try:
        spec = importlib.util.find_spec(top)
    except Exception:  # already reported by find_source's own lookup
        return None
    if spec is None:
        return None
    if isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return _dist_name(top), spec.origin or ""
    return _scan(top, list(spec.submodule_search_locations or []), suffixes)


def _scan(top: str, roots: List[str], suffixes: Tuple[str, ...]) -> Optional[Tuple[str, str]]:
    seen = 0
    for root in roots:
        for folder, _dirs, names in os.walk(root):
            for file_name in names:
                seen += 1
                if file_name.endswith(suffixes):
                    return _dist_name(top), os.path.join(folder, file_name)
                if seen > MAX_SCAN_FILES:
                    return None
    return None


def _dist_name(top: str) -> str:
    found = _distributions().get(top)
    return found[0] if found else top


def describe(source: proto.Source) -> str:
    """One line for logs: what was sent for a Fetch."""
    detail: Any = source.origin or source.detail or "-"
    return f"{source.name}: {source.kind} ({detail})"
