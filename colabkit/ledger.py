"""The persisted ledger of what each sync tier holds, and of uploads still in flight.

One JSON file per tier under ``<root>/.colabkit/ledger/<tier>.json`` (written through
:func:`colabkit.fsutil.atomic_write_json`, so a crash leaves the previous version intact)::

    {"format": 2, "tier": "hub",
     "entries":  {relpath: {"remote_path", "size", "sha256", "md5", "remote_id", "uploaded_at",
                            "local_size", "local_mtime_ns"}},
     "inflight": {relpath: {"remote_path", "size", "sha256", "started_at", "upload": {...} | null}},
     "uploads":  [[time, bytes, relpath], ...]}

``uploads`` (format 2) lists the uploads of the last 24 hours, so a tier with a daily cap (Drive's ~750 GB
per account per rolling day, ``drive.daily_upload_cap``) knows how much it may still send and when the
oldest bytes leave the window; format 1 ledgers (no ``uploads``) are read as having uploaded nothing yet.

``entries`` are verified copies the tier holds (a key ending in ``/`` is a checkpoint folder, recorded once
every file of it is: ``{"files": N, "size": bytes, "sha256": its manifest's}``); ``local_size``/``local_mtime_ns`` are the local file's stat
when it was hashed, so an unchanged file is recognised without reading it again. ``inflight`` records an
upload before it starts: a process killed mid-upload finds it on restart, asks the remote whether the copy
arrived (then adopts it without uploading twice) and otherwise uploads again, handing the remote the saved
resumable-upload state (:meth:`Ledger.upload_state`).

Several processes may write the same ledger (the notebook's syncer and ``colabkit sync watch``): saving
takes an ``fcntl`` lock, re-reads the file and merges by ``uploaded_at`` so neither loses the other's records.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .fsutil import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

FORMAT = 2
LEDGER_DIR = "ledger"
DAY = 86400.0       # the window of ``uploads``


def ledger_path(state_dir: str | os.PathLike, tier: str) -> Path:
    """``<state_dir>/ledger/<tier>.json``."""
    return Path(state_dir) / LEDGER_DIR / f"{tier}.json"


def _uploads(data: dict[str, Any]) -> list[list[Any]]:
    """The well-formed ``uploads`` rows of a ledger's data (none in format 1)."""
    out = []
    for u in data.get("uploads") or []:
        if isinstance(u, list) and len(u) >= 2 and isinstance(u[0], (int, float)) and isinstance(u[1], int):
            out.append([float(u[0]), int(u[1]), str(u[2]) if len(u) > 2 else ""])
    return out


class LedgerUploadState:
    """An :class:`colabkit.remotes.UploadState` kept in the ledger (e.g. a Drive resumable session URI)."""

    def __init__(self, ledger: "Ledger", relpath: str) -> None:
        self.ledger = ledger
        self.relpath = relpath

    def load(self) -> dict[str, Any] | None:
        with self.ledger.lock:
            rec = self.ledger.inflight.get(self.relpath)
            up = rec.get("upload") if rec else None
            return dict(up) if up else None

    def save(self, state: dict[str, Any]) -> None:
        with self.ledger.lock:
            rec = self.ledger.inflight.setdefault(self.relpath, {"started_at": time.time()})
            rec["upload"] = dict(state)
            self.ledger.save()

    def clear(self) -> None:
        with self.ledger.lock:
            rec = self.ledger.inflight.get(self.relpath)
            if rec and rec.get("upload") is not None:
                rec["upload"] = None
                self.ledger.save()


class Ledger:
    """What one tier holds. Thread-safe; every change is persisted by :meth:`save`.

    Example:
        >>> led = Ledger.load(cfg.state_dir, "hub")
        >>> led.verified_copy("experiments/v01/checkpoints/v01_step_00000100.pt", sha)
        {'remote_path': ..., 'sha256': ..., ...}
    """

    def __init__(self, path: Path, tier: str) -> None:
        self.path = Path(path)
        self.tier = tier
        self.entries: dict[str, dict[str, Any]] = {}
        self.inflight: dict[str, dict[str, Any]] = {}
        self.uploads: list[list[Any]] = []              # [time, bytes, relpath] of the last 24 h
        #: files the tier deleted by itself (a Hub tier's ``keep``): not held (retention does not count them),
        #: but not to be uploaded again while the local file is unchanged
        self.pruned: dict[str, dict[str, Any]] = {}
        self._forgotten: set[str] = set()
        self.lock = threading.RLock()

    # -- loading / saving ------------------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: str | os.PathLike, tier: str) -> "Ledger":
        """Read ``<state_dir>/ledger/<tier>.json`` (an empty ledger when it does not exist yet).

        A file that cannot be parsed is set aside as ``<tier>.json.corrupt`` (logged) and an empty ledger
        is used: the worst outcome is that files are verified against the remote again.
        """
        led = cls(ledger_path(state_dir, tier), tier)
        data = led._read()
        led.entries = data.get("entries", {})
        led.inflight = data.get("inflight", {})
        led.uploads = _uploads(data)
        pruned = data.get("pruned", {})
        led.pruned = pruned if isinstance(pruned, dict) else {}
        return led

    def _read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as e:
            log.warning("ledger %s cannot be read (%s); treating it as empty", self.path, e.strerror)
            return {}
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
                raise ValueError("not a ledger")
        except ValueError:
            bad = self.path.with_name(self.path.name + ".corrupt")
            with contextlib.suppress(OSError):
                os.replace(self.path, bad)
            log.warning("ledger %s is corrupt; moved aside to %s, starting empty", self.path, bad)
            return {}
        try:
            fmt = int(data.get("format", 1))
        except (TypeError, ValueError):
            fmt = FORMAT + 1   # not a format this colabkit wrote: keep it as it is
        if fmt > FORMAT:
            # written by a newer colabkit: this one reads what it can (the entries it understands), but saving
            # in its own format would drop what the newer one recorded, so a copy of that file is kept first
            aside = self.path.with_name(f"{self.path.name}.format-{data.get('format')}")
            if not aside.exists():
                with contextlib.suppress(OSError):
                    atomic_write_bytes(aside, raw.encode("utf-8"))
                log.warning("ledger %s has format %s, newer than this colabkit (%s); reading what it can, a copy "
                            "of it is kept as %s for the newer colabkit", self.path, data.get("format"), FORMAT,
                            aside)
        return data

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - not POSIX
                pass
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def save(self) -> None:
        """Merge with what other processes wrote since we read, then write atomically."""
        with self.lock, self._file_lock():
            disk = self._read()
            for rel, e in disk.get("entries", {}).items():
                mine = self.entries.get(rel)
                if rel in self._forgotten and (mine is None):
                    continue
                if mine is None or float(e.get("uploaded_at") or 0) > float(mine.get("uploaded_at") or 0):
                    self.entries[rel] = e
            for rel, e in (disk.get("pruned") or {}).items():
                if rel not in self.pruned and rel not in self.entries:
                    self.pruned[rel] = e
            for rel in [r for r, p in self.pruned.items() if float((self.entries.get(r) or {}).get("uploaded_at")
                                                                   or 0) > float(p.get("pruned_at") or 0)]:
                del self.pruned[rel]   # uploaded again since the tier deleted it
            # the uploads of every process writing this ledger count towards the same cap
            seen = {tuple(u) for u in self.uploads}
            self.uploads += [u for u in _uploads(disk) if tuple(u) not in seen]
            since = time.time() - DAY
            self.uploads = sorted(u for u in self.uploads if u[0] > since)
            atomic_write_json(self.path, {"format": FORMAT, "tier": self.tier, "entries": self.entries,
                                          "inflight": self.inflight, "uploads": self.uploads,
                                          "pruned": self.pruned})

    # -- queries ---------------------------------------------------------------------------------
    def get(self, relpath: str) -> dict[str, Any] | None:
        with self.lock:
            e = self.entries.get(relpath)
            return dict(e) if e else None

    def verified_copy(self, relpath: str, sha256: str) -> dict[str, Any] | None:
        """The entry when this tier holds a verified copy of `relpath` with exactly this sha256, else None."""
        with self.lock:
            e = self.entries.get(relpath)
            if e and sha256 and e.get("sha256") == sha256:
                return dict(e)
            return None

    def unchanged(self, relpath: str, size: int, mtime_ns: int) -> bool:
        """True when the tier holds `relpath` as it was when last hashed (same local size and mtime), or deleted
        that very copy by itself (:meth:`pruned_on_tier`): either way there is nothing to upload."""
        e = self.entries.get(relpath) or self.pruned.get(relpath)
        return bool(e) and e.get("local_size") == size and e.get("local_mtime_ns") == mtime_ns

    def pruned_on_tier(self, remote_paths: Sequence[str]) -> list[str]:
        """The tier deleted these paths by itself (a Hub tier's ``keep``): their entries stop counting as held
        copies (retention and the disk guard go by them) and are kept aside, so the unchanged local files are not
        uploaded again. A checkpoint folder whose every file went loses its folder entry too. Returns the
        relpaths set aside."""
        gone = set(remote_paths)
        if not gone:
            return []
        with self.lock:
            now = time.time()
            moved = [rel for rel, e in self.entries.items() if e.get("remote_path") in gone and rel[-1:] != "/"]
            for rel in moved:
                self.pruned[rel] = {**self.entries.pop(rel), "pruned_at": now}
                self._forgotten.add(rel)
            for key in [k for k in self.entries if k[-1:] == "/"]:
                if any(rel.startswith(key) for rel in moved) and not any(r.startswith(key) and r != key
                                                                         for r in self.entries):
                    self.pruned[key] = {**self.entries.pop(key), "pruned_at": now}
                    self._forgotten.add(key)
                    moved.append(key)
            if moved:
                self.save()
            return moved

    def summary(self) -> dict[str, Any]:
        with self.lock:
            files = {k: e for k, e in self.entries.items() if not k.endswith("/")}   # "<rel>/": a checkpoint folder
            return {"files": len(files), "bytes": sum(int(e.get("size") or 0) for e in files.values()),
                    "folders": len(self.entries) - len(files),
                    "last_upload": max((float(e.get("uploaded_at") or 0) for e in self.entries.values()),
                                       default=None) or None,
                    "inflight": len(self.inflight), "uploaded_24h": self.uploaded_within()}

    def uploaded_within(self, seconds: float = DAY, *, now: float | None = None) -> int:
        """Bytes uploaded to this tier in the last `seconds` (at most a day is kept), by every process."""
        since = (time.time() if now is None else now) - seconds
        with self.lock:
            return sum(int(u[1]) for u in self.uploads if u[0] > since)

    def fits_at(self, size: int, cap: int, *, now: float | None = None) -> float | None:
        """When `size` more bytes fit under a `cap` of bytes per rolling 24 h: None for now, else the time
        (seconds since the epoch) the oldest uploads have left the window; ``inf`` when `size` exceeds `cap`."""
        if size > cap:
            return float("inf")
        now = time.time() if now is None else now
        with self.lock:
            ups = sorted(u for u in self.uploads if u[0] > now - DAY)
        used = sum(int(u[1]) for u in ups)
        if used + size <= cap:
            return None
        for t, n, *_ in ups:
            used -= int(n)
            if used + size <= cap:
                return float(t) + DAY
        return now  # pragma: no cover - size <= cap, so the loop always returns

    # -- changes ---------------------------------------------------------------------------------
    def count_upload(self, relpath: str, nbytes: int, *, at: float | None = None) -> None:
        """Count `nbytes` sent for `relpath` towards the rolling 24 h (saved with the next :meth:`save`)."""
        with self.lock:
            self.uploads.append([time.time() if at is None else float(at), int(nbytes), relpath])

    def begin(self, relpath: str, *, remote_path: str, size: int, sha256: str | None,
              save: bool = True) -> None:
        """Record that an upload of `relpath` starts (kept until :meth:`record` or :meth:`abandon`)."""
        with self.lock:
            prev = self.inflight.get(relpath) or {}
            upload = prev.get("upload") if prev.get("sha256") == sha256 else None
            self.inflight[relpath] = {"remote_path": remote_path, "size": size, "sha256": sha256,
                                      "started_at": time.time(), "upload": upload}
            if save:
                self.save()

    def record(self, relpath: str, *, remote_path: str, size: int, sha256: str | None, md5: str | None,
               remote_id: str | None, local_size: int | None, local_mtime_ns: int | None,
               uploaded_at: float | None = None, save: bool = True) -> dict[str, Any]:
        """Record a verified copy (and drop the in-flight record)."""
        with self.lock:
            e = {"remote_path": remote_path, "size": size, "sha256": sha256, "md5": md5, "remote_id": remote_id,
                 "uploaded_at": uploaded_at if uploaded_at is not None else time.time(),
                 "local_size": local_size, "local_mtime_ns": local_mtime_ns}
            self.entries[relpath] = e
            self.pruned.pop(relpath, None)
            self._forgotten.discard(relpath)
            self.inflight.pop(relpath, None)
            if save:
                self.save()
            return dict(e)

    def touch(self, relpath: str, *, local_size: int, local_mtime_ns: int) -> None:
        """The local file's stat changed but its content is what the tier holds: remember the new stat."""
        with self.lock:
            e = self.entries.get(relpath)
            if e:
                e["local_size"], e["local_mtime_ns"] = local_size, local_mtime_ns

    def abandon(self, relpath: str, *, save: bool = True) -> None:
        with self.lock:
            if self.inflight.pop(relpath, None) is not None and save:
                self.save()

    def forget(self, relpath: str, *, save: bool = True) -> None:
        """Drop the entry for `relpath` (the tier no longer holds it)."""
        with self.lock:
            self.entries.pop(relpath, None)
            self._forgotten.add(relpath)
            if save:
                self.save()

    def upload_state(self, relpath: str) -> LedgerUploadState:
        """The resumable-upload state of `relpath`, for ``remote.put(..., upload_state=...)``."""
        return LedgerUploadState(self, relpath)
