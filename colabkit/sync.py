"""Background sync of a run's folders to the configured tiers (Drive, the Hub, local folders).

A :class:`SyncGroup` watches some folders (watchdog; a polling observer on FUSE/network mounts) and runs one
:class:`TierSyncer` thread per tier. A tier is due by its interval (``every``) or by :func:`flush`; on a due
tick it walks the watched folders, picks the files its include/exclude globs select that are complete (a
checkpoint with its manifest, an append-only log (``*.log``: uploaded as it is on each due tick, so a
preempted run's log reaches the tiers up to its last tick), or any other file whose size and mtime have been
stable for ``sync.settle``; temporary names never; a checkpoint folder, e.g. a sharded save, only whole and
complete, its manifest last: :meth:`TierSyncer._select_units`) and that it does not already hold (the persisted
:class:`colabkit.ledger.Ledger`), and uploads them one at a time (a Hub tier: all in one commit through
``put_many``). The training process never waits: uploads run on these threads, at a lowered CPU priority.

Errors are classified once, where a remote wraps them (``RemoteError.kind``, see
:func:`colabkit.errors.error_kind`): ``transient`` ones (5xx, 429, dropped connections, a token endpoint that is
briefly down) and any other RemoteError/OSError not known to be fatal retry with exponential back-off and jitter,
honouring ``retry_after``, for as long as the tier runs (each attempt is bounded by the remote's own retries);
``auth``, ``permission`` and ``quota`` stop that tier (:data:`FATAL_KINDS`). Either way the error stays in :func:`status` and the log
(``<root>/.colabkit/logs/sync.log``) until a later upload succeeds. Threads never print. A daily upload cap is
not an error: a Drive tier counts what it uploaded per rolling 24 h (the ledger) and defers what would pass
``drive.daily_upload_cap``, and Drive's own cap answer (:class:`~colabkit.errors.RemoteUploadCapError`) pauses it
too; status says ``paused until HH:MM`` and the tier resumes by itself. Files a tier will never upload
(``max_file_size``, their manifests, older checkpoints under ``latest_only``) are ``skipped``, with the reason.
After a tick records a checkpoint, local checkpoints beyond ``retention.keep_local`` that the required tiers
hold are deleted (:func:`colabkit.retention.prune`). With ``sync.workers`` (several machines holding the same
checkpoints), each checkpoint goes through an election first (:mod:`colabkit.elect`): a tier uploads it only
under this worker's lease, and records another worker's verified copy instead (``uploaded_by``).

Example:
    >>> from colabkit import sync
    >>> sync.start(every=3600)          # replaces a group already watching the same folders
    >>> sync.status()["tiers"]["hub"]["state"]
    'idle'
    >>> sync.flush(timeout=600)         # upload everything due now and wait
    >>> sync.stop()                     # flush, then join the threads (safe to call twice)
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import posixpath
import random
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from .errors import (ColabkitError, IntegrityError, RemoteAuthError, RemoteError, RemotePermissionError,
                     RemoteQuotaError, RemoteUploadCapError, SyncError, error_kind)
from .fsutil import FileDigest, atomic_write_json, hash_file, is_temporary, sweep_temporaries
from .runtime import command

if TYPE_CHECKING:
    from .config import Config, TierConfig
    from .ledger import Ledger
    from .remotes.base import Remote

log = logging.getLogger(__name__)
#: routine activity (uploads, starts, stops) goes only to <root>/.colabkit/logs/sync.log: it does not
#: propagate, so a notebook whose root logger prints INFO is not flooded by background threads
_activity = logging.getLogger(__name__ + ".activity")
_activity.propagate = False
_activity.setLevel(logging.INFO)

#: error kinds that stop a tier: retrying cannot help until someone fixes the key, the sharing or the quota
FATAL_KINDS = frozenset({"auth", "permission", "quota"})
FATAL = (RemoteQuotaError, RemoteAuthError, RemotePermissionError)   # the classes of FATAL_KINDS
_CAP_PROBE = 3600.0         # after Drive's daily-cap answer (no Retry-After), ask again this much later
_HUB_HINT = ("weights belong on the Hub: keep checkpoints out of this tier (exclude: ['*.pt', '*.pt.json', ...]) "
             "and let a hub tier take them")
_SHOW_SKIPPED = 50          # skipped files listed by name in a status snapshot (all are counted)
_MANIFEST_OF_SKIPPED = "the manifest of a skipped checkpoint"
_SKIP_DIRS = {".colabkit", ".git", "__pycache__", ".ipynb_checkpoints"}
_GUARD_INTERVAL = 30.0      # the disk guard also runs between due ticks, at least this often
_CKPT_EXTS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_STEP = re.compile(r"(?:step|iter|iteration|global_step)[_\-]?(\d+)", re.IGNORECASE)


# -- globs ---------------------------------------------------------------------------------------
#: append-only logs: due on every tick as they are (a run printing every second never "settles"), so
#: the log of a run that is killed mid-way reaches the tiers up to its last tick
APPEND_ONLY = (".log",)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A compiled regex for a tier glob: ``*`` within a name, ``**`` across folders, ``?``, ``[...]``."""
    i, out = 0, []
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


class Patterns:
    """include/exclude globs of a tier. A pattern without '/' matches the basename; with '/', the path
    relative to the project root. Results are cached per path (a tick over 10,000 files stays cheap)."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        def split(pats):
            return ([glob_regex(p) for p in pats if "/" not in p and p != "**"],
                    [glob_regex(p) for p in pats if "/" in p or p == "**"])
        self.inc_base, self.inc_path = split(include)
        self.exc_base, self.exc_path = split(exclude)
        self._cache: dict[str, bool] = {}

    def __call__(self, rel: str) -> bool:
        r = self._cache.get(rel)
        if r is None:
            base = rel.rsplit("/", 1)[-1]
            inc = any(p.match(base) for p in self.inc_base) or any(p.match(rel) for p in self.inc_path)
            r = inc and not (any(p.match(base) for p in self.exc_base) or any(p.match(rel) for p in self.exc_path))
            if len(self._cache) > 200_000:
                self._cache.clear()
            self._cache[rel] = r
        return r


def _latest_reason(step: int) -> str:
    return f"latest_only: step {step} is newer"


def tier_notes(t: Mapping[str, Any]) -> list[str]:
    """What a tier snapshot (or flush result) says beyond its counts: a pause by a daily upload cap, skipped files.

    Example:
        >>> tier_notes(sync.status()["tiers"]["drive"])
        ['paused until 14:05: 699.9 GB uploaded to this tier in the last 24 h; ...']
    """
    out = []
    if t.get("paused_until"):
        out.append(f"{t.get('paused') or 'paused'}: {t.get('pause_reason') or ''}".rstrip(": "))
    if t.get("skipped"):
        out.append(f"skipped {t['skipped']} ({describe_skipped(t.get('skipped_files') or {})})")
    w = t.get("workers") or {}
    if w.get("excluded"):
        out.append(f"worker {w.get('id')} is excluded from this tier's upload elections (it cannot write here)")
    if w.get("watching"):
        n = len(w["watching"])
        out.append(f"watching for {n} checkpoint{'s' if n != 1 else ''} another worker uploads")
    return out


def _hhmm(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


def describe_skipped(files: Mapping[str, str], *, limit: int = 3) -> str:
    """``reason: a, b; other reason: c`` for a tier's skipped files (as in status and flush results)."""
    by: dict[str, list[str]] = {}
    for rel, why in sorted(files.items()):
        by.setdefault(why, []).append(rel)
    parts = []
    for why, rels in by.items():
        names = ", ".join(rels[:limit]) + (f", ... ({len(rels) - limit} more)" if len(rels) > limit else "")
        parts.append(f"{why}: {names}")
    return "; ".join(parts)


def _step_of(name: str) -> int | None:
    try:
        from .checkpoints import step_of
        return step_of(name)
    except ImportError:  # pragma: no cover
        if is_temporary(name) or not name.lower().endswith(_CKPT_EXTS):
            return None
        m = _STEP.search(name)
        return int(m.group(1)) if m else None


# -- scanning ------------------------------------------------------------------------------------
@dataclass(slots=True)
class LocalFile:
    path: str           # absolute
    rel: str            # relative to the project root, POSIX (= the remote path and the ledger key)
    size: int
    mtime: float
    mtime_ns: int
    unit: str | None = None     # the key ("<folder rel>/") of the checkpoint folder it belongs to


@dataclass(slots=True)
class FolderUnit:
    """A checkpoint folder under a watched folder, as one scan found it (see :meth:`SyncGroup.scan`)."""
    key: str            # "<rel>/": the pending/skipped/ledger key of the folder
    path: str           # absolute
    step: int
    unit: Any           # the colabkit.distributed.CheckpointUnit once complete, else None (still being written)
    files: list[LocalFile]

    @property
    def rel(self) -> str:
        return self.key[:-1]

    @property
    def probe(self) -> str:
        """What a tier's globs judge the folder as: a checkpoint file of its name (``*.pt`` takes it)."""
        return self.rel + ".pt"

    def marker(self) -> str | None:
        """The file that makes the folder complete, uploaded after every other one (None: Megatron's
        tracker lives outside the folder)."""
        if self.unit is None:
            return None
        from .distributed import DCP_METADATA, FOLDER_MANIFEST
        kind = self.unit.kind
        if kind == "folder":
            return FOLDER_MANIFEST
        if kind == "dcp":
            return DCP_METADATA
        if kind == "safetensors":
            names = {f.rel.rsplit("/", 1)[-1] for f in self.files}
            idx = sorted(n for n in names if n.endswith(".safetensors.index.json"))
            return idx[0] if idx else ("model.safetensors" if "model.safetensors" in names else None)
        return None


_UNIT_HINTS = (".distcp", ".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _looks_like_checkpoint(folder: str) -> bool:
    """A step-named folder is a checkpoint folder when it holds checkpoint files (not, say, sample images)."""
    from .distributed import DCP_METADATA, FOLDER_MANIFEST
    if os.path.basename(folder).startswith("iter_"):
        return True
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_temporary(d)]
        for n in names:
            if n in (FOLDER_MANIFEST, DCP_METADATA) or n.endswith(_UNIT_HINTS) or n.endswith(".index.json"):
                return True
    return False


def _scan(targets: Sequence[tuple[str, str]], skip: set[str]) -> Iterable[LocalFile]:
    """Walk and stat every file under the watched targets ((absolute path, rel path) pairs)."""
    for top, rel_top in targets:
        try:
            st = os.stat(top)
        except OSError:
            continue
        if not os.path.isdir(top):
            if not is_temporary(top):
                yield LocalFile(top, rel_top, st.st_size, st.st_mtime, st.st_mtime_ns)
            continue
        stack = [(top, rel_top)]
        while stack:
            d, rd = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:
                continue
            with it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            # a folder still being written (a sharded save) is one unit: never its loose files
                            if e.name not in _SKIP_DIRS and not is_temporary(e.name) and e.path not in skip:
                                stack.append((e.path, f"{rd}/{e.name}" if rd else e.name))
                            continue
                        if is_temporary(e.name):
                            continue
                        if e.is_symlink():
                            s = _followed(e.path, f"{rd}/{e.name}" if rd else e.name)
                            if s is None:
                                continue
                        else:
                            s = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    yield LocalFile(e.path, f"{rd}/{e.name}" if rd else e.name, s.st_size, s.st_mtime, s.st_mtime_ns)


_symlinks_noted: set[str] = set()   # symlinks already reported as not followed (once per process)


def _followed(path: str, rel: str) -> os.stat_result | None:
    """A symlink in a watched folder: the stat of the regular file it points to (that file is uploaded under
    the link's name), or None for a link to a folder (never walked: links can make loops), a broken link or a
    symlink loop, each said once in sync.log."""
    import stat as stat_mod
    why = None
    try:
        s = os.stat(path)
    except OSError as e:
        why = "a symlink loop" if e.errno == errno.ELOOP else f"a broken symlink ({e.strerror})"
        s = None
    else:
        if stat_mod.S_ISREG(s.st_mode):
            return s
        why = "a symlink to a folder (links are not walked)" if stat_mod.S_ISDIR(s.st_mode) else \
            "a symlink to something that is not a regular file"
    if path not in _symlinks_noted:
        _symlinks_noted.add(path)
        _activity.info("%s is %s; not uploaded", rel, why)
    return None


def _stat_sig(u: "FolderUnit") -> tuple:
    return tuple(sorted((f.rel, f.size, f.mtime_ns) for f in u.files))


def _manifest_sha(path: str, size: int) -> str | None:
    """The sha256 recorded in `path`'s sidecar manifest, when it exists and agrees on the size."""
    try:
        with open(path + ".json", encoding="utf-8") as f:
            m = json.load(f)
        if isinstance(m, dict) and int(m.get("size", -1)) == size and m.get("sha256"):
            return str(m["sha256"])
    except (OSError, ValueError):
        pass
    return None


def _ioprio(value: int) -> None:
    """ioprio_set(IOPRIO_WHO_PROCESS, this thread, value): best effort, x86_64/arm64 Linux only."""
    try:
        import ctypes
        import platform
        nr = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
        if nr is not None:
            ctypes.CDLL(None, use_errno=True).syscall(nr, 1, threading.get_native_id(), value)
    except Exception:
        pass


def _lower_priority() -> None:
    """Make this thread yield the CPU and the disk to the training process: SCHED_BATCH at nice 19 and the
    lowest best-effort I/O priority. Linux applies both per thread, so the rest of the process is unaffected.

    Not SCHED_IDLE or the idle I/O class: with training keeping every core (or the disk) busy, those starve
    the uploader outright (a 250 MB checkpoint took 5 minutes to reach a local-folder tier on 2 busy cores);
    nice 19 gives it ~1.5% of a busy core, so checkpoints still leave the machine."""
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        # SCHED_BATCH: never preempts a training thread on wake-up; nice 19: the smallest CFS share
        os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))  # per-thread on Linux
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    _ioprio((2 << 13) | 7)  # IOPRIO_CLASS_BE, level 7 (the lowest)


def _normal_priority() -> None:
    """Back to normal priority for a flush (someone is waiting for it); best effort: an unprivileged
    thread may not lower its nice value again (RLIMIT_NICE), root (Colab, a VM) may."""
    tid = threading.get_native_id()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, tid, 0)
    _ioprio((2 << 13) | 4)  # IOPRIO_CLASS_BE, the default level


def _fmt_err(e: BaseException) -> str:
    from .secrets import redact
    return redact(f"{type(e).__name__}: {e}")


# -- one tier ------------------------------------------------------------------------------------
class _FlushRequest:
    def __init__(self, deadline: float, settled: bool = False) -> None:
        self.deadline = deadline
        self.settled = settled
        self.done = threading.Event()
        self.result: dict[str, Any] = {}


class TierSyncer(threading.Thread):
    """The thread that uploads one tier's files. Built and driven by :class:`SyncGroup`.

    States: ``starting``, ``idle``, ``scanning``, ``uploading``, ``retrying`` (back-off after an error),
    ``stopped`` (fatal error: quota, auth, permission; or the group was stopped).
    """

    def __init__(self, group: "SyncGroup", tier: "TierConfig", remote: "Remote | None", ledger: "Ledger", *,
                 every: float, open_error: BaseException | None = None) -> None:
        super().__init__(name=f"colabkit-sync-{tier.name}", daemon=True)
        self.group = group
        self.tier = tier
        self.remote = remote
        self.ledger = ledger
        self.every = float(every)
        self.patterns = Patterns(tier.include, tier.exclude)
        self._wake = threading.Event()
        self._stop_evt = threading.Event()
        self._lock = threading.RLock()
        self._flushes: list[_FlushRequest] = []
        self._closed = False
        self._next_due = time.monotonic()           # the first tick is due at once (catch up after a restart)
        self._next_attempt = 0.0                    # back-off: no attempt before this
        self._next_guard = 0.0
        self._attempts = 0
        self.fatal: str | None = None
        self._pending: dict[str, int] = {}          # rel -> size of files due or settling
        self._skipped: dict[str, str] = {}          # rel -> why this tier will not upload it (as things are)
        self._best: dict[str, tuple[int, str]] = {}  # latest_only: folder -> (step, path) of its newest checkpoint
        self._logged_big: set[str] = set()
        self._ckpt_recorded = False                 # a checkpoint was recorded since the last prune
        # a daily upload cap (Drive): files deferred in the last tick, until when, why
        self._deferred: dict[str, int] = {}
        self._paused_until: float | None = None     # wall clock
        self._pause_reason: str | None = None
        self._cap_answer_until = 0.0                # Drive answered "cap reached": nothing is sent before this
        self._pause_logged: tuple[int, str] | None = None
        self._data_of: dict[str, list[LocalFile]] = {}   # a manifest or folder marker -> what goes up first
        self._unit_key_of: dict[str, str] = {}      # rel of a file in a checkpoint folder -> the folder's key
        self._units: dict[str, FolderUnit] = {}     # the complete checkpoint folders of the current tick
        self._bad_units: dict[str, tuple[Any, str]] = {}  # key -> (the files' stat when refused, why)
        self.elect: Any = None                      # a colabkit.elect.TierElection with sync.workers
        self._watching: dict[str, str] = {}         # elected checkpoints another worker uploads: key -> what we wait for
        self.snap: dict[str, Any] = {
            "tier": tier.name, "remote": remote.describe() if remote else None, "state": "starting",
            "every": self.every, "last_upload": None, "last_tick": None, "next_due": None, "pending_files": 0,
            "pending_bytes": 0, "last_error": None, "last_error_at": None, "last_error_kind": None,
            "uploaded": 0, "uploaded_bytes": 0,
            "skipped": 0, "errors": 0, "retry_at": None, "current": None, "last_uploaded": None,
            "held_by_others": 0, "cancelled": 0}
        if open_error is not None:
            self._set_fatal(open_error)

    # -- public (called from other threads) ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self.snap)
            pending: dict[str, int] = {}   # a checkpoint folder counts once, with all its bytes
            for rel, size in self._pending.items():
                k = self._unit_key_of.get(rel, rel)
                pending[k] = pending.get(k, 0) + size
            s["pending_files"] = len(pending)
            s["pending_bytes"] = sum(pending.values())
            # what the tier holds, verified (a checkpoint folder's own entry, "<rel>/", is not a file)
            s["ledger_files"] = len(self.ledger.entries) - sum(1 for k in list(self.ledger.entries) if k[-1:] == "/")
            s["skipped"] = len(self._skipped)
            s["skipped_files"] = dict(sorted(self._skipped.items())[:_SHOW_SKIPPED])
            paused = self._paused_until if self._deferred and self._paused_until else None
            s["paused_until"] = paused
            s["paused"] = f"paused until {_hhmm(paused)}" if paused else None
            s["pause_reason"] = self._pause_reason if paused else None
            s["deferred_files"] = len(self._deferred) if paused else 0
            if self.elect is not None:
                s["workers"] = {"id": self.elect.w.id, "group": self.elect.w.group, "run": self.elect.w.run,
                                "member": self.elect.member, "excluded": self.elect.excluded,
                                "watching": dict(self._watching)}
                if self._watching and s["state"] in ("idle", "retrying"):
                    s["state"] = "watching"
            if paused and s["state"] in ("idle", "scanning"):
                s["state"] = "paused"
            now_m, now = time.monotonic(), time.time()
            if self.fatal is None and s["state"] != "stopped":
                s["next_due"] = now + max(max(self._next_due, self._next_attempt) - now_m, 0.0)
            if self._next_attempt > now_m:
                s["retry_at"] = now + (self._next_attempt - now_m)
            else:
                s["retry_at"] = None
            return s

    def request_flush(self, deadline: float, *, settled: bool = False) -> _FlushRequest:
        req = _FlushRequest(deadline, settled)
        with self._lock:
            if self._closed or not self.is_alive():
                req.result = self._flush_result(ok=self.fatal is None, note="not running")
                req.done.set()
                return req
            self._flushes.append(req)
        self._wake.set()
        return req

    def note(self, path: str) -> None:
        """A watchdog event for `path`: update pending counts (uploads still wait for the due tick).

        Pending counts only what this tier will upload: a file it will skip (max_file_size, the manifest of
        such a checkpoint, an older checkpoint in a latest_only tier) is counted as skipped, with the reason."""
        rel = self.group.rel_of(path)
        if rel is None or is_temporary(path):
            return
        key = self.group.unit_key_of(path)
        if key is not None:   # a file of a checkpoint folder: the folder is judged whole on the next tick
            if not self.patterns(key[:-1] + ".pt"):
                return
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if os.path.isfile(path):
                    with self._lock:
                        if not self.ledger.unchanged(rel, st.st_size, st.st_mtime_ns):
                            self._unit_key_of[rel] = key
                            self._pending[rel] = st.st_size
            return
        if not self.patterns(rel):
            return
        try:
            st = os.stat(path)
        except OSError:
            with self._lock:
                self._pending.pop(rel, None)
                self._skipped.pop(rel, None)
            return
        if not os.path.isfile(path):
            return
        with self._lock:
            if self.ledger.unchanged(rel, st.st_size, st.st_mtime_ns):
                self._pending.pop(rel, None)
                self._skipped.pop(rel, None)
                return
            why = self._skip_reason(path, rel, st.st_size)
            if why is not None:
                self._pending.pop(rel, None)
                self._skipped[rel] = why
                return
            self._skipped.pop(rel, None)
            self._pending[rel] = st.st_size

    def _skip_reason(self, path: str, rel: str, size: int) -> str | None:
        """Why this tier will not upload `path` (judged from one event; the next tick judges every file)."""
        if self._too_big(size):
            return self._big_reason()
        base = os.path.basename(path)
        data = path[:-5] if path.endswith(".json") else None
        step = _step_of(base[:-5]) if data is not None else _step_of(base)
        if data is not None and step is not None:
            drel = rel[:-5]
            with contextlib.suppress(OSError):
                if self.patterns(drel) and self._too_big(os.stat(data).st_size):
                    return _MANIFEST_OF_SKIPPED
        if not self.tier.latest_only or step is None:
            return None
        ckpt = rel[:-5] if data is not None else rel
        folder = posixpath.dirname(rel)
        best = self._best.get(folder)
        if best is not None and (step, ckpt) < best:
            return _latest_reason(best[0])
        # a complete checkpoint (its manifest is there) newer than the folder's newest: the older ones waiting
        # for the tick will not be uploaded now
        if (data is not None or os.path.exists(path + ".json")) and (best is None or (step, ckpt) > best):
            self._best[folder] = (step, ckpt)
            for r in list(self._pending):
                if posixpath.dirname(r) != folder:
                    continue
                c = r[:-5] if r.endswith(".json") else r
                s = _step_of(posixpath.basename(c))
                if s is not None and (s, c) < (step, ckpt):
                    del self._pending[r]
                    self._skipped[r] = _latest_reason(step)
        return None

    def _big_reason(self) -> str:
        from .config import format_size
        return f"larger than max_file_size ({format_size(self.tier.max_file_size)})"

    def stop_soon(self) -> None:
        self._stop_evt.set()
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        _lower_priority()
        self._sweep()
        with self._lock:
            if self.fatal is None:
                self.snap["state"] = "idle"
        while True:
            now = time.monotonic()
            with self._lock:
                has_flush = bool(self._flushes)
            if not has_flush:
                due_at = max(self._next_due, self._next_attempt)
                timeout = min(due_at, self._next_guard) - now if self.fatal is None else None
                if timeout is None or timeout > 0:
                    self._wake.wait(timeout)
                self._wake.clear()
            if self._stop_evt.is_set():
                with self._lock:
                    self._closed = True
                    reqs, self._flushes = self._flushes, []
                for r in reqs:
                    r.result = self._flush_result(ok=False, note="stopped")
                    r.done.set()
                break
            try:
                self._step()
            except Exception as e:  # never die silently
                log.exception("%s: unexpected error in the sync loop", self.tier.name)
                self._record_error(e)
                self._backoff(None)
        with self._lock:
            self.snap["state"] = "stopped"
            self.snap["current"] = None

    def _sweep(self) -> None:
        """Remove temporaries of ours that killed processes left in this tier's folder and in the ledger folder
        (a partial copy on a mounted Drive is synced and counts against its quota); never one whose writer
        is alive (:func:`colabkit.fsutil.sweep_temporaries`)."""
        from .config import format_size
        where = [(str(self.ledger.path.parent), False)]
        root = getattr(self.remote, "root", None) if getattr(self.remote, "kind", "") == "local" else None
        if root is not None:
            where.append((str(root), True))
        for folder, recursive in where:
            try:
                gone = sweep_temporaries(folder, recursive=recursive)
            except Exception as e:   # hygiene must never stop a tier
                log.warning("%s: sweeping stale temporaries in %s failed: %s", self.tier.name, folder, _fmt_err(e))
                continue
            if gone:
                _activity.info("%s: removed %d stale temporary file(s) (%s) left by interrupted writers in %s",
                               self.tier.name, len(gone), format_size(sum(n for _, n in gone)), folder)

    def _step(self) -> None:
        with self._lock:
            reqs, self._flushes = self._flushes, []
        now = time.monotonic()
        if reqs:
            deadline = max(r.deadline for r in reqs)
            settled = all(r.settled for r in reqs)
            result: dict[str, Any] = {"ok": False, "state": "error", "note": "the flush failed (see sync.log)"}
            try:
                result = self._flush(deadline, settled=settled)
            finally:  # whoever waits is answered, whatever happened
                for r in reqs:
                    r.result = result
                    r.done.set()
            return
        if self.fatal is not None:
            return
        if now >= max(self._next_due, self._next_attempt):
            self._next_due = now + self.every
            self._tick(final=False)
            self.group.guard()
            self._next_guard = time.monotonic() + min(_GUARD_INTERVAL, self.every)
        elif now >= self._next_guard:
            self.group.guard()
            self._next_guard = time.monotonic() + min(_GUARD_INTERVAL, self.every)

    def _flush(self, deadline: float, *, settled: bool = False) -> dict[str, Any]:
        """A final tick: settle-waits (not for logs and assets when `settled`) and retries with back-off until
        everything due is up or the deadline."""
        if self.fatal is not None:
            return self._flush_result(ok=False)
        with self._lock:
            self.snap["state"] = "flushing"
        self._attempts = 0
        self._next_attempt = 0.0
        _normal_priority()
        try:
            return self._flush_loop(deadline, settled=settled)
        finally:
            _lower_priority()

    def _flush_loop(self, deadline: float, *, settled: bool = False) -> dict[str, Any]:
        ok = False
        while True:
            ok = self._tick(final=True, deadline=deadline, settled=settled)
            if ok or self.fatal is not None or self._stop_evt.is_set():
                break
            wait = self._next_attempt - time.monotonic()
            if time.monotonic() + max(wait, 0) >= deadline:
                break
            self._stop_evt.wait(max(wait, 0))
        self._next_due = time.monotonic() + self.every
        self.group.guard()
        return self._flush_result(ok=ok and self.fatal is None)

    def _flush_result(self, *, ok: bool, note: str | None = None) -> dict[str, Any]:
        s = self.snapshot()
        if s["paused_until"]:   # what waits for the daily cap is not up: said at once, not waited for
            ok = False
        out = {"ok": ok, "state": s["state"], "uploaded": s["uploaded"], "pending_files": s["pending_files"],
               "skipped": s["skipped"], "skipped_files": s["skipped_files"], "paused_until": s["paused_until"],
               "paused": s["paused"], "pause_reason": s["pause_reason"], "last_error": s["last_error"]}
        if note:
            out["note"] = note
        return out

    # -- one tick --------------------------------------------------------------------------------
    def _too_big(self, size: int) -> bool:
        return self.tier.max_file_size is not None and size > self.tier.max_file_size

    def _scan(self) -> tuple[list[LocalFile], dict[str, FolderUnit]]:
        """The files this tier's globs take, and the checkpoint folders among them (judged whole, by
        :attr:`FolderUnit.probe`)."""
        files, units = self.group.scan_units()
        units = {k: u for k, u in units.items() if self.patterns(u.probe)}
        return [f for f in files if (f.unit in units if f.unit is not None else self.patterns(f.rel))], units

    def _select(self, files: list[LocalFile], *, final: bool, units: Mapping[str, FolderUnit] | None = None,
                settled: bool = False) -> tuple[list[tuple[LocalFile, str | None]], list[LocalFile]]:
        """(due files with their manifest sha256 or None, files still settling).

        The files of a checkpoint folder (`units`) are decided folder by folder (:meth:`_select_units`)."""
        units = units or {}
        now = time.time()
        settle = self.group.config.sync.settle
        led = self.ledger
        due: list[tuple[LocalFile, str | None]] = []
        unsettled: list[LocalFile] = []
        entries, pruned = led.entries, led.pruned   # pruned: deleted by the tier's keep, not to be sent again
        todo = []
        for f in files:  # the hot loop of an idle tick: one dict lookup per file
            e = entries.get(f.rel) or pruned.get(f.rel)
            if e is None or e.get("local_mtime_ns") != f.mtime_ns or e.get("local_size") != f.size:
                todo.append(f)
        self._data_of = {}
        with self._lock:
            self._unit_key_of = {f.rel: f.unit for f in files if f.unit is not None}
        self._units = {}
        if not todo and all(k in entries or k in pruned for k in units):
            # an idle tick: everything is held (the newest per folder is unchanged too)
            with self._lock:
                self._skipped = {}
            return due, unsettled
        skipped: dict[str, str] = {}
        by_path = {f.path: f for f in files if f.unit is None}
        todo_units = {f.unit for f in todo if f.unit is not None}
        for f in todo:
            if f.unit is not None:
                continue
            if self._too_big(f.size):
                skipped[f.rel] = self._big_reason()
                if f.rel not in self._logged_big:
                    self._logged_big.add(f.rel)
                    _activity.info("%s: %s is larger than max_file_size (%d bytes); not uploaded",
                                   self.tier.name, f.rel, self.tier.max_file_size)
                continue
            sha = None
            data = by_path.get(f.path[:-5]) if f.path.endswith(".json") else None
            is_manifest = data is not None
            if is_manifest and self._too_big(data.size) and _step_of(os.path.basename(data.path)) is not None:
                skipped[f.rel] = _MANIFEST_OF_SKIPPED   # it would wait for its checkpoint forever
                continue
            if not is_manifest and f.path + ".json" in by_path:
                sha = _manifest_sha(f.path, f.size)
            if sha is not None or is_manifest or f.path.endswith(APPEND_ONLY) or now - f.mtime >= settle:
                due.append((f, sha))
            else:
                unsettled.append(f)
        # a manifest goes up only after its data file (when this tier takes the data file too)
        self._data_of = {f.path: [by_path[f.path[:-5]]] for f, _ in due
                         if f.path.endswith(".json") and f.path[:-5] in by_path}
        udue, uunsettled, ustate = self._select_units(units, todo_units, skipped, now=now, settle=settle,
                                                      settled=settled)
        best_rel: dict[str, tuple[int, str]] = {}
        if self.tier.latest_only:
            # per folder: only the newest checkpoint due, and never one older than a checkpoint already held;
            # a checkpoint folder competes with the checkpoint files beside it
            best: dict[str, tuple[int, str]] = {}
            steps: dict[str, int] = {}
            due_paths = {f.path for f, _ in due}
            held_paths = {f.path for f in files} - {f.path for f in todo}
            for f in files:
                if f.unit is not None or f.path.endswith(".json"):
                    continue
                s = _step_of(os.path.basename(f.path))
                if s is None:
                    continue
                steps[f.path] = s
                if f.path in held_paths or f.path in due_paths:
                    d = os.path.dirname(f.path)
                    if d not in best or (s, f.path) > best[d]:
                        best[d] = (s, f.path)
                        best_rel[posixpath.dirname(f.rel)] = (s, f.rel)
            for key, state in ustate.items():
                u = units[key]
                if state in ("held", "due"):
                    d = os.path.dirname(u.path)
                    if d not in best or (u.step, u.path) > best[d]:
                        best[d] = (u.step, u.path)
                        best_rel[posixpath.dirname(u.rel)] = (u.step, u.rel)
            drop = {p for p in steps if p in due_paths and best[os.path.dirname(p)][1] != p}
            drop |= {p + ".json" for p in drop}
            old = [f for f in unsettled if f.path in steps and os.path.dirname(f.path) in best
                   and steps[f.path] <= best[os.path.dirname(f.path)][0]]
            for f in [f for f, _ in due if f.path in drop] + old:
                skipped[f.rel] = _latest_reason(best[os.path.dirname(f.path[:-5] if f.path.endswith(".json")
                                                                    else f.path)][0])
            due = [(f, s) for f, s in due if f.path not in drop]
            unsettled = [f for f in unsettled if f not in old]
            for key, state in ustate.items():
                u = units[key]
                b = best.get(os.path.dirname(u.path))
                if state != "held" and b is not None and (u.step, u.path) < b:
                    skipped[key] = _latest_reason(b[0])
                    self._units.pop(key, None)
            udue = [(f, s) for f, s in udue if f.unit not in skipped]
            uunsettled = [f for f in uunsettled if f.unit not in skipped]
        due += udue
        unsettled += uunsettled
        with self._lock:
            self._skipped = skipped
            self._best = best_rel
        # data files before their manifests (a folder's files before its manifest or marker): a remote
        # holding a manifest always holds its data
        due.sort(key=lambda x: (x[0].path.endswith(".json") or x[0].path in self._data_of, x[0].rel))
        return due, unsettled

    def _select_units(self, units: Mapping[str, FolderUnit], todo: set[str], skipped: dict[str, str], *,
                      now: float, settle: float, settled: bool
                      ) -> tuple[list[tuple[LocalFile, str | None]], list[LocalFile], dict[str, str]]:
        """The checkpoint folders of a tick: (due files, files still settling, {key: held | due | waiting}).

        A folder goes up only once it is complete: colabkit's with its manifest (every file listed at the
        size it records, with the sha256 it records), another tool's with its marker and every file's size
        and mtime stable for ``sync.settle``; its manifest (or marker) goes up after every other file."""
        due: list[tuple[LocalFile, str | None]] = []
        unsettled: list[LocalFile] = []
        state: dict[str, str] = {}
        for key, u in units.items():
            if key not in todo:
                state[key] = "held"
                if u.unit is not None:
                    self._units[key] = u   # the folder entry may still be missing (a kill after the last file)
                continue
            if u.unit is None:
                if settled:   # nothing writes any more: this save will never finish
                    skipped[key] = "incomplete: no manifest or marker (a save that did not finish)"
                    state[key] = "skipped"
                else:
                    unsettled += u.files
                    state[key] = "waiting"
                continue
            bad = self._bad_units.get(key)
            if bad is not None and bad[0] == _stat_sig(u):
                skipped[key] = bad[1]
                state[key] = "skipped"
                continue
            big = [f for f in u.files if self._too_big(f.size)]
            if big:
                skipped[key] = f"{big[0].rel.rsplit('/', 1)[-1]} is {self._big_reason()}"
                state[key] = "skipped"
                continue
            files = u.files
            hints: dict[str, str] = {}
            if u.unit.manifest is not None:
                from .distributed import FOLDER_MANIFEST
                listed = {f["path"]: f for f in u.unit.manifest["files"]}
                by_rel = {f.rel[len(key):]: f for f in u.files}
                wrong = sorted(p for p, m in listed.items()
                               if p not in by_rel or by_rel[p].size != m["size"])
                if wrong:
                    skipped[key] = f"incomplete: {wrong[0]} is missing or not the size its manifest records"
                    state[key] = "skipped"
                    continue
                files = [by_rel[p] for p in sorted(listed)] + [by_rel[FOLDER_MANIFEST]]
                hints = {by_rel[p].rel: m["sha256"] for p, m in listed.items()}
            elif not settled and any(now - f.mtime < settle for f in files):
                unsettled += files   # another tool's folder: its sizes must be stable first
                state[key] = "waiting"
                continue
            marker = u.marker()
            first = [f for f in files if f.rel != key + (marker or "\0")]
            for f in files:
                if self.ledger.unchanged(f.rel, f.size, f.mtime_ns):
                    continue
                due.append((f, hints.get(f.rel)))
                if marker is not None and f.rel == key + marker:
                    self._data_of[f.path] = first
            self._units[key] = u
            state[key] = "due"
        return due, unsettled, state

    def _refuse_unit(self, f: LocalFile) -> None:
        """A file of a checkpoint folder is not what its manifest says: the folder is corrupt on this disk and
        stays off the tier (skipped, with the reason) until it changes."""
        u = self._units[f.unit]
        why = f"corrupted: {f.rel[len(f.unit):]} does not match its manifest's sha256"
        self._bad_units[f.unit] = (_stat_sig(u), why)
        log.warning("%s: checkpoint folder %s not uploaded: %s", self.tier.name, f.unit, why)
        with self._lock:
            self._skipped[f.unit] = why
            for g in u.files:
                self._pending.pop(g.rel, None)

    def _finish_units(self) -> None:
        """Record each checkpoint folder of this tick whose every file this tier holds as one complete entry
        (``"<rel>/"`` in the ledger): what retention and resume go by."""
        for key, u in list(self._units.items()):
            files = u.files
            if u.unit is not None and u.unit.manifest is not None:
                from .distributed import FOLDER_MANIFEST
                names = {f["path"] for f in u.unit.manifest["files"]} | {FOLDER_MANIFEST}
                files = [f for f in u.files if f.rel[len(key):] in names]
            if not all(self.ledger.unchanged(f.rel, f.size, f.mtime_ns) for f in files):
                continue
            if not any(f.rel in self.ledger.entries for f in files):
                continue   # the tier's keep deleted it: unchanged here, not held there
            size = sum(f.size for f in files)
            mtime_ns = max(f.mtime_ns for f in files)
            e = self.ledger.entries.get(key)
            if e and e.get("local_size") == size and e.get("local_mtime_ns") == mtime_ns:
                continue
            sha = None
            if u.unit is not None and u.unit.manifest is not None:
                from .distributed import FOLDER_MANIFEST
                sha = (self.ledger.entries.get(key + FOLDER_MANIFEST) or {}).get("sha256")
            self.ledger.record(key, remote_path=self.group.config.remote_path(u.path), size=size, sha256=sha,
                               md5=None, remote_id=None, local_size=size, local_mtime_ns=mtime_ns)
            with self.ledger.lock:
                self.ledger.entries[key]["files"] = len(files)
                by = {(self.ledger.entries.get(f.rel) or {}).get("uploaded_by") for f in files}
                if len(by) == 1 and None not in by:   # elected upload: the worker whose copy the tier holds
                    self.ledger.entries[key]["uploaded_by"] = by.pop()
            self.ledger.save()
            self._ckpt_recorded = True
            _activity.info("%s: checkpoint folder %s complete (%d files, %d bytes)", self.tier.name, key,
                           len(files), size)

    def _tick(self, *, final: bool, deadline: float | None = None, settled: bool = False) -> bool:
        """Upload what is due. Returns True when nothing due is left (uploaded or already held).

        `settled` (a final tick after the writers ended): files other than checkpoints are taken as they are
        without waiting for their settle time."""
        with self._lock:
            if not final:
                self.snap["state"] = "scanning"
        files, units = self._scan()
        due, unsettled = self._select(files, final=final, units=units, settled=settled)
        if final and unsettled and deadline is not None:
            # let files that are still being written settle (bounded by the flush deadline)
            settle = self.group.config.sync.settle
            newest = max(f.mtime for f in unsettled)
            wait = min(newest + settle - time.time(), deadline - time.monotonic())
            if settled and all(_step_of(os.path.basename(f.path)) is None and f.unit is None for f in unsettled):
                wait = 0  # nothing is writing any more: no reason to wait
            if wait > 0:
                self._stop_evt.wait(wait)
            files, units = self._scan()
            due, unsettled = self._select(files, final=final, units=units, settled=settled)
            # still changing: a log being appended is uploaded as it is now; a checkpoint (a file, or a
            # folder's) is not
            extra = [(f, None) for f in unsettled if _step_of(os.path.basename(f.path)) is None and f.unit is None]
            due += extra
            unsettled = [f for f in unsettled if _step_of(os.path.basename(f.path)) is not None or f.unit is not None]
        with self._lock:
            self._pending = {f.rel: f.size for f, _ in due}
            self._pending.update({f.rel: f.size for f in unsettled})
            self.snap["last_tick"] = time.time()
        refused = len(self._bad_units)
        ok = self._upload(due)
        while ok and self.tier.latest_only and len(self._bad_units) > refused:
            # the newest checkpoint, which latest_only had chosen over the older ones, was refused as corrupt
            # while it went up: choose again now, or the newest good one waits for the next tick (hours)
            refused = len(self._bad_units)
            files, units = self._scan()
            again, still = self._select(files, final=final, units=units, settled=settled)
            again = [(f, s) for f, s in again if f.unit not in self._bad_units]
            with self._lock:
                self._pending.update({f.rel: f.size for f, _ in again})
            unsettled = still
            ok = self._upload(again)
        self._finish_units()
        if self._ckpt_recorded:
            # retention in the default flow: the verified copies just recorded may let older checkpoints go
            self._ckpt_recorded = False
            self.group.prune()
        with self._lock:
            if ok:
                self._attempts = 0
                self._next_attempt = 0.0
                self.snap["last_error"] = None
                self.snap["last_error_kind"] = None
                self.snap["retry_at"] = None
            if self.fatal is None:
                self.snap["state"] = ("watching" if self._watching else
                                      "retrying" if self._next_attempt > time.monotonic() else "idle")
            self.snap["current"] = None
        self.group.persist_status(force=bool(due) or not ok)
        return ok and not unsettled

    def _upload(self, due: list[tuple[LocalFile, str | None]]) -> bool:
        """Upload `due` in order. Returns True when nothing is left but what a daily upload cap defers.

        With ``sync.workers``, checkpoints go through the election first (:meth:`_upload_elected`)."""
        try:
            if self.elect is None:
                self._watching = {}
                return self._upload_plain(due)
            due, ok = self._upload_elected(due)
            if self.fatal is not None:
                return False
            return self._upload_plain(due) and ok
        finally:
            self._forget_pruned()

    def _forget_pruned(self) -> None:
        """What the tier deleted by itself in these uploads (a Hub tier's ``keep``) is no longer a held copy."""
        gone = self.remote.take_deleted()
        if not gone:
            return
        moved = self.ledger.pruned_on_tier(gone)
        files = [r for r in moved if r[-1:] != "/"]
        if files:
            _activity.info("%s: the tier's keep removed %d older file(s) (%s); they no longer count as copies "
                           "this tier holds", self.tier.name, len(files), ", ".join(files[:3])
                           + (", ..." if len(files) > 3 else ""))

    def _upload_plain(self, due: list[tuple[LocalFile, str | None]]) -> bool:
        now = time.time()
        with self._lock:
            self._deferred = {}
            if self._cap_answer_until <= now:
                self._paused_until = self._pause_reason = None
        if not due:
            return True
        with self._lock:
            self.snap["state"] = "uploading"
        if getattr(self.remote, "kind", "") == "hub" and len(due) > 1:
            return self._upload_batch(due)
        complete = True
        deferred: dict[str, int] = {}
        by_cap: dict[str, int] = {}   # deferred by the cap itself (not behind a deferred checkpoint)
        try:
            for f, sha in due:
                if self._stop_evt.is_set():
                    return False
                if f.unit is not None and f.unit in self._bad_units and f.unit in self._skipped:
                    continue   # refused a moment ago in this tick: none of its files goes up
                deps = self._data_of.get(f.path, ())
                if any(d.rel in deferred for d in deps):
                    deferred[f.rel] = f.size   # goes up after its checkpoint, when the cap allows
                    continue
                if any(not self.ledger.unchanged(d.rel, d.size, d.mtime_ns) for d in deps):
                    complete = False
                    continue  # its checkpoint is not up (yet): a remote never holds a manifest without its data
                if self._defer(f):
                    if f.rel not in self._skipped:
                        deferred[f.rel] = by_cap[f.rel] = f.size
                    continue
                try:
                    self._upload_one(f, sha)
                except RemoteUploadCapError as e:
                    # Drive refuses more today: pause (not stop) and try again later
                    self._cap_answered(e)
                    deferred[f.rel] = f.size
                    continue
                except FATAL as e:
                    self._set_fatal(e)
                    return False
                except IntegrityError as e:
                    if f.unit is not None and f.unit in self._units and sha is not None:
                        self._refuse_unit(f)
                        continue
                    # the file changed while it was read: it is picked up again once it settles
                    _activity.info("%s: %s", self.tier.name, e)
                    complete = False
                    continue
                except RemoteError as e:
                    self._record_error(e)
                    self._backoff(e.retry_after)
                    return False
                except FileNotFoundError:
                    with self._lock:
                        self._pending.pop(f.rel, None)
                    continue  # deleted locally (pruned, rotated) before its turn
                except OSError as e:
                    self._record_error(e)
                    self._backoff(None)
                    return False
                except Exception as e:
                    log.exception("%s: uploading %s failed", self.tier.name, f.rel)
                    self._record_error(e)
                    self._backoff(None)
                    return False
            return complete
        finally:
            with self._lock:
                self._deferred = deferred
            self._pause_for_cap(by_cap)

    # -- elected upload (sync.workers; colabkit.elect) ----------------------------------------------
    def _elected_groups(self, due: list[tuple[LocalFile, str | None]]
                        ) -> tuple[dict[str, tuple[int, str, list[tuple[LocalFile, str | None]]]],
                                   list[tuple[LocalFile, str | None]]]:
        """({checkpoint key: (step, its local path, its due files)}, the other due files). A checkpoint is a
        checkpoint folder, or a checkpoint file with its manifest (keyed by the data file)."""
        groups: dict[str, tuple[int, str, list[tuple[LocalFile, str | None]]]] = {}
        rest: list[tuple[LocalFile, str | None]] = []
        for f, sha in due:
            if f.unit is not None:
                u = self._units.get(f.unit)
                if u is None:
                    rest.append((f, sha))
                    continue
                groups.setdefault(f.unit, (u.step, u.path, []))[2].append((f, sha))
                continue
            base = os.path.basename(f.path)
            if f.path.endswith(".json"):
                step, key, data = _step_of(base[:-5]), f.rel[:-5], f.path[:-5]
            else:
                step, key, data = _step_of(base), f.rel, f.path
            if step is None:
                rest.append((f, sha))
                continue
            groups.setdefault(key, (step, data, []))[2].append((f, sha))
        return groups, rest

    def _content_tag(self, key: str, local: str) -> str:
        """What keys a checkpoint's claim: its content (not its manifest, whose timestamps differ per worker)."""
        from .elect import content_tag
        u = self._units.get(key)
        if u is None:
            size = os.stat(local).st_size
            return content_tag(_manifest_sha(local, size) or hash_file(local).sha256)
        import hashlib
        h = hashlib.sha256()
        if u.unit is not None and u.unit.manifest is not None:
            for m in sorted(u.unit.manifest["files"], key=lambda m: m["path"]):
                h.update(f"{m['path']}\0{m['size']}\0{m['sha256']}\n".encode())
        else:
            marker = u.marker()
            for f in sorted(u.files, key=lambda f: f.rel):
                h.update(f"{f.rel[len(key):]}\0{f.size}\n".encode())
                if marker is not None and f.rel == key + marker:
                    h.update(hash_file(f.path).sha256.encode())
        return content_tag(h.hexdigest())

    def _upload_elected(self, due: list[tuple[LocalFile, str | None]]
                        ) -> tuple[list[tuple[LocalFile, str | None]], bool]:
        """Each due checkpoint: record it when another worker's verified copy is on the tier, upload it when
        this worker holds its lease, else leave it pending and look again soon. Returns (the other due
        files, whether nothing elected is left waiting)."""
        groups, rest = self._elected_groups(due)
        watching: dict[str, str] = {}
        ok = True
        for key, (step, local, files) in groups.items():
            if self._stop_evt.is_set():
                return rest, False
            try:
                rkey = self.group.config.remote_path(local)
                tag = self._content_tag(key, local)
                d = self.elect.decide(rkey, tag, step)
                if d.action == "held":
                    if not self._record_held(key, files, by=d.by):
                        watching[key] = "the claimed copy does not verify yet"
                        ok = False
                    else:
                        self.elect.forget(rkey, tag)
                    continue
                if d.action == "wait":
                    watching[key] = d.note
                    ok = False
                    continue
                won = self._upload_claimed(key, rkey, tag, files)
                if won is None:   # another worker's copy won meanwhile
                    with self._lock:
                        self.snap["cancelled"] += 1
                    claim = self.elect.claim_of(rkey, tag) or {}
                    if not self._record_held(key, files, by=claim.get("worker")):
                        watching[key] = "the claimed copy does not verify yet"
                        ok = False
                    continue
                self.elect.forget(rkey, tag)
            except FATAL as e:
                self._set_fatal(e)
                return [], False
            except IntegrityError as e:   # a file changed while it was uploaded: again once it settles
                _activity.info("%s: %s", self.tier.name, e)
                self._backoff(None)
                return rest, False
            except (RemoteError, OSError) as e:
                self._record_error(e)
                self._backoff(getattr(e, "retry_after", None))
                return rest, False
        with self._lock:
            self._watching = watching
        if watching:
            poll = self.elect.poll_interval()
            self._next_due = min(self._next_due, time.monotonic() + poll)
            self._next_attempt = max(self._next_attempt, time.monotonic() + poll)   # a flush looks again then
        return rest, ok

    def _digest_of(self, f: LocalFile, sha: str | None) -> FileDigest:
        return FileDigest(f.size, sha, None) if sha is not None else hash_file(f.path)

    def _record_held(self, key: str, files: list[tuple[LocalFile, str | None]], *, by: Any) -> bool:
        """Record the due files of checkpoint `key` as held when the tier holds exactly their bytes (a
        manifest, whose timestamps differ per worker: the winner's copy of it). False while it does not."""
        from .distributed import FOLDER_MANIFEST
        items, manifests = [], []
        for f, sha in files:
            rp = self.group.config.remote_path(f.path)
            is_manifest = (f.unit is None and f.path.endswith(".json")) or f.rel == (f.unit or "") + FOLDER_MANIFEST
            (manifests if is_manifest else items).append((f, rp, self._digest_of(f, sha) if not is_manifest else None))
        got = self.remote.holds([(Path(f.path), rp, d) for f, rp, d in items]) if items else {}
        if any(got.get(rp) is None for _f, rp, _d in items):
            return False
        mrecs = self.remote.stat_many([rp for _f, rp, _d in manifests]) if manifests else {}
        if any(mrecs.get(rp) is None for _f, rp, _d in manifests):
            return False
        for f, rp, d in items + manifests:
            rec = got.get(rp) or mrecs.get(rp)
            self.ledger.record(f.rel, remote_path=rp, size=rec.size, sha256=rec.sha256 or (d.sha256 if d else None),
                               md5=rec.md5, remote_id=rec.id, local_size=f.size, local_mtime_ns=f.mtime_ns, save=False)
            with self.ledger.lock:
                self.ledger.entries[f.rel]["uploaded_by"] = by
            with self._lock:
                self._pending.pop(f.rel, None)
        self.ledger.save()
        self._ckpt_recorded = True
        with self._lock:
            self.snap["held_by_others"] += 1
        _activity.info("%s: %s is held by the tier (uploaded by worker %s); not uploaded by this one",
                       self.tier.name, key, by)
        return True

    def _upload_claimed(self, key: str, rkey: str, tag: str, files: list[tuple[LocalFile, str | None]]
                        ) -> list[Any] | None:
        """Upload checkpoint `key` under this worker's lease, and claim it (one commit on the Hub). None when
        another worker's claim won first (this upload stopped at a chunk boundary and cleaned up)."""
        from .errors import UploadCancelled
        items, digests, metas = [], {}, []
        for f, sha in files:
            rp = self.group.config.remote_path(f.path)
            d = FileDigest(f.size, sha, None) if sha is not None else hash_file(f.path)
            items.append((Path(f.path), rp))
            digests[rp] = d
            metas.append((f, d))
            self.ledger.begin(f.rel, remote_path=rp, size=f.size, sha256=d.sha256, save=False)
        self.ledger.save()
        claim = self.elect.claim_path(rkey, tag)
        last = [time.monotonic()]

        def progress(_n: int) -> None:   # at each chunk boundary: has another worker's copy won?
            now = time.monotonic()
            if _n == 0 or now - last[0] >= min(1.0, self.elect.poll_interval()):
                last[0] = now
                if self._stop_evt.is_set() or self.elect.claimed(rkey, tag):
                    raise UploadCancelled(f"{self.tier.name}: {key}: another worker's copy won")
        with self._lock:
            self.snap["current"] = key
            self.snap["state"] = "uploading"
        try:
            recs = self.remote.put_claimed(items, claim=claim, record=self.elect.record(key=rkey, tag=tag),
                                           digests=digests, progress=progress)
        except UploadCancelled:
            recs = None
        if recs is None:
            for f, _d in metas:
                self.ledger.abandon(f.rel, save=False)
            self.ledger.save()
            _activity.info("%s: %s: another worker's copy won; this upload stopped", self.tier.name, key)
            return None
        for (f, d), rec in zip(metas, recs):
            self._recorded(f, rec, d.sha256, d)
            with self.ledger.lock:
                self.ledger.entries[f.rel]["uploaded_by"] = self.elect.w.id
        self.ledger.save()
        _activity.info("%s: worker %d uploaded and claimed %s", self.tier.name, self.elect.w.id, key)
        return recs

    # -- a daily upload cap (Drive) ----------------------------------------------------------------
    def _daily_cap(self) -> int | None:
        if getattr(self.remote, "kind", "") != "drive":
            return None
        return self.group.config.drive.daily_upload_cap or None

    def _defer(self, f: LocalFile) -> bool:
        """True when `f` must wait for the daily upload cap (or can never pass it: then it is skipped)."""
        from .config import format_size
        now = time.time()
        if self._cap_answer_until > now:
            return True
        cap = self._daily_cap()
        if cap is None:
            return False
        at = self.ledger.fits_at(f.size, cap, now=now)
        if at is None:
            return False
        if at == float("inf"):
            with self._lock:
                self._pending.pop(f.rel, None)
                self._skipped[f.rel] = f"larger than drive.daily_upload_cap ({format_size(cap)})"
            return True
        return True   # paused after the tick's uploads, which count too (_pause_for_cap)

    def _cap_reason(self, rel: str, size: int, cap: int, now: float) -> str:
        from .config import format_size
        used = self.ledger.uploaded_within(now=now)
        return (f"{format_size(used)} uploaded to this tier in the last 24 h, and {rel} ({format_size(size)}) would "
                f"pass drive.daily_upload_cap ({format_size(cap)}; Drive refuses more than about 750 GB a day); "
                f"uploads go on by themselves then; {_HUB_HINT}")

    def _pause_for_cap(self, waiting: dict[str, int]) -> None:
        """After a tick's uploads: pause until the first of the files that wait for the cap (`waiting`, rel -> size)
        fits. It is counted here, not when the file was deferred: the uploads after it in the tick count too."""
        cap, now = self._daily_cap(), time.time()
        if not waiting or cap is None or self._cap_answer_until > now:
            return   # Drive's own answer rules
        pauses = [(at, rel, size) for rel, size in waiting.items()
                  if (at := self.ledger.fits_at(size, cap, now=now)) is not None and at != float("inf")]
        if pauses:
            at, rel, size = min(pauses, key=lambda p: p[0])   # the first to fit; on a tie, the first in upload order
            self._pause(at, self._cap_reason(rel, size, cap, now))

    def _cap_answered(self, e: RemoteUploadCapError) -> None:
        until = time.time() + (e.retry_after or _CAP_PROBE)
        self._cap_answer_until = until
        with self._lock:
            self._paused_until = None   # Drive's answer rules over our own count
        self._pause(until, f"Drive answered that this account's daily upload cap is reached ({e}); "
                           f"trying again then; {_HUB_HINT}")

    def _pause(self, until: float, reason: str) -> None:
        with self._lock:
            if self._paused_until is not None and self._paused_until <= until:
                return   # an earlier resume time is already known
            self._paused_until, self._pause_reason = until, reason
        # wake up when the first deferred file may go (the tick would otherwise wait for `every`)
        self._next_due = min(self._next_due, time.monotonic() + max(until - time.time(), 0.0) + 1.0)
        if self._pause_logged != (round(until), reason):   # once per pause, not on every tick
            self._pause_logged = (round(until), reason)
            log.warning("%s: paused until %s: %s", self.tier.name, _hhmm(until), reason)

    def _digest_for(self, f: LocalFile, sha: str | None) -> tuple[FileDigest | None, str]:
        if sha is not None:
            return None, sha
        d = hash_file(f.path)
        return d, d.sha256

    def _already_held(self, f: LocalFile, sha: str, remote_path: str) -> bool:
        """Skip uploads of content the tier already holds (same sha256), or that an interrupted
        process uploaded before it could record it."""
        led = self.ledger
        if led.verified_copy(f.rel, sha):
            led.touch(f.rel, local_size=f.size, local_mtime_ns=f.mtime_ns)
            led.save()
            return True
        if self._was_inflight(f, sha) and self.remote is not None:
            return self._held_by(f, sha, remote_path, self.remote.stat(remote_path))
        return False

    def _was_inflight(self, f: LocalFile, sha: str) -> bool:
        inf = self.ledger.inflight.get(f.rel)
        return bool(inf and inf.get("sha256") == sha)

    def _held_by(self, f: LocalFile, sha: str, remote_path: str, rec: Any) -> bool:
        """Record `f` as held when the remote's record `rec` (of an upload in flight when a process or an
        attempt was interrupted) is exactly its content."""
        if rec is None or rec.size != f.size or not (rec.sha256 == sha or (rec.sha256 is None and rec.md5)):
            return False
        if rec.sha256 is None:  # only an md5 to compare: check it against the local file
            d = hash_file(f.path)
            if d.md5 != rec.md5 or d.sha256 != sha:
                return False
            # and finish what the interrupted upload left undone (Drive: the sha256 beside the file)
            rec = self.remote.adopt(remote_path, rec, d)
        self.ledger.count_upload(f.rel, rec.size)   # sent by the interrupted process, today most likely
        self.ledger.record(f.rel, remote_path=remote_path, size=rec.size, sha256=sha, md5=rec.md5,
                           remote_id=rec.id, local_size=f.size, local_mtime_ns=f.mtime_ns)
        _activity.info("%s: %s was uploaded before an interruption; verified and recorded", self.tier.name, f.rel)
        if f.unit is not None or _step_of(os.path.basename(f.path)) is not None:
            self._ckpt_recorded = True
        return True

    def _upload_one(self, f: LocalFile, sha_hint: str | None) -> None:
        remote_path = self.group.config.remote_path(f.path)
        digest, sha = self._digest_for(f, sha_hint)
        if self._already_held(f, sha, remote_path):
            with self._lock:
                self._pending.pop(f.rel, None)
            return
        with self._lock:
            self.snap["current"] = f.rel
        self.ledger.begin(f.rel, remote_path=remote_path, size=f.size, sha256=sha)
        rec = self.remote.put(Path(f.path), remote_path, digest=digest,
                              upload_state=self.ledger.upload_state(f.rel))
        if rec.sha256 is not None and rec.sha256 != sha:
            # the manifest and the bytes disagree: do not record (or keep) a copy that is not what it says
            try:
                self.remote.delete(rec.path)
            except Exception as e:   # a copy no manifest vouches for is never a resume candidate: say, carry on
                log.warning("%s: could not remove %s, which does not match its manifest: %s", self.tier.name,
                            rec.path, _fmt_err(e))
            raise IntegrityError(f"{self.tier.name}: {f.rel} does not match its manifest's sha256 "
                                 f"({rec.sha256} vs {sha}); it will be retried when it changes",
                                 path=f.rel, expected=sha, actual=rec.sha256)
        self._recorded(f, rec, sha, digest)

    def _recorded(self, f: LocalFile, rec: Any, sha: str, digest: FileDigest | None) -> None:
        self.ledger.count_upload(f.rel, rec.size)   # towards a daily cap (saved by record())
        self.ledger.record(f.rel, remote_path=rec.path, size=rec.size, sha256=rec.sha256 or sha,
                           md5=rec.md5 or (digest.md5 if digest else None), remote_id=rec.id,
                           local_size=f.size, local_mtime_ns=f.mtime_ns)
        if f.unit is not None or _step_of(os.path.basename(f.path)) is not None:
            self._ckpt_recorded = True
        with self._lock:
            self._pending.pop(f.rel, None)
            self.snap["uploaded"] += 1
            self.snap["uploaded_bytes"] += rec.size
            self.snap["last_upload"] = time.time()
            self.snap["last_uploaded"] = {"path": f.rel, "size": rec.size}
        _activity.info("%s: uploaded %s (%d bytes)", self.tier.name, f.rel, rec.size)

    def _upload_batch(self, due: list[tuple[LocalFile, str | None]]) -> bool:
        """Hub: every file due in this tick in one commit."""
        items, digests, meta = [], {}, []
        try:
            hashed = []
            bad: set[str] = set()
            for f, sha in due:
                remote_path = self.group.config.remote_path(f.path)
                d = hash_file(f.path)
                if sha is not None and d.sha256 != sha and f.unit is not None and f.unit in self._units:
                    self._refuse_unit(f)
                    bad.add(f.unit)
                    continue
                if self.ledger.verified_copy(f.rel, d.sha256):
                    self.ledger.touch(f.rel, local_size=f.size, local_mtime_ns=f.mtime_ns)
                    with self._lock:
                        self._pending.pop(f.rel, None)
                    continue
                hashed.append((f, d, remote_path))
            hashed = [h for h in hashed if h[0].unit not in bad]
            # after a failed attempt every file is in flight: look them all up in one call (retried by the
            # remote), and keep what an earlier attempt did get up
            inflight = [rp for f, d, rp in hashed if self._was_inflight(f, d.sha256)]
            held = self.remote.stat_many(inflight) if inflight else {}
            for f, d, remote_path in hashed:
                if remote_path in held and self._held_by(f, d.sha256, remote_path, held[remote_path]):
                    with self._lock:
                        self._pending.pop(f.rel, None)
                    continue
                items.append((Path(f.path), remote_path))
                digests[remote_path] = d
                meta.append((f, d))
                self.ledger.begin(f.rel, remote_path=remote_path, size=f.size, sha256=d.sha256, save=False)
            self.ledger.save()
            if not items:
                return True
            with self._lock:
                self.snap["current"] = f"{len(items)} files in one commit"
            recs = self.remote.put_many(items, digests=digests)
            for (f, d), rec in zip(meta, recs):
                self._recorded(f, rec, d.sha256, d)
            return True
        except FATAL as e:
            self._set_fatal(e)
        except IntegrityError as e:
            _activity.info("%s: %s", self.tier.name, e)
            self._backoff(None)
        except FileNotFoundError as e:
            if isinstance(e, RemoteError):
                self._record_error(e)
            self._backoff(getattr(e, "retry_after", None))
        except (RemoteError, OSError) as e:
            self._record_error(e)
            self._backoff(getattr(e, "retry_after", None))
        except Exception as e:
            log.exception("%s: uploading %d files failed", self.tier.name, len(items))
            self._record_error(e)
            self._backoff(None)
        return False

    # -- errors ----------------------------------------------------------------------------------
    def _record_error(self, e: BaseException) -> None:
        msg = _fmt_err(e)
        with self._lock:
            self.snap["last_error"] = msg
            self.snap["last_error_at"] = time.time()
            self.snap["last_error_kind"] = error_kind(e)
            self.snap["errors"] += 1
        log.warning("%s: upload failed (will retry): %s", self.tier.name, msg)

    def _backoff(self, retry_after: float | None) -> None:
        sc = self.group.config.sync
        self._attempts += 1
        delay = min(sc.retry_max, sc.retry_initial * (2 ** (self._attempts - 1)))
        delay *= 0.5 + random.random() / 2  # jitter: many tiers/processes do not retry in lockstep
        if retry_after:
            delay = max(delay, float(retry_after))
        self._next_attempt = time.monotonic() + delay
        with self._lock:
            self.snap["state"] = "retrying"
            self.snap["retry_at"] = time.time() + delay

    def _set_fatal(self, e: BaseException) -> None:
        msg = _fmt_err(e)
        self.fatal = msg
        with self._lock:
            self.snap["state"] = "stopped"
            self.snap["last_error"] = msg
            self.snap["last_error_at"] = time.time()
            self.snap["last_error_kind"] = error_kind(e)
            self.snap["errors"] += 1
        log.error("%s: tier stopped: %s", self.tier.name, msg)


# -- a group of tiers watching some folders ------------------------------------------------------
class _Handler:
    """watchdog event handler: tells every tier which path changed."""

    def __init__(self, group: "SyncGroup") -> None:
        self.group = group

    def dispatch(self, event: Any) -> None:
        if getattr(event, "is_directory", False):
            return
        for p in (getattr(event, "src_path", None), getattr(event, "dest_path", None)):
            if p:
                p = os.fsdecode(p)
                for s in self.group.syncers:
                    s.note(p)


_log_handlers: dict[str, list[Any]] = {}   # sync.log path -> [handler, refcount]
_LOGGERS = ("colabkit.sync", "colabkit.sync.activity", "colabkit.retention", "colabkit.ledger")


def _attach_log(path: Path) -> None:
    key = str(path)
    with _registry_lock:
        ent = _log_handlers.get(key)
        if ent:
            ent[1] += 1
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(path, encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
        h.setLevel(logging.INFO)
        for name in _LOGGERS:  # levels are left alone: warnings reach the user's handlers as configured
            logging.getLogger(name).addHandler(h)
        _log_handlers[key] = [h, 1]


def _detach_log(path: Path) -> None:
    key = str(path)
    with _registry_lock:
        ent = _log_handlers.get(key)
        if not ent:
            return
        ent[1] -= 1
        if ent[1] > 0:
            return
        del _log_handlers[key]
        for name in _LOGGERS:
            logging.getLogger(name).removeHandler(ent[0])
        ent[0].close()


def default_paths(config: "Config") -> list[Path]:
    """What ``sync.watch`` names, resolved: each entry under the root and under every experiment folder."""
    out: list[Path] = []
    exp_root = config.root / config.experiments
    exps = sorted(p for p in exp_root.iterdir() if p.is_dir()) if exp_root.is_dir() else []
    for w in config.sync.watch:
        cands = [config.root / w] + [e / w for e in exps]
        out += [c for c in cands if c.exists()]
    return out


class SyncGroup:
    """Syncer threads, one per tier, over a set of watched folders (and an observer feeding them events).

    Build it with :func:`start`; ``stop()`` flushes and joins, and may be called twice.
    """

    def __init__(self, config: "Config", paths: Sequence[str | os.PathLike] | None = None, *,
                 every: float | None = None, tiers: Sequence[str] | None = None,
                 remotes: Mapping[str, "Remote"] | None = None) -> None:
        from .ledger import Ledger
        from .remotes import open_remote
        self.config = config
        root = config.root.resolve()
        if paths is None:
            resolved = default_paths(config)
            if not resolved:
                raise SyncError(f"nothing to watch under {root}: none of {', '.join(config.sync.watch)} exists "
                                "(at the root or in an experiment folder); pass the folders to watch "
                                f"({command('sync start PATH')}) or set sync.watch in colabkit.yaml")
        else:
            resolved = []
            for p in paths:
                q = Path(p).expanduser()
                q = q if q.is_absolute() else root / q
                if not q.exists():
                    raise SyncError(f"cannot watch {q}: no such file or folder; create it or pass another path")
                resolved.append(q)
        self.paths = sorted({Path(os.path.realpath(p)) for p in resolved})
        self.targets = [(str(p), config.remote_path(p) if p != root else "") for p in self.paths]
        self.targets = [(a, "" if r == "." else r) for a, r in self.targets]
        self.key = tuple(str(p) for p in self.paths)
        selected = [config.tier(n) for n in tiers] if tiers else list(config.tiers)
        if not selected:
            raise SyncError("no sync tiers are configured; add a 'tiers:' list to colabkit.yaml "
                            f"(see '{command('config show')}')")
        if every is not None:
            from .config import check_every
            check_every(float(every), key="every")
        remotes = dict(remotes or {})
        self.syncers: list[TierSyncer] = []
        self._skip: set[str] = set()
        for t in selected:
            err = None
            remote = remotes.get(t.name)
            if remote is None:
                try:
                    remote = open_remote(config, t)
                except ColabkitError as e:
                    remote, err = None, e
            rroot = getattr(remote, "root", None)
            if rroot is not None:
                self._skip.add(os.path.realpath(rroot))  # a local tier inside a watched folder
            s = TierSyncer(self, t, remote, Ledger.load(config.state_dir, t.name),
                           every=float(every if every is not None else t.every), open_error=err)
            self.syncers.append(s)
        self.notes: list[str] = []       # what start() has to say (a worker excluded from elections, ...)
        if config.sync.workers is not None:
            from .elect import TierElection
            for s in self.syncers:
                if s.remote is None or s.fatal is not None:
                    continue
                if not getattr(s.remote, "supports_claims", False):
                    note = (f"tier {s.tier.name!r}: elected upload is not available for {s.remote.kind} tiers yet "
                            "(local and hub tiers only); every worker uploads its checkpoints to it")
                    self.notes.append(note)
                    log.warning("%s", note)
                    continue
                s.elect = TierElection(config.sync.workers, s.remote, s.tier.name)
        self.observer: Any = None
        self.poll = bool(config.sync.poll) if config.sync.poll is not None else None
        self._guard_lock = threading.Lock()
        self._prune_lock = threading.Lock()
        self._ckpt_dirs: set[str] = set()
        self._scan_lock = threading.Lock()
        self._stopped = False
        self._stop_result: dict[str, Any] | None = None
        import hashlib
        tag = hashlib.sha1("\0".join(self.key).encode()).hexdigest()[:8]
        self._status_path = config.state_dir / "sync" / f"status-{os.getpid()}-{tag}.json"
        self._status_lock = threading.Lock()
        self._status_written = 0.0
        self.started_at: float | None = None

    # -- paths -----------------------------------------------------------------------------------
    def rel_of(self, path: str) -> str | None:
        for top, rel_top in self.targets:
            if path == top:
                return rel_top
            if path.startswith(top + os.sep):
                rest = path[len(top) + 1:].replace(os.sep, "/")
                if any(part in _SKIP_DIRS or is_temporary(part) for part in rest.split("/")[:-1]):
                    return None
                return f"{rel_top}/{rest}" if rel_top else rest
        return None

    def scan(self) -> list[LocalFile]:
        """Walk and stat the watched folders (each tier filters with its own globs)."""
        return self.scan_units()[0]

    def scan_units(self) -> tuple[list[LocalFile], dict[str, FolderUnit]]:
        """:meth:`scan`, and the checkpoint folders found: a file inside one carries its key in ``unit``.

        A checkpoint folder is the outermost step-named folder below a watched one that holds checkpoint
        files (``v01_step_00001200/``, ``iter_0001200/``, ``checkpoint-1200/``); it is complete when
        :func:`colabkit.distributed.classify_folder` says so (its manifest, or another tool's marker)."""
        from .distributed import classify_folder
        files = list(_scan(self.targets, self._skip))
        roots: dict[str, tuple[str, int] | None] = {}
        looks: dict[str, bool] = {}
        units: dict[str, FolderUnit] = {}
        for f in files:
            d = os.path.dirname(f.path)
            if d not in roots:
                roots[d] = self._unit_root(d, looks)
            r = roots[d]
            if r is None:
                continue
            path, step = r
            rel = self.rel_of(path)
            if rel is None:
                continue
            key = rel + "/"
            u = units.get(key)
            if u is None:
                u = units[key] = FolderUnit(key, path, step, classify_folder(path), [])
            u.files.append(f)
            f.unit = key
        dirs = {os.path.dirname(f.path) for f in files
                if f.unit is None and f.path.endswith(_CKPT_EXTS) and _step_of(os.path.basename(f.path)) is not None}
        dirs |= {os.path.dirname(u.path) for u in units.values()}
        with self._scan_lock:
            self._ckpt_dirs |= dirs
        return files, units

    def _unit_root(self, d: str, looks: dict[str, bool]) -> tuple[str, int] | None:
        """(the checkpoint folder holding folder `d`, its step), or None."""
        from .distributed import folder_step
        for top, _ in self.targets:
            if d == top or not d.startswith(top + os.sep):
                continue
            parts = d[len(top) + 1:].split(os.sep)
            for i, part in enumerate(parts):
                step = folder_step(part)
                if step is None:
                    continue
                cand = os.path.join(top, *parts[:i + 1])
                if cand not in looks:
                    looks[cand] = _looks_like_checkpoint(cand)
                if looks[cand]:
                    return cand, step
            return None
        return None

    def unit_key_of(self, path: str) -> str | None:
        """The checkpoint folder key of the file `path` (for watchdog events), or None."""
        r = self._unit_root(os.path.dirname(path), {})
        if r is None:
            return None
        rel = self.rel_of(r[0])
        return rel + "/" if rel is not None else None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "SyncGroup":
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self._log_path = self.config.state_dir / "logs" / "sync.log"
        _attach_log(self._log_path)
        try:
            for s in self.syncers:
                # before joining: prove write access by publishing the membership record (colabkit.elect)
                if s.elect is not None:
                    note = s.elect.join()
                    if note:
                        self.notes.append(note)
            self.observer = self._make_observer()
        except BaseException:   # nothing started: let go of the log and the remotes, as stop() would
            _detach_log(self._log_path)
            self._close_remotes()
            self._stopped = True
            raise
        self.started_at = time.time()
        for s in self.syncers:
            s.start()
        _activity.info("sync started: %s -> %s", ", ".join(self.key),
                 ", ".join(f"{s.tier.name} every {s.every:g}s" for s in self.syncers))
        self.persist_status(force=True)
        return self

    def _make_observer(self) -> Any:
        try:
            from watchdog.observers.polling import PollingObserver   # (the native observer: _native_observer)
        except ImportError as e:
            from .errors import MissingDependencyError
            raise MissingDependencyError("watchdog", purpose="background sync") from e
        from .runtime import is_network_path
        poll = self.poll if self.poll is not None else any(is_network_path(p) for p in self.paths)
        every = self.config.sync.poll_interval
        try:
            obs = self._watch(PollingObserver(timeout=every) if poll else _native_observer())
        except OSError as e:
            if poll or e.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            # the machine's inotify limits are spent (an editor's file watcher takes thousands): polling sees the
            # same changes, a little later, at the cost of a scan every poll_interval
            note = (f"the folder watch cannot use inotify ({e.strerror}); polling every {every:g}s instead. To watch "
                    "again: sudo sysctl fs.inotify.max_user_watches=524288 fs.inotify.max_user_instances=512")
            log.warning("sync: %s", note)
            self.notes.append(note)
            poll, obs = True, self._watch(PollingObserver(timeout=every))
        self.polling = poll
        return obs

    def _watch(self, obs: Any) -> Any:
        """Schedule the watched paths on `obs` and start it; on an error nothing is left running."""
        obs.name = "colabkit-sync-observer"
        obs.daemon = True
        handler = _Handler(self)
        try:
            for p in self.paths:
                if p.is_dir():
                    obs.schedule(handler, str(p), recursive=True)
                else:
                    obs.schedule(handler, str(p.parent), recursive=False)
            obs.start()
        except BaseException:
            with contextlib.suppress(Exception):
                obs.stop()
                if obs.is_alive():
                    obs.join(10)
            raise
        return obs

    def flush(self, *, timeout: float | None = None, settled: bool = False) -> dict[str, Any]:
        """Upload everything due now in every tier and wait (at most `timeout` seconds).

        `settled`: the caller knows every writer has finished (the training process exited), so logs and
        other files still inside their settle time are uploaded as they are instead of waited for.

        Returns:
            {"ok": bool, "tiers": {name: {"ok", "state", "uploaded", "pending_files", "last_error"}}}
        """
        timeout = self.config.sync.flush_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        reqs = {s.tier.name: s.request_flush(deadline, settled=settled) for s in self.syncers}
        out: dict[str, Any] = {}
        for name, r in reqs.items():
            if r.done.wait(max(deadline - time.monotonic(), 0) + 0.5):
                out[name] = r.result
            else:
                out[name] = {"ok": False, "state": "timeout", "note": f"not finished within {timeout:g}s"}
        self.persist_status(force=True)
        return {"ok": all(v.get("ok") for v in out.values()), "tiers": out}

    def stop(self, *, flush: bool = True, timeout: float | None = None, settled: bool = False) -> dict[str, Any]:
        """Flush (unless ``flush=False``; `settled` as in :meth:`flush`), stop the observer and join every
        thread. Safe to call twice."""
        if self._stopped:
            return self._stop_result or {"ok": True, "tiers": {}}
        if self.started_at is None:   # never started: no thread, observer or log to stop, nothing to flush
            self._stopped = True
            self._close_remotes()
            self._stop_result = {"ok": True, "tiers": {}}
            return self._stop_result
        timeout = self.config.sync.flush_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        result = self.flush(timeout=timeout, settled=settled) if flush else {"ok": True, "tiers": {}}
        self._stopped = True
        for s in self.syncers:
            s.stop_soon()
        if self.observer is not None:
            with contextlib.suppress(Exception):
                self.observer.stop()
            self.observer.join(max(deadline - time.monotonic(), 1.0))
        alive = []
        for s in self.syncers:
            if s.is_alive():
                s.join(max(deadline - time.monotonic(), 1.0))
            if s.is_alive():
                alive.append(s.name)
        for s in self.syncers:
            with contextlib.suppress(Exception):
                s.ledger.save()
        if alive:
            log.error("sync threads still running after stop (an upload in progress): %s", ", ".join(alive))
            result["still_running"] = alive
        with contextlib.suppress(OSError):
            self._status_path.unlink()  # only live processes leave a snapshot for `colabkit sync status`
        with _registry_lock:
            if _registry.get(self.key) is self:
                del _registry[self.key]
        _detach_log(self._log_path)
        self._close_remotes()
        _activity.info("sync stopped: %s", ", ".join(self.key))
        self._stop_result = result
        return result

    def _close_remotes(self) -> None:
        for s in self.syncers:
            if s.remote is not None:
                with contextlib.suppress(Exception):
                    s.remote.close()

    @property
    def running(self) -> bool:
        return not self._stopped and any(s.is_alive() for s in self.syncers)

    # -- guard and status --------------------------------------------------------------------------
    def guard(self) -> None:
        """The disk guard's tick: keep retention.min_free free in every folder holding checkpoints."""
        if not self._guard_lock.acquire(blocking=False):
            return  # another tier is running it right now
        try:
            from . import retention
            with self._scan_lock:
                dirs = sorted(self._ckpt_dirs)
            retention.check(dirs, config=self.config)
        except Exception as e:
            log.warning("disk guard failed: %s", _fmt_err(e))
        finally:
            self._guard_lock.release()

    def prune(self) -> None:
        """Retention after verified uploads: in every folder holding checkpoints, delete those beyond
        ``retention.keep_local`` that the tiers ``retention.require_remote`` names hold verified copies of
        (:func:`colabkit.retention.prune`; the newest ``keep_local`` always stay)."""
        with self._prune_lock:   # tiers finishing at the same moment take turns
            try:
                from . import retention
                with self._scan_lock:
                    dirs = sorted(self._ckpt_dirs)
                for d in dirs:
                    retention.prune(d, config=self.config)
            except Exception as e:
                log.warning("pruning local checkpoints failed: %s", _fmt_err(e))

    def status(self) -> dict[str, Any]:
        from . import retention
        g = retention.guard_status()
        mine = {d: v for d, v in g.items() if d in self._ckpt_dirs}
        return {"running": self.running, "watching": list(self.key), "pid": os.getpid(), "notes": list(self.notes),
                "polling": getattr(self, "polling", None), "started_at": self.started_at,
                "tiers": {s.tier.name: s.snapshot() for s in self.syncers}, "disk": mine}

    def persist_status(self, *, force: bool = False) -> None:
        """Write the snapshot to <root>/.colabkit/sync/status-<pid>.json (for `colabkit sync status` elsewhere)."""
        now = time.monotonic()
        if self._stopped or (not force and now - self._status_written < 1.0):
            return
        with self._status_lock:
            self._status_written = now
            with contextlib.suppress(OSError):
                atomic_write_json(self._status_path, {"format": 1, "time": time.time(), **self.status()})


def _native_observer() -> Any:
    """The folder watch where the platform has one (inotify on Linux): watchdog's ``Observer``."""
    from watchdog.observers import Observer
    return Observer()


# -- the registry and the module-level API --------------------------------------------------------
_registry_lock = threading.RLock()
_registry: dict[tuple[str, ...], SyncGroup] = {}
_hooks_installed = False
_sigterm_installed = False
_prev_sigterm: Any = None


def _groups() -> list[SyncGroup]:
    with _registry_lock:
        return list(_registry.values())


def start(paths: Sequence[str | os.PathLike] | None = None, *, config: "Config | None" = None,
          every: float | None = None, tiers: Sequence[str] | None = None,
          remotes: Mapping[str, "Remote"] | None = None) -> SyncGroup:
    """Start background sync of `paths` (default: ``sync.watch``) to the configured tiers.

    Running it again for the same folders replaces the running syncers (no duplicate threads).

    Args:
        paths: files or folders to watch (relative to the project root, or absolute inside it).
        config: the configuration (default: :func:`colabkit.config.load_config`).
        every: override every selected tier's interval, in seconds.
        tiers: only these tier names (default: all configured tiers).
        remotes: ready-made remotes by tier name instead of :func:`colabkit.remotes.open_remote`
            (wrappers for tests, or remotes the caller already opened).
    Returns:
        The running :class:`SyncGroup`.
    Raises:
        SyncError: nothing to watch, or no tiers; ConfigError: an unknown tier or a path outside the root.
    """
    from .config import load_config
    cfg = config or load_config()
    group = SyncGroup(cfg, paths, every=every, tiers=tiers, remotes=remotes)
    with _registry_lock:
        old = _registry.pop(group.key, None)
    if old is not None:
        _activity.info("sync: replacing the syncers already watching %s", ", ".join(group.key))
        old.stop(flush=False)
    group.start()
    with _registry_lock:
        _registry[group.key] = group
    _install_hooks(cfg)
    return group


def stop(*, flush: bool = True, timeout: float | None = None, settled: bool = False) -> dict[str, Any]:
    """Stop every running sync group (flushing first unless ``flush=False``). Safe to call twice.

    `settled`: every writer has finished (see :meth:`SyncGroup.flush`); the end of a ``%train`` run passes it.

    Returns:
        {"ok": bool, "tiers": {name: flush result}, "stopped": number of groups}
    """
    out: dict[str, Any] = {"ok": True, "tiers": {}, "stopped": 0}
    for g in _groups():
        r = g.stop(flush=flush, timeout=timeout, settled=settled)
        out["ok"] = out["ok"] and r.get("ok", True) and not r.get("still_running")
        out["tiers"].update(r.get("tiers", {}))
        out["stopped"] += 1
    return out


def flush(*, timeout: float | None = None, settled: bool = False) -> dict[str, Any]:
    """Upload everything due now in every running tier and wait (at most `timeout` seconds each group).

    Returns:
        {"ok": bool, "tiers": {name: {"ok", "state", "uploaded", "pending_files", "last_error"}}}
    Raises:
        SyncError: no sync is running.
    """
    groups = _groups()
    if not groups:
        raise SyncError("sync is not running; start it with '%sync start' (or 'colabkit sync once' for one pass)")
    out: dict[str, Any] = {"ok": True, "tiers": {}}
    for g in groups:
        r = g.flush(timeout=timeout, settled=settled)
        out["ok"] = out["ok"] and r["ok"]
        out["tiers"].update(r["tiers"])
    return out


def status(*, config: "Config | None" = None, ledgers: bool = True) -> dict[str, Any]:
    """A snapshot of every tier: state, last upload, next due, pending files/bytes, last error, counts.

    With no sync running in this process it reports what the ledgers hold (``ledger``; skipped with
    ``ledgers=False``, which reads only small status files) and snapshots persisted by sync running in other
    live processes (``elsewhere``), when a configuration is found.

    Returns:
        {"running": bool, "groups": [...], "tiers": {name: {...}}, "disk": {...}, ...}
    """
    groups = _groups()
    out: dict[str, Any] = {"running": bool(groups), "groups": [], "tiers": {}, "disk": {}}
    for g in groups:
        s = g.status()
        out["groups"].append({"watching": s["watching"], "polling": s["polling"], "started_at": s["started_at"]})
        for name, t in s["tiers"].items():
            key = name if name not in out["tiers"] else f"{name}#{len(out['groups'])}"
            out["tiers"][key] = t
        out["disk"].update(s["disk"])
    if groups:
        return out
    try:
        from .config import load_config
        cfg = config or load_config()
    except ColabkitError:
        return out
    from .ledger import Ledger
    if ledgers:
        out["ledger"] = {t.name: Ledger.load(cfg.state_dir, t.name).summary() for t in cfg.tiers}
    elsewhere = []
    d = cfg.state_dir / "sync"
    for p in sorted(d.glob("status-*.json")) if d.is_dir() else []:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            pid = int(data.get("pid", 0))
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and data.get("running"):
            elsewhere.append(data)
    if elsewhere:
        out["elsewhere"] = elsewhere
        for e in elsewhere:
            for name, t in e.get("tiers", {}).items():
                out["tiers"].setdefault(name, {**t, "pid": e.get("pid")})
    return out


def persisted_status(*, config: "Config", pid: int | None = None) -> list[dict[str, Any]]:
    """The snapshots sync wrote to ``<root>/.colabkit/sync/``, those of processes that are gone included: what a
    syncer was doing when its machine was preempted (each tier's ``next_due``, ``last_upload``, pending files).

    Args:
        pid: only the snapshots of this process.
    Returns:
        Snapshots, each with ``live`` (its process still runs), oldest first.
    """
    out = []
    d = config.state_dir / "sync"
    for p in sorted(d.glob("status-*.json")) if d.is_dir() else []:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
            spid = int(data.get("pid", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if pid is not None and spid != pid:
            continue
        try:
            os.kill(spid, 0)
            data["live"] = True
        except OSError:
            data["live"] = False
        out.append(data)
    out.sort(key=lambda d: d.get("time") or 0)
    return out


def once(paths: Sequence[str | os.PathLike] | None = None, *, config: "Config | None" = None,
         tiers: Sequence[str] | None = None, timeout: float | None = None,
         remotes: Mapping[str, "Remote"] | None = None) -> dict[str, Any]:
    """One synchronous pass: upload everything due now to every tier, then return (no threads stay).

    Returns:
        The flush result: {"ok": bool, "tiers": {name: {...}}}.
    """
    from .config import load_config
    cfg = config or load_config()
    group = SyncGroup(cfg, paths, every=None, tiers=tiers, remotes=remotes)
    group.poll = group.poll  # no observer needed for a single pass
    group._make_observer = lambda: None  # type: ignore[method-assign]
    group.start()
    return group.stop(flush=True, timeout=timeout)


class RunSync:
    """Sync for the length of one ``%train`` run: started for the run's folders when the run starts, unless
    ``%sync start`` already watches the project (that group is then only flushed at the end); stopped with a
    settled flush when the run ends (the child has exited: nothing is being written)."""

    def __init__(self, config: "Config", paths: Sequence[str | os.PathLike]) -> None:
        self.config = config
        self.paths = list(paths)
        self._started = False

    def start(self) -> None:
        if status(config=self.config).get("groups"):  # %sync start already watches this project
            return
        start(self.paths, config=self.config)
        self._started = True

    def end(self) -> str | None:
        """Flush (and stop what :meth:`start` started); a warning to show when not everything is up."""
        try:
            if self._started:
                res = stop(flush=True, settled=True)
            elif status(config=self.config).get("groups"):
                res = flush(settled=True)
            else:
                return None
        except ColabkitError as e:
            return f"flushing sync at the end of the run failed: {e}"
        if not res.get("ok", True):
            return f"sync did not upload everything at the end of the run; see '{command('sync status')}'"
        return None


def watch(paths: Sequence[str | os.PathLike] | None = None, *, config: "Config | None" = None,
          every: float | None = None, tiers: Sequence[str] | None = None,
          on_start: Callable[[SyncGroup], None] | None = None, stop_event: threading.Event | None = None
          ) -> dict[str, Any]:
    """Sync in the foreground until Ctrl-C or SIGTERM, then flush (``sync.flush_timeout``) and return.

    Returns:
        The final flush result.
    """
    ev = stop_event or threading.Event()
    group = start(paths, config=config, every=every, tiers=tiers)
    restore = None
    if threading.current_thread() is threading.main_thread():
        prev = signal.getsignal(signal.SIGTERM)

        def _term(signum, frame):  # noqa: ARG001
            ev.set()
        signal.signal(signal.SIGTERM, _term)
        restore = prev
    try:
        if on_start:
            on_start(group)
        while not ev.wait(1.0):
            if not group.running:
                break
    except KeyboardInterrupt:
        pass
    finally:
        result = group.stop(flush=True)
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    return result


# -- exit and SIGTERM -----------------------------------------------------------------------------
def _flush_all_at_exit(timeout: float | None) -> None:
    for g in _groups():
        try:
            g.stop(flush=True, timeout=timeout)
        except Exception as e:  # the interpreter is going away: log and carry on
            log.error("sync: flush at exit failed: %s", _fmt_err(e))


def _atexit() -> None:
    _flush_all_at_exit(None)


def _on_sigterm(signum: int, frame: Any) -> None:
    groups = _groups()
    if groups:
        log.warning("SIGTERM: flushing sync before exit")
        _flush_all_at_exit(None)
    prev = _prev_sigterm
    if callable(prev) and prev is not _on_sigterm:
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # the default action: terminate as SIGTERM would have
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_hooks(cfg: "Config") -> None:
    """One atexit hook per process; a chaining SIGTERM handler, installed once and only from the main thread."""
    global _hooks_installed, _sigterm_installed, _prev_sigterm
    with _registry_lock:
        if not _hooks_installed:
            atexit.register(_atexit)
            _hooks_installed = True
        if not _sigterm_installed and threading.current_thread() is threading.main_thread():
            try:
                prev = signal.getsignal(signal.SIGTERM)
                if prev is not _on_sigterm:
                    _prev_sigterm = prev
                    signal.signal(signal.SIGTERM, _on_sigterm)
                _sigterm_installed = True
            except (ValueError, OSError):
                pass
