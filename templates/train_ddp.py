"""The torchrun variant of the template: the same tiny deterministic MLP, trained on every rank of a group.

Run it through ``%train v01 --nproc-per-node 2`` (or ``colabkit train v01 --nproc-per-node auto``), which starts
``python -m torch.distributed.run --standalone --nproc-per-node N --max-restarts 0 train.py ARGS`` and supervises
the whole group as one job; or directly with ``torchrun --standalone --nproc-per-node 2 train_ddp.py``. Started
without torchrun (``%train v01``, ``python train_ddp.py``) it runs as a group of one process.

Two ways to spread the model over the ranks:

- DDP (the default): every rank builds the same model (seeded), wraps it in ``DistributedDataParallel`` and trains
  on its own slice of the step's batch; DDP averages the gradients, so every rank holds the same weights. Global
  rank 0 writes the checkpoint *files* (``Checkpointer.save`` returns at once on the other ranks).
- ``--sharded``: FSDP2 (``fully_shard``) over a device mesh of every rank: each parameter and its optimizer state
  are DTensors split across the ranks (each rank holds its shards only), gradients are reduce-scattered. Every
  rank writes its own shards: ``Checkpointer.save`` writes a checkpoint *folder* through
  ``torch.distributed.checkpoint`` (``v01_step_00000100/`` with colabkit's manifest), and a resume loads a folder
  into the model's sharded state dict (resharding to another world size where DCP can).

Global rank 0 prints the progress lines; every rank resumes from ``--resume-from`` / ``COLABKIT_RESUME_FROM``. A run
interrupted at any point and resumed from its last checkpoint ends with the same weights, bit for bit, as a run
that was never interrupted (same world size, same mode).

Backend: nccl when every rank has a GPU, else gloo (CPU; FSDP2 runs there too, on a CPU mesh).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="train up to this step (total)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="print 'step N loss X' every N steps (rank 0)")
    p.add_argument("--resume-from", default=os.environ.get("COLABKIT_RESUME_FROM") or None, metavar="PATH",
                   help="a checkpoint to resume from (default: $COLABKIT_RESUME_FROM; none: fresh start)")
    p.add_argument("--checkpoint-dir", default=os.environ.get("COLABKIT_CHECKPOINT_DIR") or "checkpoints")
    p.add_argument("--prefix", default=os.environ.get("COLABKIT_EXPERIMENT") or "v01",
                   help="checkpoint file name prefix (default: the experiment name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch, split across the ranks")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--backend", default="auto", help="auto (nccl with GPUs, else gloo), nccl or gloo")
    p.add_argument("--sharded", action="store_true",
                   help="shard the model over the ranks with FSDP2 (DTensors) and save checkpoint folders (DCP) "
                        "instead of replicating it with DDP")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch per rank (0: torch's default)")
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="seconds to wait after each step (to make a toy run last; 0 in real runs)")
    return p.parse_args(argv)


def make_model(torch, features: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def batch(torch, step: int, *, seed: int, batch_size: int, features: int, rank: int, world: int, device):
    """This rank's slice of the batch of `step`: a function of (seed, step, rank, world) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch_size, features, generator=g)
    w = torch.linspace(-1.0, 1.0, features)
    y = (x @ w).sin().unsqueeze(1) + 0.01 * torch.randn(batch_size, 1, generator=g)
    return x[rank::world].to(device), y[rank::world].to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from colabkit import Checkpointer

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > local_rank else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:  # started without torchrun (plain `%train v01`): a group of this one process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    model = make_model(torch, args.features, args.hidden, args.seed).to(device)
    if args.sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)   # each layer's parameters become DTensors sharded on dim 0
        net = fully_shard(model, mesh=mesh)
    else:
        net = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    ckpt = Checkpointer(args.checkpoint_dir, prefix=args.prefix)

    def state_to_save(step: int) -> dict:
        if args.sharded:  # this rank's shards of the model and of Adam's moments
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_sd, optim_sd = get_state_dict(model, opt)
            return {"step": step, "model": model_sd, "optim": optim_sd}
        return {"step": step, "model": model.state_dict(), "optim": opt.state_dict()}

    step = 0
    if args.resume_from:
        if args.sharded:
            # every rank loads its shards of the folder into the sharded state dict (DCP, collectively)
            from torch.distributed.checkpoint.state_dict import set_state_dict
            state = ckpt.load(args.resume_from, state=state_to_save(0))
            set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            state = ckpt.load(args.resume_from, map_location=device)  # every rank; verified against its manifest
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
        step = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.resume_from} at step {step}", flush=True)
    if rank == 0:
        how = f"{backend}, sharded with FSDP2" if args.sharded else backend
        print(f"training {sum(p.numel() for p in model.parameters())} parameters on {world} ranks ({how}) "
              f"from step {step} to {args.steps}", flush=True)

    loss_fn = torch.nn.MSELoss()
    while step < args.steps:
        x, y = batch(torch, step + 1, seed=args.seed, batch_size=args.batch_size, features=args.features,
                     rank=rank, world=world, device=device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()  # DDP all-reduces (FSDP2 reduce-scatters) the gradients, averaged across the ranks
        opt.step()
        step += 1
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step} loss {loss.item():.6f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            # DDP (replicated): rank 0 writes a file, the other ranks return at once;
            # sharded: every rank writes its shards into one folder, rank 0 adds the manifest (a collective)
            path = ckpt.save(step, state_to_save(step))
            if rank == 0:
                print(f"saved checkpoint at iteration {step} to {path}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)  # a toy knob: makes a demo run last long enough to watch
    ckpt.close()
    if rank == 0:
        print(f"done: {step} steps", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
