"""Shared helpers for benchmarks: every figure is a ratio against a baseline measured in the same run."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).with_name("results.json")
WORK = Path(os.environ.get("COLABKIT_BENCH_DIR", Path(__file__).with_name("_work")))


def result(name: str, value: float, baseline: float, target: float, unit: str, *,
           higher_is_better: bool = False, notes: str = "") -> dict[str, Any]:
    """One record: ratio = value / baseline; pass when ratio <= target (>= when higher_is_better)."""
    ratio = value / baseline if baseline else float("inf")
    ok = ratio >= target if higher_is_better else ratio <= target
    return {"name": name, "value": value, "baseline": baseline, "ratio": round(ratio, 4), "target": target,
            "unit": unit, "pass": bool(ok), "higher_is_better": higher_is_better, "notes": notes}


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(n: int, fn: Callable[[], Any]) -> float:
    """The fastest of `n` runs: the least noisy estimate on a shared machine."""
    return min(timed(fn) for _ in range(n))


def alternating(rounds: int, contenders: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every contender once per round, in turn, `rounds` times; each returns the seconds it measured.

    Alternating rounds put a neighbour's load on every contender alike, where measuring one contender's rounds
    and then the other's lets a burst of load fall on one side only. Take ``min`` of each list (best of N)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(fn())
    return times


def median_of(n: int, fn: Callable[[], Any]) -> float:
    return statistics.median(timed(fn) for _ in range(n))


def machine() -> dict[str, Any]:
    try:
        import multiprocessing
        cores = multiprocessing.cpu_count()
    except Exception:
        cores = None
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": cores, "memory_bytes": mem, "python": platform.python_version(),
            "platform": platform.platform()}


def report(records: list[dict[str, Any]]) -> None:
    """One line per figure: what `make bench` and each benchmark run alone print."""
    for r in records:
        print(f"   {r['name']}: ratio {r['ratio']} (target {'>=' if r.get('higher_is_better') else '<='} "
              f"{r['target']}) {'PASS' if r['pass'] else 'FAIL'}; {r.get('notes', '')}", flush=True)


def main(records: list[dict[str, Any]]) -> None:
    """What a benchmark run alone (``python -m benchmarks.bench_x``) does with its figures."""
    write_results(records)
    report(records)


def write_results(records: list[dict[str, Any]], *, path: Path = RESULTS) -> None:
    """Merge `records` into results.json by name (other benchmarks' figures are kept)."""
    existing: dict[str, Any] = {}
    if path.exists():
        try:
            existing = {r["name"]: r for r in json.loads(path.read_text()).get("results", [])}
        except (ValueError, KeyError):
            existing = {}
    for r in records:
        existing[r["name"]] = r
    data = {"machine": machine(), "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": sorted(existing.values(), key=lambda r: r["name"])}
    path.write_text(json.dumps(data, indent=2) + "\n")
