"""Summarise a py-spy raw profile (``-f raw``): self and inclusive % per process and thread."""

import collections
import re
import sys

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 12
groups = collections.defaultdict(lambda: (collections.Counter(), collections.Counter(), [0]))
for line in open(path):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    frames = stack.split(";")
    procs = [f for f in frames if f.startswith("process ")]
    frames = [f for f in frames if not f.startswith("process ")]
    p = procs[-1] if procs else "profile_target (recorded without --subprocesses)"
    kind = "client" if "profile_target" in p else ("worker" if "python" in p else p[:60])
    thread = (
        "loop"
        if any("Runtime" in f for f in frames)
        else ("reader" if any("read_commands" in f for f in frames) else "main")
    )
    key = (kind, thread)
    selfc, incl, tot = groups[key]
    tot[0] += n
    if frames:
        selfc[re.sub(r" \(.*:\d+\)", lambda m: m.group(0).split(":")[0] + ")", frames[-1])] += n
    seen = set()
    for f in frames:
        g = re.sub(r":\d+\)", ")", f)
        if g not in seen:
            incl[g] += n
            seen.add(g)
grand = sum(t[0] for _, _, t in groups.values())
for key, (selfc, incl, tot) in sorted(groups.items(), key=lambda kv: -kv[1][2][0]):
    print(f"== {key}: {tot[0]} samples ({100 * tot[0] / grand:.0f}% of all)")
    print("  self:", "; ".join(f"{f} {100 * c / tot[0]:.0f}%" for f, c in selfc.most_common(top)))
    print(
        "  incl:",
        "; ".join(f"{f} {100 * c / tot[0]:.0f}%" for f, c in incl.most_common(top + 14)[8:]),
    )
