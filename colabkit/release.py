"""Release the Colab runtime or the VM once the work is safe.

An idle A100 or L4 burns credits; a released machine loses its local disk. So :func:`release` first
flushes every sync tier, then checks from the ledgers that each tier verifiably holds the final checkpoint
and the logs it should hold, that no trigger action is queued, running or interrupted and that no other job of the project
is active. Only when every check passes does it release:

* on Colab: ``google.colab.runtime.unassign()`` (the runtime and its disk are gone);
* on a VM: ``release.command``, by default ``shutdown -h +2`` (a halt in two minutes, cancellable with
  ``sudo shutdown -c``; a stopped VM keeps its disk, and the disk keeps being billed);
* elsewhere: only when ``release.command`` says how.

It says what it verified and what it is about to do (returned, printed by the command, and logged) before it
acts. ``force=True`` releases despite failed checks and says what may be lost; ``dry_run=True`` only decides.
The real calls are :func:`colab_unassign` and :func:`run_command`; tests pass their own ``releaser``.

Example:
    >>> from colabkit import release
    >>> d = release.release(dry_run=True)
    >>> d.decision, [c.name for c in d.checks if not c.ok]
    ('refuse', ['tiers'])
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import ColabkitError, ReleaseError, SyncError
from .fsutil import is_temporary
from .runtime import command

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

DEFAULT_VM_COMMAND = "shutdown -h +2"
#: queue states of an action that has not run to its end: releasing would lose it (an interrupted one waits for
#: '%triggers retry' or 'cancel')
_UNFINISHED_ACTIONS = ("pending", "waiting", "running", "interrupted")
_ACTIVE_JOBS = ("starting", "running", "waiting", "stopping")


@dataclass
class Check:
    name: str          # flush | tiers | triggers | jobs | platform | idle
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class Action:
    """What releasing means here: ``colab`` (unassign the runtime) or ``command`` (run `command`)."""

    kind: str
    description: str
    command: list[str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "description": self.description, "command": self.command}


@dataclass
class Decision:
    """The checks, the decision (``release``, ``refuse`` or ``dry-run``) and what was (or would be) done.

    Attributes:
        released: the releaser was called (and returned).
        forced: released although checks failed (`at_risk` lists them).
    """

    checks: list[Check]
    action: Action | None
    decision: str
    released: bool = False
    forced: bool = False
    at_risk: list[str] = field(default_factory=list)
    idle: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "ok": self.ok, "released": self.released, "forced": self.forced,
                "checks": [c.as_dict() for c in self.checks], "action": self.action.as_dict() if self.action else None,
                "at_risk": list(self.at_risk), "idle": self.idle, "error": self.error}

    def lines(self) -> list[str]:
        out = ["Release checks:"]
        out += [f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<9} {c.detail}" for c in self.checks]
        what = self.action.description if self.action else "nothing to release here"
        if self.decision == "refuse":
            failed = ", ".join(c.name for c in self.checks if not c.ok)
            if self.action is None:
                out.append("NOT RELEASED: nothing is configured to release this machine (release.command)")
            else:
                out.append(f"NOT RELEASED ({failed} failed): did not {what}. Fix the above, or pass "
                           f"--release-when-done=force / {command('release --force')} to release anyway")
        elif self.decision == "dry-run":
            out.append(f"Dry run: would {'release' if self.ok else 'refuse'}: {what}"
                       + ("" if self.ok else f" (failing: {', '.join(c.name for c in self.checks if not c.ok)})"))
        else:
            if self.forced:
                out.append("FORCED although checks failed; what may be lost: " + "; ".join(self.at_risk))
            out.append(f"Releasing: {what}" if not self.error else f"Release failed: {self.error}")
        return out


# -- the real calls (one small function each) ------------------------------------------------------------
def colab_unassign() -> None:  # pragma: no cover - only on Colab
    """Colab's own call: the runtime (VM, GPU, local disk) is handed back at once."""
    from google.colab import runtime
    runtime.unassign()


def run_command(argv: list[str]) -> None:  # pragma: no cover - halts the machine
    """Run the VM's release command (``shutdown -h +2`` by default).

    Raises:
        ReleaseError: it could not run or exited non-zero (its output is in the message).
    """
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise ReleaseError(f"release command {shlex.join(argv)!r} could not run ({e}); set release.command in "
                           "colabkit.yaml (e.g. 'sudo -n shutdown -h +2')") from None
    if p.returncode != 0:
        raise ReleaseError(f"release command {shlex.join(argv)!r} exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[:300]}; set release.command in colabkit.yaml "
                           "(e.g. 'sudo -n shutdown -h +2')")


def real_releaser(action: Action) -> None:  # pragma: no cover - see colab_unassign / run_command
    if action.kind == "colab":
        colab_unassign()
    else:
        run_command(action.command or [])


# -- checks ----------------------------------------------------------------------------------------------
def plan_action(config: "Config") -> Action | None:
    """What releasing means on this machine (None: nothing is configured to release it)."""
    from . import runtime
    cmd = config.release.command
    if cmd:
        return Action("command", f"run the release command {cmd!r}", shlex.split(cmd))
    if runtime.in_colab():
        return Action("colab", "release the Colab runtime (google.colab.runtime.unassign(); its local disk is "
                               "deleted)")
    if runtime.detect().platform == "vm":
        return Action("command", f"halt this VM with {DEFAULT_VM_COMMAND!r} (cancel within 2 minutes with "
                                 "'sudo shutdown -c'; a stopped VM keeps its disk, and the disk stays billed)",
                      shlex.split(DEFAULT_VM_COMMAND))
    return None


def _experiments(cfg: "Config", experiment: str | None) -> list[str | None]:
    if experiment:
        cfg.require_experiment(experiment)
        return [experiment]
    names = [n for n in cfg.experiment_names()
             if cfg.checkpoint_dir(n).is_dir() or cfg.log_dir(n).is_dir()]
    return names or [None]


def should_hold(cfg: "Config", experiment: str | None) -> list[Path]:
    """The files the tiers should hold at the end of a run: the final (newest) checkpoint with its manifest,
    and every log file of the experiment."""
    from .checkpoints import discover, manifest_path
    out: list[Path] = []
    found = discover(cfg.checkpoint_dir(experiment))
    if found:
        final = found[-1].path
        out.append(final)
        if manifest_path(final).is_file():
            out.append(manifest_path(final))
    logs = cfg.log_dir(experiment)
    if logs.is_dir():
        for dirpath, dirnames, filenames in os.walk(logs):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            out += [Path(dirpath) / f for f in sorted(filenames) if not is_temporary(f)]
    return out


def _held(entry: dict[str, Any] | None, path: Path) -> bool:
    if not entry:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    if entry.get("local_size") == st.st_size and entry.get("local_mtime_ns") == st.st_mtime_ns:
        return True
    from .checkpoints import manifest_path, read_manifest
    m = read_manifest(manifest_path(path))
    return bool(m and m.get("size") == st.st_size and entry.get("sha256") == m.get("sha256"))


def check_tiers(cfg: "Config", experiments: Iterable[str | None]) -> Check:
    """From the ledgers: does each tier hold a verified copy of what it should (its globs and size cap)?"""
    from .config import format_size
    from .ledger import Ledger
    from .sync import Patterns
    names = cfg.release.tiers if cfg.release.tiers is not None else tuple(t.name for t in cfg.tiers)
    if not names:
        return Check("tiers", False, "no sync tier is configured: the final checkpoint and logs exist only on this "
                                     "disk, which a release deletes (configure tiers: in colabkit.yaml)")
    files = [p for e in experiments for p in should_hold(cfg, e)]
    if not files:
        return Check("tiers", True, "no checkpoint or log to keep")
    short, summary = [], []
    for name in names:
        t = cfg.tier(name)
        pats = Patterns(t.include, t.exclude)
        led = Ledger.load(cfg.state_dir, t.name)
        want = []
        for p in files:
            rel = cfg.remote_path(p)
            if not pats(rel):
                continue
            if t.max_file_size is not None and p.stat().st_size > t.max_file_size:
                continue
            want.append((rel, p))
        missing = [rel for rel, p in want if not _held(led.get(rel), p)]
        if missing:
            short.append(f"{t.name} lacks {len(missing)} of {len(want)} ({', '.join(missing[:3])}"
                         + (", ..." if len(missing) > 3 else "") + ")")
        else:
            size = sum(p.stat().st_size for _, p in want)
            summary.append(f"{t.name}: {len(want)} files, {format_size(size)}")
    if short:
        return Check("tiers", False, "; ".join(short) + f": not verified on the tier yet (see '{command('sync status')}')")
    return Check("tiers", True, "every tier holds a verified copy of the final checkpoint and logs ("
                 + "; ".join(summary) + ")")


def check_flush(cfg: "Config", *, timeout: float | None) -> Check:
    """Upload what is due now: the running sync's flush, else one synchronous pass."""
    from . import sync
    if not cfg.tiers:
        return Check("flush", True, "no tiers to flush")
    try:
        if sync.status(config=cfg).get("groups"):
            res = sync.flush(timeout=timeout, settled=True)
        else:
            res = sync.once(config=cfg, timeout=timeout)
    except SyncError as e:
        if "nothing to watch" in str(e):
            return Check("flush", True, "nothing to sync")
        return Check("flush", False, f"the flush failed: {e}")
    except ColabkitError as e:
        return Check("flush", False, f"the flush failed: {e}")
    bad = {n: r for n, r in res.get("tiers", {}).items() if not r.get("ok")}
    if bad:
        parts = [f"{n}: {r.get('state')}" + (f" ({r.get('last_error') or r.get('note')})"
                                             if (r.get('last_error') or r.get('note')) else "")
                 for n, r in bad.items()]
        return Check("flush", False, "the flush did not finish: " + "; ".join(parts))
    return Check("flush", True, f"flushed {', '.join(res.get('tiers', {})) or 'every tier'}")


def check_triggers(cfg: "Config") -> Check:
    """No trigger action queued, running or interrupted (read through :func:`colabkit.triggers.list_entries`,
    which counts a ``running`` entry whose worker is gone as ``interrupted``)."""
    from . import triggers
    busy = [f"{e['id']} ({e['state']})" for e in triggers.list_entries(config=cfg) if e["state"] in _UNFINISHED_ACTIONS]
    if busy:
        return Check("triggers", False, f"{len(busy)} trigger action(s) still queued, running or interrupted: "
                     + ", ".join(busy[:5]) + f"; see '{command('triggers list')}'")
    return Check("triggers", True, "no trigger action queued, running or interrupted")


def check_jobs(cfg: "Config", *, exclude_run: str | None = None) -> Check:
    from . import runner
    busy = []
    for j in runner.status(config=cfg).get("jobs", []):
        if j.get("run_id") == exclude_run or j.get("state") not in _ACTIVE_JOBS:
            continue
        if j.get("pid") != os.getpid() and not j.get("live", False):
            continue
        busy.append(f"{j.get('experiment')} (run {j.get('run_id')}, {j.get('state')})")
    if busy:
        return Check("jobs", False, "another job of this project is active: " + ", ".join(busy))
    return Check("jobs", True, "no other job of this project is active")


def idle_seconds(cfg: "Config", *, now: float | None = None) -> float | None:
    """How long this project has had no run and no sync activity (None: nothing has happened yet)."""
    from . import runner, sync
    now = time.time() if now is None else now
    stamps: list[float] = []
    for j in runner.status(config=cfg).get("jobs", []):
        if j.get("state") in _ACTIVE_JOBS and (j.get("live") or j.get("pid") == os.getpid()):
            return 0.0
        stamps.append(float(j.get("updated") or j.get("started") or 0))
    st = sync.status(config=cfg)
    for t in st.get("tiers", {}).values():
        if t.get("state") in ("uploading", "scanning") or t.get("current"):
            return 0.0
        stamps.append(float(t.get("last_upload") or 0))
    for s in (st.get("ledger") or {}).values():
        stamps.append(float(s.get("last_upload") or 0))
    last = max((s for s in stamps if s), default=None)
    return None if last is None else max(0.0, now - last)


LAST = "release.json"


def _remember(cfg: "Config", d: Decision, lines: list[str]) -> None:
    """``.colabkit/release.json``: the last decision, for ``status`` and the dashboard."""
    from .fsutil import atomic_write_json
    try:
        atomic_write_json(cfg.state_dir / LAST, {"format": 1, "time": time.time(), **d.as_dict(), "lines": lines})
    except OSError as e:
        log.warning("cannot write %s: %s", cfg.state_dir / LAST, e)


def status(*, config: "Config | None" = None) -> dict[str, Any]:
    """For ``status`` and the dashboard: how long the project has been idle, the idle guard's setting, and the
    last release decision (a refusal stays visible here until the next decision).

    Returns:
        ``{"idle": seconds | None, "idle_after": seconds | None, "last": {decision, time, lines, ...} | None}``.
    """
    from .config import load_config
    cfg = config if config is not None else load_config()
    last = None
    try:
        last = json.loads((cfg.state_dir / LAST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    return {"idle": idle_seconds(cfg), "idle_after": cfg.release.idle_after,
            "last": last if isinstance(last, dict) else None}


def status_lines(st: dict[str, Any], *, now: float | None = None) -> list[str]:
    """``status``'s release lines: idle time, the guard, the last decision (loud when it was a refusal)."""
    from .config import format_duration
    now = time.time() if now is None else now
    idle = st.get("idle")
    guard = (f"release.idle_after {format_duration(st['idle_after'])}" if st.get("idle_after")
             else "idle guard off (release.idle_after)")
    out = [f"idle: {'no activity yet' if idle is None else format_duration(idle)} · {guard}"]
    last = st.get("last")
    if last:
        when = format_duration(max(0.0, now - float(last.get("time") or now)))
        tail = (last.get("lines") or [""])[-1]
        if last.get("decision") == "refuse":
            failing = [c for c in last.get("checks", []) if not c.get("ok")]
            out.append(f"last release: REFUSED {when} ago: {tail}")
            out += [f"  {c['name']}: {c['detail']}" for c in failing]
        else:
            out.append(f"last release: {last.get('decision')} {when} ago: {tail}")
    return out


def watch_idle(*, config: "Config | None" = None, interval: float = 60.0, stop: "Any" = None,
               releaser: Callable[[Action], None] | None = None,
               on_message: Callable[[str], None] | None = None) -> Decision:
    """The idle guard in the foreground (``colabkit release --watch-idle``, e.g. under tmux or systemd on the
    VM): every `interval` seconds, once the project has been idle for ``release.idle_after``, try a release
    under the same checks; a refusal is logged and the guard keeps watching. Returns the releasing decision
    (or the last one when `stop`, a threading.Event, is set).

    Raises:
        ReleaseError: ``release.idle_after`` is not set.
    """
    import threading
    from .config import load_config
    cfg = config if config is not None else load_config()
    if cfg.release.idle_after is None:
        raise ReleaseError("release.idle_after is not set: the idle guard is off. Set it in colabkit.yaml, e.g. "
                           "release: {idle_after: 30m}")
    ev = stop if stop is not None else threading.Event()
    last: Decision | None = None
    while True:
        idle = idle_seconds(cfg)
        if idle is not None and idle >= cfg.release.idle_after:
            last = release(config=cfg, if_idle=True, releaser=releaser, on_message=on_message)
            if last.released:
                return last
        if ev.wait(interval):
            return last or Decision([], plan_action(cfg), "refuse", idle=idle)


def _append_log(cfg: "Config", lines: list[str]) -> None:
    """``.colabkit/logs/release.log``: every decision, so a refusal nobody saw can be read afterwards."""
    p = cfg.state_dir / "logs" / "release.log"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        with open(p, "a", encoding="utf-8") as f:
            f.write("".join(f"{stamp} {x}\n" for x in lines))
    except OSError as e:
        log.warning("cannot write %s: %s", p, e)


def release(experiment: str | None = None, *, config: "Config | None" = None, dry_run: bool = False,
            force: bool = False, releaser: Callable[[Action], None] | None = None, flush_timeout: float | None = None,
            exclude_run: str | None = None, if_idle: bool = False,
            on_message: Callable[[str], None] | None = None) -> Decision:
    """Check that nothing would be lost, then release this machine (see the module docstring).

    Args:
        experiment: the run's experiment (default: every experiment with checkpoints or logs).
        dry_run: show the checks and the decision without acting (no flush either: the ledgers as they are).
        force: release even when checks fail (the decision lists what may be lost).
        releaser: called with the :class:`Action` instead of the real call (tests, or your own way).
        flush_timeout: seconds the flush may take (default ``sync.flush_timeout``).
        exclude_run: a job that is not "another job" (the run that asked for the release).
        if_idle: release only when the project has been idle for ``release.idle_after``.
        on_message: called with each line of the decision before acting (the cell); it is also logged.
    Returns:
        The :class:`Decision`.
    Raises:
        ReleaseError: the releaser itself failed (the decision is in ``.decision``, the message says why).
    """
    from .config import format_duration, load_config
    cfg = config if config is not None else load_config()
    action = plan_action(cfg)
    checks: list[Check] = []
    if action is None:
        checks.append(Check("platform", False, "not on Colab or a Google VM: nothing is configured to release "
                                               "this machine (set release.command in colabkit.yaml)"))
    else:
        checks.append(Check("platform", True, action.description))
    idle = idle_seconds(cfg)
    if if_idle:
        limit = cfg.release.idle_after
        if limit is None:
            checks.append(Check("idle", False, "release.idle_after is not set (the idle guard is off)"))
        elif idle is None or idle < limit:
            checks.append(Check("idle", False, f"idle for {format_duration(idle or 0)}, less than release.idle_after "
                                               f"({format_duration(limit)})"))
        else:
            checks.append(Check("idle", True, f"idle for {format_duration(idle)} (release.idle_after "
                                              f"{format_duration(limit)})"))
    exps = _experiments(cfg, experiment)
    if not dry_run:
        checks.append(check_flush(cfg, timeout=flush_timeout if flush_timeout is not None
                                  else cfg.sync.flush_timeout))
    checks.append(check_tiers(cfg, exps))
    checks.append(check_triggers(cfg))
    checks.append(check_jobs(cfg, exclude_run=exclude_run))
    ok = all(c.ok for c in checks)
    if dry_run:
        d = Decision(checks, action, "dry-run", idle=idle)
    elif action is None or (not ok and not force):
        d = Decision(checks, action, "refuse", idle=idle)
    else:
        d = Decision(checks, action, "release", forced=not ok,
                     at_risk=[f"{c.name}: {c.detail}" for c in checks if not c.ok], idle=idle)
        if d.forced:
            log.warning("release forced although checks failed: %s", "; ".join(d.at_risk))
    lines = d.lines()
    loud = d.decision != "dry-run" and on_message is None   # nobody watches: the refusal must reach the log
    for line in lines:
        (log.warning if loud else log.info)("%s", line)
        if on_message is not None:
            on_message(line)
    if not dry_run:
        _append_log(cfg, lines)
        _remember(cfg, d, lines)
    if d.decision == "release":
        try:
            (releaser or real_releaser)(action)  # type: ignore[arg-type]
        except ReleaseError as e:
            d.error = str(e)
            raise
        d.released = True
    return d
