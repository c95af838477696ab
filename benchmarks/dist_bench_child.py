"""Run by bench_distributed.py under torchrun (2 ranks, gloo): times sharded saves; rank 0 prints one JSON line.

Each rank holds half of a ~256 MB DTensor state (16 tensors sharded over a CPU mesh of 2). Timed per save: the
slowest rank's time for ``Checkpointer(sharded=True).save`` (DCP save, hashing, manifest, rename) and for
``Checkpointer(sharded=True, async_save=True).save`` to return (the state staged into CPU memory; the write runs
on a background thread and is waited for outside the timed region).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from colabkit.checkpoints import Checkpointer


def main() -> None:
    work, size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    n = size // 4 // 16
    torch.manual_seed(0)
    state = {"step": 0, "model": {f"layer{i}.weight": distribute_tensor(torch.randn(n), mesh, [Shard(0)])
                                  for i in range(16)}}

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    sync_times, async_times = [], []
    ck = Checkpointer(os.path.join(work, "sync"), prefix="b", sharded=True)
    for r in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        ck.save(r, state)
        sync_times.append(slowest(time.perf_counter() - t0))
    ak = Checkpointer(os.path.join(work, "async"), prefix="b", sharded=True, async_save=True)
    for r in range(rounds):
        ak.wait()  # the previous write is not part of this save's blocking time
        dist.barrier()
        t0 = time.perf_counter()
        ak.save(r, state)
        async_times.append(slowest(time.perf_counter() - t0))
        with torch.no_grad():
            for t in state["model"].values():
                t.add_(1.0)  # training goes on while the write is in flight
    ak.close()
    local = sum(t.to_local().numel() * 4 for t in state["model"].values())
    if dist.get_rank() == 0:
        print(json.dumps({"sync": sync_times, "async": async_times, "bytes_per_rank": local,
                          "world_size": dist.get_world_size()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
