"""The Airlock: move an experiment's code between machines without drift, and bring its logs back.

``export`` bundles the committed code of ``experiments/vXX`` into a deterministic zip (same content, same
commit, same tool versions -> same bytes) with a ``MANIFEST.json`` and uploads it to the airlock remote at
``airlock/<experiment>/<content hash>.zip`` plus ``airlock/<experiment>/latest.json``. ``pull`` downloads a
bundle, verifies every file against the manifest and unpacks it safely. ``status`` reports drift between
the working tree and the last bundle exported or pulled. ``import_logs`` brings a run's logs back and writes
a journal entry.

Example:
    >>> from colabkit import airlock
    >>> res = airlock.export("v01")                       # on home base
    >>> airlock.pull("v01", to="/content")                # on the cluster
    >>> airlock.status("v01")["in_sync"]
    True
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import (AirlockError, ColabkitError, DirtyTreeError, IntegrityError, NoBundleError,
                     RemoteNotFoundError, SecretInBundleError, UnsafeBundleError)
from .fsutil import TMP_PREFIX, atomic_open, atomic_write_json, hash_file, is_temporary
from .runtime import command
from .secrets import redact

if TYPE_CHECKING:
    from .config import Config
    from .remotes import Remote

log = logging.getLogger(__name__)

#: version of MANIFEST.json, latest.json and the local record
FORMAT = 1
MANIFEST_NAME = "MANIFEST.json"
LATEST_NAME = "latest.json"
#: remote folder holding every bundle: airlock/<experiment>/<hash>.zip
REMOTE_DIR = "airlock"
#: fixed zip entry time (the earliest a zip can hold) and mode: the bytes depend on content only
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644
COMPRESS_LEVEL = 6

#: never bundled, whatever git says: build artefacts and notebook autosaves
_ALWAYS_SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", ".git", ".colabkit", ".pytest_cache", ".mypy_cache"}
_ALWAYS_SKIP_SUFFIXES = (".pyc", ".pyo")
_DATA_DIRS = ("data", "datasets")
_WEIGHT_PATTERNS = ("*.pt", "*.pth", "*.ckpt", "*.safetensors", "*.pt.json")

# -- secrets: names and contents that never travel --------------------------------------------------
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_SA_PRIVATE_KEY = re.compile(rb"[\"']private_key[\"']\s*:\s*[\"']")
_HF_TOKEN = re.compile(rb"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,}(?![A-Za-z0-9])")
#: an authorized_user JSON (gcloud application-default credentials) or an OAuth client file
_OAUTH_SECRET = re.compile(rb"[\"'](?:refresh_token|client_secret)[\"']\s*:\s*[\"'][^\"'\s]{8,}")
_READ_WHOLE = 64 * 1024 * 1024


def _secret_by_name(rel: str) -> str | None:
    parts = rel.split("/")
    if ".secrets" in parts[:-1]:
        return "is under .secrets/"
    name = parts[-1]
    if name == ".env" or name.startswith(".env.") or name.endswith(".env"):
        return "is a .env file"
    return None


def _secret_in(data: bytes) -> str | None:
    """What kind of secret `data` holds, or None. Cheap substring tests first; the regex only on a hit."""
    if b"PRIVATE KEY-----" in data and _PRIVATE_KEY.search(data):
        return "holds a private-key block"
    if b"private_key" in data and _SA_PRIVATE_KEY.search(data):
        return "holds a service-account private_key"
    if b"hf_" in data and _HF_TOKEN.search(data):
        return "holds a Hugging Face token"
    if (b"refresh_token" in data or b"client_secret" in data) and _OAUTH_SECRET.search(data):
        return "holds an OAuth refresh token or client secret"
    return None


# -- small helpers ------------------------------------------------------------------------------------
def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def content_hash(entries: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted ``(path, sha256)`` pairs: ``path NUL sha256 LF`` per file, UTF-8."""
    h = hashlib.sha256()
    for path, sha in sorted(entries):
        h.update(f"{path}\0{sha}\n".encode("utf-8"))
    return h.hexdigest()


def _load_cfg(config: "Config | None") -> "Config":
    if config is not None:
        return config
    from .config import load_config
    return load_config()


def _check_name(experiment: str) -> str:
    from .config import check_experiment_name
    return check_experiment_name(experiment)


def _experiment_dir(cfg: "Config", experiment: str) -> Path:
    return cfg.require_experiment(experiment)  # the check every command makes (train, resume, ...)


def _prefix(cfg: "Config", experiment: str) -> str:
    """The bundle path of the experiment folder: ``experiments/v01``."""
    return posixpath.join(Path(cfg.experiments).as_posix(), experiment)


def selected(rel: str, cfg: "Config") -> bool:
    """True when `rel` (a path relative to the experiment folder) belongs in a bundle.

    Never: ``logs/``, ``checkpoints/``, ``data/``/``datasets/``, weights (``*.pt`` ...), build artefacts
    (``__pycache__``, ``*.pyc``, ``.ipynb_checkpoints``), temporary files, ``airlock.exclude`` patterns.
    """
    parts = rel.split("/")
    if parts[0] in (cfg.logs, cfg.checkpoints, *_DATA_DIRS):
        return False
    if any(p in _ALWAYS_SKIP_DIRS for p in parts[:-1]):
        return False
    name = parts[-1]
    if name.endswith(_ALWAYS_SKIP_SUFFIXES) or is_temporary(name) or name == ".DS_Store":
        return False
    if any(fnmatch.fnmatchcase(name, p) for p in _WEIGHT_PATTERNS):
        return False
    return not _excluded(rel, cfg.airlock.exclude)


def _excluded(rel: str, patterns: Iterable[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        p = pat.strip().replace("\\", "/")
        if not p:
            continue
        if p.endswith("/"):  # a folder anywhere in the path
            p = p.rstrip("/")
            if any(fnmatch.fnmatchcase("/".join(parts[:i]), p) or fnmatch.fnmatchcase(parts[i - 1], p)
                   for i in range(1, len(parts))):
                return True
            continue
        p = p.lstrip("/")
        if fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(parts[-1], p):
            return True
        if p.startswith("**/") and fnmatch.fnmatchcase(rel, p[3:]):
            return True
        # a pattern naming a folder excludes what is inside it
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), p) for i in range(1, len(parts))):
            return True
    return False


# -- git ---------------------------------------------------------------------------------------------
def _git(args: list[str], cwd: Path, *, check: bool = True) -> str:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=False, timeout=120)
    except FileNotFoundError:
        raise AirlockError("git is not installed; install git (the airlock reads the commit state from it)") \
            from None
    if check and r.returncode != 0:
        msg = r.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AirlockError(f"git {' '.join(args[:2])} failed in {cwd}: {msg[-1] if msg else r.returncode}")
    return r.stdout.decode("utf-8", "surrogateescape") if r.returncode == 0 else ""


def _in_git(d: Path) -> bool:
    if shutil.which("git") is None:
        return False
    r = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=d, capture_output=True, timeout=60)
    return r.returncode == 0 and r.stdout.strip() == b"true"


def _z(out: str) -> list[str]:
    return [x for x in out.split("\0") if x]


@dataclass
class _GitState:
    commit: str | None
    commit_time: float | None
    head: str | None
    branch: str | None
    tracked: list[str]          # relative to the experiment folder
    untracked: list[str]        # not ignored, relative to the experiment folder
    dirty: list[str]            # `git status` entries (relative to the experiment folder) that matter


def _git_state(d: Path, cfg: "Config") -> _GitState:
    tracked = _z(_git(["ls-files", "-z", "--", "."], d))
    untracked = _z(_git(["ls-files", "-z", "--others", "--exclude-standard", "--", "."], d))
    head = _git(["rev-parse", "-q", "--verify", "HEAD"], d, check=False).strip() or None
    branch = _git(["symbolic-ref", "-q", "--short", "HEAD"], d, check=False).strip() or None
    commit, ctime = None, None
    if head:
        out = _git(["log", "-1", "--format=%H %ct", "--", "."], d, check=False).split()
        if len(out) == 2:
            commit, ctime = out[0], float(out[1])
    status = _git(["status", "--porcelain=v1", "-z", "--untracked-files=all", "--", "."], d)
    top = Path(_git(["rev-parse", "--show-toplevel"], d).strip())
    dirty = []
    entries = _z(status)
    i = 0
    while i < len(entries):
        e = entries[i]
        code, path = e[:2], e[3:]
        i += 1
        if code[0] in "RC":  # a rename carries the old name as the next entry
            i += 1
        try:
            rel = (top / path).resolve().relative_to(d.resolve()).as_posix()
        except ValueError:
            continue
        if selected(rel, cfg) or _secret_by_name(rel):
            kind = "untracked" if code == "??" else "modified" if "M" in code else _code(code)
            dirty.append(f"{kind}: {_prefix(cfg, d.name)}/{rel}")
    return _GitState(commit, ctime, head, branch, tracked, untracked, dirty)


def _code(code: str) -> str:
    c = code.strip()[:1]
    return {"A": "added", "D": "deleted", "R": "renamed", "C": "copied", "U": "conflict", "T": "type changed"}.get(
        c, "changed")


def _diff_hash(d: Path, untracked: list[str]) -> str:
    """sha256 of ``git diff HEAD`` of the experiment plus each untracked file's path and sha256."""
    h = hashlib.sha256()
    r = subprocess.run(["git", "diff", "--binary", "HEAD", "--", "."], cwd=d, capture_output=True, timeout=300)
    h.update(r.stdout)
    for rel in sorted(untracked):
        with contextlib.suppress(OSError):
            h.update(f"\0{rel}\0{hash_file(d / rel).sha256}".encode())
    return h.hexdigest()


# -- the working tree --------------------------------------------------------------------------------
def _walk(d: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(x for x in dirnames if x not in _ALWAYS_SKIP_DIRS)
        base = Path(dirpath).relative_to(d).as_posix()
        for fn in filenames:
            out.append(fn if base == "." else f"{base}/{fn}")
    return sorted(out)


def _tree_files(d: Path, cfg: "Config") -> list[str]:
    """Files of the working tree that a bundle would hold (git: tracked + untracked not ignored)."""
    if _in_git(d):
        st = _git_state(d, cfg)
        names = set(st.tracked) | set(st.untracked)
        names = {n for n in names if (d / n).is_file() or (d / n).is_symlink()}
    else:
        names = set(_walk(d))
    return sorted(n for n in names if selected(n, cfg))


# -- export --------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    rel: str        # relative to the experiment folder
    path: str       # the path inside the bundle (experiments/v01/...)
    size: int
    sha256: str


def _scan(d: Path, rels: list[str], tick: Callable[[int], None] | None) -> tuple[list[_Entry], list[str]]:
    """Hash every file and look for secrets in the same read. Returns (entries, secret findings)."""
    entries, secrets = [], []
    for rel in rels:
        full = d / rel
        why = _secret_by_name(rel)
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            raise AirlockError(f"{rel} is a symbolic link; a bundle holds plain files only: replace it with the "
                               "file or add it to airlock.exclude")
        if not stat.S_ISREG(st.st_mode):
            raise AirlockError(f"{rel} is not a plain file; add it to airlock.exclude")
        h = hashlib.sha256()
        size = 0
        with open(full, "rb") as f:
            if st.st_size <= _READ_WHOLE:
                data = f.read()
                h.update(data)
                size = len(data)
                why = why or _secret_in(data)
            else:
                tail = b""
                while True:
                    buf = f.read(_READ_WHOLE)
                    if not buf:
                        break
                    h.update(buf)
                    size += len(buf)
                    why = why or _secret_in(tail + buf)
                    tail = buf[-4096:]
        if why:
            secrets.append(f"{rel} ({why})")
        entries.append(_Entry(rel, "", size, h.hexdigest()))
        if tick:
            tick(size)
    return entries, secrets


def _manifest(cfg: "Config", experiment: str, entries: list[_Entry], *, git: _GitState | None, dirty: bool,
              diff_sha256: str | None) -> dict[str, Any]:
    from . import __version__
    files = sorted(({"path": e.path, "sha256": e.sha256, "size": e.size} for e in entries), key=lambda x: x["path"])
    created = git.commit_time if git and git.commit_time is not None else 0.0
    return {
        "format": FORMAT,
        "kind": "colabkit-airlock-bundle",
        "experiment": experiment,
        "prefix": _prefix(cfg, experiment),
        "git": {"commit": git.commit if git else None, "branch": git.branch if git else None,
                "dirty": dirty, "diff_sha256": diff_sha256},
        # the commit time of the last commit touching the experiment (not the export time), so that
        # exporting the same content twice gives the same bytes; the export time lives in latest.json
        "created": _iso(created),
        "python": ".".join(map(str, sys.version_info[:3])),
        "colabkit": __version__,
        "files": files,
        "total_size": sum(f["size"] for f in files),
        "content_sha256": content_hash((f["path"], f["sha256"]) for f in files),
    }


def _zipinfo(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    zi.compress_type = zipfile.ZIP_DEFLATED
    zi.create_system = 3
    zi.external_attr = (stat.S_IFREG | FILE_MODE) << 16
    return zi


def build_bundle(cfg: "Config", experiment: str, entries: list[_Entry], manifest: dict[str, Any], out: Path,
                 *, tick: Callable[[int], None] | None = None) -> None:
    """Write the bundle zip to `out`: MANIFEST.json first, then the files sorted by path.

    Fixed entry times and modes, no extra fields: the same content gives the same bytes.

    Raises:
        AirlockError: a file changed between hashing and bundling.
    """
    d = cfg.experiment_dir(experiment)
    with atomic_open(out, "wb") as raw:
        with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL) as zf:
            zf.writestr(_zipinfo(MANIFEST_NAME),
                        (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"),
                        compress_type=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL)
            for e in sorted(entries, key=lambda x: x.path):
                zi = _zipinfo(e.path)
                h = hashlib.sha256()
                with open(d / e.rel, "rb") as f:
                    if e.size <= _READ_WHOLE:
                        data = f.read()
                        h.update(data)
                        zf.writestr(zi, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL)
                    else:
                        zi.file_size = e.size
                        with zf.open(zi, "w", force_zip64=True) as w:
                            while True:
                                buf = f.read(4 * 1024 * 1024)
                                if not buf:
                                    break
                                h.update(buf)
                                w.write(buf)
                if h.hexdigest() != e.sha256:
                    raise AirlockError(f"{e.rel} changed while the bundle was being built; export again")
                if tick:
                    tick(e.size)


def airlock_remote(cfg: "Config", name: str | None = None) -> "Remote":
    """The remote bundles go to: `name`, else ``airlock.remote``, else the first drive tier, else a folder."""
    from .remotes import open_remote
    from .remotes.local import LocalRemote
    name = name or cfg.airlock.remote
    if name:
        if name == "local":
            return LocalRemote("local", cfg.home / "remotes" / cfg.project / "airlock")
        return open_remote(cfg, name)
    tier = next((t for t in cfg.tiers if t.remote == "drive"), None)
    if tier is not None:
        return open_remote(cfg, tier)
    return LocalRemote("airlock", cfg.home / "remotes" / cfg.project / "airlock")


def _record_path(root: Path, experiment: str) -> Path:
    return root / ".colabkit" / "airlock" / f"{experiment}.json"


def _write_record(root: Path, experiment: str, record: dict[str, Any]) -> Path:
    p = _record_path(root, experiment)
    atomic_write_json(p, record)
    return p


def read_record(root: Path, experiment: str) -> dict[str, Any] | None:
    """The last bundle exported from or pulled into `root` for `experiment` (None if none)."""
    p = _record_path(Path(root), experiment)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AirlockError(f"{p}: the airlock record is unreadable ({e}); delete it and export or pull again") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("manifest"), dict):
        raise AirlockError(f"{p}: the airlock record is malformed; delete it and export or pull again")
    return data


def _progress(total: int, desc: str, enabled: bool):
    # small jobs finish before a bar helps; tqdm also starts a monitor thread per process
    if not enabled or total < 32 * 10**6 or os.environ.get("TQDM_DISABLE"):
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)


def export(experiment: str, *, config: "Config | None" = None, allow_dirty: bool = False,
           progress: bool = False) -> dict[str, Any]:
    """Bundle ``experiments/<experiment>`` and upload it to the airlock remote.

    Args:
        experiment: the folder name under ``experiments/`` (``v01``).
        config: the configuration (default: :func:`colabkit.config.load_config`).
        allow_dirty: bundle uncommitted and untracked files too; the manifest records ``dirty: true`` and
            the sha256 of the diff.
        progress: show a progress bar (tqdm.auto).
    Returns:
        ``{"experiment", "bundle" (content hash), "short", "remote", "remote_path", "uploaded" (bool),
        "bytes_uploaded", "files", "size", "bundle_size", "bundle_sha256", "dirty", "diff_sha256",
        "commit", "branch", "latest_updated"}``.
    Raises:
        AirlockError: unknown experiment, not a git repository, a link in the tree.
        DirtyTreeError: uncommitted or untracked files (listed), without `allow_dirty`.
        SecretInBundleError: a file that would travel is or holds a secret (each named; no override).
        RemoteError: the upload failed.

    Example:
        >>> export("v01")["remote_path"]
        'airlock/v01/3f2a...e1.zip'
    """
    cfg = _load_cfg(config)
    d = _experiment_dir(cfg, experiment)
    git: _GitState | None = None
    diff_sha = None
    dirty = False
    if _in_git(d):
        git = _git_state(d, cfg)
        if git.dirty:
            if not allow_dirty:
                shown = git.dirty[:50]
                more = f"\n  ... and {len(git.dirty) - 50} more" if len(git.dirty) > 50 else ""
                raise DirtyTreeError(
                    f"experiments/{experiment} has uncommitted or untracked files; commit them (or add them to "
                    f".gitignore or airlock.exclude), or export with --allow-dirty:\n  "
                    + "\n  ".join(shown) + more)
            dirty = True
            diff_sha = _diff_hash(d, [u for u in git.untracked if selected(u, cfg)])
            log.warning("exporting %s with uncommitted changes (diff sha256 %s)", experiment, diff_sha)
        names = set(git.tracked) | (set(git.untracked) if allow_dirty else set())
        names = {n for n in names if os.path.lexists(d / n)}
    else:
        if not allow_dirty:
            raise DirtyTreeError(f"{d} is not in a git repository, so its commit state is unknown; commit it "
                                 "to git (git init && git add && git commit), or export with --allow-dirty")
        dirty = True
        names = set(_walk(d))
    rels = sorted(n for n in names if selected(n, cfg))
    if not rels:
        raise AirlockError(f"experiments/{experiment} has no files to bundle (everything is excluded or "
                           "untracked); add train.py and the model code and commit them")
    total = sum(os.lstat(d / r).st_size for r in rels)
    with _progress(2 * total, f"bundle {experiment}", progress) as bar:
        tick = bar.update if bar is not None else None
        entries, secrets = _scan(d, rels, tick)
        if secrets:
            raise SecretInBundleError(
                f"refusing to export {experiment}: {len(secrets)} file(s) are or hold secrets, and secrets never "
                f"travel; remove them from the experiment (or, for a false positive, add them to "
                f"airlock.exclude):\n  " + "\n  ".join(secrets))
        prefix = _prefix(cfg, experiment)
        for e in entries:
            e.path = f"{prefix}/{e.rel}"
        if not dirty and git is not None and git.commit is None:
            dirty = True
        manifest = _manifest(cfg, experiment, entries, git=git, dirty=dirty, diff_sha256=diff_sha)
        chash = manifest["content_sha256"]
        remote = airlock_remote(cfg)
        rdir = f"{REMOTE_DIR}/{experiment}"
        zpath = f"{rdir}/{chash}.zip"
        existing = remote.stat(zpath)
        latest = _read_latest(remote, rdir, cfg)
        state = cfg.state_dir / "airlock"
        state.mkdir(parents=True, exist_ok=True)
        uploaded = 0
        if existing is not None and latest is not None and latest.get("bundle") == chash:
            bundle_sha, bundle_size = latest.get("bundle_sha256") or existing.sha256, existing.size
            latest_updated = False
        else:
            if existing is None:
                with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=state) as tmp:
                    zfile = Path(tmp) / f"{chash}.zip"
                    build_bundle(cfg, experiment, entries, manifest, zfile, tick=tick)
                    digest = hash_file(zfile)
                    remote.put(zfile, zpath, digest=digest)
                    uploaded += digest.size
                    bundle_sha, bundle_size = digest.sha256, digest.size
                    log.info("uploaded %s (%d bytes) to %s", zpath, digest.size, remote.describe())
            else:
                bundle_sha, bundle_size = existing.sha256, existing.size
                if bundle_sha is None:  # a remote that only knows md5: fetch and hash once
                    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=state) as tmp:
                        remote.get(zpath, Path(tmp) / "b.zip", expected=existing)
                        bundle_sha = hash_file(Path(tmp) / "b.zip").sha256
            latest_doc = {"format": FORMAT, "experiment": experiment, "bundle": chash, "path": zpath,
                          "bundle_sha256": bundle_sha, "bundle_size": bundle_size, "exported_at": _now_iso(),
                          "commit": git.commit if git else None, "head": git.head if git else None,
                          "branch": git.branch if git else None, "dirty": dirty, "diff_sha256": diff_sha}
            with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=state) as tmp:
                lp = Path(tmp) / LATEST_NAME
                lp.write_text(json.dumps(latest_doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                remote.put(lp, f"{rdir}/{LATEST_NAME}", digest=hash_file(lp))
                uploaded += lp.stat().st_size
            latest_updated = True
    _write_record(cfg.root, experiment, {
        "format": FORMAT, "experiment": experiment, "bundle": chash, "action": "export", "at": _now_iso(),
        "remote": remote.name, "remote_path": zpath, "bundle_sha256": bundle_sha, "manifest": manifest})
    return {"experiment": experiment, "bundle": chash, "short": chash[:12], "remote": remote.name,
            "remote_describe": remote.describe(), "remote_path": zpath, "uploaded": uploaded > 0 and existing is None,
            "bytes_uploaded": uploaded, "files": len(entries), "size": manifest["total_size"],
            "bundle_size": bundle_size, "bundle_sha256": bundle_sha, "dirty": dirty, "diff_sha256": diff_sha,
            "commit": git.commit if git else None, "branch": git.branch if git else None,
            "latest_updated": latest_updated}


def _read_latest(remote: "Remote", rdir: str, cfg: "Config") -> dict[str, Any] | None:
    state = cfg.state_dir / "airlock"
    state.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=state) as tmp:
        p = Path(tmp) / LATEST_NAME
        try:
            remote.get(f"{rdir}/{LATEST_NAME}", p)
        except RemoteNotFoundError:
            return None
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s/%s on %s is not valid JSON; ignoring it", rdir, LATEST_NAME, remote.name)
            return None
    return data if isinstance(data, dict) else None


# -- safe extraction ------------------------------------------------------------------------------------
def unsafe_name(name: str) -> str | None:
    """Why an archive entry named `name` could land outside its target (None when it cannot).

    The one rule for every archive colabkit unpacks (airlock bundles, data sets): no NUL byte, no absolute
    path or drive letter, no ``..`` component.
    """
    if "\0" in name:
        return "a NUL byte in its name"
    n = name.replace("\\", "/")
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        return "an absolute path"
    if any(p == ".." for p in n.split("/")):
        return "a '..' component"
    return None


def _unsafe_reason(zi: zipfile.ZipInfo) -> str | None:
    why = unsafe_name(zi.filename)
    if why:
        return why
    mode = zi.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if zi.create_system == 3 and kind:  # no type bits (0o600 from many writers): a plain file
        if stat.S_ISLNK(mode):
            return "a symbolic link"
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            return "a device, pipe or socket"
    return None


def check_members(zf: zipfile.ZipFile, *, max_unpacked: int, label: str) -> list[zipfile.ZipInfo]:
    """Every file entry of `zf` after refusing unsafe ones and enforcing the size cap.

    Raises:
        UnsafeBundleError: an absolute path, ``..``, a link or device entry, or more than `max_unpacked`
            bytes once unpacked.
    """
    files, total = [], 0
    bad = []
    for zi in zf.infolist():
        why = _unsafe_reason(zi)
        if why:
            bad.append(f"{zi.filename!r} ({why})")
            continue
        if zi.is_dir():
            continue
        files.append(zi)
        total += zi.file_size
    if bad:
        raise UnsafeBundleError(f"{label} is unsafe and was not unpacked: " + "; ".join(bad[:20])
                                + ("" if len(bad) <= 20 else f"; and {len(bad) - 20} more")
                                + ". Do not use this bundle; export it again from a clean checkout")
    if total > max_unpacked:
        from .config import format_size
        raise UnsafeBundleError(f"{label} would unpack to {format_size(total)} ({total} bytes), over the cap of "
                                f"{format_size(max_unpacked)} (airlock.max_unpacked); nothing was unpacked. "
                                "Raise airlock.max_unpacked in colabkit.yaml if this bundle is expected")
    return files


def _extract_verified(zf: zipfile.ZipFile, zi: zipfile.ZipInfo, dest: Path, *, expected: dict[str, Any],
                      budget: list[int], label: str) -> None:
    """Stream one entry to `dest`, counting bytes against the cap and checking size and sha256."""
    h = hashlib.sha256()
    size = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    import zlib
    try:
        with zf.open(zi) as src, open(dest, "wb") as out:
            while True:
                buf = src.read(1024 * 1024)
                if not buf:
                    break
                size += len(buf)
                budget[0] -= len(buf)
                if budget[0] < 0:
                    raise UnsafeBundleError(f"{label} unpacks to more than its entries declare, over the cap "
                                            "(airlock.max_unpacked); nothing was unpacked. Do not use this bundle")
                h.update(buf)
                out.write(buf)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise IntegrityError(f"{label}: {zi.filename} cannot be read from the zip ({e}); nothing was unpacked. "
                             "The bundle is damaged: export it again", path=zi.filename) from None
    if size != expected["size"] or h.hexdigest() != expected["sha256"]:
        raise IntegrityError(
            f"{label}: {zi.filename} does not match the manifest (sha256 {h.hexdigest()[:16]}… vs "
            f"{str(expected['sha256'])[:16]}…, {size} vs {expected['size']} bytes); nothing was unpacked. "
            "The bundle was altered: export it again", path=zi.filename, expected=expected["sha256"],
            actual=h.hexdigest())


def _read_manifest(zf: zipfile.ZipFile, label: str) -> dict[str, Any]:
    try:
        raw = zf.read(MANIFEST_NAME)
    except KeyError:
        raise AirlockError(f"{label} has no {MANIFEST_NAME}; it is not a colabkit bundle") from None
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError(f"{label}: {MANIFEST_NAME} is not valid JSON; the bundle is damaged, export it "
                             "again", path=MANIFEST_NAME) from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), list) or not isinstance(m.get("format"), int):
        raise IntegrityError(f"{label}: {MANIFEST_NAME} is malformed; export the bundle again", path=MANIFEST_NAME)
    if m["format"] > FORMAT:
        raise AirlockError(f"{label} has manifest format {m['format']}, newer than this colabkit understands "
                           f"({FORMAT}); upgrade colabkit where you installed it from (pip install -U -e . in your "
                           "checkout, or pip install -U with its git URL; the name 'colabkit' on PyPI is another "
                           "project)")
    return m


def verify_and_extract(zpath: Path, target: Path, *, max_unpacked: int, label: str,
                       expected_hash: str | None = None, tick: Callable[[int], None] | None = None,
                       replace: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Check a bundle completely, then move its files under `target`. Returns the manifest.

    Everything is unpacked into a staging folder beside `target` and checked (entries safe, size cap,
    each file against the manifest, the manifest's content hash against `expected_hash`) before any file
    under `target` is replaced, so a bad bundle changes nothing.
    """
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError) as e:
        raise IntegrityError(f"{label} is not a readable zip file ({e}); download or export it again",
                             path=str(zpath)) from None
    with zf:
        members = check_members(zf, max_unpacked=max_unpacked, label=label)
        manifest = _read_manifest(zf, label)
        files = {}
        for f in manifest["files"]:
            p = f.get("path") if isinstance(f, dict) else None
            if not isinstance(p, str) or not isinstance(f.get("sha256"), str) or not isinstance(f.get("size"), int):
                raise IntegrityError(f"{label}: {MANIFEST_NAME} has a malformed file entry {f!r}; export again",
                                     path=MANIFEST_NAME)
            files[p] = f
        chash = content_hash((p, f["sha256"]) for p, f in files.items())
        want = expected_hash or manifest.get("content_sha256")
        if manifest.get("content_sha256") != chash or chash != want:
            raise IntegrityError(f"{label}: its manifest lists files whose content hash is {chash[:12]}, not "
                                 f"{str(want)[:12]}; the bundle was altered: export it again", path=MANIFEST_NAME,
                                 expected=want, actual=chash)
        names = {zi.filename for zi in members} - {MANIFEST_NAME}
        extra, missing = sorted(names - set(files)), sorted(set(files) - names)
        if extra or missing:
            raise IntegrityError(f"{label}: the files do not match the manifest (not listed: "
                                 f"{', '.join(extra) or 'none'}; missing: {', '.join(missing) or 'none'}); export "
                                 "it again", path=MANIFEST_NAME)
        target.mkdir(parents=True, exist_ok=True)
        staging_parent = target / ".colabkit" / "airlock"
        staging_parent.mkdir(parents=True, exist_ok=True)
        budget = [max_unpacked]
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "unpack-", dir=staging_parent) as staging:
            sroot = Path(staging).resolve()
            for zi in sorted(members, key=lambda z: z.filename):
                if zi.filename == MANIFEST_NAME:
                    continue
                dest = (sroot / zi.filename).resolve()
                if sroot not in dest.parents:
                    raise UnsafeBundleError(f"{label}: {zi.filename!r} would land outside the target; nothing "
                                            "was unpacked")
                _extract_verified(zf, zi, dest, expected=files[zi.filename], budget=budget, label=label)
                if tick:
                    tick(zi.file_size)
            troot = target.resolve()
            for p in sorted(files):
                final = (troot / p)
                if troot not in final.resolve().parents:
                    raise UnsafeBundleError(f"{label}: {p!r} would land outside {target}; nothing was unpacked")
                if replace is not None and not replace(p):
                    continue
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.is_symlink() or (final.exists() and not final.is_file()):
                    raise UnsafeBundleError(f"{target / p} exists and is not a plain file; remove it and pull "
                                            "again")
                os.chmod(sroot / p, FILE_MODE)
                os.replace(sroot / p, final)
    return manifest


# -- pull ----------------------------------------------------------------------------------------------
def _resolve_bundle(remote: "Remote", cfg: "Config", experiment: str, bundle: str) -> tuple[str, dict | None]:
    rdir = f"{REMOTE_DIR}/{experiment}"
    if bundle in (None, "", "latest"):
        latest = _read_latest(remote, rdir, cfg)
        if latest is None or not isinstance(latest.get("bundle"), str):
            raise NoBundleError(f"no bundle of {experiment!r} on {remote.describe()} ({rdir}/{LATEST_NAME} is "
                                f"missing); run '{command('airlock export ' + experiment)}' where the code is")
        return latest["bundle"], latest
    b = bundle.lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", b):
        raise AirlockError(f"--bundle {bundle!r} is not a bundle hash; pass 'latest' or at least 4 hex digits "
                           "of a hash that 'colabkit airlock export' printed")
    found = sorted({posixpath.basename(f.path)[:-4] for f in remote.list(rdir) if f.path.endswith(".zip")})
    hits = [h for h in found if h.startswith(b)]
    if not hits:
        raise AirlockError(f"no bundle {bundle!r} of {experiment!r} on {remote.describe()}; available: "
                           f"{', '.join(h[:12] for h in found) or 'none'}")
    if len(hits) > 1:
        raise AirlockError(f"--bundle {bundle!r} matches {len(hits)} bundles ({', '.join(h[:12] for h in hits)}); "
                           "give more digits")
    latest = _read_latest(remote, rdir, cfg)
    return hits[0], (latest if latest and latest.get("bundle") == hits[0] else None)


def pull(experiment: str, *, config: "Config | None" = None, bundle: str = "latest",
         to: str | os.PathLike | None = None, install: bool = False, force: bool = False,
         progress: bool = False, missing_ok: bool = False) -> dict[str, Any]:
    """Download a bundle, verify it and unpack it under `to` (default: the project root).

    Files land at ``<to>/experiments/<experiment>/...``; the bundle's identity is recorded in
    ``<to>/.colabkit/airlock/<experiment>.json`` (what ``status`` compares against). A file under `to` that
    differs from both the new bundle and the bundle recorded there before (a local edit) is not
    overwritten unless `force`.

    Args:
        experiment: the experiment name.
        bundle: ``latest``, or a content hash (a prefix of 4+ hex digits is enough).
        to: the target folder (a project root).
        install: then run ``pip install -r requirements.txt`` of the bundle (a real subprocess).
        force: overwrite locally edited files.
        progress: show a progress bar.
        missing_ok: when nothing was exported yet (no latest bundle), return ``{"pulled": False, "note": ...}``
            instead of raising: for notebook cells meant for the cluster that also run where the code is
            written (a fresh project on a laptop). A named ``bundle`` that is missing still raises.
    Returns:
        ``{"experiment", "pulled": True, "bundle", "short", "target", "files", "written", "unchanged",
        "removed", "size", "manifest", "install"}``.
    Raises:
        NoBundleError: nothing was exported yet (unless `missing_ok`).
        AirlockError: no such bundle; local edits in the way.
        IntegrityError: the bundle or a file does not match its hash (nothing is unpacked).
        UnsafeBundleError: an entry would escape the target, is a link or device, or the size cap is hit.
    """
    cfg = _load_cfg(config)
    _check_name(experiment)
    cfg.experiment_dir(experiment)  # an unrendered template placeholder is refused before any lookup
    target = Path(to).expanduser().resolve() if to is not None else cfg.root
    remote = airlock_remote(cfg)
    try:
        chash, latest = _resolve_bundle(remote, cfg, experiment, bundle)
    except NoBundleError as e:
        if not missing_ok:
            raise
        return {"experiment": experiment, "pulled": False, "bundle": None, "target": str(target),
                "remote": remote.describe(), "note": str(e)}
    rpath = f"{REMOTE_DIR}/{experiment}/{chash}.zip"
    label = f"bundle {chash[:12]} of {experiment}"
    prev = read_record(target, experiment)
    prev_files = {f["path"]: f["sha256"] for f in (prev or {}).get("manifest", {}).get("files", [])
                  if isinstance(f, dict) and "path" in f}
    staging = target / ".colabkit" / "airlock"
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=staging) as tmp:
        zfile = Path(tmp) / f"{chash}.zip"
        try:
            remote.get(rpath, zfile)
        except RemoteNotFoundError:
            raise AirlockError(f"{label} is listed but {rpath} is missing on {remote.describe()}; export again") \
                from None
        digest = hash_file(zfile)
        if latest and latest.get("bundle_sha256") and latest["bundle_sha256"] != digest.sha256:
            raise IntegrityError(f"{label}: the zip's sha256 ({digest.sha256[:16]}…) is not the one recorded at "
                                 f"export ({str(latest['bundle_sha256'])[:16]}…); the bundle was altered, export "
                                 "it again", path=rpath, expected=latest["bundle_sha256"], actual=digest.sha256)
        # first pass: verify everything without touching the target, and find local edits in the way
        with zipfile.ZipFile(zfile) if zipfile.is_zipfile(zfile) else contextlib.nullcontext(None) as zf:
            manifest = _read_manifest(zf, label) if zf is not None else None
        conflicts: list[str] = []
        new_files = {f["path"]: f for f in (manifest or {}).get("files", []) if isinstance(f, dict) and "path" in f}
        for p, f in new_files.items():
            if not isinstance(p, str) or not isinstance(f.get("sha256"), str):
                continue
            final = target / p
            if final.is_file() and not final.is_symlink():
                have = hash_file(final).sha256
                if have != f["sha256"] and prev_files.get(p) != have:
                    conflicts.append(p)
        if conflicts and not force:
            raise AirlockError(f"{len(conflicts)} file(s) under {target} have local changes that pulling "
                               f"{label} would overwrite: {', '.join(sorted(conflicts)[:20])}; commit or move them, "
                               "or pull with --force")
        counts = {"written": 0, "unchanged": 0}

        def replace(p: str) -> bool:
            final = target / p
            if final.is_file() and not final.is_symlink() and hash_file(final).sha256 == new_files[p]["sha256"]:
                counts["unchanged"] += 1
                return False
            counts["written"] += 1
            return True

        total = sum(int(f.get("size", 0)) for f in new_files.values() if isinstance(f.get("size", 0), int))
        with _progress(total, f"unpack {chash[:12]}", progress) as bar:
            manifest = verify_and_extract(zfile, target, max_unpacked=cfg.airlock.max_unpacked, label=label,
                                          expected_hash=chash, tick=bar.update if bar is not None else None,
                                          replace=replace)
    # files of the previous bundle that the new one dropped, still as that bundle left them
    removed = []
    for p, sha in prev_files.items():
        final = target / p
        if p not in new_files and final.is_file() and hash_file(final).sha256 == sha:
            final.unlink()
            removed.append(p)
    _write_record(target, experiment, {
        "format": FORMAT, "experiment": experiment, "bundle": chash, "action": "pull", "at": _now_iso(),
        "remote": remote.name, "remote_path": rpath, "bundle_sha256": digest.sha256, "manifest": manifest})
    result = {"experiment": experiment, "pulled": True, "bundle": chash, "short": chash[:12], "target": str(target),
              "files": len(manifest["files"]), "written": counts["written"], "unchanged": counts["unchanged"],
              "removed": removed, "size": sum(f["size"] for f in manifest["files"]), "manifest": manifest,
              "install": None}
    if install:
        result["install"] = install_requirements(target, manifest)
    return result


def install_requirements(target: Path, manifest: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """``pip install -r`` the bundle's requirements.txt (the experiment's) in a child process.

    Raises:
        AirlockError: pip failed (the end of its output is in the message, secrets redacted).
    """
    prefix = manifest.get("prefix") or ""
    req = target / prefix / "requirements.txt"
    if not req.is_file():
        return {"requirements": None, "returncode": None,
                "note": f"the bundle has no {prefix}/requirements.txt; nothing installed"}
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r", str(req)]
    r = subprocess.run(cmd, cwd=req.parent, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise AirlockError(f"pip install -r {req} failed (exit {r.returncode}):\n{redact(tail)}\nfix "
                           "requirements.txt, export again, and pull with --install")
    return {"requirements": str(req), "returncode": 0, "output": redact(r.stdout)[-2000:]}


# -- status --------------------------------------------------------------------------------------------
def status(experiment: str | None = None, *, config: "Config | None" = None,
           root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Drift between the working tree and the last bundle exported or pulled here.

    Args:
        experiment: one experiment; None: every experiment with a record under ``.colabkit/airlock``.
        root: the project folder to look at (default: the configuration's root).
    Returns:
        ``{"in_sync": bool, "experiments": [{"experiment", "bundle", "short", "action", "at", "in_sync",
        "added", "removed", "changed"}]}``.
    Raises:
        AirlockError: no bundle was exported or pulled for `experiment` here, or an unknown experiment.
    """
    cfg = _load_cfg(config)
    base = Path(root).expanduser().resolve() if root is not None else cfg.root
    if root is not None:
        cfg = cfg.with_changes(root=base)
    if experiment is None:
        rdir = base / ".colabkit" / "airlock"
        names = sorted(p.stem for p in rdir.glob("*.json")) if rdir.is_dir() else []
        if not names:
            raise AirlockError(f"no bundle was exported or pulled in {base} yet; run "
                               f"'{command('airlock export vXX')}' or '{command('airlock pull vXX')}'")
    else:
        names = [_check_name(experiment)]
    reports = []
    for name in names:
        rec = read_record(base, name)
        if rec is None:
            if not cfg.experiment_dir(name).is_dir():
                _experiment_dir(cfg, name)
            raise AirlockError(f"no bundle of {name!r} was exported or pulled in {base}; run "
                               f"'{command('airlock export ' + name)}' (or pull it) first")
        manifest = rec["manifest"]
        prefix = manifest.get("prefix") or _prefix(cfg, name)
        recorded = {f["path"]: f for f in manifest.get("files", []) if isinstance(f, dict) and "path" in f}
        d = base / prefix
        current = {f"{prefix}/{r}": r for r in (_tree_files(d, cfg) if d.is_dir() else [])}
        added = sorted(set(current) - set(recorded))
        removed = sorted(set(recorded) - set(current))
        changed = []
        for p in sorted(set(current) & set(recorded)):
            full = d / current[p]
            st = os.stat(full)
            if st.st_size != recorded[p].get("size") or hash_file(full).sha256 != recorded[p].get("sha256"):
                changed.append(p)
        ok = not (added or removed or changed)
        reports.append({"experiment": name, "bundle": rec.get("bundle"), "short": str(rec.get("bundle"))[:12],
                        "action": rec.get("action"), "at": rec.get("at"), "remote": rec.get("remote"),
                        "in_sync": ok, "added": added, "removed": removed, "changed": changed})
    return {"in_sync": all(r["in_sync"] for r in reports), "root": str(base), "experiments": reports}


# -- import ---------------------------------------------------------------------------------------------
def _distinct_name(dest: Path, sha: str) -> Path:
    """``train.log`` -> ``train.imported-1a2b3c4d.log`` (the incoming file's hash keeps names unique)."""
    suffix = "".join(dest.suffixes[-1:])
    stem = dest.name[: len(dest.name) - len(suffix)] if suffix else dest.name
    return dest.with_name(f"{stem}.imported-{sha[:8]}{suffix}")


def _place(incoming: Path, dest: Path) -> tuple[str, Path]:
    """Move `incoming` to `dest` without overwriting a different file. Returns (what happened, path)."""
    sha = hash_file(incoming).sha256
    if dest.exists():
        if dest.is_file() and hash_file(dest).sha256 == sha:
            incoming.unlink()
            return "unchanged", dest
        alt = _distinct_name(dest, sha)
        if alt.exists() and alt.is_file() and hash_file(alt).sha256 == sha:
            incoming.unlink()
            return "unchanged", alt
        dest = alt
        what = "kept both"
    else:
        what = "imported"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(incoming, dest)
    return what, dest


def import_logs(experiment: str, *, config: "Config | None" = None, from_: str | None = None,
                gdown: str | None = None, journal: bool = True) -> dict[str, Any]:
    """Bring a run's logs into ``experiments/<experiment>/logs/`` and append a journal entry.

    Args:
        experiment: the experiment name.
        from_: the tier to read from (default: the airlock remote); logs are where the sync engine puts
            them, under ``experiments/<experiment>/logs/`` on that tier.
        gdown: a publicly shared Drive file id or link, fetched with gdown instead of a tier.
        journal: append the run entry to journal.md.
    Returns:
        ``{"experiment", "source", "files": [{"name", "status", "path"}], "summary", "entry"}``; status is
        ``imported``, ``unchanged`` or ``kept both`` (a different file of that name existed: the incoming one
        was written under a distinct name).
    Raises:
        AirlockError: unknown experiment, nothing to import, both `from_` and `gdown`.
        RemoteError: the tier or the link failed.
    """
    cfg = _load_cfg(config)
    _experiment_dir(cfg, experiment)  # an unknown experiment fails here, naming the ones there are
    if from_ and gdown:
        raise AirlockError("pass either --from REMOTE or --gdown ID_OR_URL, not both")
    logs = cfg.log_dir(experiment)
    state = cfg.state_dir / "airlock"
    state.mkdir(parents=True, exist_ok=True)
    placed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "import-", dir=state) as tmp:
        tmpd = Path(tmp)
        if gdown:
            from .remotes.drive import gdown_fetch, resolve_endpoint
            try:
                got = gdown_fetch(gdown, tmpd, endpoint=resolve_endpoint(cfg.drive.endpoint))
            except ValueError as e:
                raise AirlockError(str(e)) from None
            source = f"gdown {gdown}"
            what, where = _place(got, logs / got.name)
            placed.append({"name": got.name, "status": what, "path": str(where)})
        else:
            remote = airlock_remote(cfg, from_)
            prefix = cfg.remote_path(logs)
            source = f"{remote.name} ({remote.describe()})"
            files = [f for f in remote.list(prefix) if not is_temporary(f.path)]
            if not files:
                raise AirlockError(f"no logs of {experiment!r} on {remote.describe()} under {prefix}/; has the run "
                                   "synced its logs there (on the cluster: '%sync start' in the notebook, "
                                   "'colabkit sync watch' in a terminal)? Or use --gdown ID_OR_URL")
            for i, f in enumerate(files):
                rel = posixpath.relpath(f.path, prefix)
                dest = logs / rel
                if dest.is_file():
                    digest = hash_file(dest)
                    if f.matches(digest):
                        placed.append({"name": rel, "status": "unchanged", "path": str(dest)})
                        continue
                incoming = tmpd / f"{i}.part"
                remote.get(f.path, incoming, expected=f)
                what, where = _place(incoming, dest)
                placed.append({"name": rel, "status": what, "path": str(where)})
    for p in placed:
        log.info("%s: %s -> %s", p["status"], p["name"], p["path"])
    paths = [Path(p["path"]) for p in placed]
    summary = summarize_run(cfg, experiment, paths)
    entry = None
    if journal:
        from . import journal as jr
        entry = jr.add_run(experiment, config=cfg, source=source, **summary)
    return {"experiment": experiment, "source": source, "logs": str(logs), "files": placed, "summary": summary,
            "entry": entry}


# -- reading a run's logs ---------------------------------------------------------------------------------
_STEP = re.compile(r"\b(?:global[_ ])?(?:step|iter(?:ation)?)\b\s*[:=#]?\s*(\d+)", re.IGNORECASE)
_LOSS = re.compile(r"\bloss\b\s*[:=]?\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", re.IGNORECASE)


def _first_group(m: re.Match) -> str | None:
    gd = m.groupdict()
    for k in ("step", "iter", "iteration", "loss", "value"):
        if gd.get(k) is not None:
            return gd[k]
    return next((g for g in m.groups() if g is not None), None) if m.groups() else m.group(0)


def parse_log_lines(lines: Iterable[str], *, step_regex: str | None = None,
                    loss_regex: str | None = None) -> dict[str, Any]:
    """Steps reached and last/best loss from training-log lines (``step N`` / ``iter N``, ``loss X``)."""
    sre = re.compile(step_regex) if step_regex else _STEP
    lre = re.compile(loss_regex) if loss_regex else _LOSS
    steps = None
    last = best = None
    for line in lines:
        m = sre.search(line)
        if m:
            with contextlib.suppress(TypeError, ValueError):
                s = int(_first_group(m))
                steps = s if steps is None else max(steps, s)
        m = lre.search(line)
        if m:
            with contextlib.suppress(TypeError, ValueError):
                v = float(_first_group(m))
                if v == v:  # not NaN
                    last = v
                    best = v if best is None else min(best, v)
    return {"steps": steps, "last_loss": last, "best_loss": best}


def _run_meta(paths: list[Path], logs: Path) -> dict[str, Any]:
    """Host, GPU, attempts and bundle from the run.json files the %train engine writes (tolerant)."""
    cands = {p for p in paths if p.name.endswith(".json") and "run" in p.name}
    if logs.is_dir():
        cands |= set(logs.rglob("run.json")) | set(logs.rglob("*.run.json"))
    metas = []
    for p in cands:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                metas.append((str(data.get("ended") or data.get("finished") or data.get("started") or ""),
                              p.stat().st_mtime, data))
    if not metas:
        return {}
    metas.sort(key=lambda x: (x[0], x[1]))
    m = metas[-1][2]
    out: dict[str, Any] = {}
    host = m.get("host") or m.get("hostname")
    rt = m.get("runtime") if isinstance(m.get("runtime"), dict) else {}
    host = host or rt.get("host")
    if host:
        out["host"] = str(host)
    gpu = m.get("gpu") or m.get("gpus") or rt.get("gpus")
    if isinstance(gpu, dict):
        gpu = gpu.get("name")
    elif isinstance(gpu, (list, tuple)):
        names = [g.get("name") if isinstance(g, dict) else str(g) for g in gpu]
        gpu = ", ".join(n for n in names if n) or None
    if gpu:
        out["gpu"] = str(gpu)
    att = m.get("attempts")
    if isinstance(att, list):
        att = len(att)
    if att is None and isinstance(m.get("restarts"), int):
        att = m["restarts"] + 1
    if isinstance(att, int):
        out["attempts"] = att
    if isinstance(m.get("bundle"), str):
        out["bundle"] = m["bundle"]
    for k in ("steps", "step", "last_step"):
        if isinstance(m.get(k), int):
            out["meta_steps"] = m[k]
            break
    return out


def _checkpoints_per_tier(cfg: "Config", experiment: str) -> dict[str, str | None]:
    from .config import CHECKPOINT_PATTERNS
    try:
        from .checkpoints import step_of
    except ImportError:  # pragma: no cover - the checkpoint module ships with colabkit
        def step_of(name: str) -> int | None:
            m = re.search(r"(?:step|iter)[_-]?(\d+)", name)
            return int(m.group(1)) if m else None

    def newest(names: Iterable[str]) -> str | None:
        best = None
        for n in names:
            base = posixpath.basename(n)
            if base.endswith(".json") or is_temporary(base):
                continue
            if not any(fnmatch.fnmatchcase(base, p) for p in CHECKPOINT_PATTERNS):
                continue
            s = step_of(base)
            if s is not None and (best is None or s > best[0]):
                best = (s, n)
        return best[1] if best else None

    ck = cfg.checkpoint_dir(experiment)
    out: dict[str, str | None] = {}
    local = newest(p.relative_to(cfg.root).as_posix() for p in ck.rglob("*") if p.is_file()) if ck.is_dir() else None
    out["local"] = local
    from .remotes import open_remote
    prefix = cfg.remote_path(ck)
    for t in cfg.tiers:
        try:
            with open_remote(cfg, t) as r:
                out[t.name] = newest(f.path for f in r.list(prefix))
        except (ColabkitError, OSError) as e:
            out[t.name] = f"unavailable ({redact(str(e))[:120]})"
    return out


# the first line of each attempt's log, and the line the engine appends when the attempt ends (runner.py)
_ATTEMPT_HEADER = re.compile(r"^# colabkit %train (?P<experiment>\S+) run (?P<run>\S+) attempt (?P<n>\d+) on "
                             r"(?P<host>\S+) at (?P<at>\S+?):")
_ATTEMPT_END = re.compile(r"^# colabkit: attempt (?P<n>\d+) (?P<detail>.+) at (?P<at>\S+)\s*$")
NO_END = "no end recorded (the machine was preempted or the run killed)"


def _run_attempts(cfg: "Config", experiment: str, paths: list[Path]) -> list[dict[str, Any]]:
    """Every attempt of the newest run, across its restarts and the earlier runs it resumed from.

    A run (one ``%train``, one ``logs/<run id>/`` folder) lists its attempts in its run.json; an attempt cut off
    by a preemption is known only from its log (``<run id>.attempt<N>.log``, whose first line says where it
    ran). A run whose first attempt was resumed from a checkpoint continues the run before it; the chain ends
    at a fresh start.

    Returns:
        ``[{"run", "number", "host", "gpu", "resume_from", "outcome", "step"}]`` in the order they ran.
    """
    files = {p for p in paths if p.is_file()}
    logs = cfg.log_dir(experiment)
    if logs.is_dir():
        files |= {p for p in logs.rglob("*") if p.is_file() and (p.suffix == ".log" or p.name.endswith("run.json"))}
    runs: dict[str, dict[str, Any]] = {}
    for p in sorted(files):
        if p.name.endswith("run.json"):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(p.read_text(encoding="utf-8"))
                if not (isinstance(data, dict) and isinstance(data.get("run_id"), str)
                        and isinstance(data.get("attempts"), list)):
                    continue
                r = runs.setdefault(data["run_id"], {"attempts": {}})
                r.update({k: data.get(k) for k in ("host", "gpu", "started") if data.get(k)})
                for a in data["attempts"]:
                    if isinstance(a, dict) and isinstance(a.get("number"), int):
                        r["attempts"].setdefault(a["number"], {}).update(
                            {k: a.get(k) for k in ("resume_from", "detail", "last_step", "started")
                             if a.get(k) is not None})
        elif p.suffix == ".log":
            with contextlib.suppress(OSError):
                with open(p, "r", encoding="utf-8", errors="replace") as f:
                    m = _ATTEMPT_HEADER.match(f.readline())
                    if not m or m.group("experiment") != experiment:
                        continue
                    body = list(f)
                r = runs.setdefault(m.group("run"), {"attempts": {}})
                if int(m.group("n")) == 1:
                    r.setdefault("started", m.group("at"))
                a = r["attempts"].setdefault(int(m.group("n")), {})
                a["log_host"] = m.group("host")
                a["log_step"] = parse_log_lines(body, step_regex=cfg.train.step_regex,
                                                loss_regex=cfg.train.loss_regex)["steps"]
                end = next((e for e in map(_ATTEMPT_END.match, reversed(body[-5:])) if e), None)
                if end:
                    a.setdefault("detail", end.group("detail"))
    if not runs:
        return []
    def began(rid: str) -> tuple[str, float, str]:  # run.json's stamp has seconds; its attempts' times are exact
        times = [a["started"] for a in runs[rid]["attempts"].values() if isinstance(a.get("started"), (int, float))]
        return (str(runs[rid].get("started") or ""), min(times, default=0.0), rid)
    order = sorted(runs, key=began)
    chain = [order[-1]]
    while len(chain) < len(order):  # resumed from a checkpoint: the run before it is the same run, continued
        first = runs[chain[0]]["attempts"].get(min(runs[chain[0]]["attempts"], default=1), {})
        if not first.get("resume_from"):
            break
        chain.insert(0, order[len(order) - len(chain) - 1])
    out = []
    for rid in chain:
        r = runs[rid]
        for n in sorted(r["attempts"]):
            a = r["attempts"][n]
            step = a.get("last_step") if a.get("last_step") is not None else a.get("log_step")
            out.append({"run": rid, "number": n, "host": r.get("host") or a.get("log_host"), "gpu": r.get("gpu"),
                        "resume_from": a.get("resume_from"), "outcome": a.get("detail") or NO_END, "step": step})
    return out


def summarize_run(cfg: "Config", experiment: str, paths: list[Path]) -> dict[str, Any]:
    """What a journal entry says about a run: bundle, host, GPU, steps, losses, attempts, checkpoints."""
    lines: list[str] = []
    for p in sorted(paths):
        if p.suffix.lower() in (".json", ".pt", ".bin", ".zip", ".gz") or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            with open(p, "r", encoding="utf-8", errors="replace") as f:
                lines.extend(f)
    parsed = parse_log_lines(lines, step_regex=cfg.train.step_regex, loss_regex=cfg.train.loss_regex)
    meta = _run_meta(paths, cfg.log_dir(experiment))
    rec = None
    with contextlib.suppress(AirlockError):
        rec = read_record(cfg.root, experiment)
    steps = parsed["steps"] if parsed["steps"] is not None else meta.get("meta_steps")
    attempts = _run_attempts(cfg, experiment, paths)
    return {"bundle": meta.get("bundle") or (rec or {}).get("bundle"), "host": meta.get("host"),
            "gpu": meta.get("gpu"), "steps": steps, "last_loss": parsed["last_loss"],
            "best_loss": parsed["best_loss"], "attempts": len(attempts) if attempts else meta.get("attempts"),
            "attempt_details": attempts,
            "checkpoints": _checkpoints_per_tier(cfg, experiment),
            "logs": [cfg.remote_path(p) if _inside(p, cfg.root) else str(p) for p in sorted(paths)]}


def _inside(p: Path, root: Path) -> bool:
    try:
        p.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
