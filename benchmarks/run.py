"""Run every benchmark (or those named) and merge the figures into benchmarks/results.json.

    python -m benchmarks.run            # all
    python -m benchmarks.run sync hub   # bench_sync.py and bench_hub.py only
    python -m benchmarks.run --table    # results.json as the Markdown table the README shows
"""
from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

from .common import RESULTS, report, write_results


def table(path: Path = RESULTS) -> str:
    """results.json as a Markdown table: figure, ratio, target, pass, what was measured."""
    import json
    data = json.loads(path.read_text())
    m = data["machine"]
    lines = [f"Measured {data['updated'][:10]} on {m['cpu']}, {m['cores']} cores, "
             f"{round(m['memory_bytes'] / 2**30)} GiB, Python {m['python']} (no GPU).", "",
             "| figure | ratio | target | pass | what was measured |", "|---|---|---|---|---|"]
    for r in data["results"]:
        op = ">=" if r.get("higher_is_better") else "<="
        notes = r.get("notes", "").replace("|", "/")
        lines.append(f"| `{r['name']}` | {r['ratio']:g} | {op} {r['target']:g} | {'yes' if r['pass'] else '**no**'} "
                     f"| {notes} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv == ["--table"]:
        print(table())
        return 0
    here = Path(__file__).parent
    names = argv or sorted(p.stem[len("bench_"):] for p in here.glob("bench_*.py"))
    failed = []
    for name in names:
        t0 = time.perf_counter()
        print(f"== bench_{name}", flush=True)
        try:
            records = importlib.import_module(f"benchmarks.bench_{name}").run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        write_results(records)
        report(records)
        print(f"   ({time.perf_counter() - t0:.0f}s)", flush=True)
    if failed:
        print(f"benchmarks that raised: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
