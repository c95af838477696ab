"""Asynchronous checkpoint save: how long ``Checkpointer.save`` blocks the training loop.

Baseline (same run, same ~256 MB state dict of float32 tensors, same folder): ``torch.save`` to a file, flush
and fsync, the cost a training step pays without the helper. Value: the time ``Checkpointer(async_save=True)
.save()`` takes to return (a copy of the state into CPU memory; the write, manifest and pointer happen on a
background thread, waited for outside the timed region). Target: value / baseline <= 0.25.

    python -m benchmarks.run checkpoints      # or: python -m benchmarks.bench_checkpoints
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import WORK, main, result

SIZE = int(os.environ.get("COLABKIT_BENCH_CKPT_BYTES", 256 * 1024 * 1024))
ROUNDS = int(os.environ.get("COLABKIT_BENCH_CKPT_ROUNDS", 5))


def _state(torch) -> dict[str, Any]:
    n = SIZE // 4 // 16
    return {"step": 1, "model": {f"layer{i}.weight": torch.randn(n) for i in range(16)}}


def run() -> list[dict[str, Any]]:
    import torch

    from colabkit.checkpoints import Checkpointer

    torch.manual_seed(0)
    state = _state(torch)
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=WORK))
    try:
        base_times, async_times = [], []
        for r in range(ROUNDS):
            target = work / f"plain_{r}.pt"
            t0 = time.perf_counter()
            with open(target, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            base_times.append(time.perf_counter() - t0)
            target.unlink()
        ck = Checkpointer(work / "async", prefix="bench", async_save=True)
        for r in range(ROUNDS):
            ck.wait()  # the previous write is not part of this save's blocking time
            state["step"] = r
            t0 = time.perf_counter()
            ck.save(r, state)
            async_times.append(time.perf_counter() - t0)
            for t in state["model"].values():
                t.add_(1.0)  # the next step changes the weights while the write is in flight
        ck.close()
        value, baseline = min(async_times), min(base_times)
        size = sum(t.numel() * 4 for t in state["model"].values())
        return [result("checkpoint_async_save_blocking_vs_torch_save_fsync", value, baseline, 0.25, "s",
                       notes=f"{size / 2**20:.0f} MiB state dict, best of {ROUNDS}; async save() return time "
                             f"{value * 1000:.0f} ms vs torch.save+fsync {baseline * 1000:.0f} ms")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(run())
