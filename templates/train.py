"""A small, real, deterministic training script: the starting point of an experiment (``colabkit init``).

It trains a tiny MLP on regression data generated from a seed, checkpoints with ``colabkit.Checkpointer``
and can resume from a checkpoint. It is deterministic: a run interrupted at any point and resumed from its
last checkpoint ends with the same weights, bit for bit, as a run that was never interrupted, because every
batch is drawn from a generator seeded by (seed, step) and the checkpoint holds the model, the optimiser and
the step.

Run it directly (``python train.py --steps 300``) or through ``%train v01`` / ``colabkit train v01``, which
set ``COLABKIT_CHECKPOINT_DIR``, ``COLABKIT_EXPERIMENT`` and pass ``--resume-from PATH`` after a crash.

It prints the lines %train reads its progress from::

    step 120 loss 0.031250
    saved checkpoint at iteration 200 to /.../checkpoints/v01_step_00000200.pt
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
    p.add_argument("--log-every", type=int, default=10, help="print 'step N loss X' every N steps")
    p.add_argument("--resume-from", default=os.environ.get("COLABKIT_RESUME_FROM") or None, metavar="PATH",
                   help="a checkpoint to resume from (default: $COLABKIT_RESUME_FROM; none: fresh start)")
    p.add_argument("--checkpoint-dir", default=os.environ.get("COLABKIT_CHECKPOINT_DIR") or "checkpoints")
    p.add_argument("--prefix", default=os.environ.get("COLABKIT_EXPERIMENT") or "v01",
                   help="checkpoint file name prefix (default: the experiment name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cuda or cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (a tiny model only loses time to more; 0: torch's default)")
    p.add_argument("--async-save", action="store_true",
                   help="write checkpoints in a background thread (training goes on while one is written)")
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="seconds to wait after each step (to make a toy run last; 0 in real runs)")
    return p.parse_args(argv)


def make_model(torch, features: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def batch(torch, step: int, *, seed: int, batch_size: int, features: int, device):
    """The batch of `step`: a function of (seed, step) only, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch_size, features, generator=g)
    w = torch.linspace(-1.0, 1.0, features)
    y = (x @ w).sin().unsqueeze(1) + 0.01 * torch.randn(batch_size, 1, generator=g)
    return x.to(device), y.to(device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from colabkit import Checkpointer

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    model = make_model(torch, args.features, args.hidden, args.seed).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt = Checkpointer(args.checkpoint_dir, prefix=args.prefix, async_save=args.async_save)

    step = 0
    if args.resume_from:
        state = ckpt.load(args.resume_from, map_location=device)  # verified against its manifest
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        step = int(state["step"])
        print(f"resumed from {args.resume_from} at step {step}", flush=True)
    print(f"training {sum(p.numel() for p in model.parameters())} parameters on {device} "
          f"from step {step} to {args.steps}", flush=True)

    loss_fn = torch.nn.MSELoss()
    while step < args.steps:
        x, y = batch(torch, step + 1, seed=args.seed, batch_size=args.batch_size, features=args.features,
                     device=device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            path = ckpt.save(step, {"step": step, "model": model.state_dict(), "optim": opt.state_dict()})
            print(f"saved checkpoint at iteration {step} to {path}", flush=True)
        if args.step_delay:
            time.sleep(args.step_delay)  # a toy knob: makes a demo run last long enough to watch
    ckpt.close()
    print(f"done: {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
