"""Where the solver time goes: sum the per-step seconds recorded by a solver over all matrices of a run.

Usage: python benchmarks/solver_time.py RUN_DIR [RUN_DIR ...]   (reads RUN_DIR/results.json)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def breakdown(results: dict) -> dict:
    steps: dict[str, float] = defaultdict(float)
    for m in results["matrices"]:
        for k, v in m.get("info", {}).get("time", {}).items():
            steps[k] += v
    return dict(sorted(steps.items(), key=lambda kv: -kv[1]))


def main(argv: list[str]) -> int:
    for d in argv:
        r = json.loads((Path(d) / "results.json").read_text())
        s = r["seconds"]
        print(f"## {r['method']} {r['spec']} ({d})\n")
        print("| stage | seconds |\n|---|---|")
        for k, v in s.items():
            print(f"| {k} | {v:.1f} |")
        print("\n| solver step (sum over matrices) | seconds |\n|---|---|")
        for k, v in breakdown(r).items():
            print(f"| {k} | {v:.1f} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
