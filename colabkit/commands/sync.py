"""``colabkit sync start | stop | status | flush | watch | once`` and ``%sync ...`` — background sync of a run's
folders to the configured tiers. The handlers call :mod:`colabkit.sync` and render; no logic here."""
from __future__ import annotations

import argparse
import time
from typing import Any, Iterable

from . import Context, common, duration_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="background sync of checkpoints and logs to Drive, the Hub and local folders")
    ss = p.add_subparsers(dest="action", metavar="ACTION")
    ss.required = True

    def targets(q: argparse.ArgumentParser, *, every: bool = True) -> argparse.ArgumentParser:
        q.add_argument("paths", nargs="*", metavar="PATH",
                       help="files or folders to watch (default: sync.watch: checkpoints, logs, journal.md)")
        if every:
            q.add_argument("--every", type=duration_arg, default=None, metavar="DURATION",
                           help="override every tier's interval (3600, 90m, 2h)")
        q.add_argument("--tier", dest="tiers", action="append", default=None, metavar="NAME",
                       help="only this tier (repeatable; default: every configured tier)")
        return common(q)

    targets(ss.add_parser("start", help="start syncing in the background of this notebook kernel "
                                        "(replaces a sync already watching the same folders)")).set_defaults(func=start)
    q = common(ss.add_parser("stop", help="flush, then stop every background syncer (safe to repeat)"))
    q.add_argument("--no-flush", dest="flush", action="store_false", help="stop without a final upload")
    q.add_argument("--timeout", type=duration_arg, default=None, metavar="DURATION",
                   help="give up waiting after this long (default: sync.flush_timeout)")
    q.set_defaults(func=stop)
    common(ss.add_parser("status", help="each tier's state, last upload, next due, pending files, errors")
           ).set_defaults(func=status)
    q = common(ss.add_parser("flush", help="upload everything due now and wait"))
    q.add_argument("--timeout", type=duration_arg, default=None, metavar="DURATION",
                   help="give up waiting after this long (default: sync.flush_timeout)")
    q.set_defaults(func=flush)
    targets(ss.add_parser("watch", help="sync in the foreground until Ctrl-C or SIGTERM (a terminal on the VM)")
            ).set_defaults(func=watch)
    q = targets(ss.add_parser("once", help="one synchronous pass: upload everything due now, then exit"),
                every=False)
    q.add_argument("--timeout", type=duration_arg, default=None, metavar="DURATION",
                   help="give up waiting after this long (default: sync.flush_timeout)")
    q.set_defaults(func=once)


def _ago(t: float | None) -> str:
    from ..config import format_duration
    if not t:
        return "never"
    d = time.time() - t
    return f"{format_duration(abs(d))} ago" if d >= 0 else f"in {format_duration(-d)}"


def tier_lines(tiers: dict[str, Any]) -> Iterable[str]:
    from ..config import format_size
    for name, t in tiers.items():
        line = (f"{name}: {t.get('state', '?')} · last upload {_ago(t.get('last_upload'))}"
                f" · next due {_ago(t.get('next_due')) if t.get('next_due') else '-'}"
                f" · pending {t.get('pending_files', 0)} files / {format_size(t.get('pending_bytes', 0))}"
                f" · uploaded {t.get('uploaded', 0)}")
        line += _notes(t)
        if t.get("errors"):
            line += f" · errors {t['errors']}"
        if t.get("last_error"):
            line += f" · last error: {t['last_error']}"
        yield line


def _notes(t: dict[str, Any]) -> str:
    from ..sync import tier_notes
    return "".join(f" · {n}" for n in tier_notes(t))


def _status_lines(data: dict[str, Any]) -> Iterable[str]:
    from ..config import format_size
    if data.get("running"):
        for g in data.get("groups", []):
            yield f"sync running: watching {', '.join(g['watching'])}" + (" (polling)" if g.get("polling") else "")
    elif data.get("elsewhere"):
        for e in data["elsewhere"]:
            yield f"sync running in process {e.get('pid')}: watching {', '.join(e.get('watching', []))}"
    else:
        yield "sync is not running in this process (start it with %sync start, or colabkit sync watch)"
    yield from tier_lines(data.get("tiers", {}))
    for name, s in (data.get("ledger") or {}).items():
        yield (f"{name}: holds {s['files']} files / {format_size(s['bytes'])} · last upload {_ago(s['last_upload'])}"
               + (f" · uploaded {format_size(s['uploaded_24h'])} in the last 24 h" if s.get("uploaded_24h") else "")
               + (f" · {s['inflight']} interrupted" if s.get("inflight") else ""))
    for d, g in (data.get("disk") or {}).items():
        if g.get("state") == "blocked":
            yield f"disk guard: {g['message']}"


def _flush_lines(res: dict[str, Any], verb: str) -> Iterable[str]:
    for name, t in res.get("tiers", {}).items():
        state = "ok" if t.get("ok") else f"NOT done ({t.get('state')})"
        line = f"{name}: {state} · uploaded {t.get('uploaded', 0)} · pending {t.get('pending_files', 0)}"
        line += _notes(t)
        if t.get("last_error"):
            line += f" · last error: {t['last_error']}"
        if t.get("note"):
            line += f" · {t['note']}"
        yield line
    if res.get("still_running"):
        yield f"still uploading: {', '.join(res['still_running'])}"
    skipped = sum(t.get("skipped") or 0 for t in res.get("tiers", {}).values())
    yield (f"{verb}: {'everything due is uploaded' if res.get('ok') else 'some files are not uploaded (see above)'}"
           + (f" ({skipped} skipped: see above)" if skipped else ""))


def start(args: argparse.Namespace, ctx: Context) -> int:
    from .. import sync
    from ..errors import SyncError
    if not (ctx.notebook or ctx.shell is not None):  # a magic keeps its kernel alive; a CLI process exits
        raise SyncError("'colabkit sync start' would stop as soon as this command exits; in a terminal use "
                        "'colabkit sync watch' (foreground) or 'colabkit sync once', in a notebook '%sync start'")
    group = sync.start(args.paths or None, config=ctx.config(), every=args.every, tiers=args.tiers)
    st = group.status()

    def text():
        yield f"sync started: watching {', '.join(st['watching'])}" + (" (polling)" if st.get("polling") else "")
        yield from st.get("notes") or ()
        yield from tier_lines(st["tiers"])
    ctx.emit(st, text)
    return 0


def stop(args: argparse.Namespace, ctx: Context) -> int:
    from .. import sync
    res = sync.stop(flush=args.flush, timeout=args.timeout)
    if not res["stopped"]:
        ctx.emit(res, "sync is not running; nothing to stop")
        return 0
    ctx.emit(res, lambda: _flush_lines(res, "stopped"))
    return 0 if res["ok"] else 1


def status(args: argparse.Namespace, ctx: Context) -> int:
    from .. import sync
    data = sync.status(config=ctx.config())
    ctx.emit(data, lambda: _status_lines(data))
    return 0


def flush(args: argparse.Namespace, ctx: Context) -> int:
    from .. import sync
    res = sync.flush(timeout=args.timeout)
    ctx.emit(res, lambda: _flush_lines(res, "flush"))
    return 0 if res["ok"] else 1


def watch(args: argparse.Namespace, ctx: Context) -> int:
    from .. import sync

    def started(group):
        st = group.status()
        ctx.out(f"watching {', '.join(st['watching'])}; Ctrl-C or SIGTERM flushes and stops")
        for note in st.get("notes") or ():
            ctx.out(note)
        for line in tier_lines(st["tiers"]):
            ctx.out(line)
    res = sync.watch(args.paths or None, config=ctx.config(), every=args.every, tiers=args.tiers, on_start=started)
    ctx.emit(res, lambda: _flush_lines(res, "stopped"))
    return 0 if res["ok"] else 1


def once(args: argparse.Namespace, ctx: Context) -> int:
    from .. import sync
    res = sync.once(args.paths or None, config=ctx.config(), tiers=args.tiers, timeout=args.timeout)
    ctx.emit(res, lambda: _flush_lines(res, "sync once"))
    return 0 if res["ok"] else 1
