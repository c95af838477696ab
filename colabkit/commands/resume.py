"""``colabkit resume`` / ``%resume`` — what each source holds, the choice, and the verified download.

    colabkit resume [--experiment vXX] [--policy newest|first] [--source NAME ...] [--dir PATH]
                    [--on-unreachable wait|older|fail] [--deadline DURATION] [--no-fetch] [--json]

By default the chosen checkpoint is fetched into the local checkpoint folder and its path printed (pass it
to train.py as ``--resume-from PATH``); ``--no-fetch`` only shows the sources and the choice.
"""
from __future__ import annotations

import argparse

from . import Context, common, duration_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="find the newest verified checkpoint across local and remote tiers, fetch it",
                       description="Ask local, then each tier in resume.priority, for its newest verified "
                                   "checkpoint; choose one by the policy; download and verify it.")
    p.add_argument("--experiment", "-e", metavar="vXX", default=None,
                   help="experiment whose checkpoints to look for (default: $COLABKIT_EXPERIMENT, else the only "
                        "experiment, else the one with the newest checkpoint or run; named in the output)")
    p.add_argument("--policy", choices=("newest", "first"), default=None,
                   help="newest: the highest step, ties to the earlier source; first: the first source holding one "
                        "(default: resume.policy)")
    p.add_argument("--source", dest="sources", action="append", metavar="NAME", default=None,
                   help="ask only this source (local or a tier name); repeat for several, in priority order")
    p.add_argument("--dir", dest="directory", metavar="PATH", default=None,
                   help="the local checkpoint folder (default: the experiment's checkpoints/)")
    p.add_argument("--on-unreachable", dest="on_unreachable", choices=("wait", "older", "fail"), default=None,
                   help="when a source that may hold a newer checkpoint cannot be reached: wait (retry until the "
                        "deadline, then fail), older (resume from the best one that can be fetched, and say so) or "
                        "fail (default: resume.on_unreachable, wait)")
    p.add_argument("--deadline", type=duration_arg, default=None, metavar="DURATION",
                   help="how long transient errors are retried, e.g. 10m (default: resume.deadline)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fetch", dest="fetch", action="store_true", default=True,
                   help="download and verify the chosen checkpoint (the default)")
    g.add_argument("--no-fetch", "--dry-run", dest="fetch", action="store_false",
                   help="only show what each source holds and the choice")
    common(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace, ctx: Context) -> int:
    from ..resume import fetch, locate
    plan = locate(config=ctx.config(), experiment=args.experiment, directory=args.directory, policy=args.policy,
                  sources=args.sources, on_unreachable=args.on_unreachable, deadline=args.deadline)
    if not ctx.json:
        for line in plan.lines():
            ctx.out(line)
    path = None
    if args.fetch and plan.choice is not None:
        path = fetch(plan, progress=not ctx.json)
    data = plan.as_dict()
    data["path"] = str(path) if path else None

    def text():
        if path is not None:
            if plan.unreachable:
                yield f"Warning: resumed from an older checkpoint: {plan.reason}"
            elif plan.choice is not None and "fell back" in plan.reason:
                yield f"Fell back: {plan.reason}"
            yield f"Resume from: {path}"
            yield f"  (train.py receives it as --resume-from {path} and COLABKIT_RESUME_FROM)"
        elif plan.choice is not None:
            yield "Not fetched (--no-fetch)."
        else:
            yield "Nothing to resume from: training starts fresh."
    ctx.emit(data, text)
    return 0
