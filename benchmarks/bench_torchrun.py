"""``%train --nproc-per-node 2`` overhead: the DDP template as a supervised torchrun group vs the same torchrun
command run directly.

Baseline (same run, same machine): ``subprocess.run([python, -m, torch.distributed.run, --standalone,
--nproc-per-node, 2, --max-restarts, 0, --tee, 3, templates/train_ddp.py, ...], capture_output=True)`` — two
gloo ranks on CPU (one thread each) for ``STEPS`` steps, rank 0 printing ``step N loss X`` every 10 steps,
a checkpoint every 500. ``--tee 3`` is in the baseline too: torchrun's own prefixing of every rank's output is
the same work in both. Value: ``colabkit.runner.train(..., nproc_per_node=2)`` on the same script and arguments
with ``on_line`` streaming every line, which adds preflight, ``pip freeze``, the bootstrap on every rank, the
rank-prefixed attempt log, run.json, the job file, rank tracking and progress parsing of rank 0's lines. Sync
off. Rounds alternate contenders; best of ROUNDS each. Target: value / baseline <= 1.05.

    python -m benchmarks.run torchrun      # or: python -m benchmarks.bench_torchrun
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

STEPS = int(os.environ.get("COLABKIT_BENCH_TORCHRUN_STEPS", 1000))
ROUNDS = int(os.environ.get("COLABKIT_BENCH_TORCHRUN_ROUNDS", 3))
ARGS = ["--steps", str(STEPS), "--save-every", "500", "--log-every", "10"]
TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "train_ddp.py"


def _project(work: Path) -> Path:
    root = work / "proj"
    (root / "experiments" / "v01").mkdir(parents=True)
    shutil.copy(TEMPLATE, root / "experiments" / "v01" / "train.py")
    (root / "colabkit.yaml").write_text("project: bench\ntiers: []\ntrain:\n  min_free_disk: 1MB\n")
    return root


def _direct(root: Path) -> float:
    ck = root / "direct-ck"
    shutil.rmtree(ck, ignore_errors=True)
    logs = root / "direct-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]:"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-u", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", "0", "--tee", "3", "--log-dir", str(logs),
                          str(root / "experiments" / "v01" / "train.py"), *ARGS, "--checkpoint-dir", str(ck)],
                         cwd=root / "experiments" / "v01", capture_output=True, env=env, check=True)
    dt = time.perf_counter() - t0
    assert out.stdout.count(b"[rank0]:step ") == STEPS // 10
    return dt


def _runner(root: Path) -> float:
    from colabkit import runner
    from colabkit.config import load_config
    cfg = load_config(root / "colabkit.yaml")
    shutil.rmtree(cfg.checkpoint_dir("v01"), ignore_errors=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    res = runner.train("v01", config=cfg, resume="none", sync=False, args=ARGS, on_line=lines.append,
                       nproc_per_node=2)
    dt = time.perf_counter() - t0
    assert res.ok and res.step == STEPS and sum(x.startswith("step ") for x in lines) == STEPS // 10
    return dt


def run() -> list[dict[str, Any]]:
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-torchrun-", dir=WORK))
    try:
        root = _project(work)
        t = alternating(ROUNDS, {"direct": lambda: _direct(root), "runner": lambda: _runner(root)})
        base, via = t["direct"], t["runner"]
        notes = (f"templates/train_ddp.py on 2 gloo ranks (CPU, 1 thread each), {STEPS} steps, rank 0 prints every "
                 f"10 steps, checkpoint every 500; best of {ROUNDS} alternating rounds: direct torchrun "
                 f"{[round(x, 2) for x in base]} s, %train --nproc-per-node 2 {[round(x, 2) for x in via]} s")
        return [result("train_torchrun_vs_direct_torchrun", min(via), min(base), 1.05, "s", notes=notes)]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(run())
