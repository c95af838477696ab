"""``colabkit dashboard`` / ``%colabkit dashboard`` — the live view: runtime, training and its loss curve, each
sync tier, the triggers, the resume sources. A widget in a notebook (updating itself), text in a terminal,
``--json`` for agents; ``--follow`` keeps updating in the foreground until the run ends (what Colab renders)."""
from __future__ import annotations

import argparse

from . import Context, common, duration_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = common(sub.add_parser(
        "dashboard", help="the live dashboard: runtime, training + loss curve, sync tiers, triggers, resume sources",
        description="Show the dashboard. In a notebook it is a widget that updates itself every dashboard.refresh "
                    "while a run or sync is active, and after every cell; --follow also updates it in the "
                    "foreground until the run ends (Colab renders only those; interrupting stops the watching, "
                    "never the training). In a terminal it prints text; --json prints the snapshot."))
    p.add_argument("--experiment", "-e", metavar="vXX", help="the experiment to show (default: the newest run's)")
    p.add_argument("--follow", action="store_true",
                   help="keep updating in the foreground until no run or sync is active")
    p.add_argument("--refresh", type=duration_arg, default=None, metavar="DURATION",
                   help="seconds between refreshes (default: dashboard.refresh, 2s)")
    p.add_argument("--stop", action="store_true", help="stop every live dashboard of this kernel")
    p.set_defaults(func=dashboard)


def dashboard(args: argparse.Namespace, ctx: Context) -> int:
    from .. import dashboard as db
    if args.stop:
        n = len(db.views())
        db.close_all()
        ctx.emit({"stopped": n}, f"stopped {n} live dashboard{'s' if n != 1 else ''}")
        return 0
    cfg = ctx.config()
    if args.refresh is not None and args.refresh <= 0:
        from ..errors import ConfigError
        raise ConfigError(f"--refresh: {args.refresh:g} must be a positive duration, e.g. 2s", key="refresh",
                          value=args.refresh)
    if ctx.json:
        ctx.emit(db.snapshot_now(config=cfg, experiment=args.experiment))
        return 0
    if not ctx.notebook:
        db.snapshot_now(config=cfg, experiment=args.experiment)  # a terminal has no later refresh: ask now
    db.show(config=cfg, experiment=args.experiment, follow=args.follow, refresh=args.refresh,
            notebook=ctx.notebook, out=ctx.out)
    return 0
