"""A train.py-like script for the torchrun test: every rank runs it (gloo backend, CPU).

Usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_child.py DIR

DIR/one/o_step_00000007 must hold a folder that one process saved ({"w": arange(32).reshape(8, 4) * 7, "step": 7}).
Part 1 (DDP, replicated): rank 1 saves first and only then lets rank 0 save (through the rendezvous store): a
barrier inside rank 1's save would hang it. Part 2 (sharded): a DTensor sharded over a CPU mesh of 2, saved
synchronously and asynchronously, then loaded back on every rank; part 3 corrupts a shard of the newest folder
(every rank must fall back to the same older one); part 4 loads the one-process folder onto the 2 ranks. Every result is one JSON line per rank.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from colabkit.checkpoints import Checkpointer


def say(**kw) -> None:
    os.write(1, (json.dumps(kw) + "\n").encode())


def gloo_threads() -> int:
    """The gloo worker threads of this process (each gloo process group runs its own)."""
    n = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                n += f.read().strip() == "pt_gloo_runloop"
        except OSError:
            pass
    return n


def main() -> None:
    root = sys.argv[1]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    torch.manual_seed(0)

    # -- part 1: DDP ------------------------------------------------------------------------------
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.full((3, 4), float(rank + 1))).sum().backward()
        opt.step()
    ck = Checkpointer(os.path.join(root, "ddp"), prefix="d")
    state = {"step": 2, "model": model.module.state_dict()}
    if rank == 1:
        path = ck.save(2, state)
        say(rank=rank, part="ddp-save", path=str(path), exists=os.path.exists(path))
        store.set("rank1-saved", "1")
    else:
        store.wait(["rank1-saved"], timedelta(seconds=30))  # rank 1 returned without waiting for rank 0
        path = ck.save(2, state)
        say(rank=rank, part="ddp-save", path=str(path), exists=os.path.exists(path))
    dist.barrier()
    loaded = ck.load_latest()
    same = all(torch.equal(loaded["model"][k], v) for k, v in model.module.state_dict().items())
    say(rank=rank, part="ddp-load", step=loaded["step"], same=same, loaded=ck.loaded.name)

    # -- part 2: sharded (DTensor) ------------------------------------------------------------------
    mesh = init_device_mesh("cpu", (2,))
    full = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    w = distribute_tensor(full.clone(), mesh, [Shard(0)])
    sk = Checkpointer(os.path.join(root, "sharded"), prefix="s", async_save=True)
    sk.save(1, {"w": w, "step": 1})          # detected as sharded: a DCP folder
    with torch.no_grad():
        w.add_(100.0)                         # training goes on while the first write is in flight
    sk.save(2, {"w": w, "step": 2})          # waits for step 1, then starts step 2
    with torch.no_grad():
        w.mul_(0.0)                           # the write in flight must keep the values at save time
    sk.wait()
    template = {"w": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]), "step": 0}
    got = sk.load_latest(state=template)
    local = got["w"].to_local()
    want = (full + 100.0)[rank * 4:(rank + 1) * 4]
    say(rank=rank, part="sharded-load", step=got["step"], same=bool(torch.equal(local, want)),
        loaded=sk.loaded.name, files=sorted(os.listdir(sk.loaded.path)))

    # -- part 3: a corrupt shard: rank 0 refuses it and every rank falls back to the same older folder ------
    if rank == 0:
        shard = os.path.join(root, "sharded", "s_step_00000002", "__1_0.distcp")
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    dist.barrier()
    template = {"w": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]), "step": 0}
    got = sk.load_latest(state=template)
    want = full[rank * 4:(rank + 1) * 4]
    say(rank=rank, part="fallback", step=got["step"], same=bool(torch.equal(got["w"].to_local(), want)),
        loaded=sk.loaded.name)
    before = gloo_threads()
    sk.close()   # releases the checkpoint process group: its gloo threads end now, not at the interpreter's exit
    say(rank=rank, part="close", released=before - gloo_threads())

    # -- part 4: a folder one process wrote, resharded onto the 2 ranks (load of an explicit path) ----------
    one = os.path.join(root, "one", "o_step_00000007")
    template = {"w": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)]), "step": 0}
    got = Checkpointer(os.path.join(root, "one"), prefix="o").load(one, state=template)
    want = (full * 7)[rank * 4:(rank + 1) * 4]
    say(rank=rank, part="reshard", step=got["step"], same=bool(torch.equal(got["w"].to_local(), want)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
