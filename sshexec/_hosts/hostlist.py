"""Slurm's hostlist syntax, as pure functions.

Owns: ``expand_hostlist`` (equal to ``scontrol show hostnames``), its inverse
``compress_hostlist`` and Slurm's per-node counts (``4(x2),2``). Must not import: anything
but the standard library; no I/O.
"""

from __future__ import annotations

import itertools
import re
from typing import Iterable, List, Optional, Tuple

MAX_RANGE = 64 * 1024  # Slurm's own limit on one range: "Too many hosts in range"
MAX_HOSTS = 1024 * 1024  # a list that expands past this is a typo, not a cluster
_SEPARATORS = ",\t "
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_COUNT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
_TRAILING_DIGITS = re.compile(r"^(.*?)(\d*)$")


def _tokens(text: str) -> List[str]:
    """Split at commas, spaces and tabs outside brackets; brackets must pair, unnested."""
    tokens: List[str] = []
    current: List[str] = []
    depth = 0
    for char in text:
        if char == "[":
            if depth:
                raise ValueError(f"invalid hostlist {text!r}: '[' inside brackets")
            depth = 1
        elif char == "]":
            if not depth:
                raise ValueError(f"invalid hostlist {text!r}: ']' without '['")
            depth = 0
        elif char in _SEPARATORS and not depth:
            if current:
                tokens.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth:
        raise ValueError(f"invalid hostlist {text!r}: '[' without ']'")
    if current:
        tokens.append("".join(current))
    return tokens


def _numbers(text: str, body: str) -> List[str]:
    """``1-3,07`` → ``["1", "2", "3", "07"]``: each range zero-padded to its low end's width."""
    out: List[str] = []
    for item in body.split(","):
        match = _RANGE.match(item)
        if match is None:
            raise ValueError(f"invalid hostlist {text!r}: bad range {item!r} in [{body}]")
        low_text, high_text = match.group(1), match.group(2)
        low = int(low_text)
        high = int(high_text) if high_text is not None else low
        if high < low:
            raise ValueError(f"invalid hostlist {text!r}: range {item!r} runs backwards")
        if high - low + 1 > MAX_RANGE:
            raise ValueError(f"invalid hostlist {text!r}: range {item!r} is over {MAX_RANGE}")
        width = len(low_text)
        out.extend(str(n).zfill(width) for n in range(low, high + 1))
    return out


def _expand_token(text: str, token: str) -> List[str]:
    parts = re.split(r"\[([^\]]*)\]", token)  # literal, group, literal, group, ..., literal
    if len(parts) == 1:
        return [token]
    if parts[-1]:
        raise ValueError(
            f"invalid hostlist {text!r}: text after the last bracket in {token!r} "
            "(Slurm refuses it too)"
        )
    literals, groups = parts[0::2], [_numbers(text, body) for body in parts[1::2]]
    size = 1
    for group in groups:
        size *= len(group)
    if size > MAX_HOSTS:
        raise ValueError(f"invalid hostlist {text!r}: {token!r} names over {MAX_HOSTS} hosts")
    # Slurm's order: the last group varies fastest, then the first, second, ... and the
    # one before the last slowest (it peels bracket groups off from the right).
    order = [*range(len(groups) - 2, -1, -1), len(groups) - 1]
    names: List[str] = []
    for combo in itertools.product(*(groups[i] for i in order)):
        chosen = dict(zip(order, combo))
        names.append("".join(literals[i] + chosen[i] for i in range(len(groups))) + literals[-1])
    return names


def expand_hostlist(text: str) -> List[str]:
    """The host names of a Slurm hostlist, in order, as ``scontrol show hostnames`` gives them.

    Handles several comma-separated items, ranges and single numbers in one bracket
    (``n[1-3,07]``), zero padding (the width of each range's low end: ``n[08-10]``),
    prefixes and text between bracket groups (``rack[1-2]-node[01-04]``), names that are
    not ranges at all (``login1``), and spaces or tabs between items. Duplicates are kept.

    Args:
        text: A hostlist such as ``$SLURM_JOB_NODELIST``.

    Returns:
        The names; an empty list for an empty string.

    Raises:
        ValueError: Unpaired or nested brackets, a range that is not ``N`` or ``N-M``
            with ``N <= M``, text after the last bracket group (which Slurm refuses),
            or a list too large to be a cluster.
    """
    if not isinstance(text, str):
        raise TypeError(f"a hostlist must be a str, got {type(text).__name__}")
    names: List[str] = []
    for token in _tokens(text):
        names.extend(_expand_token(text, token))
        if len(names) > MAX_HOSTS:
            raise ValueError(f"invalid hostlist {text[:60]!r}...: over {MAX_HOSTS} hosts")
    return names


def compress_hostlist(names: Iterable[str]) -> str:
    """A hostlist that ``expand_hostlist`` turns back into exactly ``names`` (order and
    duplicates kept): runs of one prefix with consecutive, equally padded numbers become
    ``prefix[a-b,c]``.

    Raises:
        ValueError: A name that is empty or holds brackets, commas or spaces.
    """
    items: List[str] = []
    prefix: Optional[str] = None
    runs: List[Tuple[str, int]] = []  # (low end as written, high end)

    def flush() -> None:
        if prefix is None:
            return
        if len(runs) == 1 and str(runs[0][1]).zfill(len(runs[0][0])) == runs[0][0]:
            items.append(prefix + runs[0][0])  # a single name needs no brackets
            return
        body = ",".join(
            low if int(low) == high else f"{low}-{str(high).zfill(len(low))}" for low, high in runs
        )
        items.append(f"{prefix}[{body}]")

    for name in names:
        if not name or any(c in name for c in "[]" + _SEPARATORS):
            raise ValueError(f"{name!r} cannot be in a hostlist")
        match = _TRAILING_DIGITS.match(name)
        assert match is not None  # the pattern matches every string
        head, digits = match.group(1), match.group(2)
        if not digits:
            flush()
            prefix, runs = None, []
            items.append(name)
            continue
        if head == prefix and runs:
            low, high = runs[-1]
            if int(digits) == high + 1 and str(high + 1).zfill(len(low)) == digits:
                runs[-1] = (low, high + 1)
                continue
            runs.append((digits, int(digits)))
            continue
        flush()
        prefix, runs = head, [(digits, int(digits))]
    flush()
    return ",".join(items)


def expand_counts(text: str) -> List[int]:
    """Slurm's per-node counts: ``4(x2),2`` → ``[4, 4, 2]``."""
    counts: List[int] = []
    for item in text.split(","):
        match = _COUNT.match(item.strip())
        if match is None:
            raise ValueError(f"invalid count {item!r} in {text!r}: expected N or N(xK)")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
