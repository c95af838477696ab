"""``colabkit data fetch | list | verify | evict`` (``%data ...``): data sets on the local SSD, verified.

    colabkit data fetch NAME [--source S] [--version V] [--unpack tar|zip|none] [--sha256 HEX|PATH=HEX ...]
                             [--preprocessing TEXT] [--cache DIR] [--no-journal] [--json]
    colabkit data list [--cache DIR] [--json]
    colabkit data verify NAME [--version V] [--cache DIR] [--json]     (exit 1 when a file does not match)
    colabkit data evict NAME [--version V] [--dry-run] [--cache DIR] [--json]
"""
from __future__ import annotations

import argparse

from . import Context, common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="pre-fetch data sets to the local SSD, verified and journaled "
                                    "(fetch|list|verify|evict)",
                       description="Data sets on the local disk, never trained from a network mount: fetch from "
                                   "a Hub dataset repo, Drive, a public link or a path; verify; evict.")
    ss = p.add_subparsers(dest="action", metavar="ACTION")
    ss.required = True

    f = ss.add_parser("fetch", help="download a data set to the data cache (nothing when it is already there)")
    f.add_argument("name", metavar="NAME", help="the data set (declared under data.sets, or any name with --source)")
    f.add_argument("--source", default=None, metavar="SOURCE",
                   help="hub:datasets/USER/REPO[@REV][:GLOB], drive:ID_OR_PATH, gdown:ID_OR_URL, https://... or a "
                        "path (default: the declaration's)")
    f.add_argument("--version", dest="data_version", default=None, metavar="V",
                   help="the version (default: declared, else a digest of the source's file list)")
    f.add_argument("--unpack", choices=("tar", "zip", "none"), default=None, help="unpack the downloaded archive")
    f.add_argument("--sha256", action="append", default=None, metavar="HEX|PATH=HEX",
                   help="verify against this digest (one file), or PATH=HEX per file; repeat for several")
    f.add_argument("--preprocessing", default=None, metavar="TEXT", help="what was done to it (for the journal)")
    f.add_argument("--no-journal", dest="journal", action="store_false", help="do not write the journal entry")
    _cache(f)
    common(f)
    f.set_defaults(func=fetch)

    ls = ss.add_parser("list", help="declared data sets and the fetched versions, with their state")
    _cache(ls)
    common(ls)
    ls.set_defaults(func=list_)

    v = ss.add_parser("verify", help="re-hash every file of a fetched data set against its record")
    v.add_argument("name", metavar="NAME")
    v.add_argument("--version", dest="data_version", default=None, metavar="V", help="only this version")
    _cache(v)
    common(v)
    v.set_defaults(func=verify)

    e = ss.add_parser("evict", help="remove a data set from the cache (never one a running job uses)")
    e.add_argument("name", metavar="NAME")
    e.add_argument("--version", dest="data_version", default=None, metavar="V", help="only this version")
    e.add_argument("--dry-run", action="store_true", help="show what would be removed")
    _cache(e)
    common(e)
    e.set_defaults(func=evict)


def _cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, metavar="DIR", help="the data cache (default: data.cache)")


def _sha(values: list[str] | None):
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        path, sep, hexd = v.rpartition("=")
        if not sep or not path:
            from ..errors import ConfigError
            raise ConfigError(f"--sha256: {v!r} must be HEX (one file) or PATH=HEX", key="sha256", value=v)
        out[path] = hexd
    return out


def fetch(args: argparse.Namespace, ctx: Context) -> int:
    from .. import data
    res = data.fetch(args.name, config=ctx.config(), source=args.source, version=args.data_version,
                     unpack=args.unpack, sha256=_sha(args.sha256), preprocessing=args.preprocessing,
                     cache=args.cache, progress=not ctx.json, journal=args.journal)
    if not ctx.json:
        for w in res.warnings:
            ctx.warn(f"Warning: {w}")
    ctx.emit(res.as_dict(), [x for x in res.lines() if not x.startswith("  warning: ")])
    return 0


def list_(args: argparse.Namespace, ctx: Context) -> int:
    from .. import data
    from ..config import format_size
    res = data.list_sets(config=ctx.config(), cache=args.cache)

    def text():
        yield f"Data cache: {res['cache']} ({format_size(res['free'])} free)"
        if not res["sets"]:
            yield "  no data sets declared or fetched (declare them under data.sets in colabkit.yaml)"
        for s in res["sets"]:
            if s["path"] is None:
                yield f"  {s['name']:<16} {s['version'] or '-':<14} not fetched   ({s['source']})"
            else:
                flag = "" if s["verified"] != "none" else "  UNVERIFIED"
                yield (f"  {s['name']:<16} {s['version']:<14} {s['files']} files, {format_size(s['bytes'])}  "
                       f"{s['state']}{flag}  {s['path']}")
    ctx.emit(res, text)
    return 0


def verify(args: argparse.Namespace, ctx: Context) -> int:
    from .. import data
    from ..runtime import command
    res = data.verify(args.name, version=args.data_version, config=ctx.config(), cache=args.cache,
                      progress=not ctx.json)

    def text():
        for v in res["versions"]:
            if v["ok"]:
                yield f"{res['name']} {v['version']}: all {v['files']} files match their sha256 ({v['path']})"
            else:
                yield f"{res['name']} {v['version']}: {len(v['problems'])} damaged file(s) in {v['path']}:"
                yield from (f"  {p}" for p in v["problems"][:20])
                fix = command(f"data fetch {res['name']}")
                yield f"  fetch it again: '{fix}'"
    ctx.emit(res, text)
    return 0 if res["ok"] else 1


def evict(args: argparse.Namespace, ctx: Context) -> int:
    from .. import data
    from ..config import format_size
    res = data.evict(args.name, version=args.data_version, config=ctx.config(), cache=args.cache,
                     dry_run=args.dry_run)

    def text():
        verb = "Would remove" if res["dry_run"] else "Removed"
        for r in res["removed"]:
            yield f"{verb} {res['name']} {r['version']} ({format_size(r['bytes'])}): {r['path']}"
        for k in res["kept"]:
            yield f"Kept {res['name']} {k['version']}: {k['reason']}"
        yield f"{'Would free' if res['dry_run'] else 'Freed'} {format_size(res['freed'])}"
    ctx.emit(res, text)
    return 0 if not res["kept"] else 1
