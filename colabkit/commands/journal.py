"""``colabkit journal data | package | show`` (``%journal ...``): the entries journal.md keeps."""
from __future__ import annotations

import argparse

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("journal", help="record a data set or an added package in journal.md")
    ss = p.add_subparsers(dest="action", metavar="ACTION")
    ss.required = True

    d = common(ss.add_parser("data", help="record a data set: name, source, version, preprocessing"))
    d.add_argument("name", metavar="NAME")
    d.add_argument("--source", default=None, help="URL or location (G Drive/data/raw/..., an HF dataset)")
    d.add_argument("--version", dest="data_version", default=None, help="the data set's version")
    d.add_argument("--preprocessing", default=None, help="what was done to it")
    d.add_argument("--downloaded", default=None, help="download date (default: today)")
    d.set_defaults(func=data)

    k = common(ss.add_parser("package", help="pin an installed package in requirements.txt and record why"))
    k.add_argument("name", metavar="NAME")
    k.add_argument("--reason", required=True, help="why it was added")
    k.add_argument("--experiment", metavar="vXX", default=None,
                   help="pin it in experiments/vXX/requirements.txt (default: the project's requirements.txt)")
    k.add_argument("--requirements", metavar="PATH", default=None, help="another requirements file")
    k.set_defaults(func=package)

    s = common(ss.add_parser("show", help="print journal.md (the last N entries with -n)"))
    s.add_argument("-n", type=int, default=None, help="only the last N entries")
    s.set_defaults(func=show)


def data(args: argparse.Namespace, ctx: Context) -> int:
    from .. import journal
    entry = journal.add_data(args.name, config=ctx.config(), source=args.source, version=args.data_version,
                             preprocessing=args.preprocessing, downloaded=args.downloaded)
    ctx.emit({"entry": entry, "journal": str(journal.journal_path(ctx.config()))},
             ["Added to journal.md:", *("  " + x for x in entry.rstrip().splitlines())])
    return 0


def package(args: argparse.Namespace, ctx: Context) -> int:
    from .. import journal
    res = journal.add_package(args.name, reason=args.reason, config=ctx.config(), experiment=args.experiment,
                              requirements=args.requirements)
    ctx.emit(res, [f"Pinned {res['line']} in {res['requirements']}", "Added to journal.md:",
                   *("  " + x for x in res["entry"].rstrip().splitlines())])
    return 0


def show(args: argparse.Namespace, ctx: Context) -> int:
    from .. import journal
    text = journal.read(ctx.config())
    if args.n is not None:
        entries = text.split("\n## ")[1:]
        text = "\n".join("## " + e.rstrip("\n") + "\n" for e in entries[-args.n:]) if args.n > 0 else ""
    ctx.emit({"journal": str(journal.journal_path(ctx.config())), "text": text},
             text.rstrip() or "journal.md is empty")
    return 0
