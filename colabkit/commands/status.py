"""``colabkit status`` / ``%colabkit status`` — the dashboard's facts once, as text (or JSON with ``--json``):
where this runs, the training run, sync tiers, triggers, resume sources. The live view is ``dashboard``."""
from __future__ import annotations

import argparse

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = common(sub.add_parser("status", help="the dashboard's facts once, as text or JSON "
                                             "(runtime, training, sync tiers, triggers, resume sources)"))
    p.add_argument("--experiment", "-e", metavar="vXX",
                   help="limit to one experiment (default for --resume: the only experiment, else the one with "
                        "the newest checkpoint or run)")
    p.add_argument("--resume", dest="include_resume", action="store_true",
                   help="ask every resume source now (contacts the remotes) instead of showing the cached answer")
    p.set_defaults(func=status)


def status(args: argparse.Namespace, ctx: Context) -> int:
    from .. import dashboard
    snap = dashboard.snapshot(config=ctx.config(), experiment=args.experiment, include_resume=args.include_resume,
                              refresh_resume=False)
    ctx.emit(snap, lambda: dashboard.render_text(snap))
    return 0
