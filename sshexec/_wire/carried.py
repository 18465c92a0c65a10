"""The globals a call reads, carried to a node of another Python version.

The rule, one for the whole pool: a task sees the values that the client's globals it
reads (those of ``__main__`` and of modules pickled by value) had when the call was
pickled (as cloudpickle, and so loky, gives them), except names that
the initializer or an earlier task on that worker assigned: those keep the worker's
value. On a worker of the client's Python, cloudpickle carries the values with the
function and ``_node.namespaces`` keeps the assigned ones. On a worker of another
Python, functions and classes of the script travel by reference (the node runs the
script as ``__mp_main__``, whose ``if __name__ == "__main__":`` part does not run):
each such reference is pickled as ``carry(obj, module, values)`` (``reduce``), with the
current values of the globals its code reads, and the worker applies them over the
module before the call (``take``, then ``Namespaces.adopt``).

Owns: which globals a function or class reads (``reduce``, client) and their hand-over
on the worker (``carry``, ``take``, ``note``). Shipped to nodes. Must not import: any
sshexec module outside ``_wire``, or anything beyond the stdlib and cloudpickle.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Dict, List, Optional, Set, Tuple

import cloudpickle

Carried = Dict[str, Dict[str, Any]]  # module name -> {global name: value}

_NOT_DATA = (
    types.ModuleType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.FunctionType,
    type,
)
_taken = threading.local()  # .carried: what the unpickling on this thread carried


def _by_value(module_name: str) -> bool:
    """A module whose code cloudpickle pickles by value: ``__main__``, or one registered
    with ``register_pickle_by_value``."""
    if module_name == "__main__":
        return True
    registered = getattr(cloudpickle.cloudpickle, "_is_registered_pickle_by_value", None)
    module = sys.modules.get(module_name)
    return bool(module is not None and registered is not None and registered(module))


def _names_in(code: types.CodeType, names: Set[str]) -> None:
    names.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _names_in(const, names)


def _functions_of(obj: Any) -> Tuple[types.FunctionType, ...]:
    if isinstance(obj, types.FunctionType):
        return (obj,)
    found: List[Any] = []
    for value in vars(obj).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            found.extend(f for f in (value.fget, value.fset, value.fdel) if f is not None)
        elif isinstance(value, types.FunctionType):
            found.append(value)
    return tuple(f for f in found if isinstance(f, types.FunctionType))


def reduce(obj: Any, is_script_global: Any) -> Optional[Tuple[Any, ...]]:
    """Client, for a node of another Python: ``obj`` (a function or class sent by
    reference) as ``carry(obj, module, values)`` when it belongs to a module pickled by
    value and its code reads globals there; None otherwise. ``is_script_global`` tells
    which values are such functions or classes themselves (sent by reference, with what
    they read in turn); other functions, classes and modules are not carried."""
    module_name = getattr(obj, "__module__", None) or ""
    if not _by_value(module_name):
        return None
    namespace = sys.modules[module_name].__dict__
    names: Set[str] = set()
    for function in _functions_of(obj):
        if function.__globals__ is namespace:
            _names_in(function.__code__, names)
    values = {}
    for name in names:
        if (name.startswith("__") and name.endswith("__")) or name not in namespace:
            continue
        value = namespace[name]
        if value is obj or (isinstance(value, _NOT_DATA) and not is_script_global(value)):
            continue
        values[name] = value
    if not values:
        return None
    return carry, (obj, module_name, values)


def carry(obj: Any, module: str, values: Dict[str, Any]) -> Any:
    """Worker (called by unpickling): note ``values`` of ``module``'s globals, for the
    worker to apply before the call runs (``take``); ``obj`` itself is the result."""
    note({module: values})
    return obj


def note(carried: Carried) -> None:
    """Worker: add ``carried`` to what this thread's unpickling carried (a stored
    function unpickled once notes its values again for each call)."""
    mine: Optional[Carried] = getattr(_taken, "carried", None)
    if mine is None:
        mine = _taken.carried = {}
    for module, values in carried.items():
        mine.setdefault(module, {}).update(values)


def take() -> Carried:
    """Worker: what the unpickling on this thread carried since the last ``take``."""
    mine: Optional[Carried] = getattr(_taken, "carried", None)
    _taken.carried = None
    return mine or {}
