"""``colabkit triggers check | test LOG | list | show ID | retry ID | cancel ID | worker | watch LOG`` and
``%triggers ...`` — the rules on the training log and their exactly-once action queue. The handlers call
:mod:`colabkit.triggers` and render."""
from __future__ import annotations

import argparse
import time
from typing import Any, Iterable

from . import Context, common, duration_arg

_STATES = ("pending", "waiting", "running", "done", "failed", "interrupted", "cancelled")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triggers", help="rules on the training log (cooldown runs, conversions, evals) and their "
                                        "exactly-once action queue",
                       description="Validate and test the trigger rules (triggers: in colabkit.yaml, or "
                                   "experiments/vXX/triggers.yaml), and list, show, retry or cancel the entries of "
                                   "the action queue under .colabkit/actions/.")
    s = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    s.required = True

    def leaf(name: str, help_: str, func) -> argparse.ArgumentParser:
        q = common(s.add_parser(name, help=help_, description=help_))
        q.set_defaults(func=func)
        return q

    q = leaf("check", "validate the rules and print them", check)
    q.add_argument("--experiment", metavar="vXX", help="also read experiments/vXX/triggers.yaml")
    q = leaf("test", "which rules would fire on an existing log, with their rendered actions (runs nothing)", test)
    q.add_argument("logfile", metavar="LOGFILE")
    q.add_argument("--experiment", metavar="vXX", help="whose rules (default: the only experiment)")
    q.add_argument("--run", default="main", metavar="NAME", help="the run's identity in entry ids (default: main)")
    q = leaf("list", "the queue entries, newest first", list_)
    q.add_argument("--state", choices=_STATES, default=None, help="only entries in this state")
    q.add_argument("--experiment", metavar="vXX", help="only this experiment's queue")
    q = leaf("show", "one entry: its record and the tail of its output", show)
    q.add_argument("entry", metavar="ID", help="the entry id (or a unique start of it)")
    q.add_argument("-n", "--lines", type=int, default=20, metavar="N", help="lines of output to show")
    q = leaf("retry", "run a failed, interrupted or cancelled entry again", retry)
    q.add_argument("entry", metavar="ID")
    q = leaf("cancel", "cancel a pending, waiting, failed or interrupted entry", cancel)
    q.add_argument("entry", metavar="ID")
    q = leaf("worker", "run the queued actions in the foreground (until Ctrl-C, or --once until the queue is "
                       "drained)", worker)
    q.add_argument("--experiment", metavar="vXX", help="only this experiment's queue (default: all)")
    q.add_argument("--once", action="store_true", help="return once nothing is pending or waiting")
    q.add_argument("--poll", type=duration_arg, default=1.0, metavar="DURATION",
                   help="how often to look at the queue (default 1s)")
    q = leaf("watch", "follow any training log in the foreground, fire the rules on it and run the queue "
                      "(its read position is kept across restarts)", watch)
    q.add_argument("logfile", metavar="LOGFILE")
    q.add_argument("--experiment", metavar="vXX", help="whose rules and queue (default: the only experiment)")
    q.add_argument("--run", default="main", metavar="NAME", help="the run's identity in entry ids (default: main)")
    q.add_argument("--once", action="store_true", help="read to the end, drain the queue, and return")
    q.add_argument("--no-worker", dest="worker", action="store_false",
                   help="only queue the actions (run them with 'triggers worker')")
    q.add_argument("--poll", type=duration_arg, default=1.0, metavar="DURATION",
                   help="how often to look at the file (default 1s)")


def _rule_line(r: dict[str, Any]) -> str:
    det = {"pattern": f"pattern {r.get('pattern')!r}"}.get(r["detector"], r["detector"])
    cond = []
    if r.get("at") is not None:
        cond.append("at " + ", ".join(map(str, r["at"])))
    if r.get("every"):
        cond.append(f"every {r['every']}")
    if r.get("file_exists"):
        cond.append(f"file {r['file_exists']}" + (f" (wait {r['wait']:g}s)" if r.get("wait") else ""))
    if r.get("condition"):
        cond.append("command " + " ".join(r["condition"]))
    what = {"cooldown": lambda: f"cooldown {' '.join(r.get('args') or [])} ({r.get('when')})",
            "command": lambda: "command " + " ".join(r.get("command") or []),
            "log": lambda: f"log {r.get('message')!r}",
            "sync": lambda: f"sync {r.get('tier') or 'every tier'}"}[r["action"]]()
    return f"{r['name']}: on {det}" + (f" [{'; '.join(cond)}]" if cond else "") + f" -> {what} ({r['mode']})"


def check(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers
    data = triggers.check(config=ctx.config(), experiment=args.experiment)

    def text() -> Iterable[str]:
        if not data["rules"]:
            yield "no trigger rules (add triggers: to colabkit.yaml, or experiments/vXX/triggers.yaml)"
        else:
            yield f"{len(data['rules'])} rule{'s' if len(data['rules']) != 1 else ''}, all valid:"
        for r in data["rules"]:
            yield "  " + _rule_line(r)
    ctx.emit(data, text)
    return 0


def test(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers
    data = triggers.test(args.logfile, config=ctx.config(), experiment=args.experiment, run=args.run)

    def text() -> Iterable[str]:
        yield f"{data['log']}: {data['lines']} lines, {data['rules']} rules, {len(data['fired'])} would fire"
        for f in data["fired"]:
            a = f["action"]
            shown = {"command": lambda: " ".join(a.get("command") or []),
                     "cooldown": lambda: f"cooldown from {a.get('checkpoint')} into {a.get('output_dir')} "
                                         f"{' '.join(a.get('args') or [])}",
                     "log": lambda: a.get("message"), "sync": lambda: f"sync {a.get('tier') or 'every tier'}"
                     }.get(a.get("type"), lambda: str(a))()
            extra = " (queued already)" if f["queued"] else ""
            err = f" — {f['error']}" if f.get("error") else ""
            yield f"  {f['id']}: {shown}{extra}{err}"
    ctx.emit(data, text)
    return 0


def _ago(t: float | None) -> str:
    from ..config import format_duration
    return f"{format_duration(time.time() - t)} ago" if t else "-"


def _entry_lines(entries: list[dict[str, Any]]) -> Iterable[str]:
    if not entries:
        yield "no queue entries"
    for e in entries:
        step = f" step {e['step']}" if e.get("step") is not None else ""
        yield (f"{e['id']}: {e['state']} · {e['action']}{step} · {e['attempts']} attempt"
               f"{'s' if e['attempts'] != 1 else ''} · {_ago(e['updated'])}")
        if e.get("error") and e["state"] in ("failed", "interrupted", "cancelled"):
            yield f"  {e['error']}"


def list_(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers
    entries = triggers.list_entries(config=ctx.config(), experiment=args.experiment, state=args.state)
    ctx.emit({"entries": entries}, lambda: _entry_lines(entries))
    return 0


def show(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers
    e = triggers.show(args.entry, config=ctx.config(), lines=args.lines)

    def text() -> Iterable[str]:
        yield f"{e['id']}: {e['state']} ({e.get('attempts', 0)} attempts; rule {e.get('rule')}, "\
              f"experiment {e.get('experiment')}, run {e.get('run')})"
        a = e.get("action") or {}
        if a.get("type") == "command":
            yield "  command: " + " ".join(a.get("command") or [])
        elif a.get("type") == "cooldown":
            yield f"  cooldown from {a.get('checkpoint')} into {a.get('output_dir')}: {' '.join(a.get('args') or [])}"
        elif a.get("type") == "log":
            yield f"  log: {a.get('message')}"
        else:
            yield f"  sync: {a.get('tier') or 'every tier'}"
        if e.get("event", {}).get("line"):
            yield f"  event: {e['event']['line']}"
        if e.get("error"):
            yield f"  error: {e['error']}"
        if e.get("result"):
            yield f"  result: {e['result']}"
        yield f"  record: {e['path']}"
        if e.get("output"):
            yield f"  output: {e['output']}"
            for line in e.get("output_tail") or []:
                yield "    " + line
    ctx.emit(e, text)
    return 0


def retry(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers
    e = triggers.retry(args.entry, config=ctx.config())
    ctx.emit(e, f"{e['id']}: pending again (a worker runs it: '%train' runs one while a run is active, or "
                f"'colabkit triggers worker')")
    return 0


def cancel(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers
    e = triggers.cancel(args.entry, config=ctx.config())
    ctx.emit(e, f"{e['id']}: cancelled")
    return 0


def worker(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers
    if not args.once:
        ctx.out("running the trigger queue (Ctrl-C to stop)")
    res = triggers.worker(config=ctx.config(), experiment=args.experiment, once=args.once, poll=args.poll)
    ctx.emit(res, f"ran {len(res['ran'])} entr{'y' if len(res['ran']) == 1 else 'ies'}"
                  + (": " + ", ".join(res["ran"]) if res["ran"] else ""))
    return 0


def watch(args: argparse.Namespace, ctx: Context) -> int:
    from .. import triggers

    def on_entry(e: dict[str, Any]) -> None:
        ctx.out(f"{e['id']}: {e['state']} ({e['rule']}, step {e.get('step')})")
    res = triggers.watch(args.logfile, config=ctx.config(), experiment=args.experiment, run=args.run,
                         once=args.once, worker=args.worker, poll=args.poll, on_entry=on_entry)
    ctx.emit(res, f"{res['log']}: read {res['lines']} lines (position {res['offset']}); fired {len(res['fired'])}, "
                  f"ran {len(res['ran'])}")
    return 0
