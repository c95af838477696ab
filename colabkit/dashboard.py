"""Status snapshots, and their views: an ipywidgets dashboard in notebooks, text in terminals, JSON for agents.

A snapshot is plain data gathered from the public APIs (runtime, the %train job, the sync tiers, optionally
the resume sources). Background threads never render anything: they update the state these read.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from .config import Config, format_duration, format_size


def snapshot(*, config: Config | None = None, experiment: str | None = None,
             include_resume: bool = False) -> dict[str, Any]:
    """Everything the dashboard shows, as plain data.

    Args:
        config: the configuration (default: loaded from the working directory).
        experiment: limit the training and resume sections to this experiment (the resume section
            otherwise asks about the experiment :meth:`~colabkit.config.Config.select_experiment` picks).
        include_resume: also ask every resume source what it holds (contacts the remotes).
    Raises:
        UnknownExperimentError: `experiment` is not here.
    Returns:
        {"runtime": ..., "train": ... | None, "sync": ..., "resume": ... | None, "time": epoch seconds}
    """
    from . import runtime
    from .config import load_config
    cfg = config or load_config()
    if experiment is not None:
        cfg.require_experiment(experiment)  # 'status -e v99' is an error, as for every command taking one
    snap: dict[str, Any] = {"time": time.time(), "project": cfg.project, "root": str(cfg.root),
                            "runtime": runtime.detect().as_dict(), "train": None, "sync": None, "resume": None}
    try:
        from . import runner
        snap["train"] = runner.status(config=cfg, experiment=experiment)
    except (ImportError, AttributeError):
        pass
    try:
        from . import sync
        snap["sync"] = sync.status()
    except (ImportError, AttributeError):
        pass
    try:
        from . import release
        snap["release"] = release.status(config=cfg)
    except (ImportError, AttributeError):
        snap["release"] = None
    if include_resume:
        from . import resume
        from .errors import ColabkitError
        try:
            # a view of what each source answers now: it neither waits for nor refuses an unreachable tier
            # (the plan lists it as unreachable); resuming itself follows resume.on_unreachable
            snap["resume"] = resume.locate(config=cfg, experiment=experiment, on_unreachable="older",
                                           deadline=0).as_dict()
        except ColabkitError as e:
            snap["resume"] = {"error": str(e)}
    return snap


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "never"
    d = now - t
    return f"{format_duration(d)} ago" if d >= 0 else f"in {format_duration(-d)}"


def render_text(snap: dict[str, Any]) -> list[str]:
    """The snapshot as lines of text (terminals, agents, notebooks without widgets)."""
    now = snap.get("time") or time.time()
    rt = snap.get("runtime") or {}
    gpus = rt.get("gpus") or []
    gpu = ", ".join(f"{g['name']} ({format_size(g['memory_total'])})" for g in gpus) or "no GPU"
    tier = rt.get("tier")
    lines = [f"colabkit — project {snap.get('project')} at {snap.get('root')}",
             f"runtime: {rt.get('host')} · {rt.get('platform')} · {rt.get('frontend')} · {gpu}"
             + (f" · Tier {tier}" if tier else "")]
    train = snap.get("train")
    lines.append("training:")
    if not train:
        lines.append("  no run")
    else:
        for line in _train_lines(train):
            lines.append("  " + line)
    lines.append("sync:")
    from .sync import tier_notes
    sync = snap.get("sync") or {}
    tiers = sync.get("tiers") if isinstance(sync, dict) else None
    if not tiers:
        lines.append("  not running")
    else:
        for name, t in tiers.items():
            err = t.get("last_error")
            lines.append(f"  {name}: {t.get('state', '?')} · last upload {_ago(t.get('last_upload'), now)}"
                         f" · next due {_ago(t.get('next_due'), now)}"
                         f" · pending {t.get('pending_files', 0)} files / {format_size(t.get('pending_bytes', 0))}"
                         + "".join(f" · {n}" for n in tier_notes(t))
                         + (f" · error: {err}" if err else ""))
    rel = snap.get("release")
    if rel:
        from .release import status_lines
        lines.append("release:")
        lines += ["  " + x for x in status_lines(rel, now=now)]
    res = snap.get("resume")
    if res is not None:
        lines.append("resume sources (priority order)"
                     + (f" for {res['experiment']}" if res.get("experiment") else "")
                     + (f" — {res['selected']}" if res.get("selected") else "") + ":")
        if "error" in res:
            lines.append(f"  {res['error']}")
        for s in res.get("sources", []):
            step = s.get("step")
            lines.append(f"  {s.get('name')}: {s.get('state')}" + (f" · newest step {step}" if step is not None else "")
                         + (f" · {s['error']}" if s.get("error") else ""))
        choice = res.get("choice")
        if choice:
            lines.append(f"  → {choice.get('source')} step {choice.get('step')} ({res.get('reason', '')})")
    return lines


def _train_lines(train: Any) -> Iterable[str]:
    if isinstance(train, dict) and "jobs" in train:
        jobs = train["jobs"] or []
        if not jobs:
            yield "no run"
        for j in jobs:
            yield from _train_lines(j)
        return
    if not isinstance(train, dict):
        yield str(train)
        return
    step, total = train.get("step"), train.get("total_steps")
    parts = [f"{train.get('experiment', '?')}: {train.get('state', '?')}"]
    if step is not None:
        parts.append(f"step {step}" + (f"/{total}" if total else ""))
    if train.get("loss") is not None:
        parts.append(f"loss {train['loss']:.4g}" if isinstance(train["loss"], (int, float)) else f"loss {train['loss']}")
    if train.get("rate"):
        parts.append(f"{train['rate']:.2f} steps/s")
    if train.get("eta") is not None:
        parts.append(f"ETA {format_duration(train['eta'])}")
    if train.get("attempt"):
        parts.append(f"attempt {train['attempt']}")
    yield " · ".join(parts)


def widget(snap: dict[str, Any]):
    """An ipywidgets view of the snapshot (works with ipywidgets 7 and 8)."""
    try:
        import ipywidgets as w
    except ImportError as e:
        from .errors import MissingDependencyError
        raise MissingDependencyError("ipywidgets", purpose="the notebook dashboard") from e
    import html
    lines = render_text(snap)
    sections: list[Any] = [w.HTML(f"<b>{html.escape(lines[0])}</b>"), w.HTML(html.escape(lines[1]))]
    train = snap.get("train") or {}
    step, total = (train.get("step"), train.get("total_steps")) if isinstance(train, dict) else (None, None)
    if step is not None and total:
        sections.append(w.IntProgress(value=min(int(step), int(total)), min=0, max=int(total),
                                      description="progress"))
    body = "<br>".join(html.escape(x).replace("  ", "&nbsp;&nbsp;") for x in lines[2:])
    sections.append(w.HTML(f"<div style='font-family:monospace'>{body}</div>"))
    return w.VBox(sections)


def show(snap: dict[str, Any], *, notebook: bool, out=print) -> None:
    """Display the snapshot: a widget in a notebook with a widget front end, else text."""
    if notebook:
        try:
            from IPython.display import display
            display(widget(snap))
            return
        except Exception:  # no widget front end (an agent, a terminal IPython): fall back to text
            pass
    for line in render_text(snap):
        out(line)
