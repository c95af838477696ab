"""``colabkit release [--dry-run] [--force] [-e vXX] [--if-idle]`` (``%release``): hand the Colab runtime or
the VM back once every tier verifiably holds the final checkpoint and logs. Exit 0 when released (or, with
--dry-run, when it would be), 1 when refused."""
from __future__ import annotations

import argparse

from . import Context, common, duration_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("release", help="release the Colab runtime / halt the VM once nothing would be lost",
                       description="Flush every tier, check from the ledgers that each holds the final checkpoint "
                                   "and logs, that no trigger action is queued and no other job runs; then release "
                                   "(Colab: runtime.unassign(); VM: release.command, default 'shutdown -h +2').")
    p.add_argument("--experiment", "-e", metavar="vXX", default=None,
                   help="the experiment whose final checkpoint and logs must be safe (default: every one)")
    p.add_argument("--dry-run", action="store_true", help="show the checks and the decision; change nothing")
    p.add_argument("--force", action="store_true", help="release even when checks fail (says what may be lost)")
    p.add_argument("--if-idle", action="store_true",
                   help="only when the project has been idle for release.idle_after (for a cron job on the VM)")
    p.add_argument("--watch-idle", action="store_true",
                   help="stay in the foreground and release once idle for release.idle_after (the idle guard)")
    p.add_argument("--timeout", type=duration_arg, default=None, metavar="DURATION",
                   help="how long the flush may take (default: sync.flush_timeout)")
    common(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from .. import release
    if args.watch_idle:
        d = release.watch_idle(config=ctx.config(), on_message=None if ctx.json else ctx.out)
        ctx.emit(d.as_dict(), [])
        return 0 if d.released else 1
    d = release.release(args.experiment, config=ctx.config(), dry_run=args.dry_run, force=args.force,
                        flush_timeout=args.timeout, if_idle=args.if_idle,
                        on_message=None if ctx.json else ctx.out)
    ctx.emit(d.as_dict(), [])
    if d.decision == "dry-run":
        return 0 if d.ok else 1
    return 0 if d.released else 1
