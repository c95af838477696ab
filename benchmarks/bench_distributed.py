"""Sharded checkpoints across 2 ranks: how long an asynchronous DCP save blocks the training loop.

Baseline (same run, same ~256 MB DTensor state sharded over 2 ranks under real torchrun, gloo, same disk): a
synchronous ``Checkpointer(sharded=True).save`` (DCP save of every rank's shard, each rank hashing its own
shards, the manifest, the rename into place). Value: the time ``Checkpointer(sharded=True, async_save=True)
.save()`` takes to return (DCP's async_save staging the shards into CPU memory; the write, hashes, manifest and
rename happen on a background thread, waited for outside the timed region). Both are the slowest rank's time,
best of ROUNDS. Target: value / baseline <= 0.25.

    python -m benchmarks.run distributed      # or: python -m benchmarks.bench_distributed
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import WORK, result, write_results

SIZE = int(os.environ.get("COLABKIT_BENCH_DIST_BYTES", 256 * 1024 * 1024))
ROUNDS = int(os.environ.get("COLABKIT_BENCH_DIST_ROUNDS", 3))
ROOT = Path(__file__).resolve().parent.parent


def run() -> list[dict[str, Any]]:
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-dist-", dir=WORK))
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               "2", str(Path(__file__).with_name("dist_bench_child.py")), str(work), str(SIZE),
                               str(ROUNDS)], capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr[-2000:]}")
        data = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
        value, baseline = min(data["async"]), min(data["sync"])
        total = data["bytes_per_rank"] * data["world_size"]
        return [result("distributed_async_save_blocking_vs_sharded_save", value, baseline, 0.25, "s",
                       notes=f"{total / 2**20:.0f} MiB DTensor state over {data['world_size']} ranks (torchrun, "
                             f"gloo), best of {ROUNDS}, slowest rank; async save() return time {value * 1000:.0f} ms "
                             f"vs sharded save (DCP + hashes + manifest + rename) {baseline * 1000:.0f} ms")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    write_results(run())
