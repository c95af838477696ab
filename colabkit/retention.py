"""Retention of local checkpoints and the disk guard.

Rule: the newest ``retention.keep_local`` checkpoints stay; an older one is deleted only when the ledger of
every tier named in ``retention.require_remote`` (default: at least one configured tier) holds a verified
copy with the same sha256. Its sidecar manifest goes with it. A checkpoint folder (a sharded save, another
tool's DCP / HF / Megatron folder) is one checkpoint: it goes, whole, only when every file of it has a verified
copy in those tiers. The disk guard (:func:`make_room`, called by
the Checkpointer before each save and by the sync engine on every tick) prunes eligible checkpoints, and
when that is not enough it also removes synced checkpoints inside ``keep_local`` (never the newest one);
it never deletes a checkpoint without a verified remote copy, and says so loudly when nothing can go.

Example:
    >>> from colabkit import retention
    >>> retention.prune("experiments/v01/checkpoints")          # -> [Path(...), ...] deleted
    >>> retention.make_room("experiments/v01/checkpoints", 5 * 10**9)   # -> bytes freed
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .fsutil import free_bytes, fsync_dir, hash_file, is_temporary
from .runtime import command

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)
_activity = logging.getLogger("colabkit.sync.activity")  # sync.log while sync runs (see colabkit.sync)

_STEP = re.compile(r"(?:step|iter|iteration|global_step)[_\-]?(\d+)", re.IGNORECASE)
_EXTS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")

#: the last disk-guard verdict per folder (read by colabkit.sync.status())
_guard_lock = threading.Lock()
_guard: dict[str, dict[str, Any]] = {}
_REWARN = 600.0  # repeat an unchanged 'nothing can be deleted' warning at most this often


def guard_status() -> dict[str, dict[str, Any]]:
    """The disk guard's last verdict per folder: state ok | pruned | blocked, free bytes, message, time."""
    with _guard_lock:
        return {k: dict(v) for k, v in _guard.items()}


def _note(directory: Path, state: str, free: int, message: str, **extra: Any) -> None:
    with _guard_lock:
        _guard[str(directory)] = {"state": state, "free": free, "message": message, "time": time.time(), **extra}


def step_of(name: str) -> int | None:
    """The step a checkpoint name carries (checkpoints.step_of when available)."""
    try:
        from .checkpoints import step_of as _step_of
        return _step_of(name)
    except ImportError:  # pragma: no cover - checkpoints.py missing
        n = os.path.basename(name)
        if is_temporary(n) or not n.lower().endswith(_EXTS):
            return None
        m = _STEP.search(n)
        return int(m.group(1)) if m else None


@dataclass
class Candidate:
    """A local checkpoint and what the ledgers say about it."""

    path: Path
    step: int
    size: int
    manifest: Path | None
    relpath: str
    sha256: str | None = None
    held_by: tuple[str, ...] = ()
    eligible: bool = False
    unit: Any = None        # a checkpoint folder: its colabkit.distributed.CheckpointUnit


def units(directory: str | os.PathLike) -> list[tuple[Path, int, Any]]:
    """The checkpoints directly in `directory`, files and folders, oldest step first: (path, step, unit or None).

    A folder (a sharded save, another tool's DCP / HF / Megatron folder) is one checkpoint
    (:func:`colabkit.distributed.discover_units`); a folder under a temporary name, or without its manifest
    or marker, is none."""
    out: list[tuple[Path, int, Any]] = [(p, s, None) for p, s in checkpoints(directory)]
    with contextlib.suppress(OSError):
        if any(e.is_dir(follow_symlinks=False) for e in os.scandir(directory)):
            from .distributed import discover_units
            out += [(u.path, u.step, u) for u in discover_units(directory) if u.is_folder]
    return sorted(out, key=lambda x: (x[1], x[0].name))


def config_for(directory: str | os.PathLike) -> "Config":
    """The configuration governing `directory`: ``COLABKIT_PROJECT_ROOT`` when it contains it, else the first
    folder above it with a colabkit.yaml or a ``.colabkit/ledger``, else the working directory's."""
    from .config import CONFIG_NAME, STATE_DIR, load_config
    d = Path(directory).resolve()
    env = os.environ.get("COLABKIT_PROJECT_ROOT")
    if env:
        r = Path(env).resolve()
        if r == d or r in d.parents:
            return load_config(start=r)
    for p in (d, *d.parents):
        if (p / CONFIG_NAME).is_file() or (p / STATE_DIR / "ledger").is_dir():
            cfg = load_config(start=p)
            return cfg
    return load_config()


def checkpoints(directory: str | os.PathLike) -> list[tuple[Path, int]]:
    """Checkpoint data files directly in `directory` (not manifests, not temporaries), oldest step first."""
    out = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        with os.scandir(directory) as it:
            for e in it:
                if not e.is_file(follow_symlinks=False) or is_temporary(e.name) or e.name.endswith(".json"):
                    continue
                s = step_of(e.name)
                if s is not None:
                    out.append((Path(e.path), s))
    return sorted(out, key=lambda x: (x[1], x[0].name))


def _required_tiers(config: "Config") -> tuple[tuple[str, ...], bool]:
    """(tier names, all_required): require_remote means all of those; default means any configured tier."""
    req = tuple(config.retention.require_remote)
    if req:
        return req, True
    return tuple(t.name for t in config.tiers), False


def _sha_of(c: Candidate, ledgers: dict[str, Any], st: os.stat_result) -> str | None:
    if c.manifest is not None:
        with contextlib.suppress(OSError, ValueError):
            m = json.loads(c.manifest.read_text(encoding="utf-8"))
            if int(m.get("size", -1)) == st.st_size and m.get("sha256"):
                return str(m["sha256"])
    # a ledger entry recorded with this exact stat was hashed from this very file
    for led in ledgers.values():
        e = led.entries.get(c.relpath)
        if e and e.get("local_size") == st.st_size and e.get("local_mtime_ns") == st.st_mtime_ns:
            return e.get("sha256")
    if any(led.entries.get(c.relpath) for led in ledgers.values()):
        return hash_file(c.path).sha256
    return None  # no tier holds anything under this path: no need to read the file


def _manifest_held(c: Candidate, cfg: "Config", tier: str, led: Any) -> bool:
    """A checkpoint is a unit: a tier that takes manifests holds this one's too (else deleting the checkpoint
    would take the only copy of its manifest with it, e.g. while the manifest's upload is being retried)."""
    if c.manifest is None:
        return True
    from .sync import Patterns
    mrel = c.relpath + ".json"
    try:
        t = cfg.tier(tier)
    except Exception:
        return True
    if not Patterns(t.include, t.exclude)(mrel):
        return True
    e = led.entries.get(mrel)
    if not e:
        return False
    try:
        st = c.manifest.stat()
    except OSError:
        return True   # gone already: nothing of it to lose
    if e.get("local_size") == st.st_size and e.get("local_mtime_ns") == st.st_mtime_ns:
        return True
    return e.get("sha256") == hash_file(c.manifest).sha256


def _folder_held(c: Candidate, cfg: "Config", tier: str, led: Any) -> bool:
    """A tier holds a checkpoint folder when its ledger records the folder complete and every file of it as
    a verified copy of what is on disk now (the sha256 the folder's manifest records, or, for another tool's
    folder, the file as it was when hashed)."""
    from .distributed import FOLDER_MANIFEST
    from .sync import Patterns
    try:
        t = cfg.tier(tier)
    except Exception:
        return False
    if not Patterns(t.include, t.exclude)(c.relpath + ".pt") or not led.entries.get(c.relpath + "/"):
        return False
    unit = c.unit
    want = {f["path"]: f["sha256"] for f in unit.manifest["files"]} if unit.manifest else {}
    names = list(want) + [FOLDER_MANIFEST] if unit.manifest else [n for n, _ in unit.files]
    for name in names:
        e = led.entries.get(f"{c.relpath}/{name}")
        if not e:
            return False
        if name in want:
            if e.get("sha256") != want[name]:
                return False
            continue
        try:
            st = (c.path / name).stat()
        except OSError:
            return False
        if e.get("local_size") == st.st_size and e.get("local_mtime_ns") == st.st_mtime_ns:
            continue
        if e.get("sha256") != hash_file(c.path / name).sha256:
            return False
    return True


def assess(directory: str | os.PathLike, *, config: "Config | None" = None,
           keep: int | None = None) -> list[Candidate]:
    """Every checkpoint in `directory` with the tiers that hold a verified copy, oldest first.

    ``eligible`` is True for those older than the newest `keep` (default ``retention.keep_local``) whose
    copies satisfy ``retention.require_remote``.
    """
    from .ledger import Ledger
    cfg = config or config_for(directory)
    keep = cfg.retention.keep_local if keep is None else max(int(keep), 0)
    names, all_required = _required_tiers(cfg)
    ledgers = {n: Ledger.load(cfg.state_dir, n) for n in names}
    found = units(directory)
    out: list[Candidate] = []
    cut = len(found) - keep
    for i, (p, step, unit) in enumerate(found):
        if unit is not None:   # a folder: every file of it, or it stays
            try:
                rel = cfg.remote_path(p)
            except Exception:
                rel = ""
            c = Candidate(p, step, unit.size, None, rel, unit=unit)
            if rel:
                c.held_by = tuple(n for n, led in ledgers.items() if _folder_held(c, cfg, n, led))
            ok = bool(c.held_by) and (set(names) <= set(c.held_by) if all_required else True)
            c.eligible = ok and i < cut
            c._synced = ok  # type: ignore[attr-defined]
            out.append(c)
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        man = p.with_name(p.name + ".json")
        try:
            rel = cfg.remote_path(p)
        except Exception:  # outside the project: no tier can hold it
            rel = ""
        c = Candidate(p, step, st.st_size, man if man.is_file() else None, rel)
        if rel:
            c.sha256 = _sha_of(c, ledgers, st)
            if c.sha256:
                c.held_by = tuple(n for n, led in ledgers.items() if led.verified_copy(rel, c.sha256)
                                  and _manifest_held(c, cfg, n, led))
        ok = bool(c.held_by) and (set(names) <= set(c.held_by) if all_required else True)
        c.eligible = ok and i < cut
        c._synced = ok  # type: ignore[attr-defined]
        out.append(c)
    return out


def _delete(c: Candidate) -> int:
    if c.unit is not None:
        return _delete_folder(c)
    freed = 0
    try:
        c.path.unlink()
        freed += c.size
    except FileNotFoundError:
        pass
    if c.manifest is not None:
        with contextlib.suppress(FileNotFoundError):
            size = c.manifest.stat().st_size
            c.manifest.unlink()
            freed += size
    fsync_dir(c.path.parent)
    for lg in (log, _activity):
        lg.info("deleted local checkpoint %s (step %d): verified copies in %s", c.path, c.step, ", ".join(c.held_by))
    return freed


def _delete_folder(c: Candidate) -> int:
    """Rename the folder out of its final name first (a crash mid-way never leaves a folder that looks like a
    checkpoint with shards missing; the temporary is removed by the next save's sweep), then remove it."""
    import shutil
    from .fsutil import TMP_PREFIX
    tmp = c.path.with_name(f"{TMP_PREFIX}{c.path.name}.deleting-{os.getpid()}")
    try:
        os.replace(c.path, tmp)
    except FileNotFoundError:
        return 0
    fsync_dir(c.path.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    for lg in (log, _activity):
        lg.info("deleted local checkpoint folder %s (step %d, %d files): verified copies of every file in %s",
                c.path, c.step, len(c.unit.files), ", ".join(c.held_by))
    return c.size


def prune(directory: str | os.PathLike, *, config: "Config | None" = None, keep: int | None = None) -> list[Path]:
    """Delete the checkpoints beyond the newest `keep` that have verified remote copies.

    Args:
        directory: the checkpoint folder.
        config: the configuration (default: found from `directory`, see :func:`config_for`).
        keep: how many of the newest to keep (default ``retention.keep_local``).
    Returns:
        The deleted data files (their manifests went with them).
    """
    removed = []
    for c in assess(directory, config=config, keep=keep):
        if c.eligible:
            _delete(c)
            removed.append(c.path)
    return removed


def make_room(directory: str | os.PathLike, needed: int, *, config: "Config | None" = None) -> int:
    """Free space in `directory` until `needed` bytes are free, deleting only synced checkpoints.

    First the eligible ones (older than ``keep_local``, verified copies), oldest first; if that is not
    enough, synced checkpoints inside ``keep_local`` except the newest. Never one without a verified copy.

    Args:
        directory: the checkpoint folder (the Checkpointer's, or a watched one).
        needed: bytes that should be free afterwards.
        config: the configuration (default: found from `directory`).
    Returns:
        Bytes freed (0 when enough was free already or nothing could be deleted).
    """
    directory = Path(directory)
    free = free_bytes(directory)
    if free >= needed:
        _note(directory, "ok", free, "")
        return 0
    cands = assess(directory, config=config)
    order = [c for c in cands if c.eligible]
    order += [c for c in cands[:-1] if not c.eligible and getattr(c, "_synced", False)]
    freed = 0
    for c in order:
        if free_bytes(directory) >= needed:
            break
        n = _delete(c)
        freed += n
        if n and not c.eligible:
            log.info("disk guard: deleted %s inside retention.keep_local (it has verified copies) to keep %d bytes "
                     "free in %s", c.path.name, needed, directory)
    free = free_bytes(directory)
    if free >= needed:
        _note(directory, "pruned" if freed else "ok", free, f"freed {freed} bytes")
        return freed
    from .config import format_size
    unsynced = [c for c in cands if not getattr(c, "_synced", False)]
    msg = (f"disk guard: {format_size(free)} free in {directory}, {format_size(needed)} needed, and nothing more "
           f"can be deleted: {len(unsynced)} checkpoint(s) have no verified remote copy"
           + (f" ({', '.join(c.path.name for c in unsynced[:3])}{', ...' if len(unsynced) > 3 else ''})"
              if unsynced else "")
           + f"; run '{command('sync flush')}' or free space by hand")
    with _guard_lock:
        prev = _guard.get(str(directory)) or {}
    repeat = prev.get("state") == "blocked" and prev.get("unsynced") == len(unsynced) \
        and time.time() - prev.get("warned", 0) < _REWARN
    # loud, but once per situation (the guard runs on every tick): again when it changes or after a while
    log.log(logging.DEBUG if repeat else logging.WARNING, msg)
    _note(directory, "blocked", free, msg, unsynced=len(unsynced),
          warned=prev.get("warned", 0) if repeat else time.time())
    return freed


def check(directories: Iterable[str | os.PathLike], *, config: "Config") -> dict[str, int]:
    """The guard's tick: for each folder holding checkpoints, keep ``retention.min_free`` bytes free."""
    out = {}
    for d in directories:
        d = Path(d)
        if d.is_dir() and units(d):
            out[str(d)] = make_room(d, config.retention.min_free, config=config)
    return out
