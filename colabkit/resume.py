"""Resume: ask every source for its newest verified checkpoint, pick one, fetch it and verify it.

Sources are ``local`` (the experiment's checkpoint folder) and the sync tiers, asked in the order of
``resume.priority``. Every tier stores a file under the same path relative to the project root
(``experiments/v01/checkpoints/v01_step_00001200.pt``) with its sidecar manifest beside it.

Policies:
    ``newest`` (default): the highest step wins; a tie goes to the earlier (cheaper) source.
    ``first``: the first source, in priority order, that holds a verified checkpoint wins.

A source that fails (credentials, network: any RemoteError) is reported and skipped. When nothing is found
and some source failed, :class:`~colabkit.errors.ResumeError` says what each source answered: starting
from scratch while a tier that may hold the run is unreachable would silently lose it.

Transient failures (5xx, 429, dropped connections: ``error_kind(e) == "transient"``) are retried with back-off,
honouring ``Retry-After``, until ``resume.deadline`` (per :func:`locate`, and again per :func:`fetch`), on top
of the remote's own retries. Only a copy that fails its integrity check or is gone makes :func:`fetch` fall
back to the next candidate. A source or a chosen checkpoint that stays unreachable, so that a newer
checkpoint may exist than the one that could be had, is decided by ``resume.on_unreachable``:
``wait`` (the default: retry until the deadline, then :class:`~colabkit.errors.ResumeError`), ``fail`` (the
error at once, after the remote's own retries) or ``older`` (resume from the best checkpoint that can be
fetched, and say so in ``plan.reason``, ``plan.unreachable`` and a warning). Never an older one silently.

Example:
    >>> plan = locate(experiment="v01")
    >>> path = fetch(plan)               # None: fresh start
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .checkpoints import (LATEST, CheckpointInfo, discover, is_manifest, manifest_path, step_of,
                          verify, _verify_plain)
from .errors import ColabkitError, ConfigError, IntegrityError, ResumeError, error_kind
from .fsutil import (TMP_PREFIX, atomic_write_bytes, atomic_write_json, hash_file, manifest_blocks, record_verified,
                     replace_copy, verified_sha256)
from .runtime import command

if TYPE_CHECKING:
    from .config import Config
    from .remotes.base import Remote, RemoteFile

log = logging.getLogger(__name__)

POLICIES = ("newest", "first")
ON_UNREACHABLE = ("wait", "older", "fail")
LOCAL = "local"
#: resume's own back-off between tries of a transient failure (doubling, with jitter; Retry-After wins)
RETRY_INITIAL, RETRY_MAX = 0.5, 30.0


class _Retry:
    """Retries transient failures with back-off until a deadline (``mode == "fail"``: no extra tries)."""

    def __init__(self, deadline: float, mode: str) -> None:
        self.deadline = float(deadline)
        self.until = time.monotonic() + self.deadline
        self.mode = mode
        self.tries = 0
        self._wait = threading.Event()   # never set: a wait that is not a bare sleep

    def run(self, fn: Any, what: str) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except (ColabkitError, OSError) as e:
                left = self.until - time.monotonic()
                if error_kind(e) != "transient" or self.mode == "fail" or left <= 0:
                    raise
                attempt += 1
                self.tries += 1
                delay = min(RETRY_MAX, RETRY_INITIAL * (2 ** (attempt - 1))) * random.uniform(0.5, 1.0)
                ra = getattr(e, "retry_after", None)
                if ra:
                    delay = max(delay, float(ra))
                delay = min(delay, left)
                from .secrets import redact
                log.warning("%s: %s; retrying in %.1fs (resume gives up in %.0fs)", what, redact(str(e)), delay,
                            left)
                self._wait.wait(delay)


def _check_mode(on_unreachable: str) -> str:
    if on_unreachable not in ON_UNREACHABLE:
        raise ConfigError(f"resume.on_unreachable: {on_unreachable!r} is not allowed; use one of "
                          f"{', '.join(ON_UNREACHABLE)}", key="resume.on_unreachable", value=on_unreachable)
    return on_unreachable


@dataclass
class Candidate:
    """A checkpoint one source holds.

    Attributes:
        source: the source's name (``local`` or a tier name).
        step: the training step.
        path: the remote path (relative to the tier root), or the local file's absolute path.
        size: bytes.
        sha256: the hash its manifest records (None: a plain torch.save file without a manifest).
        verified: True once checked (local: hash or archive CRC; remote: the record agrees with its manifest).
    """

    source: str
    step: int
    path: str
    size: int
    sha256: str | None = None
    verified: bool = False
    manifest: dict[str, Any] | None = None
    manifest_bytes: bytes | None = field(default=None, repr=False)
    record: Any = field(default=None, repr=False)       # RemoteFile of the data file (remotes)
    manifest_record: Any = field(default=None, repr=False)
    #: a checkpoint folder (a sharded save): its files' RemoteFile records by path inside the folder (remotes)
    folder: bool = False
    records: dict[str, Any] = field(default_factory=dict, repr=False)
    #: a folder's kind (colabkit.distributed.CheckpointUnit.kind): ``folder`` has a manifest; ``dcp``,
    #: ``safetensors`` and ``megatron`` (other tools' folders) are verified by loading once fetched
    kind: str | None = None

    @property
    def local(self) -> bool:
        return self.source == LOCAL

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.replace(os.sep, "/"))

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "step": self.step, "path": self.path, "size": self.size,
                "sha256": self.sha256, "verified": self.verified, "manifest": self.manifest is not None,
                "folder": self.folder, "kind": self.kind if self.folder else "file"}


@dataclass
class SourceReport:
    """What one source answered.

    Attributes:
        name: ``local`` or a tier name.
        state: ``ok`` (holds a verified checkpoint), ``empty`` (holds none) or ``error`` (could not be asked).
        where: a printable description of the source (no secret).
        newest: its newest verified checkpoint, or None.
        error: the failure, when ``state == "error"``.
        rejected: checkpoints found corrupt or inconsistent, each ``{"path", "step", "reason"}``.
    """

    name: str
    state: str
    where: str = ""
    newest: Candidate | None = None
    error: str | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list, repr=False)  # newest first, for fallback
    kind: str | None = None        # the error's classification (colabkit.errors.error_kind), when state == "error"

    @property
    def unreachable(self) -> bool:
        """It could not be asked for a reason that passes (network, 5xx, 429): it may hold a newer checkpoint."""
        return self.state == "error" and self.kind == "transient"

    @property
    def newest_step(self) -> int | None:
        return self.newest.step if self.newest else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "where": self.where, "newest_step": self.newest_step,
                "step": self.newest_step,  # the same, under the short name the dashboard reads
                "path": self.newest.path if self.newest else None, "size": self.newest.size if self.newest else None,
                "error": self.error, "error_kind": self.kind, "unreachable": self.unreachable,
                "rejected": list(self.rejected), "checkpoints": len(self.candidates)}


@dataclass
class ResumePlan:
    """The answer of :func:`locate`: what each source holds and which checkpoint to resume from.

    Attributes:
        policy: ``newest`` or ``first``.
        directory: the local checkpoint folder (where :func:`fetch` puts the file).
        prefix: the folder's path relative to the project root (what the tiers are listed under).
        sources: one :class:`SourceReport` per source, in priority order.
        choice: the chosen :class:`Candidate`, or None (a fresh start).
        reason: why it was chosen (or why there is none).
    """

    policy: str
    directory: Path
    prefix: str | None
    sources: list[SourceReport]
    choice: Candidate | None
    reason: str
    experiment: str | None = None
    selected: str | None = None      # why `experiment` was chosen when none was named (None: named)
    config: Any = field(default=None, repr=False)
    remotes: dict[str, Any] = field(default_factory=dict, repr=False)  # Remote objects passed in by the caller
    fetched: Path | None = None
    on_unreachable: str = "wait"
    deadline: float = 600.0
    #: newer checkpoints (or whole sources) that could not be reached, when on_unreachable is ``older``
    unreachable: list[str] = field(default_factory=list)

    def source(self, name: str) -> SourceReport:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def fallbacks(self) -> list[Candidate]:
        """Every candidate in the order the policy prefers them (the choice first)."""
        order = {s.name: i for i, s in enumerate(self.sources)}
        cands = [c for s in self.sources if s.state == "ok" for c in s.candidates]
        if self.policy == "first":
            key = lambda c: (order[c.source], -c.step)  # noqa: E731
        else:
            key = lambda c: (-c.step, order[c.source])  # noqa: E731
        return sorted(cands, key=key)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``colabkit resume --json``."""
        return {"policy": self.policy, "experiment": self.experiment, "selected": self.selected,
                "directory": str(self.directory),
                "remote_prefix": self.prefix, "sources": [s.as_dict() for s in self.sources],
                "choice": self.choice.as_dict() if self.choice else None, "reason": self.reason,
                "fetched": str(self.fetched) if self.fetched else None, "on_unreachable": self.on_unreachable,
                "unreachable": list(self.unreachable)}

    def lines(self) -> list[str]:
        """A text rendering: one line per source, then the choice."""
        out = [f"Experiment: {self.experiment or '(none)'} ({self.selected})"] if self.selected else []
        out.append(f"Resume sources ({self.policy} policy), checkpoint folder {self.directory}:")
        width = max([len(s.name) for s in self.sources] + [5])
        for s in self.sources:
            if s.state == "ok":
                what = f"step {s.newest.step:<10} {s.newest.name}{'/' if s.newest.folder else ''}"
                if not s.newest.verified:
                    what += " (no manifest: verified after download)"
            elif s.state == "empty":
                what = "no checkpoint"
            else:
                what = f"unavailable: {s.error}"
            if s.rejected:
                what += f"  [{len(s.rejected)} rejected: " + "; ".join(
                    f"{posixpath.basename(r['path'])}: {r['reason']}" for r in s.rejected[:3]) + "]"
            out.append(f"  {s.name:<{width}}  {what}")
        out.append(f"Choice: {self.choice.source} step {self.choice.step} — {self.reason}" if self.choice
                   else f"Choice: none — {self.reason}")
        return out


# -- locate ----------------------------------------------------------------------------------------
def locate(*, config: "Config | None" = None, experiment: str | None = None,
           directory: str | os.PathLike | None = None, policy: str | None = None,
           sources: Sequence["str | Remote"] | None = None, on_unreachable: str | None = None,
           deadline: float | None = None) -> ResumePlan:
    """Ask each source for its newest verified checkpoint and choose one.

    Args:
        config: the configuration (default: :func:`colabkit.config.load_config`).
        experiment: ``vXX``; default ``$COLABKIT_EXPERIMENT``, else the only experiment, else the one with the
            newest checkpoint or run (:meth:`~colabkit.config.Config.select_experiment`; named in
            ``plan.selected``); ``<root>/checkpoints`` only in a project without experiments.
        directory: the local checkpoint folder (default: ``config.checkpoint_dir(experiment)``).
        policy: ``newest`` or ``first`` (default: ``config.resume.policy``).
        sources: names (``local`` and tier names) or Remote objects, in priority order
            (default: ``config.resume.priority``).
        on_unreachable: ``wait``, ``older`` or ``fail`` (default ``config.resume.on_unreachable``; see the
            module docstring); also used by :func:`fetch` of this plan.
        deadline: seconds transient failures are retried (default ``config.resume.deadline``).
    Returns:
        A :class:`ResumePlan`; ``plan.choice`` is None when no source holds a checkpoint.
    Raises:
        ResumeError: nothing was found and at least one source could not be asked (each answer is listed); or
            a source that may hold a newer checkpoint stayed unreachable (unless `on_unreachable` is ``older``).
        ConfigError: an unknown policy, source name or `on_unreachable`.
        UnknownExperimentError: `experiment` is not here, or several are and none has a checkpoint or run.

    Example:
        >>> plan = locate(experiment="v01", on_unreachable="older", deadline=120)
    """
    from .config import load_config
    cfg = config if config is not None else load_config()
    selected: str | None = None
    if directory is None:
        # the one shared choice (train, status and the airlock use it too): never a folder no experiment uses
        picked = cfg.select_experiment(experiment)
        experiment, selected = picked.name, picked.reason
    elif experiment is not None:
        cfg.require_experiment(experiment)
    policy = policy or cfg.resume.policy
    mode = _check_mode(on_unreachable or cfg.resume.on_unreachable)
    deadline = float(cfg.resume.deadline if deadline is None else deadline)
    retry = _Retry(deadline, mode)
    if policy not in POLICIES:
        raise ConfigError(f"resume policy {policy!r} is not allowed; use one of {', '.join(POLICIES)}",
                          key="resume.policy", value=policy)
    local_dir = Path(directory).expanduser() if directory is not None else cfg.checkpoint_dir(experiment)
    if not local_dir.is_absolute():
        local_dir = (cfg.root / local_dir)
    names = list(sources) if sources is not None else list(cfg.resume.priority)
    if not names:
        raise ConfigError("resume.priority is empty; list local and/or tier names", key="resume.priority", value=[])
    try:
        prefix: str | None = cfg.remote_path(local_dir)
    except ConfigError:
        prefix = None  # a folder outside the project: only the local source can answer
    given: dict[str, Any] = {}
    reports: list[SourceReport] = []
    for src in names:
        if isinstance(src, str):
            name = src
            if name != LOCAL:
                cfg.tier(name)  # ConfigError naming the configured tiers
        else:
            name = src.name
            given[name] = src
        if name == LOCAL:
            reports.append(_ask_local(local_dir))
        elif prefix is None:
            reports.append(SourceReport(name, "error", error=f"{local_dir} is outside the project root "
                                        f"{cfg.root}, so no tier holds its checkpoints"))
        else:
            reports.append(_ask_remote(cfg, name, given.get(name), prefix, retry))
    choice, reason = _choose(reports, policy)
    if choice is None and any(r.state == "error" for r in reports):
        answers = "; ".join(f"{r.name}: {r.error if r.state == 'error' else 'no checkpoint'}" for r in reports)
        raise ResumeError(f"no checkpoint to resume from, and not every source could be asked ({answers}); "
                          "fix the failing source and retry, or pass --source local to start without it")
    away = [r for r in reports if r.unreachable]
    noted: list[str] = []
    if choice is not None and away:
        names = ", ".join(r.name for r in away)
        errors = "; ".join(f"{r.name}: {r.error}" for r in away)
        if mode != "older":
            waited = f" for {deadline:g}s" if mode == "wait" else ""
            raise ResumeError(
                f"{names} could not be reached{waited} and may hold a newer checkpoint than {choice.source} step "
                f"{choice.step} ({errors}); nothing was resumed. Retry when {names} answers again, or set "
                f"resume.on_unreachable: older (--on-unreachable older) to resume from {choice.source} step "
                f"{choice.step} anyway")
        noted = [f"{r.name} (unreachable: {r.error})" for r in away]
        reason += f"; {names} could not be reached and may hold a newer checkpoint (resume.on_unreachable: older)"
        log.warning("resume: %s could not be reached and may hold a newer checkpoint; resuming from %s step %d "
                    "(resume.on_unreachable: older)", names, choice.source, choice.step)
    plan = ResumePlan(policy=policy, directory=local_dir, prefix=prefix, sources=reports, choice=choice,
                      reason=reason, experiment=experiment, config=cfg, remotes=given, on_unreachable=mode,
                      deadline=deadline, unreachable=noted, selected=selected)
    for r in reports:
        log.info("resume source %s: %s", r.name,
                 f"step {r.newest_step}" if r.state == "ok" else (r.error or r.state))
    return plan


def _ask_local(directory: Path) -> SourceReport:
    rep = SourceReport(LOCAL, "empty", where=f"local folder {directory}")
    try:
        infos: list[Any] = discover(directory)
    except OSError as e:
        rep.state, rep.error = "error", f"cannot read {directory} ({e.strerror or e})"
        return rep
    from .distributed import discover_units, has_folders, verify_unit
    if has_folders(directory):   # checkpoint folders (sharded saves) compete with the files, by step
        infos = discover_units(directory)
    for info in reversed(infos):
        if getattr(info, "is_folder", False):
            c = Candidate(LOCAL, info.step, str(info.path), info.size, None,
                          manifest=dict(info.manifest) if info.manifest else None, folder=True, kind=info.kind)
        else:
            if hasattr(info, "is_folder"):
                info = info.info()
            c = Candidate(LOCAL, info.step, str(info.path), info.size, info.sha256,
                          manifest=dict(info.manifest or {}) or None)
        if rep.newest is None:
            try:
                verify_unit(info) if c.folder else verify(info)
            except IntegrityError as e:
                rep.rejected.append({"path": str(info.path), "step": info.step, "reason": str(e)})
                log.warning("local checkpoint %s is not usable: %s", info.path, e)
                continue
            c.verified = True
            rep.newest = c
        rep.candidates.append(c)
    if rep.newest is not None:
        rep.state = "ok"
    return rep


def _ask_remote(cfg: "Config", name: str, remote: "Remote | None", prefix: str,
                retry: "_Retry | None" = None) -> SourceReport:
    from .secrets import redact
    rep = SourceReport(name, "empty")
    opened = remote is None
    try:
        if remote is None:
            from .remotes import open_remote
            remote = open_remote(cfg, name)
        rep.where = remote.describe()
        retry = retry or _Retry(0, "fail")
        files = retry.run(lambda: remote.list(prefix), f"{name}: listing {prefix}")
        by_path = {f.path: f for f in files}
        cands = []
        for f in files:
            base = posixpath.basename(f.path)
            if posixpath.dirname(f.path) != prefix or is_manifest(base):
                continue
            step = step_of(base)
            if step is not None:
                cands.append((step, f))
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "resume-") as tmp:
            tracked = _remote_tracker(remote, files, prefix, Path(tmp), retry, name)
            folders = _remote_folders(files, prefix, tracked=tracked)
            for fpath, (key_rec, recs, kind) in folders.items():
                from .distributed import folder_step
                cands.append((folder_step(posixpath.basename(fpath)) or 0, key_rec))
            cands.sort(key=lambda x: (x[0], x[1].path), reverse=True)
            stands_for = {id(v[0]): k for k, v in folders.items()}
            for step, f in cands:
                fpath = stands_for.get(id(f))
                if fpath is not None:
                    key_rec, recs, kind = folders[fpath]
                    c = Candidate(name, step, fpath, sum(r.size for r in recs.values()), record=key_rec,
                                  manifest_record=key_rec if kind == "folder" else None, folder=True, records=recs,
                                  kind=kind)
                else:
                    c = Candidate(name, step, f.path, f.size, record=f, manifest_record=by_path.get(f.path + ".json"))
                if rep.newest is None:
                    try:
                        retry.run(lambda: _check_remote_candidate(remote, c, Path(tmp)),
                                  f"{name}: reading the manifest of {f.path}")
                    except (IntegrityError, FileNotFoundError) as e:   # corrupt, or gone since the listing
                        rep.rejected.append({"path": c.path, "step": step, "reason": str(e)})
                        log.warning("%s: %s is not usable: %s", name, c.path, e)
                        continue
                    rep.newest = c
                rep.candidates.append(c)
    except (ColabkitError, OSError) as e:  # RemoteError and its kin, CredentialsError, MissingDependencyError
        rep.state, rep.error, rep.kind = "error", redact(f"{type(e).__name__}: {e}"), error_kind(e)
        rep.newest, rep.candidates = None, []
        log.warning("resume source %s could not be asked: %s", name, rep.error)
        return rep
    finally:
        if opened and remote is not None:
            with contextlib.suppress(Exception):
                remote.close()
    if rep.newest is not None:
        rep.state = "ok"
    return rep


def _remote_tracker(remote: "Remote", files: Sequence["RemoteFile"], prefix: str, tmp: Path, retry: "_Retry",
                    name: str) -> int | str | None:
    """The iteration in the tier's ``latest_checkpointed_iteration.txt`` under `prefix` (Megatron's tracker),
    read only when an ``iter_N/`` folder is there; None without one (or unreadable)."""
    from .distributed import MEGATRON_TRACKER
    tracker = f"{prefix}/{MEGATRON_TRACKER}" if prefix else MEGATRON_TRACKER
    rec = next((f for f in files if f.path == tracker), None)
    if rec is None or not any(f.path[len(prefix) + 1 if prefix else 0:].startswith("iter_") for f in files):
        return None
    dst = tmp / MEGATRON_TRACKER
    retry.run(lambda: remote.get(rec.path, dst, expected=rec), f"{name}: reading {rec.path}")
    text = dst.read_text(encoding="utf-8", errors="replace").strip()
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        log.warning("%s: %s holds %r, not an iteration: its iter_N folders are not resume candidates", name,
                    rec.path, text[:40])
        return None


def _remote_folders(files: Sequence["RemoteFile"], prefix: str, *, tracked: int | str | None = None
                    ) -> dict[str, tuple[Any, dict[str, Any], str]]:
    """The checkpoint folders of a tier's listing directly under `prefix`: {folder path: (the record that stands
    for it, {path inside the folder: record}, kind)}. A colabkit folder only once its manifest is there (sync
    uploads it last; the manifest's record stands for it); another tool's folder once its marker is (DCP's
    ``.metadata``, the safetensors index, Megatron's tracker beside it: :func:`colabkit.distributed.listing_kind`)."""
    from .distributed import FOLDER_MANIFEST, folder_step, listing_kind
    out: dict[str, tuple[Any, dict[str, Any], str]] = {}
    inside: dict[str, dict[str, Any]] = {}
    for f in files:
        rest = f.path[len(prefix) + 1:] if prefix and f.path.startswith(prefix + "/") else (
            f.path if not prefix else None)
        if rest is None or "/" not in rest:
            continue
        top, sub = rest.split("/", 1)
        if folder_step(top) is None:
            continue
        fpath = f"{prefix}/{top}" if prefix else top
        inside.setdefault(fpath, {})[sub] = f
    for fpath, recs in inside.items():
        kind = listing_kind(posixpath.basename(fpath), recs, tracked=tracked)
        if kind == "folder":
            out[fpath] = (recs[FOLDER_MANIFEST], recs, kind)
        elif kind is not None:
            out[fpath] = (recs[sorted(recs)[0]], recs, kind)
    return out


def _check_remote_folder(remote: "Remote", c: Candidate, tmp: Path) -> None:
    """Read a remote folder's manifest; refuse the folder when a file it lists is missing, or the tier's record
    of it disagrees with the manifest on size or sha256 (a corrupted or partial shard)."""
    from .distributed import FOLDER_MANIFEST
    dst = tmp / f"{posixpath.basename(c.path)}-{FOLDER_MANIFEST}"
    remote.get(c.manifest_record.path, dst)
    raw = dst.read_bytes()
    try:
        m = json.loads(raw)
        if not isinstance(m, dict) or not isinstance(m.get("files"), list) or not isinstance(m.get("step"), int):
            raise ValueError("missing files/step")
        for f in m["files"]:
            if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                    and isinstance(f.get("sha256"), str)) or f["path"].startswith("/") or ".." in f["path"].split("/"):
                raise ValueError(f"a bad file entry {f!r}")
    except ValueError as e:
        raise IntegrityError(f"its manifest is not valid ({e})", path=c.path) from None
    for f in m["files"]:
        rec = c.records.get(f["path"])
        if rec is None:
            raise IntegrityError(f"{f['path']} is missing (its manifest lists it)", path=c.path)
        if rec.size != f["size"]:
            raise IntegrityError(f"{f['path']} is {rec.size} bytes, its manifest says {f['size']} (partial or "
                                 "replaced)", path=c.path, expected=str(f["size"]), actual=str(rec.size))
        if rec.sha256 is not None and rec.sha256 != f["sha256"]:
            raise IntegrityError(f"{f['path']} has sha256 {rec.sha256[:12]}..., its manifest says "
                                 f"{f['sha256'][:12]}... (corrupted)", path=c.path, expected=f["sha256"],
                                 actual=rec.sha256)
    c.manifest, c.manifest_bytes, c.verified, c.step = m, raw, True, m["step"]
    c.size = sum(f["size"] for f in m["files"])


def _check_remote_candidate(remote: "Remote", c: Candidate, tmp: Path) -> None:
    """Read a remote candidate's manifest; refuse it when the record disagrees with the manifest."""
    if c.folder and c.kind not in (None, "folder"):
        c.verified = False  # another tool's folder: no hashes to check against; verified by loading once fetched
        return
    if c.folder:
        return _check_remote_folder(remote, c, tmp)
    if c.manifest_record is None:
        c.verified = False  # a plain torch.save file: checked once downloaded
        return
    dst = tmp / (posixpath.basename(c.manifest_record.path))
    remote.get(c.manifest_record.path, dst)
    raw = dst.read_bytes()
    try:
        m = json.loads(raw)
        if not isinstance(m, dict) or not isinstance(m.get("sha256"), str) or not isinstance(m.get("size"), int):
            raise ValueError("missing sha256/size")
    except ValueError as e:
        raise IntegrityError(f"its manifest is not valid ({e})", path=c.path) from None
    rec = c.record
    if m.get("file", c.name) != c.name:
        raise IntegrityError(f"its manifest describes another file ({m.get('file')!r})", path=c.path)
    if m["size"] != rec.size:
        raise IntegrityError(f"{rec.size} bytes, its manifest says {m['size']} (partial or replaced)",
                             path=c.path, expected=str(m["size"]), actual=str(rec.size))
    if rec.sha256 is not None and rec.sha256 != m["sha256"]:
        raise IntegrityError(f"sha256 {rec.sha256[:12]}... disagrees with its manifest's {m['sha256'][:12]}...",
                             path=c.path, expected=m["sha256"], actual=rec.sha256)
    c.manifest, c.manifest_bytes, c.sha256, c.verified = m, raw, m["sha256"], True
    if isinstance(m.get("step"), int):
        c.step = m["step"]


def _choose(reports: list[SourceReport], policy: str) -> tuple[Candidate | None, str]:
    ok = [r for r in reports if r.state == "ok"]
    failed = [r.name for r in reports if r.state == "error"]
    skipped = f"; skipped {', '.join(failed)} (unavailable)" if failed else ""
    if not ok:
        bad = sum(len(r.rejected) for r in reports)
        if bad:
            return None, (f"no source holds a valid checkpoint ({bad} rejected as corrupt or inconsistent): "
                          "start fresh" + skipped)
        return None, "no source holds a checkpoint: start fresh" + skipped
    if policy == "first":
        r = ok[0]
        before = [x.name for x in reports[: reports.index(r)] if x.state != "error"]
        why = f"{r.name} is the first source in priority order holding a verified checkpoint"
        if before:
            why += f" ({', '.join(before)} {'holds' if len(before) == 1 else 'hold'} none)"
        return r.newest, why + skipped
    best = max(r.newest.step for r in ok)
    holders = [r for r in ok if r.newest.step == best]
    r = holders[0]
    others = [f"{x.name} has {x.newest.step}" for x in ok if x is not r and x.newest.step != best]
    why = f"step {best} is the highest"
    if len(holders) > 1:
        names = [x.name for x in holders]
        held = " and ".join([", ".join(names[:-1]), names[-1]])
        why += f"; it is held by {held}, and {r.name} comes first in priority order"
    if others:
        why += f" ({', '.join(others)})"
    return r.newest, why + skipped


# -- fetch -----------------------------------------------------------------------------------------
def fetch(plan: ResumePlan | None = None, *, config: "Config | None" = None, experiment: str | None = None,
          dest: str | os.PathLike | None = None, progress: bool = True) -> Path | None:
    """Bring the chosen checkpoint into the local checkpoint folder, verified, and return its path.

    A remote file is downloaded atomically and checked against its manifest's sha256 while it is copied (one
    pass); its manifest is written beside it and the folder's ``latest`` pointer is updated. A copy that fails
    verification (or is gone) is discarded and the next-best candidate (by the plan's policy) is tried.
    Transient failures are retried until the plan's deadline; a checkpoint that still cannot be fetched is
    never replaced by an older one silently (``plan.on_unreachable``: ``wait``/``fail`` raise, ``older``
    falls back and says so in ``plan.reason`` and ``plan.unreachable``).

    Args:
        plan: from :func:`locate` (default: ``locate(config=config, experiment=experiment)``).
        dest: the folder to put the file in (default: the plan's local checkpoint folder).
        progress: show a tqdm.auto progress bar for downloads (False for ``--json`` and scripts).
    Returns:
        The local path of the verified checkpoint, or None when there is nothing to resume from.
    Raises:
        ResumeError: every candidate failed to download or verify (each attempt is listed), or a checkpoint
            could not be fetched for a reason other than its integrity (unreachable, after the deadline) and
            ``plan.on_unreachable`` is not ``older``.
    """
    from .secrets import redact
    if plan is None:
        plan = locate(config=config, experiment=experiment)
    if plan.choice is None:
        return None
    target_dir = Path(dest).expanduser() if dest is not None else plan.directory
    attempts: list[str] = []
    missed: list[str] = []        # candidates that exist but could not be fetched (on_unreachable: older)
    opened: dict[str, Any] = {}
    retry = _Retry(plan.deadline, plan.on_unreachable)
    try:
        for c in plan.fallbacks():
            try:
                path = retry.run(lambda: _fetch_one(plan, c, target_dir, opened, progress=progress),
                                 f"{c.source}: fetching step {c.step}")
            except (ColabkitError, OSError) as e:
                msg = redact(str(e))
                if error_kind(e) in ("integrity", "not_found"):   # a bad copy, or one that is gone
                    attempts.append(f"{c.source} step {c.step}: {msg}")
                    log.warning("cannot resume from %s step %d (%s); trying the next candidate", c.source, c.step,
                                msg)
                    continue
                if plan.on_unreachable != "older":
                    waited = (f" (retried for {plan.deadline:g}s)" if plan.on_unreachable == "wait"
                              and error_kind(e) == "transient" else "")
                    raise ResumeError(
                        f"{c.source} step {c.step} could not be fetched{waited}: {msg}; no older checkpoint was "
                        f"used in its place. Retry when {c.source} answers again, or set resume.on_unreachable: "
                        "older (--on-unreachable older) to resume from the best checkpoint that can be fetched"
                    ) from e
                missed.append(f"{c.source} step {c.step} ({msg})")
                log.warning("cannot fetch %s step %d (%s); trying an older checkpoint (resume.on_unreachable: "
                            "older)", c.source, c.step, msg)
                continue
            if c is not plan.choice:
                log.warning("resuming from %s step %d instead of %s step %d", c.source, c.step,
                            plan.choice.source, plan.choice.step)
                if missed:
                    plan.reason += (f"; {', '.join(missed)} could not be fetched: resumed from the older "
                                    f"{c.source} step {c.step} (resume.on_unreachable: older)")
                    plan.unreachable.extend(missed)
                else:
                    plan.reason += f"; fell back to {c.source} step {c.step} ({attempts[-1] if attempts else ''})"
                plan.choice = c
            plan.fetched = path
            return path
    finally:
        for r in opened.values():
            with contextlib.suppress(Exception):
                r.close()
    raise ResumeError("no candidate checkpoint could be fetched and verified: " + "; ".join(attempts + missed)
                      + f"; check the sources with '{command('resume --no-fetch')}'")


def _fetch_one(plan: ResumePlan, c: Candidate, target_dir: Path, opened: dict[str, Any], *,
               progress: bool) -> Path:
    if c.folder:
        return _fetch_folder(plan, c, target_dir, opened, progress=progress)
    if c.local:
        src = Path(c.path)
        if not c.verified:
            verify(CheckpointInfo(src, c.step, c.size, c.sha256, c.manifest))
            c.verified = True
        if src.parent.resolve() == target_dir.resolve():
            return src
        from .fsutil import atomic_copy
        dst = target_dir / src.name
        digest = atomic_copy(src, dst, durable=False)
        if c.sha256 and digest.sha256 != c.sha256:
            dst.unlink()
            raise IntegrityError(f"{src} changed while it was copied", path=str(src))
        if c.sha256:
            record_verified(dst, digest.sha256)
        if c.manifest:
            atomic_write_json(manifest_path(dst), c.manifest, durable=False)
        return dst
    remote = _remote_of(plan, c, opened)
    if c.manifest_record is not None and c.manifest is None:
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "resume-", dir=_existing(target_dir)) as tmp:
            _check_remote_candidate(remote, c, Path(tmp))
    dst = target_dir / c.name
    target_dir.mkdir(parents=True, exist_ok=True)
    from .remotes.base import RemoteFile
    rec = c.record
    if c.sha256 is not None:
        # the remote verifies the download against this record while it copies: the manifest's sha256
        # (and the tier's own md5 when it has one), one pass, nothing read twice
        expected = RemoteFile(rec.path, c.manifest["size"], sha256=c.sha256, md5=rec.md5, modified=rec.modified,
                              id=rec.id)
    else:
        expected = rec
    from .remotes.local import LocalRemote
    if c.sha256 is not None and _already_there(dst, c):
        log.info("%s already holds %s with the expected sha256", target_dir, c.name)
    elif c.sha256 is not None and type(remote) is LocalRemote:
        # a folder tier (or a mounted Drive): copy and hash in one pipelined pass, sha256 only
        from .remotes.base import normalize_path
        bar = _progress_bar(c, enabled=progress)
        try:
            copy_verified(remote.root / normalize_path(rec.path), dst, size=c.manifest["size"], sha256=c.sha256,
                          progress=bar.update if bar else None, label=f"{c.source}: {rec.path}",
                          blocks=manifest_blocks(c.manifest, c.manifest["size"]))
        finally:
            if bar is not None:
                _close_bar(bar)
    else:
        bar = _progress_bar(c, enabled=progress)
        try:
            got = remote.get(rec.path, dst, expected=expected, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                _close_bar(bar)
        if c.sha256 is not None and got is not None and got.sha256 is not None and got.sha256 != c.sha256:
            with contextlib.suppress(OSError):
                dst.unlink()
            raise IntegrityError(f"{c.source}: {rec.path} downloaded with sha256 {got.sha256[:12]}..., its "
                                 f"manifest says {c.sha256[:12]}...; the copy was discarded", path=rec.path)
        if c.sha256 is not None and got is not None and got.sha256 == c.sha256:
            record_verified(dst, c.sha256)   # hashed while it downloaded; nothing has written to it since
    if c.sha256 is None:
        try:
            _verify_plain(dst)
        except IntegrityError:
            with contextlib.suppress(OSError):
                dst.unlink()
            raise
    # the fetched copy, its manifest and the pointer are not fsynced (see copy_verified): an fsync of any file
    # here would, on ext4, wait for the whole checkpoint's data too
    if c.manifest_bytes is not None:
        atomic_write_bytes(manifest_path(dst), c.manifest_bytes, durable=False)
    else:
        with contextlib.suppress(OSError):
            manifest_path(dst).unlink()  # a stale local manifest must not describe the downloaded file
    atomic_write_json(dst.parent / LATEST, {"format": 1, "file": dst.name, "step": c.step}, durable=False)
    log.info("fetched %s step %d from %s to %s", c.name, c.step, c.source, dst)
    return dst


def _fetch_folder(plan: ResumePlan, c: Candidate, target_dir: Path, opened: dict[str, Any], *,
                  progress: bool) -> Path:
    """A checkpoint folder, whole: every file fetched into a temporary folder and checked against the sha256
    its manifest records while it is copied, the manifest written last, then the folder renamed into place
    (a partial fetch never sits under the final name). The folder's path goes to train.py.

    Another tool's folder (no manifest) is fetched file by file, each checked against the tier's record of it,
    then verified by loading (:func:`colabkit.distributed.verify_unit`) before it is renamed into place."""
    import shutil
    from .distributed import FOLDER_MANIFEST, classify_folder, verify_unit
    if c.folder and c.kind not in (None, "folder"):
        return _fetch_foreign_folder(plan, c, target_dir, opened)
    if c.local:
        src = Path(c.path)
        if not c.verified:
            unit = classify_folder(src, any_name=True)
            if unit is None:
                raise IntegrityError(f"{src} is no longer a complete checkpoint folder", path=str(src))
            verify_unit(unit)
            c.verified = True
        if src.parent.resolve() == target_dir.resolve():
            return src
    final = target_dir / posixpath.basename(c.path.replace(os.sep, "/"))
    if final.is_dir() and c.manifest is not None:   # already here, complete and as the manifest says
        have = classify_folder(final, any_name=True)
        if have is not None and have.manifest is not None and have.manifest.get("files") == c.manifest["files"]:
            with contextlib.suppress(IntegrityError):
                verify_unit(have)
                log.info("%s already holds %s, verified", target_dir, final.name)
                _point_latest(final, c.step)
                return final
    tmp = _folder_tmp(target_dir, final.name)
    ok = False
    try:
        remote = None if c.local else _remote_of(plan, c, opened)
        if remote is not None and c.manifest is None:   # a fallback whose manifest was not read yet
            with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "resume-", dir=target_dir) as t:
                _check_remote_folder(remote, c, Path(t))
        from .remotes.base import RemoteFile, normalize_path
        from .remotes.local import LocalRemote
        for f in c.manifest["files"]:
            dst = tmp / f["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            label = f"{c.source}: {c.path}/{f['path']}"
            if c.local:
                copy_verified(Path(c.path) / f["path"], dst, size=f["size"], sha256=f["sha256"], label=label)
                continue
            rec = c.records[f["path"]]
            if type(remote) is LocalRemote:
                copy_verified(remote.root / normalize_path(rec.path), dst, size=f["size"], sha256=f["sha256"],
                              label=label)
                continue
            expected = RemoteFile(rec.path, f["size"], sha256=f["sha256"], md5=rec.md5, modified=rec.modified,
                                  id=rec.id)
            got = remote.get(rec.path, dst, expected=expected)
            if got is not None and got.sha256 is not None and got.sha256 != f["sha256"]:
                raise IntegrityError(f"{label} downloaded with sha256 {got.sha256[:12]}..., its manifest says "
                                     f"{f['sha256'][:12]}...; the copy was discarded", path=rec.path)
            if got is None or got.sha256 is None:
                if hash_file(dst).sha256 != f["sha256"]:
                    raise IntegrityError(f"{label} does not match its manifest's sha256; the copy was discarded",
                                         path=rec.path)
        raw = c.manifest_bytes if c.manifest_bytes is not None else json.dumps(c.manifest).encode()
        atomic_write_bytes(tmp / FOLDER_MANIFEST, raw)   # last: the folder is complete from here
        _into_place(tmp, final)
        ok = True
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    _point_latest(final, c.step)
    log.info("fetched checkpoint folder %s step %d (%d files) from %s to %s", final.name, c.step,
             len(c.manifest["files"]), c.source, final)
    return final


def _fetch_foreign_folder(plan: ResumePlan, c: Candidate, target_dir: Path, opened: dict[str, Any]) -> Path:
    """Another tool's folder (DCP, safetensors, Megatron): fetched whole into a temporary folder (each file
    checked against the tier's record of it: size, and the sha256 / md5 / git id the tier keeps), verified by
    loading, then renamed into place. A Megatron ``iter_N/`` gets the tracker beside it, so that it is a
    checkpoint there too (and Megatron's own ``--load`` finds it)."""
    import shutil
    from .distributed import CheckpointUnit, classify_folder, verify_unit
    name = posixpath.basename(c.path.replace(os.sep, "/"))
    final = target_dir / name
    if c.local:
        src = Path(c.path)
        unit = classify_folder(src, any_name=True)
        if unit is None:
            raise IntegrityError(f"{src} is no longer a complete checkpoint folder", path=str(src))
        if not c.verified:
            verify_unit(unit)
            c.verified = True
        if src.parent.resolve() == target_dir.resolve():
            return src
        listing = {rel: size for rel, size in unit.files}
    else:
        listing = {rel: rec.size for rel, rec in c.records.items()}
        have = classify_folder(final, any_name=True) if final.is_dir() else None
        if have is not None and have.kind == c.kind and dict(have.files) == listing:
            with contextlib.suppress(IntegrityError):   # already here, as the tier holds it
                verify_unit(have)
                log.info("%s already holds %s, verified by loading", target_dir, name)
                _point_foreign(final, c)
                return final
    tmp = _folder_tmp(target_dir, name)
    ok = False
    try:
        remote = None if c.local else _remote_of(plan, c, opened)
        for rel in sorted(listing):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if c.local:
                shutil.copyfile(Path(c.path) / rel, dst)
            else:
                remote.get(c.records[rel].path, dst, expected=c.records[rel])
            size = dst.stat().st_size
            if size != listing[rel]:
                raise IntegrityError(f"{c.source}: {c.path}/{rel} is {size} bytes, the tier listed "
                                     f"{listing[rel]}; the copy was discarded", path=f"{c.path}/{rel}")
        unit = CheckpointUnit(tmp, c.step, c.kind or "dcp", sum(listing.values()), None,
                              tuple(sorted(listing.items())))
        try:
            verify_unit(unit)
        except IntegrityError as e:
            raise IntegrityError(f"{c.source}: {c.path} does not load once fetched ({e}); the copy was "
                                 "discarded", path=c.path) from e
        _into_place(tmp, final)
        ok = True
    finally:
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    c.verified = True
    _point_foreign(final, c)
    log.info("fetched %s folder %s step %d (%d files) from %s to %s, verified by loading", c.kind, name, c.step,
             len(listing), c.source, final)
    return final


def _point_foreign(folder: Path, c: Candidate) -> None:
    """``latest``, and for a Megatron folder the tracker beside it unless it already names this iteration or a
    later one (Megatron writes its tracker after a save; without it the folder is no checkpoint)."""
    from .distributed import MEGATRON_TRACKER, _megatron_tracker
    if c.kind == "megatron":
        tracked = _megatron_tracker(folder.parent)
        if tracked is None or (isinstance(tracked, int) and tracked < c.step):
            atomic_write_bytes(folder.parent / MEGATRON_TRACKER, f"{c.step}".encode(), durable=False)
    _point_latest(folder, c.step)


def _folder_tmp(target_dir: Path, name: str) -> Path:
    """An empty temporary folder in `target_dir` for fetching the folder `name` (named like a sharded save's
    temporary: never a checkpoint, swept when its writer is gone)."""
    import shutil
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f"{TMP_PREFIX}{name}.resume{os.getpid()}-{threading.get_ident() % 10**6}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _into_place(tmp: Path, final: Path) -> None:
    """Rename the fetched folder `tmp` to `final`, an older or broken local copy under that name moved out of the
    way first (a partial fetch never sits under the final name)."""
    import shutil
    from .fsutil import fsync_dir
    fsync_dir(tmp)
    if final.exists():
        old = final.parent / f"{TMP_PREFIX}{final.name}.replaced{os.getpid()}-0"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _remote_of(plan: ResumePlan, c: Candidate, opened: dict[str, Any]) -> Any:
    """The remote `c` comes from: the plan's, one opened earlier in this fetch, or opened now (kept in `opened`)."""
    remote = plan.remotes.get(c.source) or opened.get(c.source)
    if remote is None:
        from .remotes import open_remote
        remote = opened[c.source] = open_remote(plan.config, c.source)
    return remote


def _point_latest(folder: Path, step: int) -> None:
    atomic_write_json(folder.parent / LATEST, {"format": 1, "file": folder.name, "step": step, "kind": "folder"},
                      durable=False)


def copy_verified(src: str | os.PathLike, dst: str | os.PathLike, *, size: int, sha256: str,
                  progress: Any = None, label: str | None = None, blocks: tuple[int, list[str]] | None = None
                  ) -> None:
    """Copy `src` to `dst` atomically, checking the bytes written against `size` and `sha256`.

    One read of the source: each buffer is written by this thread while helper threads hash it
    (:func:`colabkit.fsutil.pipe_hashed`); sha256 only (the tier's md5 is not needed here). With `blocks` (the
    block digests the manifest records, :func:`colabkit.fsutil.manifest_blocks`) and more than one core, the
    blocks are checked on several threads at once instead of one sha256 stream over the whole file. On a
    mismatch nothing is left at `dst`.

    The copy is not fsynced: a fetched checkpoint is a copy of one the tier keeps, every load verifies it
    against its manifest (a copy torn by a power cut is refused and fetched again), and an upload of it
    re-hashes what it reads. Waiting for the disk here would
    cost resume ~0.6 s per 256 MB on this machine's disk for no protection. The Checkpointer's own saves,
    the only copy until synced, are fsynced.

    Raises:
        IntegrityError: the copy does not match (the temporary file is removed).
        OSError: reading or writing failed.
    """
    import hashlib

    from .fsutil import BLOCK_READ, hash_workers, pipe_hashed

    src, dst = Path(src), Path(dst)
    label = label or str(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    workers = hash_workers() if blocks is not None and len(blocks[1]) > 1 else 1
    if workers < 2:
        blocks = None
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + dst.name + ".", suffix=".tmp", dir=dst.parent)
    h = hashlib.sha256()
    written = 0
    ok = False

    def write(view: memoryview) -> None:   # no early writeback: it would make the copy wait for the disk's queue
        nonlocal written
        off = 0
        while off < len(view):
            off += os.write(fd, view[off:])
        written += len(view)

    try:
        os.fchmod(fd, 0o644)
        with open(src, "rb", buffering=0) as fin:
            bad = pipe_hashed(fin, write, update=None if blocks else h.update, blocks=blocks, workers=workers,
                              progress=progress, buf_size=BLOCK_READ)
        if blocks is not None:
            if written != size or bad is not None:
                where = f"block {bad + 1} of {len(blocks[1])} differs" if bad is not None else "its blocks differ"
                raise IntegrityError(f"{label} does not match its manifest (size {written} vs {size}, {where}); "
                                     "the copy was discarded", path=str(src), expected=sha256)
            got = sha256   # every block matched the manifest's, and the manifest's sha256 is of those blocks
        else:
            got = h.hexdigest()
            if written != size or got != sha256:
                raise IntegrityError(f"{label} does not match its manifest (size {written} vs {size}, sha256 "
                                     f"{got[:12]}... vs {sha256[:12]}...); the copy was discarded",
                                     path=str(src), expected=sha256, actual=got)
        # these bytes were hashed as they were written: the loader need not read them again (see verify())
        record_verified(fd, got)
        os.close(fd)
        fd = -1
        replace_copy(tmp, dst)
        ok = True
    finally:
        if fd >= 0:
            os.close(fd)
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _existing(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _already_there(dst: Path, c: Candidate) -> bool:
    try:
        st = dst.stat()
        if st.st_size != c.size:
            return False
    except OSError:
        return False
    if verified_sha256(dst, st) == c.sha256:
        return True
    return hash_file(dst).sha256 == c.sha256


def _progress_bar(c: Candidate, *, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=c.size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{c.source}: {c.name}",
                leave=False)


def _close_bar(bar) -> None:
    """Close a tqdm bar and, when it was the last one, stop tqdm's monitor thread (it restarts on the next bar)."""
    bar.close()
    cls = type(bar)
    with cls.get_lock():
        monitor = getattr(cls, "monitor", None) if not cls._instances else None
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.exit()


def resume(*, config: "Config | None" = None, experiment: str | None = None, policy: str | None = None,
           sources: Sequence["str | Remote"] | None = None, progress: bool = True,
           on_unreachable: str | None = None, deadline: float | None = None) -> tuple[ResumePlan, Path | None]:
    """:func:`locate` then :func:`fetch`: the plan and the local path (None: fresh start)."""
    plan = locate(config=config, experiment=experiment, policy=policy, sources=sources,
                  on_unreachable=on_unreachable, deadline=deadline)
    return plan, fetch(plan, progress=progress)
