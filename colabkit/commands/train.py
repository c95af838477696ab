"""``colabkit train vXX [options] [-- ARGS]`` and ``%train ...`` — run train.py under supervision; and
``train status | logs | stop [vXX]`` for the running job. The handlers call :mod:`colabkit.runner` and render."""
from __future__ import annotations

import argparse
import time
from typing import Any, Iterable

from . import ArgumentParser, Context, common, duration_arg, size_arg

ACTIONS = ("status", "logs", "stop", "wait")


class _TrainParser(ArgumentParser):
    """Everything after ``--`` goes to train.py untouched (argparse alone would refuse options after the
    experiment name once ``--`` is also present)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(args or [])
        extra: list[str] = []
        if "--" in args:
            i = args.index("--")
            args, extra = args[:i], args[i + 1:]
        ns, rest = super().parse_known_args(args, namespace)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)} (arguments for train.py go after --: "
                       f"{ns.target} -- {' '.join(rest)})")
        ns.script_args = extra
        return ns, rest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="run an experiment's train.py: preflight, live log, restarts, progress (status|logs|stop|wait)",
        description="Run experiments/vXX/train.py as a supervised child process, or act on the running job: "
                    "'train status [vXX]', 'train logs [vXX] [-n N]', 'train stop [vXX]', "
                    "'train wait [vXX] [--timeout 2h]' (until a background run ends). "
                    "Arguments after -- go to train.py.")
    p.__class__ = _TrainParser
    p.add_argument("target", metavar="vXX|status|logs|stop|wait", help="the experiment to run, or an action")
    p.add_argument("experiment", nargs="?", metavar="vXX", help="(with status/logs/stop/wait) the experiment")
    p.add_argument("--background", action="store_true", help="return at once; the run continues in this kernel")
    p.add_argument("--max-restarts", type=int, default=None, metavar="N",
                   help="restarts after a crash or stall (default: train.max_restarts)")
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto: the newest verified checkpoint from any source (default); none: fresh start; "
                        "or a checkpoint file")
    p.add_argument("--on-unreachable", dest="on_unreachable", choices=("wait", "older", "fail"), default=None,
                   help="(--resume auto) when a source that may hold a newer checkpoint cannot be reached: wait "
                        "(retry until resume.deadline, then fail), older (start from the best one that can be "
                        "fetched, with a warning) or fail (default: resume.on_unreachable, wait)")
    p.add_argument("--max-vram", type=size_arg, default=None, metavar="SIZE",
                   help="GPU memory cap, e.g. 20GB (default: train.max_vram; 20 GB on a Tier 1 GPU)")
    p.add_argument("--estimate", type=duration_arg, default=None, metavar="DURATION",
                   help="expected duration (6h); warns when the measured pace is off by more than half")
    p.add_argument("--total-steps", type=int, default=None, metavar="N",
                   help="total steps, for the ETA (default: --steps N among the ARGS, or train.total_steps)")
    p.add_argument("--stall-after", type=duration_arg, default=None, metavar="DURATION",
                   help="kill and restart a run silent this long (default: train.stall_after)")
    p.add_argument("--sync", dest="sync", action="store_true", default=None,
                   help="sync checkpoints and logs while it runs (default when tiers are configured)")
    p.add_argument("--no-sync", dest="sync", action="store_false", help="do not start background sync")
    p.add_argument("--allow-network-data", action="store_true",
                   help="train from train.data_paths on a network/FUSE mount (refused by default: %%data fetch)")
    p.add_argument("--nproc-per-node", dest="nproc_per_node", type=_nproc_arg, default=None, metavar="N|auto",
                   help="run train.py on N ranks under torchrun, supervised as one job (auto: one per visible GPU; "
                        "default: train.nproc_per_node, 1)")
    p.add_argument("--nnodes", type=int, default=1, metavar="N",
                   help="nodes in the group (each runs its own %%train with --node-rank); default 1")
    p.add_argument("--node-rank", dest="node_rank", type=int, default=0, metavar="R",
                   help="this node's rank, 0..N-1 (node 0 prints the progress); with --nnodes")
    p.add_argument("--rdzv-endpoint", dest="rdzv_endpoint", default=None, metavar="HOST:PORT",
                   help="node 0's address for the rendezvous, the same on every node; with --nnodes")
    p.add_argument("--release-when-done", nargs="?", const=True, default=False, type=_release_mode,
                   metavar="force",
                   help="release the Colab runtime / halt the VM once the run has ended and every tier holds "
                        "the final checkpoint and logs (=force: even when a check fails)")
    p.add_argument("-n", "--lines", type=int, default=50, metavar="N", help="(logs) how many lines")
    p.add_argument("--timeout", type=duration_arg, default=None, metavar="DURATION",
                   help="(stop, wait) give up waiting after this long")
    common(p)
    p.set_defaults(func=handle, script_args=[])


def _nproc_arg(value: str) -> int | str:
    from ..errors import ConfigError
    from ..launch import parse_nproc
    try:
        return parse_nproc(value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def _release_mode(value: str) -> str:
    if value != "force":
        raise argparse.ArgumentTypeError(f"{value!r}: use --release-when-done, or --release-when-done=force")
    return value


def handle(args: argparse.Namespace, ctx: Context) -> int:
    if args.target in ACTIONS:
        return {"status": status, "logs": logs, "stop": stop, "wait": wait}[args.target](args, ctx)
    if args.experiment is not None:
        from ..errors import TrainError
        from ..runtime import command
        raise TrainError(f"unexpected argument {args.experiment!r}; arguments for train.py go after --: "
                         f"{command(f'train {args.target} -- {args.experiment} ...')}")
    return run(args, ctx)


def _fmt_result(res: Any) -> Iterable[str]:
    from ..config import format_duration
    d = res.as_dict()
    parts = [f"{d['experiment']}: {d['state']}"]
    if d["step"] is not None:
        parts.append(f"step {d['step']}" + (f"/{d['total_steps']}" if d["total_steps"] else ""))
    if d["loss"] is not None:
        parts.append(f"loss {d['loss']:.4g}")
    parts.append(f"{len(d['attempts'])} attempt{'s' if len(d['attempts']) != 1 else ''}")
    parts.append(f"in {format_duration(d['elapsed'])}")
    yield " · ".join(parts)
    if d["last_checkpoint"]:
        yield f"last checkpoint: {d['last_checkpoint']}"
    yield f"logs: {d['log_dir']}"


def run(args: argparse.Namespace, ctx: Context) -> int:
    from .. import runner
    from ..errors import TrainError
    if args.background and not (ctx.notebook or ctx.shell is not None):
        raise TrainError("'colabkit train --background' would stop when this command exits; in a terminal run "
                         "it in the foreground (under tmux or nohup), in a notebook use '%train vXX --background'")
    on_line = None if ctx.json or args.background else ctx.out
    res = runner.train(args.target, config=ctx.config(), background=args.background,
                       max_restarts=args.max_restarts, resume=args.resume, max_vram=args.max_vram,
                       estimate=args.estimate, args=args.script_args, on_line=on_line,
                       on_warning=ctx.warn, total_steps=args.total_steps, sync=args.sync,
                       stall_after=args.stall_after, on_unreachable=args.on_unreachable,
                       allow_network_data=args.allow_network_data, release_when_done=args.release_when_done,
                       nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                       rdzv_endpoint=args.rdzv_endpoint)
    if args.background:
        from ..runtime import command
        st = res.status()
        ctx.emit(st, [f"{st['experiment']}: started in the background (run {st['run_id']}, log folder "
                      f"{st['log_dir']})", f"follow it with '{command('train status')}', '{command('train logs')}', "
                      f"stop it with '{command('train stop ' + st['experiment'])}'"])
        return 0
    ctx.emit(res.as_dict(), lambda: _fmt_result(res))
    return 0 if res.ok else 1


def _status_lines(jobs: list[dict[str, Any]]) -> Iterable[str]:
    from ..config import format_duration
    from ..runtime import command
    if not jobs:
        yield f"no training job (start one with '{command('train vXX')}')"
    for j in jobs:
        parts = [f"{j.get('key') or j.get('experiment')}: {j.get('state')}"]  # a cooldown: v01.cooldown_200
        if j.get("attempt"):
            parts.append(f"attempt {j['attempt']}")
        if j.get("step") is not None:
            parts.append(f"step {j['step']}" + (f"/{j['total_steps']}" if j.get("total_steps") else ""))
        if j.get("loss") is not None:
            parts.append(f"loss {j['loss']:.4g}")
        if j.get("rate"):
            parts.append(f"{j['rate']:.3g} steps/s")
        if j.get("eta") is not None:
            parts.append(f"ETA {format_duration(j['eta'])}")
        if j.get("started"):
            parts.append(f"running for {format_duration(time.time() - j['started'])}"
                         if j.get("state") in ("running", "waiting", "starting") else f"run {j.get('run_id')}")
        yield " · ".join(parts)
        if j.get("checkpoint"):
            yield f"  last checkpoint: {j['checkpoint']}"
        if j.get("log"):
            yield f"  log: {j['log']}"
        if j.get("error"):
            yield f"  error: {j['error']}"
        for w in (j.get("warnings") or [])[-3:]:
            yield f"  warning: {w}"


def status(args: argparse.Namespace, ctx: Context) -> int:
    from .. import runner
    data = runner.status(config=ctx.config(), experiment=args.experiment)
    ctx.emit(data, lambda: _status_lines(data["jobs"]))
    return 0


def logs(args: argparse.Namespace, ctx: Context) -> int:
    from .. import runner
    lines = runner.logs(args.lines, experiment=args.experiment, config=ctx.config())
    ctx.emit({"lines": lines}, lines)
    return 0


def stop(args: argparse.Namespace, ctx: Context) -> int:
    from .. import runner
    res = runner.stop(experiment=args.experiment, config=ctx.config(), timeout=args.timeout)
    if not res["stopped"]:
        ctx.emit(res, "no training job is running; nothing to stop")
        return 0
    ctx.emit(res, [f"{s.get('experiment')}: {s.get('state')} (run {s.get('run_id')})" for s in res["stopped"]])
    return 0


def wait(args: argparse.Namespace, ctx: Context) -> int:
    from .. import runner
    res = runner.wait(experiment=args.experiment, config=ctx.config(), timeout=args.timeout)

    def text():
        yield from _status_lines(res["jobs"])
        if res["timed_out"]:
            yield "still running after --timeout; wait again, or '%train stop' it"
    ctx.emit(res, text)
    if res["timed_out"]:
        return 1
    return 0 if all(j.get("state") == "finished" for j in res["jobs"]) else 1
