"""Markdown tables for ``benchmarks.agent``: per entry and metric, each version's median
(min-max) over its reps, and the agent/before ratio of the medians."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import report

VERSIONS = ("before", "agent")


def values(samples: List[Dict[str, Any]], key: str) -> List[Optional[float]]:
    got: List[Optional[float]] = []
    for sample in samples:
        value = sample.get(key)
        got.append(float(value) if isinstance(value, (int, float)) else None)
    return got


def cell(samples: List[Dict[str, Any]], key: str) -> str:
    if not samples:
        return "not run"
    got = values(samples, key)
    mid = report.median(got)
    if mid is None:
        errors = sorted({str(s["error"]) for s in samples if s.get("error")})
        if errors:
            return "unavailable: " + "; ".join(e.replace("|", "/")[:200] for e in errors)
        return "—"
    if len(report.clean(got)) == 1:
        return report.fmt(mid)
    return f"{report.fmt(mid)} ({report.spread(got)})"


def ratio(by_version: Dict[str, List[Dict[str, Any]]], key: str) -> str:
    mine = report.median(values(by_version.get("agent", []), key))
    theirs = report.median(values(by_version.get("before", []), key))
    if mine is None or not theirs:
        return "—"
    return f"{mine / theirs:.2f}\u00d7"


def table(section: Dict[str, Any]) -> str:
    entries = section["entries"]
    if not entries:
        return "(no measurements)"
    labels = list(entries[0][0])
    head = [*labels, "metric", *VERSIONS, "agent/before"]
    lines = [
        f"| {' | '.join(head)} |",
        "|" + "|".join("---" if i < len(labels) + 1 else "---:" for i in range(len(head))) + "|",
    ]
    for label, by_version in entries:
        for key, name, _ in section["metrics"]:
            row = [str(label.get(k, "")) for k in labels] + [name]
            row += [cell(by_version.get(v, []), key) for v in VERSIONS]
            row.append(ratio(by_version, key))
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def partition_lines(section: Dict[str, Any]) -> List[str]:
    """'clean after X s', or 'still N processes after X s', per probe run."""
    out = []
    for label, by_version in section["entries"]:
        for version in VERSIONS:
            for sample in by_version.get(version, []):
                if sample.get("error"):
                    what = f"error: {sample['error']}"
                elif sample.get("clean") is not None:
                    what = f"clean after {sample['clean']:.1f} s"
                else:
                    what = f"still {sample.get('left')} processes after {sample.get('waited', 0):.1f} s"
                out.append(
                    f"- keepalive {label['keepalive_interval']}, {version}: {what} "
                    f"({sample.get('on_node', '?')} job processes on the node before the cut)"
                )
    return out
