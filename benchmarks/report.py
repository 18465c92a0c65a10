"""Statistics, the markdown tables, the targets and the JSON file.

A sample list holds one value per repetition (None where that repetition failed
or was skipped). Ratios are always ``median(contender) / median(reference)`` from
the same run; the row's unit says whether higher or lower is better.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .workloads import Row

Samples = Dict[str, Dict[str, List[Optional[float]]]]  # row key -> contender -> per-rep values


def clean(values: Sequence[Optional[float]]) -> List[float]:
    return [v for v in values if v is not None]


def median(values: Sequence[Optional[float]]) -> Optional[float]:
    got = clean(values)
    return statistics.median(got) if got else None


def fmt(value: Optional[float]) -> str:
    if value is None:
        return "—"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def spread(values: Sequence[Optional[float]]) -> str:
    got = clean(values)
    return f"{fmt(min(got))}\u2013{fmt(max(got))}" if got else "—"


def ratio(samples: Samples, key: str, name: str, reference: str) -> Optional[float]:
    mine = median(samples.get(key, {}).get(name, []))
    theirs = median(samples.get(key, {}).get(reference, []))
    if mine is None or not theirs:
        return None
    return mine / theirs


def ratio_text(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}\u00d7"


def main_table(rows: List[Row], samples: Samples, order: List[str]) -> str:
    lines = [
        "| workload | contender | median | min\u2013max | unit | \u00d7 PPE | \u00d7 raw |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    raw_rows = {"rt_p50", "rt_p90", "arg_in", "result_out", "np_in", "np_out"}
    for row in rows:
        by_contender = samples.get(row.key, {})
        names = [n for n in order if clean(by_contender.get(n, []))]
        for i, name in enumerate(names):
            values = by_contender[name]
            ref = "ppe" if name != "ppe" else None
            vs_ppe = ratio(samples, row.key, name, "ppe") if ref else None
            raw_key = {"np_in": "arg_in", "np_out": "result_out"}.get(row.key, row.key)
            vs_raw = None
            if row.key in raw_rows and name != "raw":
                mine = median(values)
                raw = median(samples.get(raw_key, {}).get("raw", []))
                vs_raw = mine / raw if mine is not None and raw else None
            better = "↑" if row.higher_better else "↓"
            title = f"{row.title} {better}" if i == 0 else ""
            lines.append(
                f"| {title} | {name} | {fmt(median(values))} | {spread(values)} | {row.unit} "
                f"| {ratio_text(vs_ppe)} | {ratio_text(vs_raw)} |"
            )
    return "\n".join(lines)


def section_table(section: Dict[str, Any]) -> str:
    """A special workload: its own header and one line per contender or mode."""
    head = section["columns"]
    lines = [
        f"| {' | '.join(head)} |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|",
    ]
    for line in section["lines"]:
        lines.append("| " + " | ".join(str(cell) for cell in line) + " |")
    return "\n".join(lines)


def cpu_speedups(samples: Samples) -> None:
    """Per repetition: serial time / contender time in that same repetition."""
    times = samples.get("cpu_time", {})
    serial = times.get("serial", [])
    speedups: Dict[str, List[Optional[float]]] = {}
    for name, values in times.items():
        if name == "serial":
            continue
        speedups[name] = [
            s / v if s is not None and v else None
            for s, v in zip(serial, values)  # same repetition
        ]
    if speedups:
        samples["cpu_speedup"] = speedups


def targets(samples: Samples, sections: Dict[str, Dict[str, Any]]) -> List[Tuple[str, str, bool]]:
    """(target, measured, met) for each target that could be measured in this run."""
    found: List[Tuple[str, str, bool]] = []

    def check(label: str, value: Optional[float], limit: float, at_least: bool, unit: str) -> None:
        if value is None:
            return
        met = value >= limit if at_least else value <= limit
        found.append((label, f"{value:.2f}{unit}", met))

    for who, tag in (("sshexec-ssh", "SSH"), ("sshexec-local", "local")):
        check(
            f"{tag}: map chunksize=1 ≥ 2.5\u00d7 PPE",
            ratio(samples, "map1", who, "ppe"),
            2.5,
            True,
            "\u00d7",
        )
        check(
            f"{tag}: map chunksize=256 ≥ 0.8\u00d7 PPE",
            ratio(samples, "map256", who, "ppe"),
            0.8,
            True,
            "\u00d7",
        )
        check(
            f"{tag}: round trip p50 ≤ 1.0\u00d7 PPE",
            ratio(samples, "rt_p50", who, "ppe"),
            1.0,
            False,
            "\u00d7",
        )
        check(
            f"{tag}: CPU-bound speedup ≥ 0.95\u00d7 PPE's",
            ratio(samples, "cpu_speedup", who, "ppe"),
            0.95,
            True,
            "\u00d7",
        )
    check(
        "SSH: map chunksize=1 ahead of execnet over ssh",
        ratio(samples, "map1", "sshexec-ssh", "execnet"),
        1.0,
        True,
        "\u00d7",
    )
    for label, key, who, limit, at_least in (  # the node-agent issue's targets
        ("asyncssh: map chunksize=1 ≥ 0.8\u00d7 execnet", "map1", "sshexec-ssh", 0.8, True),
        ("openssh: map chunksize=1 ≥ execnet", "map1", "sshexec-openssh", 1.0, True),
        ("openssh: submit+as_completed ≥ execnet", "submit_ac", "sshexec-openssh", 1.0, True),
        ("openssh: round trip p50 ≤ execnet's", "rt_p50", "sshexec-openssh", 1.0, False),
    ):
        check(label, ratio(samples, key, who, "execnet"), limit, at_least, "\u00d7")
    for key, what in (("arg_in", "argument"), ("result_out", "result")):
        for raw_key, peer in ((key, "raw one-way"), ("echo", "raw cat echo")):
            mine = median(samples.get(key, {}).get("sshexec-ssh", []))
            raw = median(samples.get(raw_key, {}).get("raw", []))
            if mine is not None and raw:
                check(
                    f"SSH: payload {what} ≥ 0.8\u00d7 {peer} channel",
                    mine / raw,
                    0.8,
                    True,
                    "\u00d7",
                )
    check(
        "SSH: construct → first result ≤ 0.5 s (warm)",
        median(samples.get("startup", {}).get("sshexec-ssh", [])),
        0.5,
        False,
        " s",
    )
    check(
        "local: startup ≤ 1.0\u00d7 PPE (spawn)",
        ratio(samples, "startup", "sshexec-local", "ppe-spawn"),
        1.0,
        False,
        "\u00d7",
    )
    for name, label in (
        ("many", "SSH: 64 sleeping workers ≥ 90% of ideal"),
        ("slowlink", "SSH: slow link ≥ 90% of ideal"),
    ):
        value = sections.get(name, {}).get("target")
        check(label, value, 90.0, True, "%")
    check(
        f"SSH: map {sections.get('memory', {}).get('items', 0):,} items with buffersize: "
        "client peak RSS < 150 MB",
        sections.get("memory", {}).get("target"),
        150.0,
        False,
        " MB",
    )
    return found


def targets_table(found: List[Tuple[str, str, bool]]) -> str:
    lines = ["| target | measured | |", "|---|---:|---|"]
    lines += [
        f"| {label} | {value} | {'met' if met else 'MISSED'} |" for label, value, met in found
    ]
    return "\n".join(lines)


def machine() -> Dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity else os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
        if hasattr(os, "sysconf")
        else None,
    }


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except OSError:
        return None


def summarize(samples: Samples) -> Dict[str, Dict[str, Dict[str, Any]]]:
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for key, by_contender in samples.items():
        out[key] = {}
        for name, values in by_contender.items():
            got = clean(values)
            out[key][name] = {
                "samples": values,
                "median": median(values),
                "min": min(got) if got else None,
                "max": max(got) if got else None,
                "ratio_to_ppe": ratio(samples, key, name, "ppe"),
            }
    return out


def write_json(path: Path, document: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    tmp.replace(path)
