"""`make bench`: runs every benchmarks/<name>/bench.py in its own process, then writes one summary table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import RESULTS

HERE = Path(__file__).resolve().parent


def main() -> int:
    names = sorted(p.parent.name for p in HERE.glob("*/bench.py"))
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}.bench"], cwd=HERE.parent)
        if done.returncode:
            failed.append(name)
    rows = ["| benchmark | ratio | value | target | met |", "|---|---|---|---|---|"]
    for name in names:
        path = RESULTS / f"{name}.json"
        if name in failed or not path.is_file():
            rows.append(f"| {name} | (failed) | | | no |")
            continue
        result = json.loads(path.read_text())
        if "skipped" in result:
            rows.append(f"| {name} | (skipped: {result['skipped']}) | | | |")
        for label, r in result["ratios"].items():
            rows.append(
                f"| {name} | {label} | {r['value']:.2f} | {r['target']} | "
                f"{'yes' if r['value'] >= r['target'] else 'no'} |"
            )
    table = "\n".join(rows) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.md").write_text(table)
    print("\n" + table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
