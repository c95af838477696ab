"""journal.md: the dated record of every run, data set version and added package.

``journal.md`` lives at the project root. Each entry is appended by writing the whole new file through
:func:`colabkit.fsutil.atomic_open` (temporary name, fsync, rename) under a lock, so a crash or two writers
at once never leave a torn or half-merged journal.

Example:
    >>> from colabkit import journal
    >>> journal.add_data("PG-19", source="https://github.com/deepmind/pg19", version="v1.0",
    ...                  preprocessing="Tokenized with GPT-2 BPE, max_length=2048")
"""
from __future__ import annotations

import contextlib
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .errors import JournalError
from .fsutil import atomic_open

if TYPE_CHECKING:
    from .config import Config

JOURNAL_NAME = "journal.md"
HEADER = "# Journal\n"


def _cfg(config: "Config | None") -> "Config":
    if config is not None:
        return config
    from .config import load_config
    return load_config()


def journal_path(config: "Config | None" = None) -> Path:
    """``<project root>/journal.md``."""
    return _cfg(config).root / JOURNAL_NAME


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the journal (fcntl where available), so appends never interleave."""
    lock = path.parent / ".colabkit" / "journal.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def append(text: str, *, config: "Config | None" = None) -> Path:
    """Append `text` (one entry) to journal.md atomically. Returns the journal's path."""
    path = journal_path(config)
    with _locked(path):
        try:
            old = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            old = HEADER
        if old and not old.endswith("\n"):
            old += "\n"
        new = old + ("\n" if old.strip() else "") + text.rstrip("\n") + "\n"
        with atomic_open(path, "w") as f:
            f.write(new)
    return path


def _now(when: datetime | None) -> datetime:
    return (when or datetime.now(timezone.utc)).astimezone(timezone.utc)


def _clean(value: Any) -> str:
    """One line of text: no newlines, so an entry can never forge another heading."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(value)).strip()


def _fmt_loss(v: float | None) -> str:
    return "?" if v is None else f"{v:.6g}"


def add_run(experiment: str, *, config: "Config | None" = None, bundle: str | None = None,
            host: str | None = None, gpu: str | None = None, steps: int | None = None,
            last_loss: float | None = None, best_loss: float | None = None, attempts: int | None = None,
            checkpoints: Mapping[str, str | None] | None = None, logs: list[str] | tuple[str, ...] = (),
            source: str | None = None, when: datetime | None = None,
            attempt_details: Sequence[Mapping[str, Any]] = ()) -> str:
    """Append a run entry; returns its text.

    Args:
        attempts: how many times train.py was started for this run, restarts and resumes included (default:
            the length of `attempt_details`).
        attempt_details: one mapping per attempt, in order (``run``, ``number``, ``host``, ``gpu``,
            ``resume_from``, ``outcome``, ``step``): each becomes a line saying where it ran and how it ended.
        logs: paths relative to the project, one line each.

    Example output::

        ## Run v01 — 2026-11-22 09:12 UTC
        - **Experiment**: v01
        - **Bundle**: 3f2a9c1b7d4e
        - **Ran on**: colab-a1b2 (NVIDIA A100-SXM4-80GB)
        - **Steps reached**: 1200
        - **Loss**: last 0.4123, best 0.3987
        - **Attempts**: 2
          1. colab-a1b2 (NVIDIA A100-SXM4-80GB): run v01-20261122-081200-9f3e attempt 1, fresh start; no end
             recorded (the machine was preempted or the run killed); reached step 150
          2. colab-c3d4 (NVIDIA A100-SXM4-80GB): run v01-20261122-090100-1a2b attempt 1, resumed from
             v01_step_00000100.pt; finished (exit code 0); reached step 1200
        - **Final checkpoint**: local: —; drive: experiments/v01/checkpoints/v01_step_00001200.pt; hub: —
        - **Logs** (imported from drive):
          - experiments/v01/logs/v01-20261122-081200-9f3e/v01-20261122-081200-9f3e.attempt1.log
    """
    t = _now(when)
    where = _clean(host) if host else "unknown host"
    if gpu:
        where += f" ({_clean(gpu)})"
    elif host:
        where += " (no GPU recorded)"
    machines = list(dict.fromkeys(
        _clean(a["host"]) + (f" ({_clean(a['gpu'])})" if a.get("gpu") else "")
        for a in attempt_details if a.get("host")))
    if len(machines) > 1:  # preempted on one machine, resumed on another: name them all, in order
        where, host = ", then ".join(machines), host or machines[-1]
    lines = [f"## Run {_clean(experiment)} — {t:%Y-%m-%d %H:%M} UTC",
             f"- **Experiment**: {_clean(experiment)}",
             f"- **Bundle**: {_clean(bundle)[:12] if bundle else 'unknown (no airlock export or pull recorded)'}",
             f"- **Ran on**: {where if (host or gpu) else 'unknown (no run.json in the logs)'}",
             f"- **Steps reached**: {steps if steps is not None else 'unknown (no step N / iter N in the logs)'}"]
    if last_loss is not None or best_loss is not None:
        lines.append(f"- **Loss**: last {_fmt_loss(last_loss)}, best {_fmt_loss(best_loss)}")
    else:
        lines.append("- **Loss**: not in the logs")
    if attempts is None and attempt_details:
        attempts = len(attempt_details)
    lines.append(f"- **Attempts**: {attempts if attempts is not None else 'unknown'}")
    for i, a in enumerate(attempt_details, 1):
        host = _clean(a.get("host") or "unknown host") + (f" ({_clean(a['gpu'])})" if a.get("gpu") else "")
        start = (f"resumed from {_clean(os.path.basename(str(a['resume_from'])))}" if a.get("resume_from")
                 else "fresh start")
        step = f"; reached step {a['step']}" if a.get("step") is not None else ""
        lines.append(f"  {i}. {host}: run {_clean(a.get('run') or '?')} attempt {a.get('number', '?')}, {start}; "
                     f"{_clean(a.get('outcome') or 'outcome unknown')}{step}")
    if checkpoints:
        parts = [f"{_clean(k)}: {_clean(v) if v else '—'}" for k, v in checkpoints.items()]
        lines.append(f"- **Final checkpoint**: {'; '.join(parts)}")
    if logs:
        lines.append("- **Logs**" + (f" (imported from {_clean(source)})" if source else "") + ":")
        lines.extend(f"  - {_clean(x)}" for x in logs)
    text = "\n".join(lines) + "\n"
    append(text, config=config)
    return text


def add_data(name: str, *, config: "Config | None" = None, source: str | None = None,
             version: str | None = None, preprocessing: str | None = None, downloaded: str | None = None,
             files: int | None = None, size: int | None = None, digest: str | None = None,
             verified: str | None = None, when: datetime | None = None) -> str:
    """Append a data-set entry (the protocol's ``## Data`` block); returns its text.

    Args:
        name: the data set (``PG-19``).
        source: where it comes from (a URL, ``G Drive/data/raw/...``, an HF dataset id).
        version: its version (``v1.0``).
        preprocessing: what was done to it.
        downloaded: the download date (default: today, UTC).
        files, size, digest: how many files, their total bytes and the sha256 of the file list (what
            ``colabkit data fetch`` fetched), when known.
        verified: how the files were verified.
    Raises:
        JournalError: an empty name.
    """
    if not name or not str(name).strip():
        from .runtime import command
        raise JournalError(f"journal data: the data set needs a name, e.g. {command('journal data PG-19')} "
                           "--source URL --version v1.0")
    t = _now(when)
    title = _clean(name) + (f" {_clean(version)}" if version else "")
    lines = [f"## Data — {t:%Y-%m-%d}",
             f"- **Dataset**: {title}",
             f"- **Source**: {_clean(source) if source else 'not given'}",
             f"- **Downloaded**: {_clean(downloaded) if downloaded else f'{t:%Y-%m-%d}'}",
             f"- **Preprocessing**: {_clean(preprocessing) if preprocessing else 'none recorded'}"]
    if files is not None or size is not None or digest:
        from .config import format_size
        parts = []
        if files is not None:
            parts.append(f"{files} file{'s' if files != 1 else ''}")
        if size is not None:
            parts.append(format_size(size))
        lines.append(f"- **Files**: {', '.join(parts) or 'unknown'}"
                     + (f" (file list sha256 {_clean(digest)[:16]})" if digest else ""))
    if verified:
        lines.append(f"- **Verified**: {_clean(verified)}")
    text = "\n".join(lines) + "\n"
    append(text, config=config)
    return text


_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pin_requirement(requirements: Path, name: str, version: str) -> str:
    """Write ``name==version`` into `requirements` (replacing a line for the same package). Returns the line."""
    line = f"{name}=={version}"
    try:
        old = requirements.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        old = []
    out, done = [], False
    for raw in old:
        m = _REQ_NAME.match(raw)
        if m and not raw.lstrip().startswith(("#", "-")) and _norm(m.group(1)) == _norm(name):
            if not done:
                out.append(line)
                done = True
            continue
        out.append(raw)
    if not done:
        out.append(line)
    with atomic_open(requirements, "w") as f:
        f.write("\n".join(out) + "\n")
    return line


def add_package(name: str, *, reason: str, config: "Config | None" = None, experiment: str | None = None,
                requirements: str | os.PathLike | None = None, when: datetime | None = None) -> dict[str, Any]:
    """Pin an installed package in requirements.txt and append "Added NAME==X for REASON" to the journal.

    Args:
        name: the distribution name (``einops``).
        reason: why it was added.
        experiment: pin it in ``experiments/<experiment>/requirements.txt`` (default: the project's
            ``requirements.txt``).
        requirements: an explicit requirements file instead.
    Returns:
        ``{"package", "version", "requirements", "line", "entry"}``.
    Raises:
        JournalError: the package is not installed, or no reason was given.
    """
    from importlib import metadata
    if not reason or not reason.strip():
        raise JournalError(f"journal package {name}: say why it was added, e.g. --reason 'rotary embeddings'")
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        raise JournalError(f"journal package: {name!r} is not installed in this environment; pip install "
                           f"{name} first, check it works, then record it") from None
    cfg = _cfg(config)
    canonical = name
    with contextlib.suppress(Exception):
        canonical = metadata.metadata(name)["Name"] or name
    if requirements is not None:
        req = Path(requirements).expanduser()
        req = req if req.is_absolute() else cfg.root / req
    elif experiment:
        req = cfg.require_experiment(experiment) / "requirements.txt"
    else:
        req = cfg.root / "requirements.txt"
    line = pin_requirement(req, canonical, version)
    t = _now(when)
    try:
        shown = req.resolve().relative_to(cfg.root.resolve()).as_posix()
    except ValueError:
        shown = str(req)
    text = (f"## Package — {t:%Y-%m-%d}\n"
            f"- Added {line} for {_clean(reason)} (pinned in {shown})\n")
    append(text, config=cfg)
    return {"package": canonical, "version": version, "requirements": str(req), "line": line, "entry": text}


def read(config: "Config | None" = None) -> str:
    """The journal's text ('' when there is none yet)."""
    try:
        return journal_path(config).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
