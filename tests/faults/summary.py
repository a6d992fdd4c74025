"""Per-scenario figures from a soak report (one JSON line per cycle, see harness.CycleReport):
cycles, recovery p50/max, write stall p50/max and leaks, as a markdown table.

    python -m tests.faults.summary soak-report.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def table(rows: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if "recovery_s" in row:
            by[row["scenario"]].append(row)
    out = ["| scenario | cycles | recovery p50 | recovery max | stall p50 | stall max | leaks |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for scenario, cycles in sorted(by.items()):
        rec = [float(c["recovery_s"]) for c in cycles]
        stall = [float(c.get("stall_s", 0.0)) for c in cycles]
        leaks = sum(len(c.get("leaks", [])) for c in cycles)
        out.append(f"| {scenario} | {len(cycles)} | {statistics.median(rec):.3f} s | "
                   f"{max(rec):.3f} s | {statistics.median(stall):.3f} s | {max(stall):.3f} s | "
                   f"{leaks} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.faults.summary REPORT.jsonl", file=sys.stderr)
        return 2
    try:
        lines = Path(argv[0]).read_text().splitlines()
    except OSError as exc:
        print(f"summary: {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 1
    print(table([json.loads(line) for line in lines if line.strip()]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
