"""The dashboard: status snapshots, and their views (a live ipywidgets view in notebooks, text, JSON).

A **snapshot** is plain data (documented field by field in docs/dashboard.md, ``version`` 1) gathered from
the public APIs: where the code runs, the ``%train`` job (with its loss history), each sync tier, the triggers, and the resume sources. Taking one reads in-memory state and small status files only: no remote
call, no walk of the watched folders. Asking the resume sources takes seconds, so the snapshot reads a cache
that a background refresh (a named daemon thread, one per project and experiment) fills; it shows its age.

The **live view** (:func:`show`, ``%colabkit dashboard``) is core ipywidgets (HTML, IntProgress, VBox) with the
loss curve and the trigger axes drawn as inline SVG. It updates in place:

* from a named background thread (``colabkit-dashboard-<project>``) every ``dashboard.refresh`` seconds while
  a run or sync is active: JupyterLab, the classic Notebook, VS Code;
* after every cell execution (IPython's ``post_run_cell``), because Colab does not render widget updates sent
  from background threads (colabtools issue 3373);
* in the foreground with ``follow=True`` (``--follow``) until the run ends; interrupting it stops the
  watching, never the training.

Its display bundle carries ``text/plain`` and ``text/html`` renderings of the same facts beside the widget,
refreshed after each cell, so a notebook saved without widget state (nbviewer, GitHub, an agent reading the
.ipynb) still shows them. Re-running the cell replaces the view and its thread; :meth:`Dashboard.close`,
:func:`close_all` and the kernel's exit stop them. Background threads never print; a failure to render
degrades to text.

Example:
    >>> view = show()                  # in a notebook: the live widget
    >>> snap = snapshot(); print("\\n".join(render_text(snap)))
"""
from __future__ import annotations

import atexit
import contextlib
import html
import json
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import format_duration, format_size

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

#: the snapshot format (docs/dashboard.md); readers accept older versions
VERSION = 1
#: states of a training job in which the view keeps refreshing
ACTIVE_TRAIN = ("starting", "running", "waiting", "stopping")
#: the curve is drawn with at most this many points (the runner keeps about as many)
CURVE_POINTS = 300
#: when nothing runs, the live thread looks again only every this many refresh intervals
IDLE_TICKS = 5

_QUEUE_STATES = ("pending", "waiting", "running", "done", "failed", "interrupted", "cancelled")


# -- the snapshot ------------------------------------------------------------------------------------
def snapshot(*, config: "Config | None" = None, experiment: str | None = None, include_resume: bool = False,
             refresh_resume: bool = True) -> dict[str, Any]:
    """Everything the dashboard shows, as plain data (the JSON schema is in docs/dashboard.md).

    Args:
        config: the configuration (default: loaded from the working directory).
        experiment: the experiment to show (default: the newest job's; the resume section then asks about the
            one :meth:`~colabkit.config.Config.select_experiment` picks).
        include_resume: ask every resume source now and wait for the answer (contacts the remotes; the
            one-shot ``colabkit status --resume``). Otherwise the cached answer is shown with its age.
        refresh_resume: start a background refresh of the resume cache when it is missing or older than
            ``dashboard.resume_max_age`` (never waits for it).
    Raises:
        UnknownExperimentError: `experiment` is not here.
    Returns:
        ``{"version", "time", "project", "root", "colabkit_version", "runtime", "train", "jobs", "sync",
        "triggers", "resume"}``. A section that could not be read holds ``{"error": message}``.
    """
    from . import __version__
    from .config import load_config
    cfg = config or load_config()
    if experiment is not None:
        cfg.require_experiment(experiment)  # 'status -e v99' is an error, as for every command taking one
    now = time.time()
    snap: dict[str, Any] = {"version": VERSION, "time": now, "project": cfg.project, "root": str(cfg.root),
                            "colabkit_version": __version__}
    jobs: list[dict[str, Any]] = []
    try:
        from . import runner
        jobs = runner.status(config=cfg, experiment=experiment)["jobs"]
    except Exception as e:  # a view never fails because one section could not be read
        log.debug("dashboard: training status failed", exc_info=True)
        snap["train_error"] = _err(e)
    train = jobs[0] if jobs else None
    exp = experiment or (train or {}).get("experiment") or os.environ.get("COLABKIT_EXPERIMENT")
    snap["experiment"] = exp
    snap["runtime"] = _section(lambda: _runtime(cfg, exp))
    snap["train"] = train
    snap["jobs"] = [{k: j.get(k) for k in ("experiment", "run_id", "state", "step", "total_steps")} for j in jobs]
    snap["sync"] = _section(lambda: _sync(cfg))
    step = train.get("step") if train else None
    snap["triggers"] = _section(lambda: _triggers(cfg, exp, step))
    ck_step = train.get("checkpoint_step") if train else None
    if include_resume:
        refresh_resume_cache(config=cfg, experiment=exp, wait=True, checkpoint_step=ck_step)
    snap["resume"] = _section(lambda: _resume_view(cfg, exp, now, refresh=refresh_resume and not include_resume,
                                                   checkpoint_step=ck_step))
    snap["release"] = _section(lambda: _release(cfg))
    return snap


def snapshot_now(*, config: "Config | None" = None, experiment: str | None = None,
                 timeout: float = 60.0) -> dict[str, Any]:
    """A snapshot for a one-shot reader (the CLI, ``--json``): when the resume cache is missing or stale,
    ask the sources first (waiting up to `timeout` seconds) instead of showing an old answer."""
    from .config import load_config
    cfg = config or load_config()
    snap = snapshot(config=cfg, experiment=experiment, refresh_resume=False)
    if (snap.get("resume") or {}).get("state") in ("none", "stale"):
        refresh_resume_cache(config=cfg, experiment=snap.get("experiment"), wait=True, timeout=timeout,
                             checkpoint_step=(snap.get("train") or {}).get("checkpoint_step"))
        snap = snapshot(config=cfg, experiment=experiment, refresh_resume=False)
    return snap


def _section(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as e:
        log.debug("dashboard: a section failed", exc_info=True)
        return {"error": _err(e)}


def _err(e: BaseException) -> str:
    from .secrets import redact
    return redact(str(e) or type(e).__name__)


# where the code runs does not change while a kernel lives: detected once a minute, not on every refresh
_RUNTIME_TTL = 60.0
_runtime_cache: tuple[float, Any, dict[str, Any]] | None = None


def _runtime_facts() -> dict[str, Any]:
    global _runtime_cache
    from . import runtime
    now = time.monotonic()
    gpus = runtime.gpus()  # itself cached (nvidia-smi runs once)
    hit = _runtime_cache
    if hit is not None and now - hit[0] < _RUNTIME_TTL and hit[1] == gpus:
        return dict(hit[2])
    rt = runtime.detect()
    d = rt.as_dict()
    d["gpus"] = [{"name": g.name, "memory_total": g.memory_total, "tier": g.tier} for g in rt.gpus]
    d["frontend_name"] = _frontend_name(d.get("frontend"))
    _runtime_cache = (now, gpus, d)
    return dict(d)


def _runtime(cfg: "Config", experiment: str | None) -> dict[str, Any]:
    from . import runtime
    from .fsutil import free_bytes
    d = _runtime_facts()
    tier = d.get("tier")
    cap = cfg.train.max_vram if cfg.train.max_vram is not None else (runtime.TIER1_DEFAULT_CAP if tier == 1 else None)
    d["vram_cap"] = cap
    d["tier_label"] = (None if tier is None else f"Tier 1 (L4-class, jobs capped at {format_size(cap)})" if tier == 1
                       else "Tier 2 (A100-class)" + (f", jobs capped at {format_size(cap)}" if cap else ""))
    where = cfg.checkpoint_dir(experiment)
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    d["disk_path"] = str(where)
    try:
        d["disk_free"] = free_bytes(probe)
    except OSError:
        d["disk_free"] = None
    return d


def _frontend_name(frontend: str | None) -> str:
    from .runtime import in_colab
    if in_colab():
        return "Colab"
    if frontend == "notebook":
        return "VS Code Jupyter" if any(k.startswith("VSCODE_") for k in os.environ) else "Jupyter"
    return frontend or "?"


# the ledger summaries of tiers that are not syncing here, cached on the ledger file's (mtime, size): a
# refresh then reads no ledger (a ledger of 10,000 files is megabytes of JSON)
_ledger_cache: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
_ledger_lock = threading.Lock()


def _ledger_summary(cfg: "Config", tier: str) -> dict[str, Any] | None:
    from .ledger import Ledger, ledger_path
    p = ledger_path(cfg.state_dir, tier)
    try:
        st = os.stat(p)
    except OSError:
        return None
    key = (st.st_ino, st.st_mtime_ns, st.st_size)  # each save is a rename: a new inode
    with _ledger_lock:
        hit = _ledger_cache.get(str(p))
        if hit and hit[0] == key:
            return hit[1]
    summary = Ledger.load(cfg.state_dir, tier).summary()
    with _ledger_lock:
        _ledger_cache[str(p)] = (key, summary)
    return summary


def _sync(cfg: "Config") -> dict[str, Any]:
    from . import sync
    st = sync.status(config=cfg, ledgers=False)
    tiers: dict[str, dict[str, Any]] = {}
    for name, t in (st.get("tiers") or {}).items():
        row = dict(t)
        if row.get("last_error"):
            row["last_error"] = _err(Exception(row["last_error"]))
        tiers[name] = row
    for t in cfg.tiers:  # a row for every configured tier, syncing or not
        if t.name in tiers:
            continue
        led = _ledger_summary(cfg, t.name) or {}
        tiers[t.name] = {"tier": t.name, "state": "off", "every": t.every, "last_upload": led.get("last_upload"),
                         "next_due": None, "pending_files": None, "pending_bytes": None,
                         "ledger_files": led.get("files", 0), "last_error": None, "last_uploaded": None}
    out = {"running": bool(st.get("running")) or bool(st.get("elsewhere")), "tiers": tiers}
    if st.get("elsewhere"):
        out["elsewhere"] = [e.get("pid") for e in st["elsewhere"]]
    if st.get("disk"):
        out["disk"] = st["disk"]
    return out


# release.status() reads every tier's ledger when sync is not running here: asked at most this often per project
RELEASE_TTL = 30.0
_release_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}


def _release(cfg: "Config") -> dict[str, Any] | None:
    import importlib
    now = time.monotonic()
    hit = _release_cache.get(str(cfg.root))
    if hit is not None and now - hit[0] < RELEASE_TTL:
        return hit[1]
    try:
        release = importlib.import_module("colabkit.release")
    except ModuleNotFoundError as e:
        if e.name == "colabkit.release":
            return None
        raise
    st = release.status(config=cfg)
    _release_cache[str(cfg.root)] = (now, st)
    return st


def _no_triggers(step: int | None) -> dict[str, Any]:
    return {"version": 1, "configured": False, "step": step, "rules": [],
            "queue": {s: 0 for s in _QUEUE_STATES}, "entries": []}


def _triggers(cfg: "Config", experiment: str | None, step: int | None) -> dict[str, Any]:
    import importlib
    try:
        triggers = importlib.import_module("colabkit.triggers")
    except ModuleNotFoundError as e:
        if e.name == "colabkit.triggers":
            return _no_triggers(step)  # not built yet
        raise
    fn = getattr(triggers, "status", None)
    if fn is None:
        return _no_triggers(step)
    d = fn(config=cfg, experiment=experiment, step=step)
    return d if isinstance(d, dict) else _no_triggers(step)


# -- the resume cache -----------------------------------------------------------------------------
_resume_lock = threading.Lock()
_resume_cache: dict[tuple[str, str | None], dict[str, Any]] = {}
_resume_threads: dict[tuple[str, str | None], threading.Thread] = {}


def _resume_file(cfg: "Config", experiment: str | None) -> Path:
    return cfg.state_dir / "dashboard" / f"resume-{experiment or '_'}.json"


def _cached_resume(cfg: "Config", experiment: str | None) -> dict[str, Any] | None:
    key = (str(cfg.root), experiment)
    with _resume_lock:
        hit = _resume_cache.get(key)
    if hit is not None:
        return hit
    try:  # what an earlier kernel (or a CLI) found, with its time
        data = json.loads(_resume_file(cfg, experiment).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("checked"), (int, float)):
        return None
    with _resume_lock:
        _resume_cache.setdefault(key, data)
    return data


def refresh_resume_cache(*, config: "Config | None" = None, experiment: str | None = None, wait: bool = False,
                         timeout: float | None = None, checkpoint_step: int | None = None) -> threading.Thread | None:
    """Ask the resume sources again in a daemon thread (``colabkit-dashboard-resume``); one at a time per
    project and experiment. The answer lands in the cache that snapshots read (and in
    ``.colabkit/dashboard/resume-<experiment>.json``, so a later kernel or the CLI sees it with its age).

    Args:
        wait: join the thread (up to `timeout` seconds) before returning.
        checkpoint_step: the run's newest checkpoint step when asked (a newer one makes the answer old).
    Returns:
        The refreshing thread (None when `wait` saw it finish).
    """
    from .config import load_config
    cfg = config or load_config()
    key = (str(cfg.root), experiment)
    with _resume_lock:
        t = _resume_threads.get(key)
        if t is None or not t.is_alive():
            t = threading.Thread(target=_refresh_resume, args=(cfg, experiment, key, checkpoint_step),
                                 name="colabkit-dashboard-resume", daemon=True)
            _resume_threads[key] = t
            t.start()
    if wait:
        t.join(timeout)
        return t if t.is_alive() else None
    return t


def _refresh_resume(cfg: "Config", experiment: str | None, key: tuple[str, str | None],
                    checkpoint_step: int | None) -> None:
    from .fsutil import atomic_write_json
    started = time.time()
    entry: dict[str, Any] = {"format": 1, "checked": started, "experiment": experiment,
                             "checkpoint_step": checkpoint_step}
    try:
        from . import resume
        # a view of what each source answers now: it neither waits for nor refuses an unreachable tier (the plan
        # lists it as unreachable); resuming itself follows resume.on_unreachable
        entry["plan"] = resume.locate(config=cfg, experiment=experiment, on_unreachable="older",
                                      deadline=0).as_dict()
        entry["error"] = None
    except Exception as e:  # ResumeError lists what every source answered; anything else is reported too
        entry["plan"] = None
        entry["error"] = _err(e)
    entry["duration"] = time.time() - started
    with _resume_lock:
        _resume_cache[key] = entry
    with contextlib.suppress(OSError):
        atomic_write_json(_resume_file(cfg, experiment), entry, durable=False)  # a cache: no fsync


def resume_refreshing() -> bool:
    """True while a resume refresh runs."""
    with _resume_lock:
        return any(t.is_alive() for t in _resume_threads.values())


def wait_resume(timeout: float | None = None) -> bool:
    """Wait for the running resume refreshes; True when none is left."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with _resume_lock:
        threads = list(_resume_threads.values())
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not resume_refreshing()


def clear_resume_cache() -> None:
    """Forget the in-memory resume answers (the files stay); for tests and after changing tiers."""
    with _resume_lock:
        _resume_cache.clear()


#: a new checkpoint of the run makes the resume answer out of date, but the sources are asked at most this often
RESUME_MIN_INTERVAL = 30.0


def _resume_view(cfg: "Config", experiment: str | None, now: float, *, refresh: bool,
                 checkpoint_step: int | None = None) -> dict[str, Any]:
    key = (str(cfg.root), experiment)
    entry = _cached_resume(cfg, experiment)
    max_age = cfg.dashboard.resume_max_age
    age = None if entry is None else max(0.0, now - float(entry["checked"]))
    newer = (entry is not None and checkpoint_step is not None and checkpoint_step != entry.get("checkpoint_step")
             and (age or 0.0) >= min(max_age, RESUME_MIN_INTERVAL))
    if refresh and (entry is None or age is None or age > max_age or newer):
        refresh_resume_cache(config=cfg, experiment=experiment, checkpoint_step=checkpoint_step)
    with _resume_lock:
        t = _resume_threads.get(key)
        refreshing = bool(t and t.is_alive())
    out: dict[str, Any] = {"checked": entry["checked"] if entry else None, "age": age, "max_age": max_age,
                           "refreshing": refreshing}
    if entry is None:
        out.update(state="refreshing" if refreshing else "none", sources=[], choice=None, reason=None, error=None)
        return out
    out["state"] = "fresh" if age is not None and age <= max_age else "stale"
    plan = entry.get("plan") or {}
    out["policy"] = plan.get("policy")
    out["experiment"] = plan.get("experiment")
    out["selected"] = plan.get("selected")  # why that experiment, when none was named
    out["sources"] = plan.get("sources") or []
    out["choice"] = plan.get("choice")
    out["reason"] = plan.get("reason")
    out["error"] = entry.get("error")
    return out


# -- text -------------------------------------------------------------------------------------------
def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    d = now - t
    return f"{format_duration(d)} ago" if d >= 0 else f"in {format_duration(-d)}"


def _gpu_text(rt: dict[str, Any]) -> str:
    gpus = rt.get("gpus") or []
    return ", ".join(f"{g['name']} ({format_size(g['memory_total'])})" for g in gpus) or "no GPU"


def _num(v: Any, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _train_parts(train: dict[str, Any]) -> list[str]:
    step, total = train.get("step"), train.get("total_steps")
    parts = [f"{train.get('experiment', '?')}: {train.get('state', '?')}"]
    if step is not None:
        parts.append(f"step {step}" + (f"/{total}" if total else ""))
    if train.get("loss") is not None:
        parts.append(f"loss {_num(train['loss'], '.4g')}")
    if train.get("rate"):
        parts.append(f"{train['rate']:.2f} steps/s")
    if train.get("eta") is not None:
        parts.append(f"ETA {format_duration(train['eta'])}")
    if train.get("estimate"):
        parts.append(f"estimate {format_duration(train['estimate'])}")
    if train.get("attempt"):
        parts.append(f"attempt {train['attempt']}")
    return parts


def _train_detail(train: dict[str, Any]) -> list[str]:
    out = []
    restarts = train.get("restarts")
    if restarts is not None:
        out.append(f"restarts {restarts}" + (f" of {train['max_restarts']}" if train.get("max_restarts") is not None
                                             else ""))
    ck = train.get("checkpoint")
    if ck or train.get("checkpoint_step") is not None:
        out.append(f"last checkpoint: step {train.get('checkpoint_step', '?')}"
                   + (f" ({os.path.basename(str(ck))})" if ck else ""))
    if train.get("error"):
        out.append(f"error: {train['error']}")
    return out


def _tier_text(name: str, t: dict[str, Any], now: float) -> str:
    if "error" in t and "state" not in t:
        return f"{name}: {t['error']}"
    parts = [f"{name}: {t.get('state', '?')}"]
    last = t.get("last_uploaded")
    what = f" ({last['path']}, {format_size(last.get('size'))})" if isinstance(last, dict) and last.get("path") else ""
    parts.append(f"last upload {_ago(t.get('last_upload'), now)}{what}")
    parts.append(f"next due {_ago(t.get('next_due'), now)}" if t.get("next_due") else "next due —")
    if t.get("pending_files") is not None:
        parts.append(f"pending {t.get('pending_files', 0)} files / {format_size(t.get('pending_bytes') or 0)}")
    if t.get("ledger_files") is not None:
        parts.append(f"holds {t['ledger_files']} files")
    parts.extend(_tier_notes(t))
    if t.get("last_error"):
        parts.append(f"error: {t['last_error']}")
    return " · ".join(parts)


def _tier_notes(t: dict[str, Any]) -> list[str]:
    """What sync says beyond the counts (a pause by the daily cap, skipped files), in sync's own words."""
    try:
        from .sync import tier_notes
        return tier_notes(t)
    except Exception:
        return []


def _rule_thresholds(rule: dict[str, Any], axis_max: int) -> list[int]:
    marks = sorted({int(a) for a in (rule.get("at") or []) if isinstance(a, (int, float))})
    every = rule.get("every")
    if isinstance(every, int) and every > 0 and axis_max > 0:
        n = min(axis_max // every, 50)
        marks = sorted(set(marks) | {every * i for i in range(1, n + 1)})
    return marks


def _rule_text(rule: dict[str, Any]) -> str:
    what = []
    if rule.get("at"):
        what.append("at " + ", ".join(str(a) for a in rule["at"]))
    if rule.get("every"):
        what.append(f"every {rule['every']}")
    fired = rule.get("fired") or []
    return (f"{rule.get('name', '?')}: {rule.get('detector', '?')} → {rule.get('action', '?')}"
            + (f" ({rule['mode']})" if rule.get("mode") else "")
            + (f" · {' '.join(what)}" if what else "")
            + f" · fired {', '.join(str(f) for f in fired) if fired else 'never'}"
            + (f" · next {rule['next']}" if rule.get("next") is not None else ""))


def _resume_choice_text(res: dict[str, Any]) -> str:
    choice = res.get("choice")
    if choice:
        return f"→ {choice.get('source')} step {choice.get('step')} ({res.get('reason') or ''})"
    if res.get("error"):
        return f"→ unknown: {res['error']}"
    if res.get("checked"):
        return f"→ fresh start ({res.get('reason') or 'no checkpoint anywhere'})"
    return "→ not asked yet"


def _resume_age_text(res: dict[str, Any]) -> str:
    if not res.get("checked"):
        return "asking the sources…" if res.get("refreshing") else "not asked yet"
    txt = f"checked {format_duration(res.get('age'))} ago"
    if res.get("state") == "stale":
        txt += " (stale)"
    if res.get("refreshing"):
        txt += ", refreshing…"
    return txt


def render_text(snap: dict[str, Any]) -> list[str]:
    """The snapshot as lines of text (terminals, agents, notebooks saved without widget state)."""
    now = snap.get("time") or time.time()
    rt = snap.get("runtime") or {}
    lines = [f"colabkit — project {snap.get('project')} at {snap.get('root')}"]
    if "error" in rt and "host" not in rt:
        lines.append(f"runtime: {rt['error']}")
    else:
        lines.append(f"runtime: {rt.get('host')} · {rt.get('platform')} · {rt.get('frontend')} · {_gpu_text(rt)}"
                     + (f" · Tier {rt['tier']}" if rt.get("tier") else "")
                     + (f" · free disk {format_size(rt['disk_free'])}" if rt.get("disk_free") is not None else "")
                     + (f" · colabkit {snap['colabkit_version']}" if snap.get("colabkit_version") else ""))
    train = snap.get("train")
    lines.append("training:")
    if isinstance(train, dict) and "jobs" in train:  # a version-0 snapshot: {"jobs": [...]}
        train = (train["jobs"] or [None])[0]
    if not train:
        lines.append("  no run" + (f" ({snap['train_error']})" if snap.get("train_error") else ""))
    else:
        lines.append("  " + " · ".join(_train_parts(train)))
        for x in _train_detail(train):
            lines.append("    " + x)
        hist = train.get("history") or []
        if hist:
            lines.append(f"    loss curve: {len(hist)} points, step {hist[0][0]} → {hist[-1][0]}, "
                         f"loss {_num(hist[0][1], '.4g')} → {_num(hist[-1][1], '.4g')}")
    lines.append("sync:")
    sync = snap.get("sync") or {}
    tiers = sync.get("tiers") if isinstance(sync, dict) else None
    if isinstance(sync, dict) and "error" in sync and not tiers:
        lines.append(f"  {sync['error']}")
    elif not tiers:
        lines.append("  no tiers configured")
    else:
        for name, t in tiers.items():
            lines.append("  " + _tier_text(name, t, now))
    lines.append("triggers:")
    trig = snap.get("triggers") or {}
    if "error" in trig and not trig.get("rules"):
        lines.append(f"  {trig['error']}")
    elif not trig.get("configured") and not trig.get("rules"):
        lines.append("  none configured")
    else:
        for rule in trig.get("rules") or []:
            lines.append("  " + _rule_text(rule))
        q = trig.get("queue") or {}
        counts = [f"{q[s]} {s}" for s in _QUEUE_STATES if q.get(s)]
        lines.append("  queue: " + (", ".join(counts) if counts else "empty"))
        for e in (trig.get("entries") or [])[:8]:  # newest first
            lines.append(f"    {e.get('id')}: {e.get('rule')} → {e.get('action')} · {e.get('state')}"
                         + (f" · step {e['step']}" if e.get("step") is not None else "")
                         + (f" · attempts {e['attempts']}" if e.get("attempts") else ""))
    res = snap.get("resume")
    if res is not None:
        lines.append("resume sources (priority order)"
                     + (f" for {res['experiment']}" if res.get("experiment") else "")
                     + (f" — {res['selected']}" if res.get("selected") else "") + ":")
        lines.append(f"  {_resume_age_text(res)}")
        if "error" in res and "checked" not in res:  # the section itself failed
            lines.append(f"  {res['error']}")
        for s in res.get("sources") or []:
            step = s.get("step")
            lines.append(f"  {s.get('name')}: {s.get('state')}" + (f" · newest step {step}" if step is not None else "")
                         + (f" · {s['error']}" if s.get("error") else ""))
        if "checked" in res or res.get("choice"):
            lines.append("  " + _resume_choice_text(res))
    rel = snap.get("release")
    if isinstance(rel, dict) and "error" not in rel:
        lines.append("release:")
        lines += ["  " + x for x in _release_lines(rel, now)]
    return lines


def _release_lines(rel: dict[str, Any], now: float) -> list[str]:
    try:
        from .release import status_lines
        return status_lines(rel, now=now)
    except Exception as e:
        return [_err(e)]


# -- HTML --------------------------------------------------------------------------------------------
_STYLE = ("<style>.ck-dash{font-family:-apple-system,Segoe UI,Roboto,sans-serif;font-size:13px;line-height:1.45}"
          ".ck-dash h4{margin:8px 0 2px;font-size:13px}.ck-dash table{border-collapse:collapse}"
          ".ck-dash td,.ck-dash th{padding:1px 10px 1px 0;text-align:left;vertical-align:top}"
          ".ck-dash .ck-err{color:#b00020}.ck-dash .ck-dim{color:#777}.ck-dash .ck-ok{color:#137333}</style>")


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _sec(name: str, title: str, body: str) -> str:
    return f"<div class='ck-section ck-dash' data-section='{name}'><h4>{_e(title)}</h4>{body}</div>"


def html_runtime(snap: dict[str, Any]) -> str:
    rt = snap.get("runtime") or {}
    if "error" in rt and "host" not in rt:
        return _sec("runtime", "Runtime", f"<span class='ck-err'>{_e(rt['error'])}</span>")
    gpus = rt.get("gpus") or []
    gpu = "<br>".join(f"{_e(g['name'])} · {_e(format_size(g['memory_total']))}" for g in gpus) or "no GPU"
    rows = [("host", _e(rt.get("host"))),
            ("where", _e(f"{rt.get('platform')} · {rt.get('frontend_name') or rt.get('frontend')}")),
            ("GPU", gpu), ("tier", _e(rt.get("tier_label") or "no GPU tier")),
            ("free disk", _e(f"{format_size(rt.get('disk_free'))} at {rt.get('disk_path')}")),
            ("colabkit", _e(snap.get("colabkit_version")))]
    body = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"
    return _sec("runtime", "Runtime", body)


def loss_svg(history: list[Any], *, total: int | None = None, width: int = 460, height: int = 120) -> str:
    """The loss curve as an inline SVG polyline (log scale when the loss spans more than 50×)."""
    pts = [(int(p[0]), float(p[1])) for p in history or []
           if isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], (int, float))
           and math.isfinite(float(p[1]))]
    if len(pts) > CURVE_POINTS:
        stride = math.ceil(len(pts) / CURVE_POINTS)
        pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
    n = len(pts)
    pad_l, pad_r, pad_t, pad_b = 48, 8, 8, 18
    if n == 0:
        return (f"<svg class='ck-loss' data-points='0' width='{width}' height='{height}' "
                f"xmlns='http://www.w3.org/2000/svg'><text x='{pad_l}' y='{height // 2}' fill='#777' "
                f"font-size='12'>no loss logged yet</text></svg>")
    losses = [p[1] for p in pts]
    lo, hi = min(losses), max(losses)
    log_scale = lo > 0 and hi / lo > 50

    def f(v: float) -> float:
        return math.log10(v) if log_scale else v
    flo, fhi = f(lo), f(hi)
    if fhi - flo < 1e-12:
        flo, fhi = flo - 0.5, fhi + 0.5
    s0 = min(p[0] for p in pts)
    s1 = max([p[0] for p in pts] + ([total] if total else []))
    if s1 <= s0:
        s1 = s0 + 1
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    coords = " ".join(f"{pad_l + (s - s0) / (s1 - s0) * w:.1f},{pad_t + (fhi - f(v)) / (fhi - flo) * h:.1f}"
                      for s, v in pts)
    last = pts[-1]
    return (f"<svg class='ck-loss' data-points='{n}' data-last-step='{last[0]}' width='{width}' height='{height}' "
            f"xmlns='http://www.w3.org/2000/svg' font-size='10' font-family='monospace'>"
            f"<rect x='{pad_l}' y='{pad_t}' width='{w}' height='{h}' fill='none' stroke='#ddd'/>"
            f"<polyline class='ck-loss-line' fill='none' stroke='#1a73e8' stroke-width='1.5' points='{coords}'/>"
            f"<text x='2' y='{pad_t + 8}' fill='#555'>{hi:.3g}</text>"
            f"<text x='2' y='{pad_t + h}' fill='#555'>{lo:.3g}</text>"
            f"<text x='{pad_l}' y='{height - 4}' fill='#555'>{s0}</text>"
            f"<text x='{width - pad_r}' y='{height - 4}' fill='#555' text-anchor='end'>{s1}</text>"
            f"<text x='{pad_l + w / 2:.0f}' y='{height - 4}' fill='#555' text-anchor='middle'>"
            f"loss{' (log)' if log_scale else ''} · last {last[1]:.4g} at step {last[0]}</text></svg>")


def html_train_head(snap: dict[str, Any]) -> str:
    train = snap.get("train")
    if not train:
        body = "<span class='ck-dim'>no run" + (f": {_e(snap['train_error'])}" if snap.get("train_error") else "") \
               + " — start one with <code>%train vXX --background</code></span>"
        return _sec("training", "Training", body)
    step, total = train.get("step"), train.get("total_steps")
    state = train.get("state", "?")
    cls = {"finished": "ck-ok", "failed": "ck-err", "oom": "ck-err", "lost": "ck-err"}.get(state, "")
    head = (f"<b>{_e(train.get('experiment'))}</b> <span class='ck-state {cls}' data-state='{_e(state)}'>"
            f"{_e(state)}</span> · <span class='ck-step' data-step='{_e(step)}'>step {_e(step if step is not None else '—')}"
            f"</span>" + (f" / <span class='ck-total'>{_e(total)}</span>" if total else ""))
    return _sec("training", "Training", head)


def html_train_body(snap: dict[str, Any]) -> str:
    train = snap.get("train")
    if not train:
        return ""
    rate, eta, est = train.get("rate"), train.get("eta"), train.get("estimate")
    rows = [("pace", f"{rate:.2f} steps/s" if rate else "—"),
            ("ETA", format_duration(eta) if eta is not None else "—"),
            ("estimate", format_duration(est) if est else "none given (--estimate)"),
            ("loss", _num(train["loss"], ".4g") if train.get("loss") is not None else "—"),
            ("attempt", f"{train.get('attempt') or '—'} · restarts {train.get('restarts', 0)}"
             + (f" of {train['max_restarts']}" if train.get("max_restarts") is not None else "")),
            ("last checkpoint", (f"step {train.get('checkpoint_step')} · {os.path.basename(str(train['checkpoint']))}"
                                 if train.get("checkpoint") else "none yet"))]
    if train.get("error"):
        rows.append(("error", f"<span class='ck-err'>{_e(train['error'])}</span>"))
    table = "<table>" + "".join(f"<tr><th>{k}</th><td>{v if k == 'error' else _e(v)}</td></tr>"
                                for k, v in rows) + "</table>"
    svg = loss_svg(train.get("history") or [], total=train.get("total_steps"))
    return f"<div class='ck-dash ck-train-body' style='display:flex;gap:16px;flex-wrap:wrap'>{table}<div>{svg}</div></div>"


def html_progress_static(snap: dict[str, Any]) -> str:
    """A plain-HTML progress bar for the static text/html rendering (the widget uses IntProgress)."""
    train = snap.get("train") or {}
    step, total = train.get("step"), train.get("total_steps")
    if not total or step is None:
        return ""
    pct = max(0.0, min(100.0, 100.0 * step / total))
    return (f"<div style='width:460px;height:10px;background:#eee;border-radius:3px'>"
            f"<div style='width:{pct:.1f}%;height:10px;background:#1a73e8;border-radius:3px'></div></div>")


def html_sync(snap: dict[str, Any]) -> str:
    now = snap.get("time") or time.time()
    sync = snap.get("sync") or {}
    tiers = sync.get("tiers") or {}
    if "error" in sync and not tiers:
        return _sec("sync", "Sync tiers", f"<span class='ck-err'>{_e(sync['error'])}</span>")
    if not tiers:
        return _sec("sync", "Sync tiers", "<span class='ck-dim'>no tiers configured</span>")
    head = "<tr><th>tier</th><th>state</th><th>last verified upload</th><th>next due</th><th>pending</th>" \
           "<th>holds</th><th>error</th></tr>"
    rows = []
    for name, t in tiers.items():
        last = t.get("last_uploaded")
        what = f"<br><span class='ck-dim'>{_e(last['path'])} · {_e(format_size(last.get('size')))}</span>" \
            if isinstance(last, dict) and last.get("path") else ""
        pend = "—" if t.get("pending_files") is None else \
            f"{t.get('pending_files')} files · {format_size(t.get('pending_bytes') or 0)}"
        state = _e(t.get("state", "?")) + "".join(f"<br><span class='ck-dim'>{_e(n)}</span>"
                                                   for n in _tier_notes(t))
        rows.append(f"<tr class='ck-tier' data-tier='{_e(name)}'><td><b>{_e(name)}</b></td><td>{state}</td>"
                    f"<td>{_e(_ago(t.get('last_upload'), now))}{what}</td>"
                    f"<td>{_e(_ago(t.get('next_due'), now) if t.get('next_due') else '—')}</td><td>{_e(pend)}</td>"
                    f"<td>{_e(t.get('ledger_files') if t.get('ledger_files') is not None else '—')} files</td>"
                    f"<td class='ck-err'>{_e(t.get('last_error') or '')}</td></tr>")
    return _sec("sync", "Sync tiers", f"<table>{head}{''.join(rows)}</table>")


def trigger_svg(rule: dict[str, Any], step: int | None, axis_max: int, *, width: int = 460) -> str:
    """One rule's thresholds on an iteration axis: fired ones filled, a red marker at the current step."""
    height, pad = 26, 10
    marks = _rule_thresholds(rule, axis_max)
    fired = {int(x) for x in rule.get("fired") or [] if isinstance(x, (int, float))}
    span = max(axis_max, 1)

    def x(v: float) -> float:
        return pad + min(max(v, 0), span) / span * (width - 2 * pad)
    parts = [f"<line x1='{pad}' y1='13' x2='{width - pad}' y2='13' stroke='#999'/>"]
    for m in marks:
        fill = "#137333" if m in fired else "#fff"
        parts.append(f"<circle class='ck-threshold' data-at='{m}' cx='{x(m):.1f}' cy='13' r='4' fill='{fill}' "
                     f"stroke='#137333'/>")
    if step is not None:
        parts.append(f"<line class='ck-now' data-step='{step}' x1='{x(step):.1f}' y1='3' x2='{x(step):.1f}' "
                     f"y2='23' stroke='#d93025' stroke-width='2'/>")
    return (f"<svg class='ck-rule' data-rule='{_e(rule.get('name'))}' width='{width}' height='{height}' "
            f"xmlns='http://www.w3.org/2000/svg'>{''.join(parts)}</svg>")


def html_triggers(snap: dict[str, Any]) -> str:
    trig = snap.get("triggers") or {}
    if "error" in trig and not trig.get("rules"):
        return _sec("triggers", "Triggers", f"<span class='ck-err'>{_e(trig['error'])}</span>")
    rules = trig.get("rules") or []
    if not trig.get("configured") and not rules:
        return _sec("triggers", "Triggers", "<span class='ck-dim'>none configured</span>")
    train = snap.get("train") or {}
    step = trig.get("step") if trig.get("step") is not None else train.get("step")
    marks = [m for r in rules for m in (r.get("at") or []) if isinstance(m, (int, float))]
    axis_max = int(max([train.get("total_steps") or 0, step or 0, *(m * 1.05 for m in marks)] or [1]) or 1)
    out = []
    for r in rules:
        out.append(f"<div class='ck-rule-row'>{_e(_rule_text(r))}<br>{trigger_svg(r, step, axis_max)}</div>")
    q = trig.get("queue") or {}
    counts = " · ".join(f"{q[s]} {s}" for s in _QUEUE_STATES if q.get(s)) or "empty"
    out.append(f"<div class='ck-queue'><b>queue</b>: {_e(counts)}</div>")
    entries = (trig.get("entries") or [])[:8]  # newest first
    if entries:
        out.append("<table><tr><th>entry</th><th>rule</th><th>action</th><th>state</th><th>step</th>"
                   "<th>attempts</th></tr>" + "".join(
                       f"<tr class='ck-entry' data-state='{_e(e.get('state'))}'><td>{_e(e.get('id'))}</td>"
                       f"<td>{_e(e.get('rule'))}</td><td>{_e(e.get('action'))}</td><td>{_e(e.get('state'))}</td>"
                       f"<td>{_e(e.get('step'))}</td><td>{_e(e.get('attempts'))}</td></tr>" for e in entries)
                   + "</table>")
    return _sec("triggers", "Triggers", "".join(out))


def html_resume(snap: dict[str, Any]) -> str:
    res = snap.get("resume") or {}
    if "error" in res and "checked" not in res:
        return _sec("resume", "Resume sources", f"<span class='ck-err'>{_e(res['error'])}</span>")
    rows = []
    for s in res.get("sources") or []:
        step = s.get("step")
        held = f"step {step}" if step is not None else ("no checkpoint" if s.get("state") == "empty" else "—")
        rows.append(f"<tr class='ck-source' data-source='{_e(s.get('name'))}'><td><b>{_e(s.get('name'))}</b></td>"
                    f"<td>{_e(s.get('state'))}</td><td>{_e(held)}</td>"
                    f"<td class='ck-err'>{_e(s.get('error') or '')}</td></tr>")
    table = ("<table><tr><th>source</th><th>state</th><th>newest verified</th><th></th></tr>" + "".join(rows)
             + "</table>") if rows else ""
    choice = res.get("choice") or {}
    body = (f"<div class='ck-dim ck-resume-age' data-state='{_e(res.get('state'))}'>{_e(_resume_age_text(res))}</div>"
            f"{table}<div class='ck-resume-choice' data-source='{_e(choice.get('source'))}' "
            f"data-step='{_e(choice.get('step'))}'>{_e(_resume_choice_text(res))}</div>")
    return _sec("resume", "Resume sources (priority order)", body)


def html_release(snap: dict[str, Any]) -> str:
    rel = snap.get("release")
    if not isinstance(rel, dict) or "error" in rel:
        return ""
    now = snap.get("time") or time.time()
    return _sec("release", "Release", "<br>".join(_e(x) for x in _release_lines(rel, now)))


def html_header(snap: dict[str, Any]) -> str:
    return (f"{_STYLE}<div class='ck-dash'><b>colabkit</b> — project {_e(snap.get('project'))} "
            f"<span class='ck-dim'>{_e(snap.get('root'))} · updated "
            f"<span class='ck-updated'>{_e(time.strftime('%H:%M:%S', time.localtime(snap.get('time') or 0)))}"
            f"</span></span></div>")


def render_html(snap: dict[str, Any]) -> str:
    """The snapshot as one HTML document fragment (the ``text/html`` beside the widget)."""
    return (f"<div class='colabkit-dashboard-static'>{html_header(snap)}{html_runtime(snap)}{html_train_head(snap)}"
            f"{html_progress_static(snap)}{html_train_body(snap)}{html_sync(snap)}{html_triggers(snap)}"
            f"{html_resume(snap)}{html_release(snap)}</div>")


# -- the live view ----------------------------------------------------------------------------------
def _active(snap: dict[str, Any] | None) -> bool:
    """A run or sync is going on (or the resume sources are being asked): keep refreshing."""
    if not snap:
        return True
    train = snap.get("train") or {}
    if train.get("state") in ACTIVE_TRAIN:
        return True
    if (snap.get("sync") or {}).get("running"):
        return True
    return bool((snap.get("resume") or {}).get("refreshing"))


_views_lock = threading.Lock()
_views: dict[tuple[str, str | None], "Dashboard"] = {}
_hooked_shells: list[Any] = []
_atexit_installed = False


def _section_key(name: str, snap: dict[str, Any]) -> Any:
    """What one section is drawn from; times that the section shows relative to now count to the second."""
    sec = int(snap.get("time") or 0)
    train = snap.get("train")
    if name == "header":
        return (snap.get("project"), snap.get("root"), sec)
    if name == "runtime":
        return (snap.get("runtime"), snap.get("colabkit_version"))
    if name in ("train_head", "train_body"):
        return (train, snap.get("train_error"))
    if name == "sync":
        return (snap.get("sync"), sec)
    if name == "triggers":
        return (snap.get("triggers"), (train or {}).get("step"), (train or {}).get("total_steps"))
    if name == "release":
        return (snap.get("release"), sec)
    if name == "resume":
        res = dict(snap.get("resume") or {})
        age = res.pop("age", None)
        return (res, int(age) if isinstance(age, (int, float)) else age)
    return object()  # unknown: always redraw


class Dashboard:
    """A live view of one project (and experiment): build it with :func:`show`.

    Attributes:
        snap: the last snapshot shown.
        widget: the ipywidgets ``VBox`` (None before :meth:`build`).
        refresh: seconds between two background refreshes.
    """

    def __init__(self, *, config: "Config", experiment: str | None = None, refresh: float | None = None) -> None:
        self.config = config
        self.experiment = experiment
        self.refresh = float(refresh if refresh is not None else config.dashboard.refresh)
        self.key = (str(config.root), experiment)
        self.snap: dict[str, Any] | None = None
        self.widget: Any = None
        self.display_id = f"colabkit-dashboard-{uuid.uuid4().hex[:12]}"
        self.renders = 0
        self._parts: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._published: str | None = None
        self._closed = False
        self._rendered = threading.Condition()
        self._keys: dict[str, Any] = {}

    # -- data ------------------------------------------------------------------------------------
    def take(self) -> dict[str, Any]:
        return snapshot(config=self.config, experiment=self.experiment)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- widgets ---------------------------------------------------------------------------------
    def build(self) -> Any:
        """Create the widget tree (ipywidgets 7 and 8: HTML, IntProgress, VBox, Layout)."""
        try:
            import ipywidgets as w
        except ImportError as e:
            from .errors import MissingDependencyError
            raise MissingDependencyError("ipywidgets", purpose="the notebook dashboard") from e
        p = {name: w.HTML(value="") for name in ("header", "runtime", "train_head", "train_body", "sync", "triggers",
                                                 "resume", "release")}
        p["progress"] = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="460px", display="none"))
        self._parts = p
        box = w.VBox([p["header"], p["runtime"], p["train_head"], p["progress"], p["train_body"], p["sync"],
                      p["triggers"], p["resume"], p["release"]])
        box.add_class("colabkit-dashboard")
        self.widget = box
        return box

    def update(self, snap: dict[str, Any] | None = None) -> dict[str, Any]:
        """Take a snapshot (unless given) and redraw what changed. Thread-safe; never raises for a render."""
        snap = snap if snap is not None else self.take()
        with self._lock:
            self.snap = snap
            if self.widget is None or self._closed:
                return snap
            p = self._parts
            for name, fn in (("header", html_header), ("runtime", html_runtime), ("train_head", html_train_head),
                             ("train_body", html_train_body), ("sync", html_sync), ("triggers", html_triggers),
                             ("resume", html_resume), ("release", html_release)):
                key = _section_key(name, snap)
                if self._keys.get(name) == key:
                    continue  # the same facts (to the second) as last time: nothing to redraw
                self._keys[name] = key
                try:
                    value = fn(snap)
                except Exception as e:  # one broken section degrades to its text, the others still update
                    log.debug("dashboard: rendering %s failed", name, exc_info=True)
                    value = f"<pre>{_e(name)}: {_e(_err(e))}</pre>"
                if p[name].value != value:
                    p[name].value = value
            train = snap.get("train") or {}
            step, total = train.get("step"), train.get("total_steps")
            bar = p["progress"]
            if step is not None and total:
                total = int(total)
                if bar.max != total:
                    bar.max = total
                bar.value = max(0, min(int(step), total))
                bar.bar_style = {"finished": "success", "failed": "danger", "oom": "danger", "lost": "danger",
                                 "waiting": "warning", "stopped": "warning"}.get(train.get("state"), "")
                bar.description = f"{100 * bar.value // total}%"
                bar.layout.display = None
            else:
                bar.layout.display = "none"
        with self._rendered:
            self.renders += 1
            self._rendered.notify_all()
        return snap

    def wait_render(self, count: int, timeout: float | None = None) -> bool:
        """Wait until the view was drawn at least `count` times in all; True when it was."""
        with self._rendered:
            return self._rendered.wait_for(lambda: self.renders >= count, timeout)

    def bundle(self) -> dict[str, Any]:
        """The display bundle: the widget view beside text/plain and text/html of the same facts."""
        snap = self.snap or {}
        data: dict[str, Any] = {"text/plain": "\n".join(render_text(snap)), "text/html": render_html(snap)}
        if self.widget is not None:
            data["application/vnd.jupyter.widget-view+json"] = {
                "version_major": 2, "version_minor": 0, "model_id": self.widget.model_id}
        return data

    def display(self) -> None:
        from IPython.display import display
        data = self.bundle()
        self._published = data["text/plain"]
        display(data, raw=True, display_id=self.display_id)

    def publish(self) -> None:
        """Refresh the text/plain and text/html beside the widget (main thread only: from a cell, the
        post_run_cell hook or --follow), when they changed."""
        if self._closed:
            return
        data = self.bundle()
        if data["text/plain"] == self._published:
            return
        from IPython.display import update_display
        self._published = data["text/plain"]
        update_display(data, raw=True, display_id=self.display_id)

    # -- the thread ------------------------------------------------------------------------------
    def start(self) -> "Dashboard":
        """Start the refresh thread (``colabkit-dashboard-<project>``)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        name = f"colabkit-dashboard-{self.config.project or 'project'}" + (f"-{self.experiment}" if self.experiment
                                                                           else "")
        t = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread = t
        t.start()
        return self

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _run(self) -> None:
        idle = 0
        while not self._stop.wait(self.refresh):
            try:
                if self.widget is not None and getattr(self.widget, "comm", True) is None:
                    break  # the widget was closed
                if not _active(self.snap):
                    idle += 1
                    if idle % IDLE_TICKS:
                        continue
                idle = 0
                self.update()
            except Exception:  # a background thread never prints; the next tick tries again
                log.debug("dashboard refresh failed", exc_info=True)

    def close(self, *, timeout: float | None = 5.0) -> None:
        """Stop the refresh thread and forget the view (safe to call twice)."""
        self._closed = True
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        with _views_lock:
            if _views.get(self.key) is self:
                del _views[self.key]

    # -- foreground ------------------------------------------------------------------------------
    def follow(self, *, out: Callable[[str], None] | None = None, interval: float | None = None) -> dict[str, Any]:
        """Update in the calling thread until no run or sync is active (``--follow``; Colab renders these).

        Ctrl-C / interrupting the kernel stops the watching only; the training goes on.
        Returns the last snapshot.
        """
        interval = self.refresh if interval is None else float(interval)
        last_line = None
        snap = self.snap or {}
        wait = threading.Event()
        try:
            while True:
                snap = self.update()
                if self.widget is None and out is not None:
                    line = _follow_line(snap)
                    if line != last_line:
                        out(line)
                        last_line = line
                elif self.widget is not None:
                    with contextlib.suppress(Exception):
                        self.publish()
                if not _active(snap) or self._closed:
                    break
                wait.wait(interval)
        except KeyboardInterrupt:
            (out or print)("Stopped following; the run goes on. '%colabkit dashboard' shows it again.")
        return snap


def _follow_line(snap: dict[str, Any]) -> str:
    train = snap.get("train")
    head = " · ".join(_train_parts(train)) if train else "no run"
    tiers = (snap.get("sync") or {}).get("tiers") or {}
    sync = ", ".join(f"{n} {t.get('state')}" for n, t in tiers.items())
    return head + (f" | sync: {sync}" if sync else "")


def _post_run_cell(*_args: Any) -> None:
    """After every cell: redraw every live view from the main thread (what Colab renders), and refresh the
    text beside the widget so a saved notebook shows the latest facts."""
    with _views_lock:
        views = list(_views.values())
    for v in views:
        try:
            v.update()
            v.publish()
        except Exception:
            log.debug("dashboard: post_run_cell refresh failed", exc_info=True)


def _hook(shell: Any) -> None:
    if shell is None or any(s is shell for s in _hooked_shells):
        return
    try:
        shell.events.register("post_run_cell", _post_run_cell)
    except Exception:
        log.debug("dashboard: cannot register post_run_cell", exc_info=True)
        return
    _hooked_shells.append(shell)


def _unhook_all() -> None:
    while _hooked_shells:
        shell = _hooked_shells.pop()
        with contextlib.suppress(Exception):
            shell.events.unregister("post_run_cell", _post_run_cell)


def close_all(*, timeout: float | None = 5.0) -> None:
    """Stop every live view and its thread, and the post_run_cell hook (kernel exit calls this)."""
    with _views_lock:
        views = list(_views.values())
    for v in views:
        v.close(timeout=timeout)
    _unhook_all()
    wait_resume(timeout)


def views() -> list[Dashboard]:
    """The live views of this kernel."""
    with _views_lock:
        return list(_views.values())


def show(*, config: "Config | None" = None, experiment: str | None = None, follow: bool = False,
         refresh: float | None = None, notebook: bool | None = None, live: bool = True,
         out: Callable[[str], None] = print) -> Dashboard:
    """Show the dashboard: a live widget in a notebook (replacing the view a previous run of the cell
    made), text elsewhere.

    Args:
        config: the configuration (default: loaded from the working directory).
        experiment: the experiment to show (default: the newest run's).
        follow: keep updating in the foreground until no run or sync is active (what Colab renders).
        refresh: seconds between refreshes (default ``dashboard.refresh``, 2 s).
        notebook: force (or refuse) the widget (default: inside a Jupyter kernel).
        live: start the background refresh thread and the post_run_cell hook.
        out: where text goes when there is no widget front end.
    Returns:
        The :class:`Dashboard` (``.close()`` stops it).
    Raises:
        ConfigError: `refresh` is not a positive number of seconds.
    """
    from .config import load_config
    from .errors import ConfigError
    cfg = config or load_config()
    if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or refresh <= 0):
        raise ConfigError(f"--refresh: {refresh!r} must be a positive duration, e.g. 2s", key="refresh", value=refresh)
    if notebook is None:
        from .runtime import in_notebook
        notebook = in_notebook()
    view = Dashboard(config=cfg, experiment=experiment, refresh=refresh)
    if notebook:
        try:
            view.build()
            view.update()
            view.display()
        except Exception as e:  # no widget front end, or a broken install: the same facts as text
            log.debug("dashboard: widget view failed", exc_info=True)
            if not isinstance(e, ImportError):
                log.warning("the dashboard widget could not be shown (%s); showing text", _err(e))
            view.widget = None
    if view.widget is None:
        snap = view.update()
        for line in render_text(snap):
            out(line)
        if follow:
            view.follow(out=out)
            for line in render_text(view.snap or snap):
                out(line)
        return view
    with _views_lock:
        old = _views.get(view.key)
        _views[view.key] = view
    if old is not None:
        old.close()
    if live:
        _install_atexit()
        from IPython import get_ipython
        _hook(get_ipython())
        view.start()
    if follow:
        view.follow(out=out)
    return view


def _install_atexit() -> None:
    global _atexit_installed
    if not _atexit_installed:
        atexit.register(close_all, timeout=2.0)
        _atexit_installed = True
