"""``%train`` overhead: the template's training through the runner vs the same script run directly.

Baseline (same run, same machine): ``subprocess.run([python, train.py, ...], capture_output=True)`` — the
template (a tiny MLP on seeded data, CPU, one thread) for ``STEPS`` steps, printing ``step N loss X`` every 10
steps and checkpointing every 2000 through colabkit.Checkpointer. Value: ``colabkit.runner.train(...)`` on the
same script and arguments with ``on_line`` streaming every line to the caller, which adds preflight, ``pip
freeze`` into the log folder, the bootstrap, the per-attempt log, run.json, the job file and progress parsing.
Background sync is off in the headline figure (``--no-sync``; it is a separate benchmark, bench_sync.py) and
measured on in a second record against the same baseline. Rounds alternate contenders; best of ROUNDS each.
Target: value / baseline <= 1.05 with a run long enough (~25 s) that fixed start-up costs count honestly.

    python -m benchmarks.run train      # or: python -m benchmarks.bench_train
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import WORK, alternating, main, result

STEPS = int(os.environ.get("COLABKIT_BENCH_TRAIN_STEPS", 20000))
ROUNDS = int(os.environ.get("COLABKIT_BENCH_TRAIN_ROUNDS", 3))
ARGS = ["--steps", str(STEPS), "--save-every", "2000", "--log-every", "10"]


def _project(work: Path, *, sync: bool) -> Path:
    from colabkit.templates import scaffold
    root = work / ("proj-sync" if sync else "proj")
    scaffold(root, project="bench")
    tiers = (f"tiers:\n  - name: backup\n    remote: local\n    path: {work / 'backup'}\n    every: 1h\n"
             if sync else "tiers: []\n")
    (root / "colabkit.yaml").write_text(f"project: bench\n{tiers}train:\n  min_free_disk: 1MB\n")
    return root


def _direct(root: Path) -> float:
    ck = root / "direct-ck"
    shutil.rmtree(ck, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(root / "experiments" / "v01" / "train.py"), *ARGS,
                          "--checkpoint-dir", str(ck)], cwd=root / "experiments" / "v01", capture_output=True,
                         env=env, check=True)
    dt = time.perf_counter() - t0
    assert out.stdout.count(b"\n") > STEPS // 10
    return dt


def _runner(root: Path, *, sync: bool) -> float:
    from colabkit import runner
    from colabkit.config import load_config
    cfg = load_config(root / "colabkit.yaml")
    shutil.rmtree(cfg.checkpoint_dir("v01"), ignore_errors=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    res = runner.train("v01", config=cfg, resume="none", sync=sync, args=ARGS, on_line=lines.append)
    dt = time.perf_counter() - t0
    assert res.ok and res.step == STEPS and len(lines) > STEPS // 10
    return dt


def run() -> list[dict[str, Any]]:
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=WORK))
    try:
        plain, synced = _project(work, sync=False), _project(work, sync=True)
        t = alternating(ROUNDS, {"direct": lambda: _direct(plain), "runner": lambda: _runner(plain, sync=False),
                                 "runner+sync": lambda: _runner(synced, sync=True)})
        base, via, via_sync = t["direct"], t["runner"], t["runner+sync"]
        b = min(base)
        notes = (f"template train.py, {STEPS} steps on CPU (1 thread), a line every 10 steps, checkpoint every 2000; "
                 f"best of {ROUNDS} alternating rounds: direct {[round(x, 2) for x in base]} s, "
                 f"runner {[round(x, 2) for x in via]} s, runner+sync {[round(x, 2) for x in via_sync]} s")
        return [result("train_runner_vs_direct", min(via), b, 1.05, "s", notes=notes),
                result("train_runner_with_sync_vs_direct", min(via_sync), b, 1.10, "s",
                       notes="the same, with background sync to a local-folder tier started by the run and flushed "
                             "at its end (a settled flush: the child has exited, so nothing waits out sync.settle)")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(run())
