"""Checkpoints: atomic saves with a manifest and a ``latest`` pointer, asynchronous saves, verified loading.

A checkpoint is ``{prefix}_step_{step:08d}.pt`` written to a temporary name (fsync, rename), then its
sidecar manifest ``{file}.json`` (format, step, size, sha256, created, run id, colabkit version), then an
atomic ``latest`` pointer. A checkpoint is complete once its manifest exists; a crash at any moment never
leaves a half-written file under a final name.

Plain ``torch.save`` files whose names carry a step (``model_step_1200.pt``, ``iter_0001200``,
``step-5.pt``) are discovered too and verified by reading them, so users do not have to adopt the helper.

torch is imported only inside the functions that need it: ``import colabkit`` stays light.

Example (inside train.py)::

    from colabkit import Checkpointer
    ckpt = Checkpointer("checkpoints", prefix="v01", keep=3, async_save=True)
    state = ckpt.load_latest()            # None on a fresh start
    start = state["step"] + 1 if state else 0
    for step in range(start, total):
        ...
        if step % 500 == 0:
            ckpt.save(step, {"step": step, "model": model.state_dict(), "optim": opt.state_dict()})
    ckpt.close()                           # waits for the last background write
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .errors import CheckpointError, DiskFullError, IntegrityError, MissingDependencyError, NoCheckpointError
from .fsutil import TMP_PREFIX, atomic_write_json, free_bytes, fsync_dir, is_temporary, start_writeback
from .runtime import command

log = logging.getLogger(__name__)

FORMAT = 1
LATEST = "latest"
MANIFEST_SUFFIX = ".json"
#: extensions a step-named file may carry to count as a checkpoint ("" = no extension, e.g. iter_0001200)
CHECKPOINT_EXTENSIONS = ("", ".pt", ".pth", ".ckpt", ".bin", ".tar")
# a step number: after step/iter/iteration/it, with an optional _ - = separator, not inside a word
_STEP = re.compile(r"(?<![a-z0-9])(?:global_step|step|iteration|iter|it)[_\-=]?(\d+)(?![a-z0-9])", re.IGNORECASE)
_CHUNK = 8 * 1024 * 1024
_KICK = 4 * 1024 * 1024
# a save needs the state's bytes plus the archive's own records; keep a little slack above it
_SLACK = 1 * 1024 * 1024


# -- names -----------------------------------------------------------------------------------------
def is_manifest(name: str | os.PathLike) -> bool:
    """True for a checkpoint's sidecar manifest (``v01_step_00000100.pt.json``)."""
    n = os.path.basename(os.fspath(name))
    return n.endswith(MANIFEST_SUFFIX) and step_of(n[: -len(MANIFEST_SUFFIX)]) is not None


def manifest_path(path: str | os.PathLike) -> Path:
    """The sidecar manifest of checkpoint `path`: the same name plus ``.json``."""
    p = Path(path)
    return p.with_name(p.name + MANIFEST_SUFFIX)


def checkpoint_name(prefix: str, step: int) -> str:
    """``{prefix}_step_{step:08d}.pt``."""
    return f"{prefix}_step_{int(step):08d}.pt"


def step_of(name: str | os.PathLike) -> int | None:
    """The training step a checkpoint file name carries, or None when it is not a checkpoint name.

    Matches ``v01_step_00001200.pt``, ``model_step_1200.pt``, ``iter_0001200``, ``step-5.pth``,
    ``global_step300.ckpt``. Manifests, temporary files and other extensions give None.

    Example:
        >>> step_of("v68_step_1200.pt"), step_of("iter_0001200"), step_of("notes.txt")
        (1200, 1200, None)
    """
    n = os.path.basename(os.fspath(name))
    if not n or is_temporary(n) or n == LATEST:
        return None
    stem, ext = os.path.splitext(n)
    if ext.lower() not in CHECKPOINT_EXTENSIONS:
        # "iter_0001200" has no extension; "step-5.0" style names are not checkpoints
        if not ext[1:].isdigit():
            return None
        stem = n
    matches = _STEP.findall(stem)
    return int(matches[-1]) if matches else None


# -- discovery -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file found on disk.

    Attributes:
        path: the data file.
        step: the step its name (or manifest) carries.
        size: bytes on disk.
        sha256: the hash its manifest records, or None without a (readable) manifest.
        manifest: the manifest's content, or None (a plain ``torch.save`` file).
    """

    path: Path
    step: int
    size: int
    sha256: str | None = None
    manifest: Mapping[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest at `path` (a ``.json`` sidecar), or None when it is missing or not a valid manifest."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str) or not isinstance(data.get("size"), int):
        return None
    return data


def discover(directory: str | os.PathLike) -> list[CheckpointInfo]:
    """Every checkpoint file in `directory` (not recursive), sorted by step ascending.

    Files written by :class:`Checkpointer` carry their manifest; plain ``torch.save`` files whose names
    carry a step are listed with ``manifest=None``. Temporary files, manifests and ``latest`` are skipped.
    Files of the same step sort the manifest-backed and then the most recently modified last.

    Returns:
        A list of :class:`CheckpointInfo` (empty when the folder does not exist).
    """
    d = Path(directory)
    try:
        entries = list(os.scandir(d))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[tuple[tuple, CheckpointInfo]] = []
    for e in entries:
        if is_manifest(e.name):
            continue
        step = step_of(e.name)
        if step is None:
            continue
        try:
            if not e.is_file():
                continue
            st = e.stat()
        except FileNotFoundError:
            continue
        path = d / e.name
        manifest = read_manifest(manifest_path(path))
        if manifest is not None and manifest.get("file", e.name) != e.name:
            manifest = None
        info = CheckpointInfo(path, int(manifest.get("step", step)) if manifest else step, st.st_size,
                              manifest["sha256"] if manifest else None, manifest)
        found.append(((info.step, manifest is not None, st.st_mtime_ns, e.name), info))
    found.sort(key=lambda x: x[0])
    return [info for _, info in found]


def verify(info: CheckpointInfo) -> None:
    """Check a checkpoint's integrity.

    With a manifest: size and sha256 must match it. Without one: a zip-format ``torch.save`` file must pass
    its CRC check (every record read back), an older pickle-format file must load with ``weights_only``.

    A file verified before (a resume fetch hashes while it copies; an earlier verify) carries a record of
    that (:func:`colabkit.fsutil.record_verified`): while the file's size, mtime, inode and device are those
    recorded, its recorded sha256 is compared instead of reading the file again. A successful hash here
    leaves such a record, so each byte is hashed once. A manifest that records block digests (the
    Checkpointer's do) lets a machine with several cores check the blocks in parallel
    (:func:`colabkit.fsutil.first_bad_block`) instead of running one sha256 stream over the whole file.

    Raises:
        IntegrityError: the file is truncated or corrupt; the message says how.
    """
    path = Path(info.path)
    if info.manifest is not None:
        from .fsutil import _identity, hash_file, record_verified, verified_sha256
        try:
            before = os.stat(path)
        except OSError as e:
            raise IntegrityError(f"{path}: cannot be read ({e.strerror or e})", path=str(path)) from e
        known = verified_sha256(path, before)
        if known is not None and known == info.sha256 and before.st_size == info.manifest.get("size"):
            return   # hashed when it was written here or last verified, and not changed since
        want_size = info.manifest.get("size")
        if _verify_blocks(path, before, info):
            return
        try:
            digest = hash_file(path)
            after = os.stat(path)
        except OSError as e:
            raise IntegrityError(f"{path}: cannot be read ({e.strerror or e})", path=str(path)) from e
        if digest.size != want_size:
            raise IntegrityError(f"{path}: {digest.size} bytes, its manifest says {want_size} (truncated or partial)",
                                 path=str(path), expected=str(want_size), actual=str(digest.size))
        if digest.sha256 != info.sha256:
            raise IntegrityError(f"{path}: sha256 {digest.sha256[:12]}... does not match its manifest's "
                                 f"{str(info.sha256)[:12]}... (corrupt)", path=str(path),
                                 expected=info.sha256, actual=digest.sha256)
        if _identity(before) == _identity(after):   # not written to while it was read: remember the hash
            record_verified(path, digest.sha256)
        return
    _refuse_unreadable_manifest(path)
    _verify_plain(path)


def _verify_blocks(path: Path, before: os.stat_result, info: CheckpointInfo) -> bool:
    """Verify `path` by its manifest's block digests on several threads at once. False when that does not
    apply (no block digests, one core, a file of one block, or a size the manifest does not describe: the
    caller then hashes the whole file, whose error says what is wrong)."""
    from .fsutil import _identity, first_bad_block, hash_workers, manifest_blocks, record_verified
    size = info.manifest.get("size")
    blocks = manifest_blocks(info.manifest, size) if isinstance(size, int) else None
    workers = hash_workers()
    if blocks is None or workers < 2 or len(blocks[1]) < 2 or before.st_size != size:
        return False
    block, digests = blocks
    try:
        bad = first_bad_block(path, block, digests, workers=workers)
        after = os.stat(path)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot be read ({e.strerror or e})", path=str(path)) from e
    if bad is not None:
        end = min(size, (bad + 1) * block)
        raise IntegrityError(f"{path}: block {bad + 1} of {len(digests)} (bytes {bad * block}-{end}) does not match "
                             f"its manifest's sha256 (corrupt)", path=str(path), expected=info.sha256)
    if _identity(before) == _identity(after):   # not written to while it was read: remember the verification
        record_verified(path, str(info.sha256))
    return True


def _refuse_unreadable_manifest(path: Path) -> None:
    """A checkpoint whose sidecar manifest exists but cannot be read (truncated, not JSON, not a manifest)
    cannot be verified: refuse it rather than load it as if it had never had one."""
    mp = manifest_path(path)
    if mp.is_file() and read_manifest(mp) is None:
        raise IntegrityError(f"{path}: its manifest {mp.name} is unreadable (truncated or not a colabkit "
                             "manifest), so the checkpoint cannot be verified; restore the manifest, or fetch a "
                             f"verified copy with '{command('resume')}'", path=str(path))


def _verify_plain(path: Path) -> None:
    _refuse_empty(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise IntegrityError(f"{path}: cannot be read ({e.strerror or e})", path=str(path)) from e
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise IntegrityError(f"{path}: not a readable torch.save archive ({e})", path=str(path)) from e
        if bad is not None:
            raise IntegrityError(f"{path}: record {bad} fails its CRC check (corrupt)", path=str(path))
        return
    torch = _torch("verifying a checkpoint")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, RuntimeError...
        raise IntegrityError(f"{path}: does not load ({type(e).__name__}: {_first_line(e)})",
                             path=str(path)) from e


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    s = s.splitlines()[0] if s else type(e).__name__
    # torch's zip errors go on with advice that does not fit a one-line reason
    s = s.split(". This is an internal", 1)[0]
    return s if len(s) <= 200 else s[:197] + "..."


def _torch(purpose: str):
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", purpose=purpose) from None
    return torch


def latest_valid(directory: str | os.PathLike, *, on_reject: Callable[[CheckpointInfo, Exception], None] | None = None
                 ) -> CheckpointInfo | None:
    """The newest checkpoint in `directory` that passes :func:`verify` (older ones are tried in turn)."""
    for info in reversed(discover(directory)):
        try:
            verify(info)
        except IntegrityError as e:
            if on_reject:
                on_reject(info, e)
            continue
        return info
    return None


def load(path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Load one checkpoint, verifying it against its manifest first when it has one.

    Raises:
        IntegrityError: the file does not match its manifest, or does not load.
        FileNotFoundError: no such file.
    """
    p = Path(path)
    if p.is_dir():
        raise NoCheckpointError(f"{p}: is a folder, not a checkpoint file; a sharded checkpoint folder loads "
                                "with Checkpointer.load (check --resume-from / the path given)")
    if not p.is_file():
        raise NoCheckpointError(f"{p}: no such checkpoint file; check --resume-from / the path given")
    m = read_manifest(manifest_path(p))
    if m is not None and m.get("file", p.name) == p.name:
        verify(CheckpointInfo(p, int(m.get("step", step_of(p.name) or 0)), p.stat().st_size, m["sha256"], m))
    elif m is None:
        _refuse_unreadable_manifest(p)
    return _load(p, map_location=map_location, weights_only=weights_only)


def _refuse_empty(path: Path) -> None:
    try:
        empty = os.stat(path).st_size == 0
    except OSError:
        return
    if empty:   # torch would say only "EOFError"
        raise IntegrityError(f"{path}: is empty (0 bytes), not a checkpoint (a save that never wrote it, or a "
                             "copy that failed)", path=str(path))


def _to_memory(storage: Any, location: str) -> Any:
    """map_location for :func:`_load`: a storage of the mapped file, copied into memory of its own."""
    return storage.clone()


def _torch_load(torch: Any, path: Path, *, map_location: Any, weights_only: bool) -> Any:
    """``torch.load``, faster into CPU memory: the archive is mapped and each storage copied once into memory of
    its own (``mmap=True`` with a map_location that clones), where a plain ``torch.load`` reads each record
    through a buffer (256 MB here: ~60 ms instead of ~120 ms). The result is the same: tensors in ordinary
    memory, storages shared as they were saved, nothing left mapped. Anything else (another map_location, a
    file in the older pickle format, a file system that cannot map files) loads the plain way, and so does a file on
    a FUSE or network file system (a mounted Drive): a page that cannot be fetched there would end the process with
    SIGBUS where a read raises an error."""
    from .runtime import is_network_path
    cpu = map_location in ("cpu", None) or (isinstance(map_location, torch.device) and map_location.type == "cpu")
    if cpu and not is_network_path(path):
        try:
            is_zip = zipfile.is_zipfile(path)
        except OSError:
            is_zip = False
        if is_zip:
            try:
                return torch.load(path, map_location=_to_memory, weights_only=weights_only, mmap=True)
            except OSError as e:   # could not map it (some FUSE or network file systems)
                log.debug("%s: cannot be memory-mapped (%s); reading it", path, e)
    return torch.load(path, map_location=map_location, weights_only=weights_only)


def _load(path: Path, *, map_location: Any, weights_only: bool) -> Any:
    _refuse_empty(path)
    torch = _torch("loading a checkpoint")
    import pickle
    try:
        return _torch_load(torch, path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "weights_only" in str(e).lower().replace(" ", "_"):
            # not corruption: the state holds an object weights_only refuses; do not fall back silently
            raise CheckpointError(f"{path}: holds objects that weights_only=True refuses "
                                  f"({_first_line(e)}); save plain tensors/containers, or pass weights_only=False "
                                  "for a file you trust") from e
        raise IntegrityError(f"{path}: does not load ({type(e).__name__}: {_first_line(e)})", path=str(path)) from e
    except (EOFError, RuntimeError, ValueError, zipfile.BadZipFile) as e:
        raise IntegrityError(f"{path}: does not load ({type(e).__name__}: {_first_line(e)})", path=str(path)) from e


def load_latest(directory: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True
                ) -> tuple[CheckpointInfo, Any] | None:
    """Load the newest valid checkpoint in `directory`, falling back to older ones when it is corrupt.

    Returns:
        ``(info, state)``, or None when the folder holds no checkpoint at all.
    Raises:
        NoCheckpointError: checkpoints exist but none is valid (each reason is in the message).
        CheckpointError: the newest loads only with ``weights_only=False``.
    """
    infos = discover(directory)
    if not infos:
        return None
    rejected: list[str] = []
    for i, info in enumerate(reversed(infos)):
        try:
            verify(info)
            state = _load(info.path, map_location=map_location, weights_only=weights_only)
        except IntegrityError as e:
            older = infos[-i - 2].name if i + 1 < len(infos) else None
            log.warning("checkpoint %s is not usable: %s; %s", info.name, e,
                        f"falling back to {older}" if older else "no older checkpoint left")
            rejected.append(f"{info.name}: {e}")
            continue
        if rejected:
            log.warning("resumed from %s (step %d) after skipping %d corrupt or partial checkpoint(s)",
                        info.name, info.step, len(rejected))
        return info, state
    raise NoCheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(rejected)
                            + f"; fetch one from a remote with '{command('resume')}'")


# -- writing ---------------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only file object for torch.save that hashes what it writes (one pass, no read-back): the file's
    sha256, and the sha256 of each :data:`~colabkit.fsutil.BLOCK`-byte block, which lets a reader with several
    cores verify the file in parallel. The blocks of a large write are hashed on a helper thread while this one
    hashes the whole (hashlib releases the GIL): the save takes no longer where a second core is free."""

    def __init__(self, f) -> None:
        from .fsutil import BlockHasher
        self.f = f
        self.sha = hashlib.sha256()
        self.blocks = BlockHasher()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        size = len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes
        helper = None
        if size >= _KICK:
            try:
                helper = threading.Thread(target=self.blocks.update, args=(data,), daemon=True,
                                          name="colabkit-block-hash")
                helper.start()
            except RuntimeError:   # no new thread at interpreter shutdown (an async save finishing): inline
                helper = None
        self.sha.update(data)
        if helper is None:
            self.blocks.update(data)
        else:
            helper.join()
        if size >= _KICK:  # a large record went straight to the file: start its writeback now
            start_writeback(self.f.fileno(), self.size, size)
        self.size += size
        return n

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def _is_no_space(e: BaseException | None) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def _lock(fd: int, *, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows: no stale-file detection, nothing removed
        return not blocking and False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint files left by a writer that died (e.g. killed mid-save).

    A live writer holds a lock on its temporary file, so only abandoned ones are removed.
    """
    removed = []
    d = Path(directory)
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    for e in entries:
        # our temporaries are TMP_PREFIX + final name + "." + random + ".tmp"
        if not e.name.startswith(TMP_PREFIX) or step_of(e.name[len(TMP_PREFIX):].rsplit(".", 2)[0]) is None:
            continue
        try:
            fd = os.open(e.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _lock(fd, blocking=False):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted save in %s", len(removed), d)
    return removed


def _state_nbytes(state: Any) -> int:
    """Bytes of tensor storage in `state` (each storage counted once): what torch.save will write."""
    try:
        import torch
    except ImportError:
        return 0
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in _iter_tensors(state, torch):
        try:
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            total += st.nbytes()
        except (RuntimeError, NotImplementedError):
            total += t.numel() * t.element_size()
    return total


def _iter_tensors(obj: Any, torch, _depth: int = 0) -> Iterator[Any]:
    if _depth > 50:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _iter_tensors(v, torch, _depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_tensors(v, torch, _depth + 1)


class _StoragePool:
    """CPU buffers kept from one async save to the next, so a snapshot copies into memory already mapped
    (fresh allocations cost a page fault per 4 KiB, about as much as the copy itself)."""

    def __init__(self) -> None:
        self._free: dict[tuple[bool, int], list[Any]] = {}
        self._lock = threading.Lock()

    def take(self, torch, nbytes: int, *, pinned: bool):
        with self._lock:
            bucket = self._free.get((pinned, nbytes))
            if bucket:
                return bucket.pop()
        st = torch.UntypedStorage(nbytes)
        return st.pin_memory() if pinned else st

    def give(self, storages: list[Any]) -> None:
        with self._lock:
            for pinned, st in storages:
                self._free.setdefault((pinned, st.nbytes()), []).append(st)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


def snapshot(state: Any) -> Any:
    """A copy of `state` in CPU memory that later changes to the originals cannot touch.

    Tensors are copied storage by storage (tensors sharing a storage still share it in the copy), containers
    are rebuilt, other objects are deep-copied.
    """
    return _snapshot(state, None)[0]


def _snapshot(state: Any, pool: _StoragePool | None) -> tuple[Any, list[Any]]:
    torch = _torch("saving a checkpoint")
    ctx = _SnapContext(torch, pool)
    out = ctx.snap(state, 0)
    if ctx.cuda:
        torch.cuda.synchronize()
    return out, ctx.storages


class _SnapContext:
    def __init__(self, torch, pool: _StoragePool | None) -> None:
        self.torch = torch
        self.pool = pool
        self.memo: dict[Any, Any] = {}
        self.cuda = False
        self.storages: list[tuple[bool, Any]] = []  # (pinned, storage) handed back to the pool after the write

    def snap(self, obj: Any, depth: int) -> Any:
        torch = self.torch
        if depth > 100:
            return copy.deepcopy(obj)
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return obj
        if isinstance(obj, dict):
            new = copy.copy(obj)  # keeps OrderedDict and its _metadata (state_dict versions)
            for k, v in obj.items():
                new[k] = self.snap(v, depth + 1)
            return new
        if isinstance(obj, list):
            return [self.snap(v, depth + 1) for v in obj]
        if isinstance(obj, tuple):
            items = [self.snap(v, depth + 1) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return copy.deepcopy(obj)

    def storage(self, src_st, device) -> Any:
        torch = self.torch
        nbytes = src_st.nbytes()
        pinned = device.type == "cuda"
        if self.pool is not None:
            new_st = self.pool.take(torch, nbytes, pinned=pinned)
        else:
            new_st = torch.UntypedStorage(nbytes)
            if pinned:
                new_st = new_st.pin_memory()
        self.storages.append((pinned, new_st))
        if nbytes:
            # byte views of both storages: tensor copies run on several threads, storage copies on one
            dst = torch.empty((0,), dtype=torch.uint8).set_(new_st, 0, (nbytes,), (1,))
            src = torch.empty((0,), dtype=torch.uint8, device=device).set_(src_st, 0, (nbytes,), (1,))
            dst.copy_(src, non_blocking=pinned)
            self.cuda = self.cuda or pinned
        return new_st

    def tensor(self, t):
        torch = self.torch
        if id(t) in self.memo:
            return self.memo[id(t)]
        src = t.detach()
        try:
            if src.layout != torch.strided or src.is_quantized or getattr(src, "is_nested", False):
                raise TypeError("not a plain dense tensor")
            st = src.untyped_storage()
            key = ("storage", str(src.device), st.data_ptr(), st.nbytes())
            new_st = self.memo.get(key)
            if new_st is None:
                new_st = self.memo[key] = self.storage(st, src.device)
            new = torch.empty((0,), dtype=src.dtype).set_(new_st, src.storage_offset(), src.size(), src.stride())
        except (RuntimeError, NotImplementedError, TypeError):  # sparse, quantized, nested tensors
            new = src.to("cpu", copy=True)
        if isinstance(t, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        self.memo[id(t)] = new
        return new


# module-level bookkeeping: one atexit hook waits for every Checkpointer's background write
_live: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@atexit.register
def _wait_all_at_exit() -> None:
    for c in list(_live):
        try:
            c.wait()
        except Exception as e:  # at exit nobody is left to raise to: make sure it is at least logged
            log.error("the last background checkpoint write failed: %s", e)
    if "colabkit.distributed" in sys.modules:  # then the checkpoint process groups, while the interpreter can
        sys.modules["colabkit.distributed"].release_groups()  # still run their threads (see there)


class Checkpointer:
    """Writes checkpoints atomically with a manifest and a ``latest`` pointer; loads the newest valid one.

    Args:
        directory: the checkpoint folder (default: ``$COLABKIT_CHECKPOINT_DIR``, set by ``%train``, else
            ``./checkpoints``).
        prefix: file name prefix (default: ``$COLABKIT_EXPERIMENT``, else ``ckpt``).
        keep: keep this many checkpoints locally; older ones are pruned through
            ``colabkit.retention.prune``, which never deletes one without a verified remote copy.
        async_save: ``save`` copies the state to CPU memory and returns; a background thread writes it.
        run_id: recorded in each manifest (default: ``$COLABKIT_RUN_ID``, else a new id).
        sharded: save through torch.distributed.checkpoint into a folder of shards on every rank (see
            :mod:`colabkit.distributed`); None (the default) does so when the state holds a DTensor / FSDP2
            shard. Under torch.distributed a replicated state (DDP) is saved by global rank 0 only.

    Example:
        >>> with Checkpointer("ckpt", prefix="v01", async_save=True) as ck:
        ...     ck.save(100, {"w": torch.zeros(3)})
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, prefix: str | None = None,
                 keep: int | None = None, async_save: bool = False, run_id: str | None = None,
                 sharded: bool | None = None) -> None:
        if directory is None:
            directory = os.environ.get("COLABKIT_CHECKPOINT_DIR") or "checkpoints"
        prefix = prefix if prefix is not None else (os.environ.get("COLABKIT_EXPERIMENT") or "ckpt")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise CheckpointError(f"prefix {prefix!r} is not a file name prefix; use e.g. 'v01'")
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise CheckpointError(f"keep={keep!r} must be a whole number >= 1 (or None to keep all)")
        self.directory = Path(directory).expanduser()
        self.prefix = prefix
        self.keep = keep
        self.async_save = bool(async_save)
        if sharded is not None and not isinstance(sharded, bool):
            raise CheckpointError(f"sharded={sharded!r} must be True, False or None (None: when the state holds "
                                  "DTensor shards)")
        self.sharded = sharded
        self._distributed: Any = None  # colabkit.distributed.DistributedSaver, made on the first sharded call
        self.run_id = run_id or os.environ.get("COLABKIT_RUN_ID") or uuid.uuid4().hex[:12]
        self.last_saved: CheckpointInfo | None = None
        self.loaded: CheckpointInfo | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._pool = _StoragePool()
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.directory)
        # e.g. the `latest` pointer's or a manifest's temporary, left by a writer killed mid-rename
        from .fsutil import sweep_temporaries
        sweep_temporaries(self.directory, recursive=False)
        from .distributed import remove_stale_folders
        remove_stale_folders(self.directory)  # a sharded save's folder, left by a rank that died

    # -- paths -------------------------------------------------------------------------------------
    def path_for(self, step: int) -> Path:
        return self.directory / checkpoint_name(self.prefix, step)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint in the folder (see :func:`discover`)."""
        return discover(self.directory)

    def units(self) -> list[Any]:
        """Every checkpoint unit in the folder, files and folders (see :func:`colabkit.distributed.discover_units`)."""
        from .distributed import discover_units
        return discover_units(self.directory)

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int, state: Any) -> Path:
        """Save `state` as checkpoint `step`.

        Synchronous mode returns once the file, its manifest and the pointer are on disk. With
        ``async_save=True`` it waits for the previous write (at most one is in flight), copies the state to
        CPU memory, starts the write in the background and returns.

        Returns:
            The checkpoint's final path.
        Raises:
            DiskFullError: not enough space (the previous checkpoint is intact, no partial file remains).
            CheckpointError: the previous background write failed (raised here, at the next call).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"step={step!r} must be a whole number >= 0")
        if self._closed:
            raise CheckpointError(f"this Checkpointer for {self.directory} is closed; create a new one")
        self.wait()
        from .distributed import is_sharded_state, rank_and_world
        rank, world = rank_and_world()
        if self.sharded or (self.sharded is None and is_sharded_state(state)):
            final = self._sharded().save(step, state, async_save=self.async_save)
            if self.async_save:
                _live.add(self)  # the exit hook waits for the write in flight
            return final
        if world > 1 and rank != 0:
            return self.path_for(step)  # replicated (DDP): rank 0 writes it; no barrier a dead rank could hang
        if not self.async_save:
            return self._write(step, state)
        snap, storages = _snapshot(state, self._pool)
        path = self.path_for(step)
        t = threading.Thread(target=self._background, args=(step, snap, storages), daemon=True,
                             name=f"colabkit-checkpoint-{self.prefix}-{step}")
        with self._lock:
            self._thread = t
        _live.add(self)
        t.start()
        return path

    def _sharded(self):
        if self._distributed is None:
            from .distributed import DistributedSaver
            self._distributed = DistributedSaver(self)
        return self._distributed

    def _background(self, step: int, snap: Any, storages: list[Any]) -> None:
        try:
            self._write(step, snap)
        except BaseException as e:  # kept for the next save()/wait(): never lost
            log.debug("background checkpoint write of step %d failed: %s", step, e)
            with self._lock:
                self._error = e
        finally:
            del snap
            if not self._closed:
                self._pool.give(storages)  # the next snapshot copies into these buffers

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the background write in flight (if any); raise its error if it failed.

        Raises:
            CheckpointError: the write did not finish within `timeout`.
            Exception: the background write's own error (e.g. DiskFullError), raised once.
        """
        with self._lock:
            t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                raise CheckpointError(f"the background checkpoint write did not finish within {timeout}s")
            with self._lock:
                if self._thread is t:
                    self._thread = None
        with self._lock:
            err, self._error = self._error, None
        if self._distributed is not None:
            try:
                self._distributed.wait(timeout)
            except BaseException as e:
                err = err or e
        _live.discard(self)
        if err is not None:
            raise err

    @property
    def busy(self) -> bool:
        """True while a background write is in flight."""
        t = self._thread
        return (t is not None and t.is_alive()) or (self._distributed is not None and self._distributed.busy)

    def close(self) -> None:
        """Wait for the last background write; raise its error. Safe to call twice."""
        try:
            self.wait()
        finally:
            self._closed = True
            self._pool.clear()
            saver, self._distributed = self._distributed, None
            if saver is not None and not saver.busy:
                saver.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # do not hide the exception already propagating
            log.error("background checkpoint write failed: %s", e)

    def _needed(self, state: Any) -> int:
        needed = _state_nbytes(state)
        if self.last_saved is not None:
            needed = max(needed, self.last_saved.size)
        return needed + _SLACK

    def _make_room(self, needed: int) -> None:
        free = free_bytes(self.directory)
        if free >= needed:
            return
        try:
            from . import retention  # the sync engineer's disk guard
            make_room = retention.make_room
        except (ImportError, AttributeError):
            log.warning("only %d bytes free in %s for a checkpoint of about %d bytes (no disk guard available)",
                        free, self.directory, needed)
            return
        try:
            freed = make_room(self.directory, needed)
            log.info("freed %s bytes in %s before saving", freed, self.directory)
        except Exception as e:  # the guard failing must not stop the save itself
            log.warning("could not make room in %s: %s", self.directory, e)

    def _disk_full(self, step: int, needed: int) -> DiskFullError:
        from .config import format_size
        free = free_bytes(self.directory)
        return DiskFullError(
            f"cannot save checkpoint step {step} to {self.directory}: {format_size(free)} free, about "
            f"{format_size(needed)} needed; the previous checkpoint is intact. Free space there "
            f"(old checkpoints are removed only once a remote holds a verified copy: run '{command('sync flush')}') "
            "or point the Checkpointer at a larger disk", path=str(self.directory), free=free, needed=needed)

    def _write(self, step: int, state: Any) -> Path:
        torch = _torch("saving a checkpoint")
        final = self.path_for(step)
        needed = self._needed(state)
        self._make_room(needed)
        fd = -1
        tmp = ""
        w: _HashingWriter | None = None
        try:
            import tempfile
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + final.name + ".", suffix=".tmp", dir=self.directory)
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o644)  # mkstemp's 0600 would differ from a plain torch.save file
            _lock(fd, blocking=True)  # marks the file as being written (see remove_stale_temporaries)
            with os.fdopen(fd, "wb", buffering=_CHUNK, closefd=False) as f:
                w = _HashingWriter(f)
                torch.save(state, w)
                f.flush()
                os.fsync(f.fileno())
            man = manifest_path(final)
            if man.exists():  # re-saving a step: the old manifest must not describe the new file
                man.unlink()
            os.replace(tmp, final)
            tmp = ""
            fsync_dir(self.directory)
            digest_sha, size = w.sha.hexdigest(), w.size
            try:
                manifest = {"format": FORMAT, "step": step, "size": size, "sha256": digest_sha,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "run_id": self.run_id, "colabkit_version": _version(), "file": final.name,
                            "blocks": w.blocks.result()}
                atomic_write_json(man, manifest)
                atomic_write_json(self.directory / LATEST, {"format": FORMAT, "file": final.name, "step": step})
            except BaseException:
                # a save that raises leaves nothing new behind
                with contextlib.suppress(OSError):
                    man.unlink()
                with contextlib.suppress(OSError):
                    final.unlink()
                raise
        except BaseException as e:
            if fd >= 0:  # close first: an unlinked file still holds its space while it is open
                with contextlib.suppress(OSError):
                    os.close(fd)
                fd = -1
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if _is_no_space(e) or (w is not None and _is_no_space(w.error)):
                raise self._disk_full(step, max(needed, (w.size if w else 0) + _SLACK)) from e
            raise
        finally:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        info = CheckpointInfo(final, step, size, digest_sha, manifest)
        self.last_saved = info
        log.debug("saved checkpoint %s (%d bytes)", final, size)
        if self.keep is not None:
            self._prune()
        return final

    def _prune(self) -> None:
        try:
            from . import retention
            prune = retention.prune
        except (ImportError, AttributeError):
            log.debug("colabkit.retention is not available: nothing pruned in %s", self.directory)
            return
        try:
            removed = prune(self.directory, keep=self.keep)
            if removed:
                log.info("pruned %d old checkpoint(s) in %s", len(removed), self.directory)
        except Exception as e:
            log.warning("pruning old checkpoints in %s failed: %s", self.directory, e)

    # -- loading -----------------------------------------------------------------------------------
    def load_latest(self, *, map_location: Any = "cpu", weights_only: bool = True, default: Any = None,
                    state: Any = None) -> Any:
        """The newest valid checkpoint's state, falling back to older ones when it is corrupt or partial.

        Waits for a background write first. The chosen file's info is left in :attr:`loaded`. Under
        torch.distributed every rank calls it: rank 0 picks the newest verified checkpoint and every rank loads
        that one. A checkpoint folder (sharded, DCP) is loaded through DCP into `state`, in place.

        Args:
            state: the state dict a sharded folder is loaded into (e.g. ``{"model": model.state_dict()}``; DCP
                reshards to this world size). Without it a folder's whole state is read into CPU memory.
        Returns:
            The loaded state, or `default` when the folder holds no checkpoint.
        Raises:
            NoCheckpointError: checkpoints exist but none is valid.
        """
        self.wait()
        from .distributed import has_folders, rank_and_world
        if rank_and_world()[1] > 1 or self._distributed is not None or has_folders(self.directory):
            from .distributed import load_latest_unit
            if rank_and_world()[1] > 1:
                unit_found = self._sharded().load_latest(state=state, map_location=map_location,
                                                         weights_only=weights_only)
            else:
                unit_found = load_latest_unit(self.directory, state=state, map_location=map_location,
                                              weights_only=weights_only)
            if unit_found is None:
                self.loaded = None
                return default
            unit, loaded = unit_found
            self.loaded = unit.info()
            return loaded
        found = load_latest(self.directory, map_location=map_location, weights_only=weights_only)
        if found is None:
            self.loaded = None
            return default
        self.loaded, state = found
        return state

    def load(self, path: str | os.PathLike, *, map_location: Any = "cpu", weights_only: bool = True,
             state: Any = None) -> Any:
        """Load one checkpoint (e.g. ``--resume-from PATH``), verified against its manifest if it has one.

        A checkpoint folder (sharded, DCP, safetensors, Megatron) is verified and loaded as
        :meth:`load_latest` does, into `state` for DCP folders; under torch.distributed every rank calls it.
        """
        if Path(path).is_dir():
            from .distributed import load_folder
            return load_folder(path, state=state, map_location=map_location, weights_only=weights_only,
                               saver=self._sharded())
        return load(path, map_location=map_location, weights_only=weights_only)

    def __repr__(self) -> str:
        return f"<Checkpointer {self.directory} prefix={self.prefix!r} keep={self.keep} async={self.async_save}>"


def _version() -> str:
    from . import __version__
    return __version__
