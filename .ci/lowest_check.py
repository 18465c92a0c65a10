"""Guard of the lowest-dependencies tests: each pin in .ci/lowest.txt is its package's
floor in pyproject.toml, and is the version this interpreter has installed."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement  # pytest's own dependency
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pinned(requirement: Requirement, operator: str) -> list[Version]:
    return [Version(s.version) for s in requirement.specifier if s.operator == operator]


def main() -> int:
    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
    pins = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pin = Requirement(line)
            pins[canonicalize_name(pin.name)] = pin
    problems = []
    for dependency in dependencies:
        pin = pins.pop(canonicalize_name(dependency.name), None)
        floor, exact = pinned(dependency, ">="), [] if pin is None else pinned(pin, "==")
        if len(floor) != 1 or exact != floor:
            problems.append(f"pyproject.toml has {dependency}, .ci/lowest.txt has {pin}")
        elif dependency.marker is None or dependency.marker.evaluate():
            installed = Version(version(dependency.name))
            if installed != exact[0]:
                problems.append(f"{dependency.name} {installed} is installed, not {exact[0]}")
    problems += [f".ci/lowest.txt pins {pin}, which is no dependency" for pin in pins.values()]
    for problem in problems:
        print(f"lowest dependencies: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
