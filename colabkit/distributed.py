"""Checkpoints under torch.distributed: replicated (DDP) and sharded (DCP) saves, and checkpoint folders.

A checkpoint is a *unit*: a file with its sidecar manifest (see :mod:`colabkit.checkpoints`), or a folder.
This module adds the folders:

- colabkit's own sharded checkpoints, ``{prefix}_step_{step:08d}/``, written by every rank through
  ``torch.distributed.checkpoint`` (DCP) under a temporary name, then given a manifest
  (:data:`FOLDER_MANIFEST`: format, step, world size, every file's relative path, size and sha256) by rank 0
  and renamed into place. A folder under a final name is complete; a kill -9 of any rank at any moment leaves
  only a temporary folder, removed by the next run.
- folders other tools wrote: a DCP folder with ``.metadata``, an HF-style folder of ``*.safetensors`` shards
  with an index (or one ``model.safetensors``), Megatron's ``iter_0001200/`` beside
  ``latest_checkpointed_iteration.txt``. They carry no hashes: they are verified by reading them.

:func:`discover_units` lists every unit of a folder (files and folders, by step); :func:`verify_unit` checks one;
:func:`load_unit` loads one. Sync, retention and resume can move to these units (issue 13 section 3).

Under torch.distributed the :class:`~colabkit.checkpoints.Checkpointer` saves a replicated state on global rank 0
only (the other ranks return at once, no barrier) and a sharded state (DTensor / FSDP2, or ``sharded=True``)
through DCP on every rank; ``load_latest`` runs on every rank: rank 0 picks the newest verified unit and tells
the others. Checkpoint collectives go through a process group of their own (gloo), so a background save never
interleaves with the training's collectives.

torch is imported only inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import struct
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import CheckpointError, IntegrityError, NoCheckpointError
from .fsutil import TMP_PREFIX, atomic_write_json, fsync_dir, is_temporary, owner_alive, owner_tag
from .runtime import command

log = logging.getLogger(__name__)

FOLDER_FORMAT = 1
#: the manifest inside a colabkit checkpoint folder; written last, so a folder with one is complete
FOLDER_MANIFEST = "colabkit-manifest.json"
DCP_METADATA = ".metadata"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
_LOCK_NAME = ".colabkit-writing"
#: a temporary folder without its lock file is left alone this long (its writer may be about to take the lock)
_UNLOCKED_STALE_AFTER = 60.0
# the save's token in a temporary folder's name: rank 0's owner tag (see colabkit.fsutil.owner_tag), then a nonce
_TMP_OWNER = re.compile(r"\.([0-9a-f]{8}-\d+-\d+)-[0-9a-f]{6}-\d+$")
_CHUNK = 8 * 1024 * 1024
# HF Trainer's checkpoint-1200; every other step-carrying name goes through checkpoints.step_of
_HF_STEP = re.compile(r"^checkpoint-(\d+)$")
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# -- where are we ----------------------------------------------------------------------------------
def _dist():
    """torch.distributed when it is imported, available and initialized, else None (never imports torch)."""
    mod = sys.modules.get("torch.distributed")
    if mod is None:
        return None
    try:
        return mod if mod.is_available() and mod.is_initialized() else None
    except Exception:  # a torch built without distributed support
        return None


def rank_and_world() -> tuple[int, int]:
    """``(global rank, world size)`` of this process: torch.distributed's when initialized, else ``(0, 1)``."""
    d = _dist()
    if d is None:
        return 0, 1
    return d.get_rank(), d.get_world_size()


def is_sharded_state(state: Any) -> bool:
    """True when `state` holds a DTensor (FSDP2, tensor parallel) or a ShardedTensor anywhere inside."""
    # no import here: a DTensor or ShardedTensor can exist only once its module has been imported
    kinds: list[type] = []
    for module, name in (("torch.distributed.tensor", "DTensor"),
                         ("torch.distributed._shard.sharded_tensor", "ShardedTensor")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            kinds.append(cls)
    if not kinds:
        return False
    kinds_t = tuple(kinds)

    def walk(obj: Any, depth: int) -> bool:
        if depth > 50:
            return False
        if isinstance(obj, kinds_t):
            return True
        if isinstance(obj, Mapping):
            return any(walk(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return any(walk(v, depth + 1) for v in obj)
        sd = getattr(obj, "state_dict", None)  # a Stateful (DCP calls state_dict() on it)
        if callable(sd) and hasattr(obj, "load_state_dict") and depth < 3:
            with contextlib.suppress(Exception):
                return walk(sd(), depth + 1)
        return False

    return walk(state, 0)


# -- units -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointUnit:
    """One checkpoint on disk: a file (with or without its sidecar manifest) or a folder.

    Attributes:
        path: the file or the folder.
        step: the step its manifest or its name carries.
        kind: ``"file"``, ``"folder"`` (colabkit's sharded folder with :data:`FOLDER_MANIFEST`), ``"dcp"``
            (a DCP folder another tool wrote), ``"safetensors"`` (an HF-style folder) or ``"megatron"``.
        size: bytes on disk (a folder: the sum of its files).
        manifest: the manifest's content (a file's sidecar or a folder's), or None.
        files: a folder's files as ``(relative path, size)``, manifest first-listed order; a file: itself.
    """

    path: Path
    step: int
    kind: str
    size: int
    manifest: Mapping[str, Any] | None = None
    files: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_folder(self) -> bool:
        return self.kind != "file"

    @property
    def verified_by_hash(self) -> bool:
        """True when a manifest records every file's sha256 (colabkit wrote it); False for foreign units."""
        return self.manifest is not None

    def info(self):
        """The unit as a :class:`~colabkit.checkpoints.CheckpointInfo` (``sha256`` is None for folders)."""
        from .checkpoints import CheckpointInfo
        sha = self.manifest.get("sha256") if (self.manifest and self.kind == "file") else None
        return CheckpointInfo(self.path, self.step, self.size, sha, self.manifest)


def folder_manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / FOLDER_MANIFEST


def read_folder_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """A checkpoint folder's manifest, or None when it is missing or not a valid folder manifest."""
    try:
        data = json.loads(folder_manifest_path(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or not isinstance(data.get("step"), int):
        return None
    for f in data["files"]:
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str)):
            return None
    return data


def folder_step(name: str) -> int | None:
    """The step a checkpoint folder's name carries (``v01_step_00001200``, ``iter_0001200``,
    ``checkpoint-1200``, ``global_step1200``), or None."""
    from .checkpoints import _STEP
    if not name or is_temporary(name) or name.endswith((".json", ".txt")):
        return None
    m = _HF_STEP.match(name)
    if m:
        return int(m.group(1))
    matches = _STEP.findall(name)  # the whole name: a prefix may hold dots ("v0.1_step_00000100")
    return int(matches[-1]) if matches else None


def _listing(folder: Path) -> tuple[tuple[str, int], ...]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for n in sorted(names):
            p = Path(root) / n
            with contextlib.suppress(OSError):
                out.append((p.relative_to(folder).as_posix(), p.stat().st_size))
    return tuple(out)


def _megatron_tracker(directory: Path) -> int | str | None:
    try:
        text = (directory / MEGATRON_TRACKER).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if text == "release":
        return text
    try:
        return int(text)
    except ValueError:
        return None


def classify_folder(folder: str | os.PathLike, *, any_name: bool = False) -> CheckpointUnit | None:
    """The unit `folder` is, or None when it is not a (complete) checkpoint folder.

    A colabkit folder needs its manifest; a Megatron ``iter_N`` folder needs N <= the iteration in the parent's
    ``latest_checkpointed_iteration.txt`` (Megatron writes it after the save); a DCP folder needs ``.metadata``
    (written last by DCP); an HF-style folder needs its ``*.safetensors`` index or ``model.safetensors``.
    Discovery needs a step in the folder's name; `any_name` (a path given explicitly) takes any name (step 0
    unless the manifest says otherwise).
    """
    folder = Path(folder)
    step = folder_step(folder.name)
    if step is None and any_name and not is_temporary(folder.name):
        step = 0
    if step is None or not folder.is_dir():
        return None
    manifest = read_folder_manifest(folder)
    if manifest is not None:
        files = tuple((f["path"], f["size"]) for f in manifest["files"])
        return CheckpointUnit(folder, int(manifest["step"]), "folder", sum(s for _, s in files), manifest, files)
    if folder.name.startswith("iter_"):
        tracked = _megatron_tracker(folder.parent)
        if tracked is None or (isinstance(tracked, int) and step > tracked):
            return None  # no tracker, or a save Megatron has not finished
        files = _listing(folder)
        return CheckpointUnit(folder, step, "megatron", sum(s for _, s in files), None, files)
    if (folder / DCP_METADATA).is_file():
        files = _listing(folder)
        return CheckpointUnit(folder, step, "dcp", sum(s for _, s in files), None, files)
    if _safetensors_index(folder) is not None or (folder / "model.safetensors").is_file():
        files = _listing(folder)
        return CheckpointUnit(folder, step, "safetensors", sum(s for _, s in files), None, files)
    return None


def listing_kind(name: str, names: Iterable[str], *, tracked: int | str | bool | None = None) -> str | None:
    """The kind of checkpoint folder a tier's listing shows, or None when it is not a complete one.

    The same markers :func:`classify_folder` reads on disk, judged from names alone (a remote tier has no file
    to open): `names` are the paths of the folder's files relative to it (POSIX separators). ``iter_N`` is
    Megatron's only when `tracked` says the parent holds ``latest_checkpointed_iteration.txt`` (its iteration,
    ``"release"``, or True when present but not read) and N is not beyond it.

    Example:
        >>> listing_kind("checkpoint-300", [".metadata", "__0_0.distcp"])
        'dcp'
    """
    step = folder_step(name)
    if step is None:
        return None
    top = {n for n in names if "/" not in n}
    if FOLDER_MANIFEST in top:
        return "folder"
    if name.startswith("iter_"):
        if tracked is None or tracked is False or (isinstance(tracked, int) and not isinstance(tracked, bool)
                                                   and step > tracked):
            return None
        return "megatron"
    if DCP_METADATA in top:
        return "dcp"
    if "model.safetensors" in top or any(n.endswith(".safetensors.index.json") for n in top):
        return "safetensors"
    return None


def discover_units(directory: str | os.PathLike) -> list[CheckpointUnit]:
    """Every checkpoint unit in `directory` (files and folders, not recursive), sorted by step ascending.

    Units of the same step sort the manifest-backed and then the most recently modified last, as
    :func:`colabkit.checkpoints.discover` does for files. Temporary folders are skipped.
    """
    from .checkpoints import discover
    d = Path(directory)
    keyed: list[tuple[tuple, CheckpointUnit]] = []
    for info in discover(d):
        try:
            mtime = info.path.stat().st_mtime_ns
        except OSError:
            continue
        files = ((info.name, info.size),)
        unit = CheckpointUnit(info.path, info.step, "file", info.size, info.manifest, files)
        keyed.append(((unit.step, unit.manifest is not None, mtime, unit.name), unit))
    try:
        entries = list(os.scandir(d))
    except (FileNotFoundError, NotADirectoryError):
        entries = []
    for e in entries:
        try:
            if not e.is_dir():
                continue
            mtime = e.stat().st_mtime_ns
        except OSError:
            continue
        unit = classify_folder(d / e.name)
        if unit is not None:
            keyed.append(((unit.step, unit.manifest is not None, mtime, unit.name), unit))
    keyed.sort(key=lambda x: x[0])
    return [u for _, u in keyed]


# -- verification ----------------------------------------------------------------------------------
def _sha256(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(_CHUNK)
            if not buf:
                break
            h.update(buf)
            size += len(buf)
    return size, h.hexdigest()


def verify_unit(unit: CheckpointUnit) -> None:
    """Check one unit's integrity.

    A file: as :func:`colabkit.checkpoints.verify`. A colabkit folder: every file its manifest lists exists with
    that size and sha256, and DCP's ``.metadata`` is among them. A foreign folder is read: DCP's metadata and every
    byte range it names (each tensor loaded), safetensors headers against the shard sizes and the index, Megatron's
    ``.pt`` files through their CRCs.

    Raises:
        IntegrityError: what is missing, truncated or corrupt, naming the file.
    """
    if unit.kind == "file":
        from .checkpoints import verify
        verify(unit.info())
        return
    if unit.kind == "folder":
        _verify_manifest_folder(unit)
    elif unit.kind == "dcp":
        _verify_dcp(unit.path)
    elif unit.kind == "safetensors":
        _verify_safetensors(unit.path)
    elif unit.kind == "megatron":
        _verify_megatron(unit.path)
    else:
        raise IntegrityError(f"{unit.path}: unknown checkpoint kind {unit.kind!r}", path=str(unit.path))


def _verify_manifest_folder(unit: CheckpointUnit, *, share: tuple[int, int] | None = None) -> None:
    """Every file the manifest lists; with ``share=(rank, world)`` only this rank's share of them (the files are
    dealt out by size, the same way on every rank, so the shares together cover the folder once)."""
    folder = unit.path
    manifest = unit.manifest or {}
    listed = {f["path"] for f in manifest.get("files", [])}
    if manifest.get("kind", "dcp") == "dcp" and DCP_METADATA not in listed:
        raise IntegrityError(f"{folder}: its manifest lists no {DCP_METADATA} (not a complete DCP checkpoint)",
                             path=str(folder))
    files = list(manifest.get("files", []))
    if share is not None:
        rank, world = share
        load = [0] * world
        mine = []
        for f in sorted(files, key=lambda f: (-f["size"], f["path"])):
            r = min(range(world), key=lambda i: (load[i], i))
            load[r] += f["size"]
            if r == rank:
                mine.append(f)
        files = mine
    for f in files:
        rel = f["path"]
        p = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise IntegrityError(f"{folder}: its manifest names {rel!r}, outside the folder", path=str(folder))
        try:
            size, sha = _sha256(p)
        except FileNotFoundError:
            raise IntegrityError(f"{p}: missing (listed in {FOLDER_MANIFEST})", path=str(p)) from None
        except OSError as e:
            raise IntegrityError(f"{p}: cannot be read ({e.strerror or e})", path=str(p)) from e
        if size != f["size"]:
            raise IntegrityError(f"{p}: {size} bytes, its manifest says {f['size']} (truncated or partial)",
                                 path=str(p), expected=str(f["size"]), actual=str(size))
        if sha != f["sha256"]:
            raise IntegrityError(f"{p}: sha256 {sha[:12]}... does not match its manifest's {f['sha256'][:12]}... "
                                 "(corrupt)", path=str(p), expected=f["sha256"], actual=sha)


def _torch(purpose: str):
    from .checkpoints import _torch as t
    return t(purpose)


def _verify_dcp(folder: Path) -> None:
    _torch("verifying a DCP checkpoint")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # a truncated pickle raises EOFError, UnpicklingError...
        raise IntegrityError(f"{folder / DCP_METADATA}: does not load ({type(e).__name__}: {e})",
                             path=str(folder / DCP_METADATA)) from e
    import torch
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        rel = info.relative_path
        p = folder / rel
        if rel not in sizes:
            try:
                sizes[rel] = p.stat().st_size
            except OSError:
                raise IntegrityError(f"{p}: missing (named in {DCP_METADATA})", path=str(p)) from None
        end = info.offset + info.length
        if end > sizes[rel]:
            raise IntegrityError(f"{p}: {sizes[rel]} bytes, {DCP_METADATA} needs {end} (truncated)", path=str(p),
                                 expected=str(end), actual=str(sizes[rel]))
        item = metadata.state_dict_metadata.get(index.fqn)
        if isinstance(item, TensorStorageMetadata) and not getattr(info, "transform_descriptors", None):
            with open(p, "rb") as f:
                f.seek(info.offset)
                raw = f.read(info.length)
            _verify_record(p, index.fqn, raw, torch)


def _verify_record(path: Path, fqn: str, raw: bytes, torch) -> None:
    """One DCP item: a torch.save archive, whose records carry CRCs (torch.load does not check them)."""
    import zipfile
    buf = io.BytesIO(raw)
    try:
        if zipfile.is_zipfile(buf):
            with zipfile.ZipFile(buf) as z:
                bad = z.testzip()
            if bad is not None:
                raise IntegrityError(f"{path}: {fqn} fails its CRC check in record {bad} (corrupt)", path=str(path))
            return
        torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except IntegrityError:
        raise
    except Exception as e:
        raise IntegrityError(f"{path}: {fqn} does not load ({type(e).__name__})", path=str(path)) from e


def _safetensors_index(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.safetensors.index.json"))
    return found[0] if found else None


def _safetensors_header(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise IntegrityError(f"{path}: {size} bytes, too short for a safetensors header (truncated)",
                                     path=str(path))
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise IntegrityError(f"{path}: its header claims {n} bytes, the file has {size} (truncated)",
                                     path=str(path))
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing", path=str(path)) from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: not a readable safetensors file ({type(e).__name__})", path=str(path)) from e
    data = size - 8 - n
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        b, e = meta["data_offsets"]
        end = max(end, e)
    if end != data:
        raise IntegrityError(f"{path}: its tensors need {end} data bytes, the file holds {data} "
                             f"({'truncated' if end > data else 'trailing bytes'})", path=str(path),
                             expected=str(end), actual=str(data))
    header["__data_start__"] = 8 + n
    return header


def _verify_safetensors(folder: Path) -> None:
    index = _safetensors_index(folder)
    if index is None:
        _safetensors_header(folder / "model.safetensors")
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{index}: not a readable safetensors index ({type(e).__name__})",
                             path=str(index)) from e
    headers: dict[str, dict] = {}
    for name, shard in sorted(weight_map.items()):
        if shard not in headers:
            headers[shard] = _safetensors_header(folder / shard)
        if name not in headers[shard]:
            raise IntegrityError(f"{folder / shard}: has no tensor {name!r} (named in {index.name})",
                                 path=str(folder / shard))


def _verify_megatron(folder: Path) -> None:
    from .checkpoints import _verify_plain
    if (folder / DCP_METADATA).is_file():  # Megatron's torch_dist format is DCP
        _verify_dcp(folder)
        return
    pts = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth", ".bin"))
    if not pts:
        raise IntegrityError(f"{folder}: no model_optim_rng.pt (or other .pt) file inside", path=str(folder))
    for p in pts:
        _verify_plain(p)


# -- loading ---------------------------------------------------------------------------------------
def load_unit(unit: CheckpointUnit, *, state: Any = None, map_location: Any = "cpu", weights_only: bool = True,
              process_group: Any = None) -> Any:
    """Load a unit (not verified here: see :func:`verify_unit`).

    Args:
        state: for DCP folders, the state dict to load into, in place (DTensor / FSDP2 entries receive their
            shards, plain tensors the whole tensor: DCP reshards to this world size). Without it the whole state
            is read into CPU memory. Ignored for files.
        process_group: the group DCP's load collectives use (every rank in it must call this); None outside
            torch.distributed.
    Returns:
        The loaded state: `state` itself when given for a DCP folder; a dict of tensors for a safetensors folder;
        for a Megatron folder the one ``.pt`` file's content, or ``{relative path: content}`` when there are several.
    """
    if unit.kind == "file":
        from .checkpoints import _load
        return _load(unit.path, map_location=map_location, weights_only=weights_only)
    if unit.kind in ("folder", "dcp") or (unit.kind == "megatron" and (unit.path / DCP_METADATA).is_file()):
        return _load_dcp(unit.path, state=state, process_group=process_group)
    if unit.kind == "safetensors":
        return _load_safetensors(unit.path)
    from .checkpoints import _load
    pts = sorted(p for p in unit.path.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth", ".bin"))
    loaded = {p.relative_to(unit.path).as_posix(): _load(p, map_location=map_location, weights_only=weights_only)
              for p in pts}
    return next(iter(loaded.values())) if len(loaded) == 1 else loaded


def _load_dcp(folder: Path, *, state: Any, process_group: Any) -> Any:
    _torch("loading a DCP checkpoint")
    import torch.distributed.checkpoint as dcp
    no_dist = _dist() is None
    _quiet_single_process()
    try:
        if state is None:
            # what torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, into memory
            from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
            sd: dict[str, Any] = {}
            _load_state_dict(sd, storage_reader=dcp.FileSystemReader(str(folder)),
                             planner=_EmptyStateDictLoadPlanner(), no_dist=True)
            return sd
        if not isinstance(state, dict):
            raise CheckpointError(f"state={type(state).__name__} cannot receive {folder.name}: pass the state "
                                  "dict to load into, e.g. {'model': model.state_dict(), 'optim': opt.state_dict()}")
        dcp.load(state, checkpoint_id=str(folder), process_group=process_group, no_dist=no_dist)
        return state
    except CheckpointError:
        raise
    except BaseException as e:  # DCP wraps rank failures in CheckpointException (a BaseException)
        if not (isinstance(e, Exception) or _is_dcp_failure(e)):
            raise
        msg = _reason(e)
        if "missing key" in msg.lower() or "size mismatch" in msg.lower() or "shape" in msg.lower():
            raise CheckpointError(f"{folder}: does not fit the state passed in ({msg}); pass a state dict with "
                                  "the keys and shapes that were saved") from e
        raise IntegrityError(f"{folder}: does not load ({msg})", path=str(folder)) from e


def _first_line(e: BaseException) -> str:
    from .checkpoints import _first_line as f
    return f(e)


def _is_dcp_failure(e: BaseException) -> bool:
    return type(e).__name__ == "CheckpointException" and hasattr(e, "failures")


def _reason(e: BaseException) -> str:
    """One line: the exception, or for DCP's CheckpointException each failing rank's own exception."""
    if _is_dcp_failure(e):
        parts = []
        for rank, pair in sorted(e.failures.items()):
            exc = pair[0] if isinstance(pair, tuple) else pair
            parts.append(f"rank {rank}: {type(exc).__name__}: {_first_line(exc)}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {_first_line(e)}"


def _quiet_single_process() -> None:
    """DCP warns on every save and load without an initialized process group, even with ``no_dist=True``
    (for async saves in DCP's own thread, where catch_warnings cannot reach): one process is what was meant."""
    import warnings
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _load_safetensors(folder: Path) -> dict[str, Any]:
    torch = _torch("loading a safetensors checkpoint")
    index = _safetensors_index(folder)
    shards = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
              if index is not None else ["model.safetensors"])
    out: dict[str, Any] = {}
    for shard in shards:
        p = folder / shard
        header = _safetensors_header(p)
        start = header.pop("__data_start__")
        header.pop("__metadata__", None)
        raw = bytearray(p.read_bytes())
        for name, meta in header.items():
            b, e = meta["data_offsets"]
            dtype = getattr(torch, _SAFETENSORS_DTYPES.get(meta["dtype"], ""), None)
            if dtype is None:
                raise CheckpointError(f"{p}: tensor {name!r} has dtype {meta['dtype']}, which colabkit cannot read")
            buf = raw[start + b:start + e]
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(meta["shape"]).clone()
    return out


# -- choosing what to load -------------------------------------------------------------------------
def latest_valid_unit(directory: str | os.PathLike, *,
                      on_reject: Callable[[CheckpointUnit, Exception], None] | None = None) -> CheckpointUnit | None:
    """The newest unit in `directory` that passes :func:`verify_unit` (older ones are tried in turn)."""
    for unit in reversed(discover_units(directory)):
        try:
            verify_unit(unit)
        except IntegrityError as e:
            if on_reject:
                on_reject(unit, e)
            continue
        return unit
    return None


# -- writing under torch.distributed ---------------------------------------------------------------
def remove_stale_folders(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint folders a sharded save left when a rank died (no live writer holds their lock)."""
    from .checkpoints import _lock
    removed: list[Path] = []
    d = Path(directory)
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith(TMP_PREFIX) or not e.is_dir(follow_symlinks=False):
            continue
        # ours are TMP_PREFIX + final name + "." + token + "-" + sequence number
        if folder_step(e.name[len(TMP_PREFIX):].rsplit(".", 1)[0]) is None:
            continue
        lock = Path(e.path) / _LOCK_NAME
        m = _TMP_OWNER.search(e.name)
        owner = owner_alive(m.group(1)) if m else None
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            # the writer died before it took its lock (another rank made the folder first) or after it let go
            # before the rename, or it has just made the folder and is about to lock it: the name says whether
            # the save's rank 0 is gone; where it cannot tell, only an old folder is abandoned
            try:
                if owner is not False and \
                        time.time() - e.stat(follow_symlinks=False).st_mtime < _UNLOCKED_STALE_AFTER:
                    continue
            except OSError:
                continue
            fd = -1
        except OSError:
            continue
        try:
            if fd < 0 or _lock(fd, blocking=False):
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(Path(e.path))
        finally:
            if fd >= 0:
                os.close(fd)
    if removed:
        log.info("removed %d temporary checkpoint folder(s) left by an interrupted save in %s", len(removed), d)
    return removed


#: the savers holding a gloo process group colabkit made; their groups are released by Checkpointer.close() and,
#: for the savers still holding one, before the interpreter exits (checkpoints' exit hook, after the last background
#: write). A gloo worker thread frees a finished collective's tensors a moment after the collective returns, and
#: freeing them needs the interpreter: when a script ends right after a collective (a load, then exit), the thread
#: can meet an interpreter that is already shutting down and the process aborts ("terminate called without an
#: active exception", exit -6: torchrun reports the rank failed). Dropping the last reference to a group joins its
#: threads without holding the GIL, so they finish first. A saver whose write is still in flight keeps its group
#: (joining it could wait for peers that will never come).
_savers: "weakref.WeakSet[DistributedSaver]" = weakref.WeakSet()


def release_groups() -> None:
    """Release the process group of every saver that holds one and has no write in flight."""
    for saver in list(_savers):
        if not saver.busy:
            saver.close()
    import gc
    gc.collect()  # a group held in a reference cycle (a Checkpointer and its saver) is freed now


def _fits(obj: Any, copy: Any, torch: Any, depth: int = 0) -> bool:
    """Whether the staging copy `copy` (made by :func:`_reusing_stager` from an earlier state) can take `obj`:
    the same containers and keys, each tensor's shape and dtype, and for a DTensor its local shape, its mesh
    (the object: the copy is built on it) and its placements. Plain values (a step, a learning rate) may change
    between saves. Run on every async save while training waits: it compares, and allocates nothing."""
    if depth > 64:
        return False
    if isinstance(obj, torch.Tensor):
        if not isinstance(copy, torch.Tensor) or obj.shape != copy.shape or obj.dtype != copy.dtype:
            return False
        local = getattr(obj, "_local_tensor", None)
        mine = getattr(copy, "_local_tensor", None)
        if local is None or mine is None:   # a DTensor's copy is a DTensor, a plain tensor's a plain one
            return local is None and mine is None
        return (copy.device_mesh is obj.device_mesh and tuple(copy.placements) == tuple(obj.placements)
                and mine.shape == local.shape)
    if isinstance(obj, dict):
        return (type(copy) is type(obj) and copy.keys() == obj.keys()
                and all(_fits(v, copy[k], torch, depth + 1) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(copy) is type(obj) and len(copy) == len(obj)
                and all(_fits(v, c, torch, depth + 1) for v, c in zip(obj, copy)))
    return not isinstance(copy, (torch.Tensor, dict, list, tuple))


def _reusing_stager() -> Any:
    """DCP's blocking stager for async saves, keeping its CPU copy of the state from one save to the next.

    DCP's default staging allocates a new CPU copy of the state on every async save (for a CPU DTensor it
    deep-copies each shard, then copies it again into a fresh buffer): page faults and two copies while the
    training loop waits. This stager allocates the copy once and afterwards only copies into it, one memcpy per
    byte; it allocates afresh when the state's structure changes (an optimizer state that appears after the
    first step, a model resharded). Where CUDA is available the copy is pinned, so the device-to-host copy runs
    at full speed. Reuse is safe: a save waits for the previous save's write before it stages again. The cost:
    one CPU copy of this rank's state held for the Checkpointer's lifetime (DCP's staging needs that much memory
    during every save anyway).
    """
    import torch
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    pin = torch.cuda.is_available()

    class Unsupported(Exception):
        pass

    def cpu_empty(shape: tuple[int, ...], dtype: Any) -> Any:
        t = torch.empty(shape, dtype=dtype)
        return t.pin_memory() if pin and t.numel() else t   # an empty tensor cannot be pinned

    def empty_like(obj: Any, depth: int = 0) -> Any:
        # CPU buffers of the same structure. A DTensor's copy is built on the same mesh object (DCP's own
        # _create_cpu_state_dict deep-copies a CPU DTensor, mesh included, which aborted processes at exit) and
        # its local tensor is set afterwards: DTensor.from_local would move a CPU tensor onto a CUDA mesh's GPU
        if depth > 64:
            raise Unsupported("nested too deep")
        if isinstance(obj, dict):
            out = {k: empty_like(v, depth + 1) for k, v in obj.items()}
            return out if type(obj) is dict else _rebuilt(obj, out)
        if isinstance(obj, (list, tuple)):
            items = [empty_like(v, depth + 1) for v in obj]
            return items if type(obj) is list else _rebuilt(obj, items)
        if isinstance(obj, Mapping):
            raise Unsupported(type(obj).__name__)   # DCP copies into dicts only
        if isinstance(obj, torch.Tensor):
            if type(obj).__name__ == "ShardedTensor":
                raise Unsupported("ShardedTensor")   # FSDP1's sharded state: its shards are DCP's to stage
            local = getattr(obj, "_local_tensor", None)
            if local is not None:
                from torch.distributed.tensor import DTensor
                meta = torch.empty(tuple(local.shape), dtype=local.dtype, device="meta")
                d = DTensor.from_local(meta, obj.device_mesh, obj.placements, run_check=False,
                                       shape=obj.shape, stride=obj.stride())
                d._local_tensor = cpu_empty(tuple(local.shape), local.dtype)
                return d
            return cpu_empty(tuple(obj.shape), obj.dtype)
        return obj

    def _rebuilt(like: Any, content: Any) -> Any:
        try:
            return type(like)(content)
        except Exception:   # a namedtuple, a container that cannot be made from its items
            raise Unsupported(type(like).__name__) from None

    class ReusingStager(BlockingAsyncStager):
        def __init__(self) -> None:
            super().__init__(cache_staged_state_dict=True)

        def stage(self, state_dict: Any) -> Any:
            if self.state_dict_cache is None or not _fits(state_dict, self.state_dict_cache, torch):
                self.state_dict_cache = None   # the old copy is freed before the new one is made
                try:
                    self.state_dict_cache = empty_like(state_dict)
                except Unsupported:   # staged DCP's own way, afresh on each save
                    return _copy_state_dict(state_dict, _create_cpu_state_dict(state_dict, pin_memory=pin),
                                            type_check=False)
            return _copy_state_dict(state_dict, self.state_dict_cache, type_check=False)

    return ReusingStager()


class DistributedSaver:
    """The part of a :class:`~colabkit.checkpoints.Checkpointer` that runs under torch.distributed.

    Created on the first save or load, on every rank at the same point (the calls are SPMD): it makes the
    checkpoint process group (gloo), and rank 0 removes stale temporary folders, then broadcasts a token that
    names this run's temporary folders.
    """

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        self.rank, self.world = rank_and_world()
        d = _dist()
        self.group = None
        if d is not None and self.world > 1:
            self.group = d.new_group(backend="gloo")
            _savers.add(self)
        # names the save's rank 0 (boot, pid, start time): a folder it left is known abandoned once it is gone
        token = f"{owner_tag()}-{uuid.uuid4().hex[:6]}"
        if self.rank == 0:
            remove_stale_folders(ckpt.directory)
        if self.group is not None:
            box = [token]
            d.broadcast_object_list(box, src=0, group=self.group)
            token = box[0]
        self.token = token
        self.seq = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._stager: Any = None   # made on the first async save (see _reusing_stager)

    # -- saving ------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, async_save: bool) -> Path:
        """A DCP save of `state` (every rank calls it) into ``{prefix}_step_{step:08d}/``."""
        self.wait()
        self.seq += 1
        final = self.ckpt.directory / f"{self.ckpt.prefix}_step_{int(step):08d}"
        tmp = self.ckpt.directory / f"{TMP_PREFIX}{final.name}.{self.token}-{self.seq}"
        lock_fd = self._begin(tmp)
        try:
            import torch.distributed.checkpoint as dcp
            _quiet_single_process()
            writer = dcp.FileSystemWriter(str(tmp))
            no_dist = self.group is None
            if async_save:
                if self._stager is None:
                    self._stager = _reusing_stager()
                fut = dcp.async_save(state, storage_writer=writer, process_group=self.group, no_dist=no_dist,
                                     async_stager=self._stager)
            else:
                dcp.save(state, storage_writer=writer, process_group=self.group, no_dist=no_dist)
                fut = None
        except BaseException as e:
            self._release(lock_fd)
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception) or _is_dcp_failure(e):
                raise CheckpointError(f"sharded checkpoint step {step} was not saved ({_reason(e)}); the previous "
                                      "checkpoint is intact") from e
            raise
        if fut is None:
            self._finish(step, tmp, final, lock_fd, None)
            return final
        t = threading.Thread(target=self._background, args=(step, tmp, final, lock_fd, fut), daemon=True,
                             name=f"colabkit-sharded-checkpoint-{self.ckpt.prefix}-{step}")
        with self._lock:
            self._thread = t
        t.start()
        return final

    def _begin(self, tmp: Path) -> int:
        """Rank 0 makes the temporary folder and holds a lock inside it for the whole save."""
        if self.rank != 0:
            return -1
        from .checkpoints import _lock
        tmp.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp / _LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
        _lock(fd, blocking=True)
        return fd

    @staticmethod
    def _release(fd: int) -> None:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _background(self, step: int, tmp: Path, final: Path, lock_fd: int, fut: Any) -> None:
        try:
            self._finish(step, tmp, final, lock_fd, fut)
        except BaseException as e:  # kept for the next save()/wait(): never lost
            log.debug("background sharded checkpoint write of step %d failed: %s", step, e)
            with self._lock:
                self._error = e

    def _finish(self, step: int, tmp: Path, final: Path, lock_fd: int, fut: Any) -> None:
        """Once DCP is done on every rank: each rank hashes its own shards, rank 0 writes the manifest, renames
        the folder into place and moves ``latest``; every rank learns the outcome."""
        failure: str | None = None
        digests: list[dict[str, Any]] = []
        try:
            if fut is not None:
                (getattr(fut, "upload_completion", None) or fut).result()
            log.debug("dcp wrote step %d into %s", step, tmp.name)
            digests = self._hash_own(tmp)
        except BaseException as e:
            # DCP's CheckpointException already names every failing rank (and every rank raises the same one)
            failure = _reason(e) if _is_dcp_failure(e) else f"rank {self.rank}: {_reason(e)}"
            if not (isinstance(e, Exception) or _is_dcp_failure(e)):
                raise
        gathered = self._gather((failure, digests))
        outcome: str | None = None
        if self.rank == 0:
            failures = list(dict.fromkeys(f for f, _ in gathered if f))
            if failures:
                outcome = "; ".join(failures)
            else:
                try:
                    self._commit(step, tmp, final, [d for _, ds in gathered for d in ds])
                except Exception as e:
                    outcome = f"rank 0: {_reason(e)}"
            self._release(lock_fd)
            if outcome:
                shutil.rmtree(tmp, ignore_errors=True)
        outcome = self._broadcast(outcome)
        if outcome:
            raise CheckpointError(f"sharded checkpoint step {step} was not saved ({outcome}); the previous "
                                  "checkpoint is intact")
        from .checkpoints import CheckpointInfo
        self.ckpt.last_saved = CheckpointInfo(final, step, 0, None, None)
        log.debug("saved sharded checkpoint %s", final)
        if self.rank == 0 and self.ckpt.keep is not None:
            self.ckpt._prune()   # folders beyond `keep` that the tiers hold verified copies of every file of

    def _hash_own(self, tmp: Path) -> list[dict[str, Any]]:
        """This rank's shards (DCP names them ``__{rank}_{n}.distcp``); rank 0 adds ``.metadata``."""
        mine = []
        names = sorted(os.listdir(tmp))
        for n in names:
            own = n.startswith(f"__{self.rank}_") and n.endswith(".distcp")
            if own or (self.rank == 0 and n == DCP_METADATA):
                size, sha = _sha256(tmp / n)
                mine.append({"path": n, "size": size, "sha256": sha, "rank": self.rank if own else None})
        return mine

    def _gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        d = _dist()
        out = [None] * self.world if self.rank == 0 else None
        d.gather_object(obj, out, dst=0, group=self.group)
        return out or []

    def _broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        _dist().broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _commit(self, step: int, tmp: Path, final: Path, files: list[dict[str, Any]]) -> None:
        from .checkpoints import LATEST, _version
        from .fsutil import _exchange
        listed = {f["path"] for f in files}
        if DCP_METADATA not in listed:
            raise CheckpointError(f"DCP wrote no {DCP_METADATA} into {tmp}")
        absent = sorted(f["path"] for f in files if not (tmp / f["path"]).is_file())
        if absent:  # ranks on other nodes wrote into their own disks' folders
            raise CheckpointError(f"{', '.join(absent)} written by other ranks are not in rank 0's {tmp}: a sharded "
                                  "checkpoint needs a folder every rank shares (one node, or a shared file system)")
        stray = sorted(n for n in os.listdir(tmp) if n not in listed and n != _LOCK_NAME)
        if stray:
            log.debug("files in %s no rank claimed (left out of the manifest): %s", tmp.name, stray)
        manifest = {"format": FOLDER_FORMAT, "kind": "dcp", "step": step, "world_size": self.world,
                    "files": sorted(files, key=lambda f: f["path"]), "size": sum(f["size"] for f in files),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_id": self.ckpt.run_id,
                    "colabkit_version": _version(), "folder": final.name}
        for f in manifest["files"]:
            f.pop("rank", None)
        # the shards were fsynced by DCP; the manifest is written (fsynced) last, then the folder entry
        atomic_write_json(tmp / FOLDER_MANIFEST, manifest)
        with contextlib.suppress(OSError):
            os.unlink(tmp / _LOCK_NAME)
        fsync_dir(tmp)
        if final.exists():  # re-saving a step: swap the new folder in, then remove the old one
            if _exchange(tmp, final):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(final)
                os.replace(tmp, final)
        else:
            os.replace(tmp, final)
        fsync_dir(self.ckpt.directory)
        log.debug("renamed %s into place as %s", tmp.name, final.name)
        atomic_write_json(self.ckpt.directory / LATEST, {"format": 1, "file": final.name, "step": step,
                                                          "kind": "folder"})

    def wait(self, timeout: float | None = None) -> None:
        with self._lock:
            t = self._thread
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                raise CheckpointError(f"the background sharded checkpoint write did not finish within {timeout}s")
            with self._lock:
                if self._thread is t:
                    self._thread = None
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

    @property
    def busy(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def close(self) -> None:
        """Release the checkpoint process group and the async saves' staging copy (after :meth:`wait`); a later
        call makes a new saver."""
        group, self.group = self.group, None
        self._stager = None   # frees the staging copy of the state (see _reusing_stager)
        _savers.discard(self)
        d = _dist()
        if group is not None and d is not None:
            with contextlib.suppress(Exception):  # already destroyed (destroy_process_group() destroys every group)
                d.destroy_process_group(group)

    # -- loading -----------------------------------------------------------------------------------
    def _choose(self) -> tuple[str, Any]:
        """The newest verified unit, the same on every rank: rank 0 lists the units; a colabkit folder is verified
        by every rank hashing its share of the files, anything else by rank 0; the verdicts are shared."""
        units: Any = None
        if self.rank == 0:
            try:
                units = ("ok", discover_units(self.ckpt.directory))
            except Exception as e:
                units = ("error", f"{type(e).__name__}: {_first_line(e)}")
        what, units = self._broadcast(units)
        if what == "error":
            return what, units
        if not units:
            return "empty", None
        rejected: list[str] = []
        for i, unit in enumerate(reversed(units)):
            err = None
            if unit.kind == "folder" or self.rank == 0:
                try:
                    if unit.kind == "folder":
                        _verify_manifest_folder(unit, share=(self.rank, self.world))
                    else:
                        verify_unit(unit)
                except IntegrityError as e:
                    err = str(e)
                except Exception as e:  # an unexpected failure must not leave the other ranks waiting
                    err = f"{type(e).__name__}: {_first_line(e)}"
            if unit.kind == "folder" and self.group is not None:
                verdicts: list[Any] = [None] * self.world
                _dist().all_gather_object(verdicts, err, group=self.group)
                err = next((v for v in verdicts if v), None)
            elif unit.kind == "folder":
                pass
            else:
                err = self._broadcast(err)
            if err is None:
                if rejected and self.rank == 0:
                    log.warning("resumed from %s (step %d) after skipping %d corrupt or partial checkpoint(s)",
                                unit.name, unit.step, len(rejected))
                return "ok", unit
            older = units[-i - 2].name if i + 1 < len(units) else None
            if self.rank == 0:
                log.warning("checkpoint %s is not usable: %s; %s", unit.name, err,
                            f"falling back to {older}" if older else "no older checkpoint left")
            rejected.append(f"{unit.name}: {err}")
        return "none", rejected

    def load_latest(self, *, state: Any, map_location: Any, weights_only: bool) -> tuple[CheckpointUnit, Any] | None:
        """Every rank loads the unit :meth:`_choose` picked (a folder through DCP, collectively)."""
        self.wait()
        choice = self._choose()
        what, value = choice
        if what == "empty":
            return None
        if what == "none":
            raise NoCheckpointError(f"no valid checkpoint in {self.ckpt.directory}: " + "; ".join(value)
                                    + f"; fetch one from a remote with '{command('resume')}'")
        if what == "error":
            raise CheckpointError(f"choosing a checkpoint in {self.ckpt.directory} failed on rank 0: {value}")
        unit = value
        loaded = load_unit(unit, state=state, map_location=map_location, weights_only=weights_only,
                           process_group=self.group)
        return unit, loaded


def load_latest_unit(directory: str | os.PathLike, *, state: Any = None, map_location: Any = "cpu",
                     weights_only: bool = True) -> tuple[CheckpointUnit, Any] | None:
    """Load the newest valid unit (file or folder) in `directory` in this process, falling back to older ones.

    Returns:
        ``(unit, state)``, or None when the folder holds no checkpoint at all.
    Raises:
        NoCheckpointError: checkpoints exist but none is valid (each reason is in the message).
    """
    units = discover_units(directory)
    if not units:
        return None
    rejected: list[str] = []
    for i, unit in enumerate(reversed(units)):
        older = units[-i - 2].name if i + 1 < len(units) else None
        try:
            verify_unit(unit)
            loaded = load_unit(unit, state=state, map_location=map_location, weights_only=weights_only)
        except IntegrityError as e:
            log.warning("checkpoint %s is not usable: %s; %s", unit.name, e,
                        f"falling back to {older}" if older else "no older checkpoint left")
            rejected.append(f"{unit.name}: {e}")
            continue
        if rejected:
            log.warning("resumed from %s (step %d) after skipping %d corrupt or partial checkpoint(s)",
                        unit.name, unit.step, len(rejected))
        return unit, loaded
    raise NoCheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(rejected)
                            + f"; fetch one from a remote with '{command('resume')}'")


def load_folder(path: str | os.PathLike, *, state: Any = None, map_location: Any = "cpu", weights_only: bool = True,
                saver: DistributedSaver | None = None) -> Any:
    """Verify and load the checkpoint folder `path` (``--resume-from DIR``). Under torch.distributed (a `saver`
    with a group) rank 0 verifies it and tells the others, and every rank loads it.

    Raises:
        NoCheckpointError: `path` is not a complete checkpoint folder.
        IntegrityError: it fails verification.
    """
    folder = Path(path)
    group = saver.group if saver is not None else None
    verdict: Any = None
    if saver is None or saver.rank == 0:
        unit = classify_folder(folder, any_name=True)
        if unit is None:
            verdict = ("none", f"{folder}: not a complete checkpoint folder (no {FOLDER_MANIFEST}, {DCP_METADATA}, "
                               f"safetensors index or tracked Megatron iteration); check --resume-from / the path given")
        else:
            try:
                verify_unit(unit)
                verdict = ("ok", unit)
            except IntegrityError as e:
                verdict = ("bad", e)
    if saver is not None:
        verdict = saver._broadcast(verdict)
    what, value = verdict
    if what == "none":
        raise NoCheckpointError(value)
    if what == "bad":
        raise value
    return load_unit(value, state=state, map_location=map_location, weights_only=weights_only, process_group=group)


def has_folders(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a step-named folder: loading needs the unit-aware path."""
    try:
        with os.scandir(directory) as it:
            for e in it:
                if folder_step(e.name) is not None and e.is_dir():
                    return True
    except OSError:
        return False
    return False
