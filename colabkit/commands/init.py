"""``colabkit init [DIR] [--experiment v01]`` — scaffold a project from the templates (never overwrites)."""
from __future__ import annotations

import argparse
import os

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="scaffold a project: colabkit.yaml, journal.md, .gitignore, notebook, "
                                    "experiments/v01/train.py (existing files are never overwritten)")
    p.add_argument("directory", nargs="?", default=None, metavar="DIR", help="the project folder (default: here)")
    p.add_argument("--experiment", "-e", default="v01", metavar="vXX", help="the first experiment (default: v01)")
    p.add_argument("--project", default=None, metavar="NAME", help="project name (default: the folder's name)")
    common(p)
    p.set_defaults(func=init)


def init(args: argparse.Namespace, ctx: Context) -> int:
    from ..templates import scaffold
    res = scaffold(args.directory, experiment=args.experiment, project=args.project)

    def rel(p) -> str:
        return os.path.relpath(p, res.root)

    def text():
        yield f"project at {res.root}"
        for p in res.created:
            yield f"  created  {rel(p)}"
        for p in res.skipped:
            yield f"  skipped  {rel(p)} (exists; left as it is)"
        if res.created:
            yield (f"next: cd {res.root} && colabkit train {res.experiment} -- --steps 300   "
                   f"(or %train {res.experiment} in the notebook)")
        else:
            yield "nothing to do: every file already exists"
    ctx.emit(res.as_dict(), text)
    return 0
