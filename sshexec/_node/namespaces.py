"""What a task sees of the client's module globals: the same on every worker, whatever
its Python version.

The rule (``_wire.carried`` says how the values travel): a task sees the values that the
client's globals it reads (``__main__``'s, and those of modules pickled by value) had
when the call was pickled, except names that the initializer or an earlier task on this
worker assigned (or created): those keep this worker's value, as in a process that
imported its main module once. A mutable global a task only mutates is the client's
fresh copy at each call (as under cloudpickle); state meant to last is assigned, by
the initializer or a task.

Owns: ``Namespaces``. Shipped to nodes. Must not import: any sshexec module outside
``_wire`` and ``_node``, asyncio, or anything beyond the stdlib.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

from .._wire.carried import Carried

MAIN, SCRIPT = "__main__", "__mp_main__"  # the client's script, and its name on a node
# One namespace a call reads: (the client's module name, the namespace, its values as
# the call starts, whether it is this worker's copy of a by-value module's).
_SCALARS = frozenset((int, float, str, bytes, bool, type(None)))
Watched = List[Tuple[str, Dict[str, Any], Dict[str, Any], bool]]


def _by_value_globals(obj: Any) -> Optional[Dict[str, Any]]:
    """The globals of a function that travelled by value (not those of an imported module)."""
    if type(obj) in _SCALARS:
        return None
    for _ in range(4):  # unwrap partials and bound methods
        if isinstance(obj, functools.partial):
            obj = obj.func
        elif isinstance(obj, types.MethodType):
            obj = obj.__func__
        else:
            break
    if not isinstance(obj, types.FunctionType):
        return None
    found = obj.__globals__
    module = sys.modules.get(found.get("__name__", ""))
    return None if module is not None and module.__dict__ is found else found


class Namespaces:
    """One namespace per client module for this worker, and the names assigned in it here.

    Client's Python: cloudpickle gives every unpickled call fresh globals holding the
    values read; before the call they get this worker's assigned names (and any name
    they lack) from its copy, which takes their values back afterwards. Another Python:
    the functions are the node's own (the script run as ``__mp_main__``, forwarded
    modules), and the values carried with the call are set on those modules, except
    assigned names. A name whose value a call (or the initializer) changed is assigned
    from then on.
    """

    def __init__(self, script: Callable[[], types.ModuleType]) -> None:
        self.modules: Dict[str, Dict[str, Any]] = {}  # by-value modules: this worker's copy
        self.assigned: Dict[str, Set[str]] = {}
        self.script = script

    def adopt(self, objects: Iterable[Any], carried: Carried) -> Watched:
        """Before a call of ``objects`` (its function and arguments) that carried
        ``carried``: set up what it reads."""
        watched: Watched = []
        for obj in objects:
            fresh = _by_value_globals(obj)
            if fresh is None or any(fresh is seen for _, seen, _, _ in watched):
                continue
            name = fresh.get("__name__", "")
            assigned = self.assigned.get(name, set())
            for key, value in self.modules.get(name, {}).items():
                if key in assigned or key not in fresh:
                    fresh[key] = value
            watched.append((name, fresh, dict(fresh), True))
        for name, values in carried.items():
            namespace = self._namespace(name)
            if namespace is None:
                continue
            assigned = self.assigned.get(name, set())
            namespace.update((k, v) for k, v in values.items() if k not in assigned)
            watched.append((name, namespace, {k: namespace.get(k) for k in values}, False))
        return watched

    def keep(self, watched: Watched) -> None:
        """After the call: note what it assigned; keep the by-value globals' values."""
        for name, namespace, before, is_copy in watched:
            assigned = self.assigned.setdefault(name, set())
            if is_copy:
                for key, value in namespace.items():
                    if key not in before or before[key] is not value:
                        assigned.add(key)
                copy = self.modules.setdefault(name, {})
                copy.update((k, v) for k, v in namespace.items() if k != "__builtins__")
            else:
                assigned.update(k for k, v in before.items() if namespace.get(k) is not v)

    def _namespace(self, name: str) -> Optional[Dict[str, Any]]:
        if name in (MAIN, SCRIPT):
            return self.script().__dict__
        module = sys.modules.get(name)
        return None if module is None else module.__dict__
