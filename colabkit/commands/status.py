"""``colabkit status`` / ``%colabkit status`` — where this runs, the training run, sync tiers, resume sources."""
from __future__ import annotations

import argparse

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = common(sub.add_parser("status", help="the dashboard: runtime, training, sync tiers, resume sources"))
    p.add_argument("--experiment", "-e", metavar="vXX",
                   help="limit to one experiment (default for --resume: the only experiment, else the one with "
                        "the newest checkpoint or run)")
    p.add_argument("--resume", dest="include_resume", action="store_true",
                   help="also ask every resume source what it holds (contacts the remotes)")
    p.set_defaults(func=status)


def status(args: argparse.Namespace, ctx: Context) -> int:
    from .. import dashboard
    snap = dashboard.snapshot(config=ctx.config(), experiment=args.experiment, include_resume=args.include_resume)
    if ctx.json or not ctx.notebook:
        ctx.emit(snap, lambda: dashboard.render_text(snap))
    else:
        dashboard.show(snap, notebook=True, out=ctx.out)
    return 0
