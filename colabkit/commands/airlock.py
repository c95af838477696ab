"""``colabkit airlock export | pull | status | import`` (``%airlock ...``): move code out, logs back."""
from __future__ import annotations

import argparse

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("airlock", help="export an experiment's code, pull it on the cluster, check drift, import logs")
    ss = p.add_subparsers(dest="action", metavar="ACTION")
    ss.required = True

    e = common(ss.add_parser("export", help="bundle the committed code of experiments/vXX and upload it"))
    e.add_argument("experiment", metavar="vXX")
    e.add_argument("--allow-dirty", action="store_true",
                   help="bundle uncommitted changes too (the manifest records the diff's hash)")
    e.set_defaults(func=export)

    pl = common(ss.add_parser("pull", help="download a bundle, verify every file and unpack it safely"))
    pl.add_argument("experiment", metavar="vXX")
    pl.add_argument("--bundle", default="latest", metavar="HASH|latest", help="which bundle (default: latest)")
    pl.add_argument("--to", metavar="DIR", default=None, help="project folder to unpack into (default: the root)")
    pl.add_argument("--install", action="store_true", help="pip install -r the bundle's requirements.txt")
    pl.add_argument("--force", action="store_true", help="overwrite files with local changes")
    pl.add_argument("--missing-ok", action="store_true",
                    help="when nothing was exported yet, say so and succeed (a notebook cell meant for the "
                         "cluster that also runs where the code is written)")
    pl.set_defaults(func=pull)

    st = common(ss.add_parser("status", help="drift between the working tree and the last bundle (exit 3 if drifted)"))
    st.add_argument("experiment", metavar="vXX", nargs="?", default=None)
    st.add_argument("--root", metavar="DIR", default=None, help="project folder to check (default: the root)")
    st.set_defaults(func=status)

    im = common(ss.add_parser("import", help="bring a run's logs into experiments/vXX/logs and write the journal"))
    im.add_argument("experiment", metavar="vXX")
    src = im.add_mutually_exclusive_group()
    src.add_argument("--from", dest="from_", metavar="REMOTE", default=None,
                     help="the tier holding the synced logs (default: the airlock remote)")
    src.add_argument("--gdown", metavar="ID_OR_URL", default=None, help="a publicly shared Drive file (gdown)")
    im.add_argument("--no-journal", dest="journal", action="store_false", help="do not write journal.md")
    im.set_defaults(func=import_)


def export(args: argparse.Namespace, ctx: Context) -> int:
    from .. import airlock
    res = airlock.export(args.experiment, config=ctx.config(), allow_dirty=args.allow_dirty,
                         progress=not ctx.json)
    if res["dirty"]:
        diff = res["diff_sha256"][:16] + "…" if res["diff_sha256"] else "unknown (no git)"
        ctx.warn(f"WARNING: {args.experiment} was exported WITH UNCOMMITTED CHANGES (--allow-dirty); the manifest "
                 f"records dirty=true and diff sha256 {diff}. This bundle cannot be reproduced from git.")

    def text():
        where = f"{res['remote']}:{res['remote_path']}"
        yield f"Bundle {res['short']} of {res['experiment']}: {res['files']} files, {_size(res['size'])}" \
              f" (zip {_size(res['bundle_size'])})"
        if res["commit"]:
            yield f"  commit {res['commit'][:12]}" + (f" on {res['branch']}" if res["branch"] else "")
        if res["uploaded"]:
            yield f"  uploaded to {where} ({_size(res['bytes_uploaded'])})"
        elif res["latest_updated"]:
            yield f"  unchanged: {where} already holds it; latest.json now points at it"
        else:
            yield f"  unchanged since the last export: nothing uploaded ({where})"
    ctx.emit(res, text)
    return 0


def pull(args: argparse.Namespace, ctx: Context) -> int:
    from .. import airlock
    res = airlock.pull(args.experiment, config=ctx.config(), bundle=args.bundle, to=args.to, install=args.install,
                       force=args.force, progress=not ctx.json, missing_ok=args.missing_ok)
    if not res["pulled"]:
        ctx.emit(res, [f"Nothing to pull (skipped): {res['note']}.",
                       "  Pulling is for the cluster; where the code is written, export it first."])
        return 0

    def text():
        m = res["manifest"]
        commit = (m.get("git") or {}).get("commit")
        yield f"Pulled bundle {res['short']} of {res['experiment']} into {res['target']}: {res['files']} files " \
              f"verified ({res['written']} written, {res['unchanged']} unchanged" \
              + (f", {len(res['removed'])} removed" if res["removed"] else "") + ")"
        if commit:
            yield f"  commit {commit[:12]}" + (" (DIRTY export)" if (m.get("git") or {}).get("dirty") else "")
        inst = res.get("install")
        if inst:
            yield f"  installed {inst['requirements']}" if inst.get("requirements") else f"  {inst['note']}"
    out = dict(res)
    out["manifest"] = {k: v for k, v in res["manifest"].items() if k != "files"}
    ctx.emit(out, text)
    return 0


def status(args: argparse.Namespace, ctx: Context) -> int:
    from .. import airlock
    res = airlock.status(args.experiment, config=ctx.config(), root=args.root)

    def text():
        for r in res["experiments"]:
            head = f"{r['experiment']}: bundle {r['short']} ({r['action']}ed {r['at']})"
            if r["in_sync"]:
                yield f"{head}: in sync"
                continue
            yield f"{head}: DRIFTED"
            for kind, sign in (("added", "+"), ("removed", "-"), ("changed", "~")):
                for p in r[kind]:
                    yield f"  {sign} {p} ({kind})"
    ctx.emit(res, text)
    return 0 if res["in_sync"] else 3


def import_(args: argparse.Namespace, ctx: Context) -> int:
    from .. import airlock
    res = airlock.import_logs(args.experiment, config=ctx.config(), from_=args.from_, gdown=args.gdown,
                              journal=args.journal)

    def text():
        yield f"Imported logs of {res['experiment']} from {res['source']} into {res['logs']}:"
        for f in res["files"]:
            yield f"  {f['status']}: {f['name']}" + (f" -> {f['path']}" if f["status"] == "kept both" else "")
        if res["entry"]:
            yield "journal.md:"
            yield from ("  " + line for line in res["entry"].rstrip().splitlines())
    ctx.emit(res, text)
    return 0


def _size(n) -> str:
    from ..config import format_size
    return format_size(n)
