"""``colabkit demo`` — the whole loop (init, export, pull, train with sync, preemption, resume, import,
journal, status) on local folders, in a temporary folder."""
from __future__ import annotations

import argparse

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop on local folders in a temporary folder: export, pull, train "
                                    "with sync, a preemption (SIGKILL), resume, import the logs, journal")
    p.add_argument("--dir", dest="directory", default=None, metavar="DIR",
                   help="an empty or new folder to work in (default: a new temporary folder, kept afterwards)")
    p.add_argument("--steps", type=int, default=300, metavar="N", help="training steps (default: 300)")
    p.add_argument("--save-every", type=int, default=50, metavar="N", help="checkpoint every N steps (default: 50)")
    common(p)
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace, ctx: Context) -> int:
    from ..demo import DemoError, run
    if args.steps < 2 or args.save_every < 1 or args.save_every * 2 > args.steps:
        raise DemoError(f"--steps {args.steps} --save-every {args.save_every}: the run needs at least two "
                        "checkpoints before its end to be preempted; use e.g. --steps 300 --save-every 50")
    summary = run(args.directory, steps=args.steps, save_every=args.save_every, out=ctx.out)
    if ctx.json:
        ctx.emit(summary)
    return 0
