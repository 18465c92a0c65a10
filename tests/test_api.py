"""The public API is typed and documented: docstrings on every public name, method and
dataclass field, and a ``py.typed`` marker that ships with the package."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import sshexec
from sshexec import SSHPoolExecutor

REPO = Path(__file__).resolve().parent.parent
PUBLIC = [name for name in sshexec.__all__ if name != "__version__"]


def own_doc(obj: Any) -> str:
    """The object's own docstring: never one inherited from a base class, nor the
    signature ``dataclasses`` writes when a class has none."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    doc = (doc or "").strip()
    if (
        inspect.isclass(obj)
        and dataclasses.is_dataclass(obj)
        and doc.startswith(obj.__name__ + "(")
    ):
        return ""
    return doc


def public_members(cls: type) -> Iterator[Tuple[str, Any]]:
    """Public methods and properties that sshexec itself defines on ``cls`` or a base
    (those inherited unchanged from the standard library have its documentation)."""
    for name in dir(cls):
        if name.startswith("_"):
            continue
        member = inspect.getattr_static(cls, name)
        function = member.fget if isinstance(member, property) else member
        function = getattr(function, "__func__", function)  # staticmethod / classmethod
        if callable(function) and getattr(function, "__module__", "").startswith("sshexec"):
            yield name, member


def test_all_names_exist_and_version_is_a_string() -> None:
    assert all(hasattr(sshexec, name) for name in sshexec.__all__)
    assert isinstance(sshexec.__version__, str) and re.match(r"^\d+\.\d+", sshexec.__version__)


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring(name: str) -> None:
    assert own_doc(getattr(sshexec, name)), f"sshexec.{name} has no docstring"


def test_public_classes_present_themselves_as_sshexec() -> None:
    classes = [getattr(sshexec, n) for n in PUBLIC if inspect.isclass(getattr(sshexec, n))]
    assert classes
    wrong = [c.__name__ for c in classes if c.__module__ != "sshexec" and c is not SSHPoolExecutor]
    assert not wrong, f"set __module__ = 'sshexec' on {wrong}"


def test_every_public_executor_method_has_a_docstring() -> None:
    members = dict(public_members(SSHPoolExecutor))
    for expected in ("submit", "map", "shutdown"):  # the overridden Executor methods count
        assert expected in members
    missing = [name for name, member in members.items() if not own_doc(member)]
    assert not missing, f"SSHPoolExecutor methods without a docstring: {missing}"


def test_every_public_method_of_public_classes_has_a_docstring() -> None:
    missing: List[str] = []
    for name in PUBLIC:
        obj = getattr(sshexec, name)
        if inspect.isclass(obj):
            missing += [f"{name}.{m}" for m, member in public_members(obj) if not own_doc(member)]
    assert not missing, f"public methods and properties without a docstring: {missing}"


def describes(doc: str, name: str) -> bool:
    """An ``Args:``/``Attributes:`` entry (``name: ...`` or ``name (type): ...``) or a
    ``name`` in double backquotes; a stray word such as "host" in prose does not count."""
    entry = rf"^\s*{re.escape(name)}( \([^)]*\))?:"
    return bool(re.search(entry, doc, re.M)) or f"``{name}``" in doc


def test_executor_documents_every_constructor_option() -> None:
    doc = own_doc(SSHPoolExecutor)
    parameters = inspect.signature(SSHPoolExecutor.__init__).parameters
    missing = [p for p in parameters if p != "self" and not describes(doc, p)]
    assert not missing, f"SSHPoolExecutor docstring does not describe {missing}"


def dataclass_fields() -> Dict[str, List[str]]:
    found = {}
    for name in PUBLIC:
        obj = getattr(sshexec, name)
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            found[name] = [f.name for f in dataclasses.fields(obj) if not f.name.startswith("_")]
    return found


def test_there_are_public_dataclasses_to_check() -> None:
    assert "Host" in dataclass_fields()


@pytest.mark.parametrize("name", sorted(dataclass_fields()))
def test_public_dataclass_fields_are_documented(name: str) -> None:
    # Google style: an ``Args:`` (what the constructor takes) or ``Attributes:`` section.
    doc = own_doc(getattr(sshexec, name))
    missing = [f for f in dataclass_fields()[name] if not describes(doc, f)]
    assert not missing, f"sshexec.{name}: fields not described in its docstring: {missing}"


def test_py_typed_marker_exists_and_ships_with_the_package() -> None:
    assert (REPO / "sshexec" / "py.typed").is_file()
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    package_data = project["tool"]["setuptools"].get("package-data", {})
    assert "py.typed" in package_data.get("sshexec", []) + package_data.get("*", [])
    assert "Typing :: Typed" in project["project"]["classifiers"]


def test_importing_sshexec_imports_neither_joblib_nor_sklearn() -> None:
    """joblib and scikit-learn are extras: ``import sshexec`` (and ``sshexec.Pool``) must
    work without them and never load them."""
    code = (
        "import sys, sshexec\n"
        "sshexec.Pool\n"
        "loaded = [m for m in ('joblib', 'sklearn', 'asyncssh') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_pool_documents_its_options() -> None:
    doc = own_doc(sshexec.Pool)
    parameters = inspect.signature(sshexec.Pool.__init__).parameters
    missing = [p for p in parameters if p != "self" and not (describes(doc, p) or f"**{p}:" in doc)]
    assert not missing, f"sshexec.Pool docstring does not describe {missing}"
