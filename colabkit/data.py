"""Data sets pre-fetched to the local SSD before training: verified, idempotent, journaled.

The protocol's rule: never train off a network mount. ``fetch`` copies a data set from where it is archived
(a Hub dataset repo, Drive, a public link, a local or mounted path) into the data cache on the local disk
(``data.cache``; ``/content/data`` on Colab, ``/data`` on the VM), verifies every file against the source's
own digest, and appends the protocol's ``## Data`` entry to ``journal.md`` once per version.

Layout of the cache::

    <cache>/<name>/<version>/...                     the files, exactly as train.py reads them
    <cache>/<name>/.colabkit-tmp-<version>.download/  a fetch in progress (kept across a crash: resumed)
    <cache>/.colabkit/<name>/<version>.json          the record: every file's size, sha256 and stat

A version's folder appears under its final name only once every file is downloaded, verified and unpacked,
so a path that exists is a complete data set. A second fetch of a version whose record exists compares the
files' size and modification time with the record (re-hashing any that changed) and downloads nothing; it
does not even ask the source when the version is declared. A new version goes beside the old one; ``evict``
frees space, never under a running job.

Example:
    >>> from colabkit import data
    >>> res = data.fetch("pg19", source="hub:datasets/alice/pg19@v1.0", version="v1.0")
    >>> res.path
    PosixPath('/content/data/pg19/v1.0')
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .errors import (ColabkitError, ConfigError, DataError, DiskFullError, IntegrityError, RemoteNotFoundError,
                     TransientRemoteError)
from .fsutil import (CHUNK, TMP_PREFIX, atomic_copy, atomic_write_json, free_bytes, fsync_dir, hash_file,
                     is_temporary)
from .runtime import command

if TYPE_CHECKING:
    from .config import Config
    from .remotes.base import RemoteFile

log = logging.getLogger(__name__)

FORMAT = 1
RECORDS = ".colabkit"
ATTEMPTS = 5                    # tries per file after a dropped connection or a transient error
UNVERSIONED = "unversioned"
_WAIT = threading.Event()       # never set: a back-off wait that is not a bare sleep
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


# -- sources ---------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One file a source holds: `rel` is its path inside the data set."""

    rel: str
    size: int | None
    sha256: str | None = None
    md5: str | None = None
    key: str = ""               # what identifies this content at the source (a digest, an etag, a stat)
    ref: Any = None             # what the source needs to download it


class Source:
    """Where a data set comes from. Subclasses list the files and download one, verified."""

    kind = "source"
    #: what "verified" means for this source's files
    digest_name = "none"

    def __init__(self, text: str) -> None:
        self.text = text
        self.commit: str | None = None
        self.note: str | None = None

    def items(self) -> list[Item]:
        raise NotImplementedError

    def download(self, item: Item, dest: Path, *, progress: Callable[[int], None] | None) -> str:
        """Download `item` to `dest` (atomically, verified against the source's digest); returns its sha256."""
        raise NotImplementedError

    def default_version(self, items: list[Item]) -> str:
        """The version when none is declared: a digest of what the source lists."""
        lines = sorted(f"{i.rel}\0{i.size}\0{i.key}" for i in items)
        return "sha-" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]

    def close(self) -> None:
        pass


def _glob_match(pattern: str | None) -> Callable[[str], bool]:
    if not pattern:
        return lambda rel: True
    pats = [p.strip() for p in pattern.split(",") if p.strip()]
    from .sync import Patterns
    return Patterns(pats, ())


class HubSource(Source):
    """``hub:datasets/USER/REPO[@revision][:path-glob]`` through huggingface_hub (the Hub tier's endpoint and
    token rules; a public repository needs no token)."""

    kind = "hub"
    digest_name = "the Hub's sha256 (git oid for small files)"

    def __init__(self, text: str, config: "Config") -> None:
        super().__init__(text)
        m = re.fullmatch(r"hub:(?://)?(?:(datasets|models|spaces)/)?([\w.\-]+/[\w.\-]+)(?:@([^:]+))?(?::(.+))?",
                         text.strip())
        if not m:
            raise DataError(f"{text!r} is not a Hub source; write hub:datasets/USER/REPO[@REVISION][:GLOB], "
                            "e.g. hub:datasets/alice/pg19@v1.0:train/*.parquet")
        self.repo_type = {"datasets": "dataset", "models": "model", "spaces": "space"}[m.group(1) or "datasets"]
        self.repo_id, self.revision, self.glob = m.group(2), m.group(3) or "main", m.group(4)
        from .remotes.hub import HubRemote
        self.remote = HubRemote("hub", self.repo_id, repo_type=self.repo_type, revision=self.revision,
                                endpoint=config.hub.endpoint, require_token=False, project=config.project)

    def items(self) -> list[Item]:
        from .errors import RemoteAuthError, RemotePermissionError
        match = _glob_match(self.glob)
        r = self.remote
        try:
            info = r._call(r.api.repo_info, self.repo_id, repo_type=self.repo_type, revision=self.revision,
                           action=f"reading {self.repo_type} repo {self.repo_id}@{self.revision}")
        except (RemoteNotFoundError, RemoteAuthError, RemotePermissionError) as e:
            who = r._token.describe() if r._token else "no token"
            if "has no revision" in str(e) or "RevisionNotFound" in str(e):
                raise DataError(f"{self.text}: {self.repo_type} repo {self.repo_id!r} has no revision "
                                f"{self.revision!r}; check the @revision") from None
            raise DataError(f"{self.text}: {self.repo_type} repo {self.repo_id!r} was not found at {r.endpoint}, or "
                            f"it is private and {who} cannot read it; check the name, or set HF_TOKEN to a token "
                            "that can read it") from None
        self.commit = getattr(info, "sha", None)
        recs = [x for x in r.list("") if match(x.path)]
        return [Item(r.path, r.size, sha256=r.sha256, key=r.sha256 or r.id or "", ref=r) for r in recs]

    def download(self, item: Item, dest: Path, *, progress: Callable[[int], None] | None) -> str:
        rec = self.remote.get(item.ref.path, dest, expected=item.ref, progress=progress)
        return rec.sha256 or hash_file(dest).sha256

    def close(self) -> None:
        self.remote.close()


class DriveSource(Source):
    """``drive:FILE_OR_FOLDER_ID`` or ``drive:path/under/the/drive/folder`` (the Drive tier's client and
    credentials)."""

    kind = "drive"
    digest_name = "Drive's md5"

    def __init__(self, text: str, config: "Config") -> None:
        super().__init__(text)
        self.target = text.split(":", 1)[1].strip().strip("/")
        if not self.target:
            raise DataError(f"{text!r} names no Drive file; write drive:FILE_OR_FOLDER_ID or drive:path/in/folder")
        from .remotes.drive import DriveRemote
        from .secrets import load_google_credentials
        d = config.drive
        self.is_id = "/" not in self.target and bool(re.fullmatch(r"[-\w]{20,}", self.target))
        if not self.is_id and not d.folder_id:
            raise DataError(f"{text}: a path under the Drive folder needs drive.folder_id in colabkit.yaml "
                            "(see docs/drive.md); or give the file's or folder's id: drive:ID")
        creds, found = load_google_credentials(config, scopes=tuple(d.scopes))
        self._make = lambda folder: DriveRemote("drive", folder, credentials=creds, endpoint=d.endpoint,
                                                chunk_size=d.chunk_size, timeout=d.timeout,
                                                identity=found.client_email, source=found.source,
                                                is_service_account=found.kind == "service_account")
        self.remote = self._make(d.folder_id or self.target)
        self._others: list[Any] = []

    def items(self) -> list[Item]:
        out: list[tuple[Any, RemoteFile, str]] = []   # (remote, record, rel)
        if self.is_id:
            rec, folder = self.remote.lookup(self.target)
            if folder:
                sub = self._make(self.target)
                self._others.append(sub)
                out = [(sub, r, r.path) for r in sub.list("")]
            else:
                out = [(self.remote, rec, rec.path)]
        else:
            rec = self.remote.stat(self.target)
            if rec is not None:
                out = [(self.remote, rec, self.target.rsplit("/", 1)[-1])]
            else:
                base = self.target + "/"
                out = [(self.remote, r, r.path[len(base):]) for r in self.remote.list(self.target)]
            if not out:
                raise DataError(f"{self.text}: nothing at {self.target!r} in Drive folder "
                                f"{self.remote.folder_id}; check the path (or share it with "
                                f"{self.remote.identity or 'the service account'})")
        return [Item(rel, r.size, sha256=r.sha256, md5=r.md5, key=r.md5 or r.sha256 or "", ref=(remote, r))
                for remote, r, rel in out]

    def download(self, item: Item, dest: Path, *, progress: Callable[[int], None] | None) -> str:
        remote, rec = item.ref
        got = remote.get(rec.path, dest, expected=rec, progress=progress)
        return got.sha256 or hash_file(dest).sha256

    def close(self) -> None:
        for r in [self.remote, *self._others]:
            r.close()


class HttpSource(Source):
    """``https://...`` (or ``http://``): one file, resumed with ``Range`` after a dropped connection."""

    kind = "https"

    def __init__(self, text: str, *, timeout: float = 60.0) -> None:
        super().__init__(text)
        self.url = text.strip()
        self.timeout = timeout
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.url).path.rsplit("/", 1)[-1])
        self.name = name if name and name not in (".", "..") else "download"

    def _open(self, headers: dict[str, str], method: str = "GET") -> Any:
        from . import __version__
        req = urllib.request.Request(self.url, method=method,
                                     headers={"User-Agent": f"colabkit/{__version__}", **headers})
        return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 - the user's own link

    def items(self) -> list[Item]:
        size, etag = None, ""
        try:
            with self._open({}, "HEAD") as r:
                cl = r.headers.get("Content-Length")
                size = int(cl) if cl and cl.isdigit() else None
                etag = r.headers.get("ETag") or r.headers.get("Last-Modified") or ""
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise DataError(f"{self.url}: the server answered HTTP {e.code} (not found); check the link") from None
            if e.code in (401, 403):
                raise DataError(f"{self.url}: the server answered HTTP {e.code}: the link needs sign-in; use a "
                                "public link, or the drive: or hub: source with credentials") from None
            if e.code not in (405, 501) and e.code < 500:
                raise DataError(f"{self.url}: the server answered HTTP {e.code}; check the link") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise TransientRemoteError(f"{self.url}: cannot reach the server ({_reason(e)})", remote="https",
                                       path=self.url) from None
        return [Item(self.name, size, key=etag)]

    def default_version(self, items: list[Item]) -> str:
        return UNVERSIONED

    def download(self, item: Item, dest: Path, *, progress: Callable[[int], None] | None) -> str:
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if item.size is not None and have > item.size:
            have = 0
        try:
            r = self._open({"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else
                           {"Accept-Encoding": "identity"})
        except urllib.error.HTTPError as e:
            if e.code == 416 and item.size is not None and have == item.size:
                r = None    # everything is here already
            elif e.code in (408, 429) or e.code >= 500:
                raise TransientRemoteError(f"{self.url}: the server answered HTTP {e.code}", remote="https",
                                           path=self.url) from None
            else:
                raise DataError(f"{self.url}: the server answered HTTP {e.code}; check the link") from None
        if r is not None:
            with r:
                mode = "ab" if have and r.status == 206 else "wb"
                if mode == "wb":
                    have = 0        # the server ignored Range: the whole file comes again
                with open(part, mode) as f:
                    while True:
                        buf = r.read(CHUNK)
                        if not buf:
                            break
                        f.write(buf)
                        have += len(buf)
                        if progress:
                            progress(len(buf))
        if item.size is not None and have < item.size:
            raise ConnectionError(f"the download ended at byte {have} of {item.size}")
        sha = hash_file(part).sha256
        os.replace(part, dest)
        return sha


class GdownSource(Source):
    """``gdown:ID_OR_URL`` (or a ``https://drive.google.com/...`` link): a publicly shared Drive file."""

    kind = "gdown"

    def __init__(self, text: str, config: "Config") -> None:
        super().__init__(text)
        self.link = text.split(":", 1)[1].strip() if text.startswith("gdown:") else text.strip()
        self.endpoint = config.drive.endpoint

    def items(self) -> list[Item]:
        return [Item("", None, key=self.link)]   # gdown tells the name and the size only by downloading

    def default_version(self, items: list[Item]) -> str:
        return UNVERSIONED

    def download(self, item: Item, dest: Path, *, progress: Callable[[int], None] | None) -> str:
        from .remotes.drive import gdown_fetch, resolve_endpoint
        tmp = dest.parent / (TMP_PREFIX + "gdown")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            got = gdown_fetch(self.link, tmp, endpoint=resolve_endpoint(self.endpoint))
        except ValueError as e:
            raise DataError(f"gdown source: {e}") from None
        from .remotes.base import normalize_path
        try:
            item.rel = item.rel or normalize_path(got.name)
        except ValueError:
            raise DataError(f"{self.link}: the file name {got.name!r} is not usable; nothing was kept") from None
        final = dest.parent / item.rel if dest.name == TMP_PREFIX + "unnamed" else dest
        if progress:
            progress(got.stat().st_size)
        sha = hash_file(got).sha256
        os.replace(got, final)
        shutil.rmtree(tmp, ignore_errors=True)
        return sha


class LocalSource(Source):
    """A local or mounted path (a mounted Drive is a network mount: it is copied, never trained from)."""

    kind = "local"

    def __init__(self, text: str, config: "Config") -> None:
        super().__init__(text)
        raw = text[5:] if text.startswith("file:") else text
        p = Path(raw).expanduser()
        self.path = p if p.is_absolute() else config.root / p
        from .runtime import is_network_path
        if not self.path.exists():
            raise DataError(f"{text}: no such file or folder ({self.path}); check the path, or give a hub:, "
                            "drive:, gdown: or https:// source")
        if is_network_path(self.path):
            self.note = f"copied from a network mount ({self.path})"

    def items(self) -> list[Item]:
        if self.path.is_file():
            st = self.path.stat()
            return [Item(self.path.name, st.st_size, key=f"{st.st_size}:{st.st_mtime_ns}", ref=self.path)]
        out = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if d not in (".git", RECORDS, "__pycache__"))
            for fn in sorted(filenames):
                if is_temporary(fn):
                    continue
                full = Path(dirpath) / fn
                st = full.stat()
                rel = full.relative_to(self.path).as_posix()
                out.append(Item(rel, st.st_size, key=f"{st.st_size}:{st.st_mtime_ns}", ref=full))
        return out

    def download(self, item: Item, dest: Path, *, progress: Callable[[int], None] | None) -> str:
        return atomic_copy(item.ref, dest, progress=progress, durable=False, md5=False).sha256


def parse_source(text: str, *, config: "Config") -> Source:
    """The :class:`Source` a source string names.

    Raises:
        DataError: a form that is not understood, with the forms that are.
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError("the data set has no source; give --source hub:datasets/USER/REPO, drive:ID, gdown:ID, "
                        "https://... or a path")
    s = text.strip()
    if s.startswith("hub:"):
        return HubSource(s, config)
    if s.startswith("drive:"):
        return DriveSource(s, config)
    if s.startswith("gdown:") or re.match(r"https?://(drive|docs)\.google\.com/", s):
        return GdownSource(s, config)
    if re.match(r"https?://", s):
        return HttpSource(s)
    if re.match(r"^[a-z][a-z0-9+.-]*://", s) or (re.match(r"^[a-z]{2,}:", s) and not s.startswith("file:")):
        raise DataError(f"{text!r}: unknown kind of source; use hub:datasets/USER/REPO[@REV][:GLOB], "
                        "drive:ID_OR_PATH, gdown:ID_OR_URL, https://... or a local path")
    return LocalSource(s, config)


# -- the cache -------------------------------------------------------------------------------------------
def default_cache(config: "Config") -> Path:
    """``/content/data`` on Colab, ``/data`` on the VM when it is writable (or can be made), else
    ``<home>/data``."""
    from . import runtime
    if runtime.in_colab():
        return Path("/content/data")
    if runtime.detect().platform == "vm":
        p = Path("/data")
        with contextlib.suppress(OSError):
            p.mkdir(exist_ok=True)
        if p.is_dir() and os.access(p, os.W_OK):
            return p
    return config.home / "data"


def cache_dir(config: "Config", cache: str | os.PathLike | None = None) -> Path:
    """The data cache: `cache`, else ``data.cache``, else :func:`default_cache`.

    Raises:
        DataError: it is on a network or FUSE mount (training from it is what the cache is there to avoid).
    """
    from .runtime import is_network_path, mount_of
    raw = cache if cache is not None else config.data.cache
    if raw is not None:
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else config.root / p
    else:
        p = default_cache(config)
    if is_network_path(p):
        m = mount_of(p)
        kind = f" ({m.fstype} at {m.point})" if m and m.is_network else ""
        raise DataError(f"data cache {p} is on a network or FUSE mount{kind}: training from it is slow and stalls "
                        "when the mount hiccups. Point data.cache (or --cache) at the local SSD, e.g. "
                        "/content/data on Colab or /data on the VM")
    return p


def _slug(version: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]", "_", str(version)).lstrip(".") or "_"
    return s[:120]


def _record_path(cache: Path, name: str, version: str) -> Path:
    return cache / RECORDS / name / f"{_slug(version)}.json"


def _write_record(p: Path, rec: Mapping[str, Any]) -> None:
    """Compact JSON (a record of 100,000 files is read on every repeated fetch), fsynced and renamed."""
    from .fsutil import atomic_write_text
    atomic_write_text(p, json.dumps(rec, separators=(",", ":")) + "\n")


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_record(name: str, version: str, *, config: "Config", cache: str | os.PathLike | None = None
                ) -> dict[str, Any] | None:
    """The record of a fetched version (None when it was never fetched here)."""
    return _read_json(_record_path(cache_dir(config, cache), name, version))


def records(name: str | None = None, *, config: "Config", cache: str | os.PathLike | None = None
            ) -> list[dict[str, Any]]:
    """Every fetched version in the cache (of `name`, or of every data set), newest fetch first."""
    root = cache_dir(config, cache) / RECORDS
    out = []
    dirs = [root / name] if name else (sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else [])
    for d in dirs:
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            rec = _read_json(p)
            if rec and rec.get("name") and rec.get("version") is not None:
                rec["_record"] = str(p)
                out.append(rec)
    out.sort(key=lambda r: -(r.get("fetched_at") or 0))
    return out


def _list_digest(files: Iterable[Mapping[str, Any]]) -> str:
    lines = sorted(f"{f['path']}\0{f['size']}\0{f['sha256']}" for f in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def quick_check(rec: Mapping[str, Any], *, rehash_changed: bool = True) -> list[str]:
    """What is wrong with a fetched version, by size and modification time (files whose stat changed are
    re-hashed): a list of problems, empty when it is intact."""
    base = str(rec["path"])
    problems = []
    if not os.path.isdir(base):
        return [f"{base} does not exist"]
    base += os.sep
    stat_ = os.stat
    for f in rec.get("files", []):
        p = base + f["path"]     # strings, not pathlib: this loop is the whole cost of a repeated fetch
        try:
            st = stat_(p)
        except OSError:
            problems.append(f"{f['path']} is missing")
            continue
        if st.st_size != f["size"]:
            problems.append(f"{f['path']} has {st.st_size} bytes, not {f['size']}")
        elif st.st_mtime_ns != f.get("mtime_ns"):
            if not rehash_changed or hash_file(p).sha256 != f["sha256"]:
                problems.append(f"{f['path']} was modified (sha256 differs)")
    return problems


# -- fetch -----------------------------------------------------------------------------------------------
@dataclass
class FetchResult:
    """What :func:`fetch` did.

    Attributes:
        path: the local folder holding the data set (pass it to train.py; ``COLABKIT_DATA_<NAME>`` in %train).
        downloaded: bytes transferred by this call (0 when the version was already here and intact).
        verified: ``source`` (every file against the source's digest), ``declared`` (against the sha256 list
            of the declaration), or ``none`` (nothing to check against: recorded as unverified).
        journaled: a ``## Data`` entry was appended to journal.md by this call.
    """

    name: str
    version: str
    path: Path
    source: str
    files: int
    bytes: int
    downloaded: int
    up_to_date: bool
    verified: str
    verified_by: str
    list_digest: str
    journaled: bool
    commit: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": str(self.path), "source": self.source,
                "files": self.files, "bytes": self.bytes, "downloaded": self.downloaded,
                "up_to_date": self.up_to_date, "verified": self.verified, "verified_by": self.verified_by,
                "list_digest": self.list_digest, "journaled": self.journaled, "commit": self.commit,
                "warnings": list(self.warnings)}

    def lines(self) -> list[str]:
        from .config import format_size
        what = "already here, intact: nothing downloaded" if self.up_to_date else \
            f"downloaded {format_size(self.downloaded)}"
        out = [f"{self.name} {self.version}: {self.files} files, {format_size(self.bytes)} in {self.path} ({what})"]
        if self.verified == "none":
            out.append(f"  UNVERIFIED: {self.verified_by}")
        else:
            out.append(f"  verified against {self.verified_by}")
        if self.journaled:
            out.append("  recorded in journal.md")
        out += [f"  warning: {w}" for w in self.warnings]
        env = "COLABKIT_DATA_" + env_name(self.name)
        out.append(f"  train.py gets this path as ${env} when train.data lists {self.name}")
        return out


def env_name(name: str) -> str:
    """``pg-19.v1`` -> ``PG_19_V1`` (the suffix of ``COLABKIT_DATA_<NAME>``)."""
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _declared(config: "Config", name: str, **given: Any) -> dict[str, Any]:
    decl = config.data.get(name)
    d: dict[str, Any] = {"source": None, "version": None, "preprocessing": None, "unpack": "none", "sha256": None}
    if decl is not None:
        d.update(source=decl.source, version=decl.version, preprocessing=decl.preprocessing, unpack=decl.unpack,
                 sha256=decl.sha256)
    for k, v in given.items():
        if v is not None:
            d[k] = v
    if not d["source"]:
        declared = ", ".join(s.name for s in config.data.sets) or "none"
        raise DataError(f"data set {name!r} is not declared in colabkit.yaml (declared: {declared}) and no --source "
                        f"was given; run '{command(f'data fetch {name} --source hub:datasets/USER/REPO')}' or "
                        "declare it under data.sets")
    if d["unpack"] not in ("tar", "zip", "none"):
        raise ConfigError(f"--unpack: {d['unpack']!r} is not allowed; use one of tar, zip, none", key="unpack",
                          value=d["unpack"])
    return d


def _sha_for(declared: Any, rel: str, single: bool) -> str | None:
    if declared is None:
        return None
    if isinstance(declared, str):
        return declared.lower() if single or rel == "" else None
    v = declared.get(rel) or declared.get(rel.rsplit("/", 1)[-1])
    return v.lower() if v else None


def _check_declared(declared: Any) -> None:
    vals = [declared] if isinstance(declared, str) else list((declared or {}).values())
    for v in vals:
        if not _HEX64.match(v):
            raise ConfigError(f"sha256: {v!r} is not a sha256 hex digest (64 hex characters)", key="sha256", value=v)


def _retrying(fn: Callable[[], Any], *, what: str, on_retry: Callable[[], None] | None = None) -> Any:
    """Call `fn`, again after a dropped connection or a transient error (ATTEMPTS in all, backing off)."""
    delay = 0.5
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except urllib.error.HTTPError:
            raise
        except (TransientRemoteError, ConnectionError, TimeoutError, http.client.HTTPException,
                urllib.error.URLError) as e:
            if attempt == ATTEMPTS:
                raise DataError(f"{what} failed {ATTEMPTS} times ({_reason(e)}); what was downloaded is kept: run "
                                "the same fetch again to continue") from None
            log.info("%s: %s; retrying (attempt %d of %d)", what, _reason(e), attempt + 1, ATTEMPTS)
            if on_retry:
                on_retry()
            _WAIT.wait(getattr(e, "retry_after", None) or delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _reason(e: BaseException) -> str:
    r = getattr(e, "reason", None)
    return f"{type(e).__name__}: {r or e}"


class _Bar:
    """A tqdm.auto bar over bytes (a widget in notebooks), or nothing."""

    def __init__(self, total: int | None, desc: str, enabled: bool) -> None:
        self.bar = None
        self.done = 0
        # a bar for a few small files only flickers; tqdm also starts a monitor thread per process
        if enabled and (total is None or total >= 8 * 10**6) and not os.environ.get("TQDM_DISABLE"):
            with contextlib.suppress(ImportError):
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_space(where: Path, needed: int, *, config: "Config", what: str) -> None:
    from .config import format_size
    free = free_bytes(where)
    margin = config.data.min_free
    if free - needed < margin:
        raise DiskFullError(
            f"{what} needs {format_size(needed)} but only {format_size(free)} is free on the disk of {where} "
            f"(and data.min_free keeps {format_size(margin)} free); nothing was downloaded. Free space "
            f"('{command('data evict NAME')}' removes a data set), or point data.cache at a larger disk",
            path=str(where), free=free, needed=needed + margin)


def fetch(name: str, *, config: "Config | None" = None, source: str | None = None, version: str | None = None,
          unpack: str | None = None, sha256: str | Mapping[str, str] | None = None,
          preprocessing: str | None = None, cache: str | os.PathLike | None = None, progress: bool = True,
          journal: bool = True) -> FetchResult:
    """Fetch data set `name` to the local data cache, verified; a second call for the same version downloads
    nothing.

    Args:
        name: the data set (``data.sets[].name``, or any name with `source`).
        source: where from (overrides the declaration): ``hub:datasets/USER/REPO[@REV][:GLOB]``,
            ``drive:ID_OR_PATH``, ``gdown:ID_OR_URL``, ``https://...`` or a local/mounted path.
        version: the version (default: declared, else a digest of the source's file list; ``unversioned``
            for a plain link).
        unpack: ``tar``, ``zip`` or ``none``: unpack the downloaded archive(s) safely.
        sha256: a digest (one-file source) or ``{path: digest}`` to verify against (plain links have no other).
        preprocessing: what was done to the data, for the journal.
        cache: the data cache (default ``data.cache``).
        progress: a tqdm.auto progress bar in the foreground.
        journal: append the ``## Data`` entry to journal.md (once per version).
    Returns:
        A :class:`FetchResult`.
    Raises:
        DataError: an unknown data set or source, a network cache, unsafe archive entries, repeated failures.
        IntegrityError: a file does not match its digest (nothing is left under the final name).
        DiskFullError: not enough free space, found before the first byte is downloaded.
    """
    from .config import load_config
    cfg = config if config is not None else load_config()
    from .config import _DATA_NAME
    if not isinstance(name, str) or not _DATA_NAME.match(name):
        raise DataError(f"data set name {name!r}: use letters, digits, '.', '_' or '-' (e.g. pg19)")
    decl = _declared(cfg, name, source=source, version=version, unpack=unpack, sha256=sha256,
                     preprocessing=preprocessing)
    if decl["sha256"] is not None:
        _check_declared(decl["sha256"])
    root = cache_dir(cfg, cache)
    warnings: list[str] = []

    if decl["version"] is not None:   # a declared version already here: no need to ask the source
        rec = _read_json(_record_path(root, name, decl["version"]))
        if rec is not None and rec.get("source") == decl["source"] and not quick_check(rec):
            return _result(rec, cfg, downloaded=0, up_to_date=True, journal=journal, warnings=warnings)

    src = parse_source(decl["source"], config=cfg)
    try:
        items = _retrying(src.items, what=f"listing {decl['source']}")
        if not items:
            raise DataError(f"{decl['source']}: the source holds no files"
                            + (f" matching {getattr(src, 'glob', '')!r}" if getattr(src, "glob", None) else ""))
        for it in items:
            if it.rel:
                from .remotes.base import normalize_path
                try:
                    it.rel = normalize_path(it.rel)
                except ValueError:
                    raise DataError(f"{decl['source']}: the file name {it.rel!r} would land outside the data set's "
                                    "folder; nothing was downloaded") from None
        ver = decl["version"] or src.default_version(items)
        rec = _read_json(_record_path(root, name, ver))
        if rec is not None and rec.get("source") == decl["source"] and not quick_check(rec):
            return _result(rec, cfg, downloaded=0, up_to_date=True, journal=journal, warnings=warnings)
        return _download(name, ver, decl, src, items, root=root, cfg=cfg, progress=progress, journal=journal,
                         warnings=warnings)
    finally:
        src.close()


def _download(name: str, ver: str, decl: dict[str, Any], src: Source, items: list[Item], *, root: Path,
              cfg: "Config", progress: bool, journal: bool, warnings: list[str]) -> FetchResult:
    from .config import format_size
    base = root / name
    slug = _slug(ver)
    final = base / slug
    staging = base / f"{TMP_PREFIX}{slug}.download"
    state_path = base / f"{TMP_PREFIX}{slug}.state.json"
    state = _read_json(state_path) or {}
    done: dict[str, Any] = state.get("files", {}) if state.get("source") == decl["source"] else {}

    def complete(it: Item) -> bool:
        d = done.get(it.rel or "")
        return bool(d and d.get("key") == it.key and d.get("size") == it.size and it.rel
                    and (staging / it.rel).is_file() and (staging / it.rel).stat().st_size == d.get("size"))

    todo = [it for it in items if not complete(it)]
    needed = sum(it.size or 0 for it in todo)
    _check_space(root, needed, config=cfg, what=f"{name} {ver} ({len(todo)} files)")
    staging.mkdir(parents=True, exist_ok=True)
    single = len(items) == 1
    bar = _Bar(needed or None, f"{name} {ver}", progress)
    downloaded = [0]

    def tick(n: int) -> None:
        downloaded[0] += n
        bar(n)
    try:
        for it in todo:
            dest = staging / (it.rel or (TMP_PREFIX + "unnamed"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            sha = _retrying(lambda: src.download(it, dest, progress=tick), what=f"downloading {it.rel or src.text}")
            if not it.rel:
                raise DataError(f"{src.text}: the download has no file name")  # pragma: no cover - gdown names it
            want = _sha_for(decl["sha256"], it.rel, single)
            if want is not None and sha != want:
                with contextlib.suppress(OSError):
                    (staging / it.rel).unlink()
                raise IntegrityError(f"{name}: {it.rel} does not match the declared sha256 ({sha[:16]}… vs "
                                     f"{want[:16]}…); the copy was discarded and nothing is under {final}. Check "
                                     "the sha256 in the declaration, or the link", path=it.rel, expected=want,
                                     actual=sha)
            done[it.rel] = {"key": it.key, "size": (staging / it.rel).stat().st_size if it.size is None else it.size,
                            "sha256": sha, "declared": want is not None}
            if it.size is None:
                it.size = done[it.rel]["size"]
            atomic_write_json(state_path, {"format": FORMAT, "source": decl["source"], "version": ver,
                                           "files": done}, durable=False)
    finally:
        bar.close()

    rels = {it.rel for it in items}
    if decl["sha256"] is not None and not isinstance(decl["sha256"], str):
        missing = sorted(set(decl["sha256"]) - rels - {r.rsplit("/", 1)[-1] for r in rels})
        if missing:
            warnings.append(f"the declared sha256 list names files the source does not hold: {', '.join(missing)}")
    if src.kind in ("hub", "drive"):
        verified, by = "source", src.digest_name
    elif all(done[r].get("declared") for r in rels):
        verified, by = "declared", "the sha256 list in the declaration"
    else:
        verified = "none"
        by = ("no digest to check against: a plain link without a declared sha256" if src.kind in ("https", "gdown")
              else "no digest to check against: a local copy without a declared sha256 (its sha256 is recorded)")
        warnings.append(f"{name} {ver} is UNVERIFIED: {by}; declare its sha256 in colabkit.yaml (data.sets[].sha256) "
                        "so a damaged download is caught")
        log.info("%s %s: unverified (%s)", name, ver, by)
    if src.note:
        warnings.append(src.note)

    if decl["unpack"] != "none":
        tree = base / f"{TMP_PREFIX}{slug}.unpack"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        try:
            files = []
            for rel in sorted(rels):
                files += unpack_archive(staging / rel, tree, kind=decl["unpack"], config=cfg, label=f"{name}: {rel}",
                                        cache=root)
        except BaseException:
            shutil.rmtree(tree, ignore_errors=True)
            raise
    else:
        tree = staging
        files = [{"path": r, "size": done[r]["size"], "sha256": done[r]["sha256"]} for r in sorted(rels)]
    for f in files:
        f["mtime_ns"] = os.stat(tree / f["path"]).st_mtime_ns
    old = None
    if final.exists():
        old = base / f"{TMP_PREFIX}{slug}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tree, final)
    fsync_dir(base)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        state_path.unlink()
    rec = {"format": FORMAT, "name": name, "version": ver, "source": decl["source"], "kind": src.kind,
           "path": str(final), "fetched_at": time.time(), "commit": src.commit, "unpack": decl["unpack"],
           "preprocessing": decl["preprocessing"], "verified": verified, "verified_by": by,
           # what was downloaded, when it differs from the files (an archive): the files themselves otherwise
           "source_files": ({r: {"size": done[r]["size"], "sha256": done[r]["sha256"]} for r in sorted(rels)}
                            if decl["unpack"] != "none" else None),
           "files": files, "bytes": sum(f["size"] for f in files), "list_digest": _list_digest(files),
           "journaled": False}
    _write_record(_record_path(root, name, ver), rec)
    log.info("%s %s: %d files, %s fetched to %s", name, ver, len(files), format_size(rec["bytes"]), final)
    return _result(rec, cfg, downloaded=downloaded[0], up_to_date=False, journal=journal, warnings=warnings)


def _result(rec: dict[str, Any], cfg: "Config", *, downloaded: int, up_to_date: bool, journal: bool,
            warnings: list[str]) -> FetchResult:
    journaled = False
    if journal:
        journaled = _journal_once(rec, cfg)
    if rec.get("verified") == "none" and up_to_date:
        warnings.append(f"{rec['name']} {rec['version']} is UNVERIFIED: {rec.get('verified_by')}")
    return FetchResult(name=rec["name"], version=rec["version"], path=Path(rec["path"]), source=rec["source"],
                       files=len(rec["files"]), bytes=rec["bytes"], downloaded=downloaded, up_to_date=up_to_date,
                       verified=rec.get("verified", "none"), verified_by=rec.get("verified_by", ""),
                       list_digest=rec["list_digest"], journaled=journaled, commit=rec.get("commit"),
                       warnings=warnings)


def _journal_once(rec: dict[str, Any], cfg: "Config") -> bool:
    """Append the Data entry unless journal.md already holds one for this name and file list."""
    from . import journal as jr
    from .secrets import redact
    marker = f"file list sha256 {rec['list_digest'][:16]}"
    text = jr.read(cfg)
    if marker in text and f"**Dataset**: {rec['name']}" in text:
        return False
    version = rec["version"] + (f" (commit {rec['commit'][:12]})" if rec.get("commit") else "")
    verified = {"source": f"every file against {rec.get('verified_by')}",
                "declared": "every file against the declared sha256 list"}.get(rec.get("verified"), "UNVERIFIED")
    jr.add_data(rec["name"], config=cfg, source=redact(rec["source"]), version=version,
                preprocessing=rec.get("preprocessing"), files=len(rec["files"]), size=rec["bytes"],
                digest=rec["list_digest"], verified=verified)
    return True


# -- archives --------------------------------------------------------------------------------------------
def unpack_archive(archive: Path, dest: Path, *, kind: str, config: "Config", label: str,
                   cache: Path | None = None) -> list[dict[str, Any]]:
    """Unpack `archive` (``tar``, any compression, or ``zip``) into `dest` by the airlock's rules: every entry
    checked before the first byte is written (no absolute path, no ``..``, no link or device), the size cap
    (``data.max_unpacked``) enforced on the bytes actually written. Returns the files written
    (path, size, sha256).

    Raises:
        DataError: an unsafe entry, an archive that is not of `kind`, or more than the cap.
        DiskFullError: the unpacked size does not fit.
    """
    from .airlock import _unsafe_reason, unsafe_name
    from .config import format_size
    cap = config.data.max_unpacked
    entries: list[tuple[str, Any, int]] = []
    bad: list[str] = []
    if kind == "tar":
        try:
            tf: Any = tarfile.open(archive, "r:*")
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{label} is not a readable tar archive ({e}); check unpack: in the declaration") from None
        members = tf.getmembers()
        for m in members:
            why = unsafe_name(m.name)
            if why is None and (m.issym() or m.islnk()):
                why = "a link"
            elif why is None and not (m.isreg() or m.isdir()):
                why = "a device, pipe or socket"
            if why:
                bad.append(f"{m.name!r} ({why})")
            elif m.isreg():
                entries.append((m.name, m, m.size))
    else:
        try:
            tf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{label} is not a readable zip archive ({e}); check unpack: in the declaration") from None
        for zi in tf.infolist():
            why = _unsafe_reason(zi)
            if why:
                bad.append(f"{zi.filename!r} ({why})")
            elif not zi.is_dir():
                entries.append((zi.filename, zi, zi.file_size))
    with tf:
        if bad:
            raise DataError(f"{label} is unsafe and was not unpacked: " + "; ".join(bad[:20])
                            + ("" if len(bad) <= 20 else f"; and {len(bad) - 20} more")
                            + ". Nothing was written; do not use this archive")
        total = sum(e[2] for e in entries)
        if total > cap:
            raise DataError(f"{label} would unpack to {format_size(total)}, over the cap of {format_size(cap)} "
                            "(data.max_unpacked); nothing was unpacked. Raise data.max_unpacked if this is expected")
        _check_space(cache or dest, total, config=config, what=f"unpacking {label}")
        droot = dest.resolve()
        budget = cap
        out = []
        for name, ref, _size in entries:
            target = (droot / name).resolve()
            if droot not in target.parents:
                raise DataError(f"{label}: {name!r} would land outside the data set's folder; nothing was unpacked")
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            n = 0
            src = tf.extractfile(ref) if kind == "tar" else tf.open(ref)
            with src, open(target, "wb") as f:
                while True:
                    buf = src.read(CHUNK)
                    if not buf:
                        break
                    n += len(buf)
                    budget -= len(buf)
                    if budget < 0:
                        raise DataError(f"{label} unpacks to more than its entries declare, over the cap "
                                        "(data.max_unpacked); nothing was unpacked. Do not use this archive")
                    h.update(buf)
                    f.write(buf)
            rel = target.relative_to(droot).as_posix()
            out.append({"path": rel, "size": n, "sha256": h.hexdigest()})
    return out


# -- list, verify, evict, paths --------------------------------------------------------------------------
def list_sets(*, config: "Config | None" = None, cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """The declared data sets and every fetched version, with its state (``ok`` or what is wrong, by stat).

    Returns:
        ``{"cache": path, "free": bytes, "sets": [{name, version, path, files, bytes, state, ...}]}``.
    """
    from .config import load_config
    cfg = config if config is not None else load_config()
    root = cache_dir(cfg, cache)
    out = []
    seen = set()
    for rec in records(config=cfg, cache=cache):
        problems = quick_check(rec, rehash_changed=False)
        seen.add(rec["name"])
        decl = cfg.data.get(rec["name"])
        out.append({"name": rec["name"], "version": rec["version"], "path": rec["path"], "files": len(rec["files"]),
                    "bytes": rec["bytes"], "fetched_at": rec.get("fetched_at"), "source": rec["source"],
                    "verified": rec.get("verified"), "declared": decl is not None,
                    "state": "ok" if not problems else "; ".join(problems[:3])})
    for d in cfg.data.sets:
        if d.name not in seen:
            out.append({"name": d.name, "version": d.version, "path": None, "files": None, "bytes": None,
                        "fetched_at": None, "source": d.source, "verified": None, "declared": True,
                        "state": "not fetched"})
    return {"cache": str(root), "free": free_bytes(root), "sets": out}


def _pick(name: str, version: str | None, cfg: "Config", cache: str | os.PathLike | None) -> list[dict[str, Any]]:
    recs = records(name, config=cfg, cache=cache)
    if version is not None:
        recs = [r for r in recs if r["version"] == version]
    return recs


def verify(name: str, *, version: str | None = None, config: "Config | None" = None,
           cache: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Re-hash every file of the fetched version(s) of `name` against its record.

    Returns:
        ``{"ok": bool, "versions": [{"version", "path", "ok", "problems": [...]}]}``.
    Raises:
        DataError: nothing of `name` (or that version) was fetched here.
    """
    from .config import load_config
    cfg = config if config is not None else load_config()
    recs = _pick(name, version, cfg, cache)
    if not recs:
        raise DataError(f"{name}{' ' + version if version else ''} has not been fetched to "
                        f"{cache_dir(cfg, cache)}; run '{command(f'data fetch {name}')}'")
    out = []
    for rec in recs:
        base = Path(rec["path"])
        bar = _Bar(rec["bytes"], f"verify {name} {rec['version']}", progress)
        problems = []
        try:
            for f in rec["files"]:
                p = base / f["path"]
                try:
                    d = hash_file(p, progress=bar)
                except OSError:
                    problems.append(f"{f['path']} is missing")
                    continue
                if d.size != f["size"] or d.sha256 != f["sha256"]:
                    problems.append(f"{f['path']} does not match its recorded sha256 (size {d.size} vs {f['size']})")
        finally:
            bar.close()
        out.append({"version": rec["version"], "path": rec["path"], "ok": not problems, "problems": problems,
                    "files": len(rec["files"]), "bytes": rec["bytes"]})
        if problems:
            # a damaged copy is not trusted by stat any more: the next fetch downloads it again
            rec.pop("_record", None)
            for f in rec["files"]:
                f["mtime_ns"] = None
            _write_record(_record_path(cache_dir(cfg, cache), name, rec["version"]), rec)
    return {"ok": all(v["ok"] for v in out), "name": name, "versions": out}


def _in_use(path: Path, cfg: "Config") -> str | None:
    """Why `path` may not be removed: a live job of the project uses it, or a process has a file under it open."""
    real = os.path.realpath(path)
    with contextlib.suppress(ColabkitError, ImportError):
        from . import runner
        for j in runner.status(config=cfg).get("jobs", []):
            live = j.get("live", j.get("state") in ("starting", "running", "waiting", "stopping"))
            if not live or j.get("state") not in ("starting", "running", "waiting", "stopping"):
                continue
            for p in (j.get("data") or {}).values():
                if os.path.realpath(p) == real:
                    return f"the running job {j.get('run_id')} ({j.get('experiment')}) uses it"
    proc = Path("/proc")
    if proc.is_dir():
        me = os.getpid()
        for pid_dir in proc.iterdir():
            if not pid_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for fd in (pid_dir / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        target = os.readlink(fd)
                        if target == real or target.startswith(real + "/"):
                            who = "this process" if int(pid_dir.name) == me else f"process {pid_dir.name}"
                            return f"{who} has {target} open"
    return None


def evict(name: str, *, version: str | None = None, config: "Config | None" = None,
          cache: str | os.PathLike | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Remove the fetched version(s) of `name` from the cache (every version, or `version`), never one a
    running job uses or a process has open. The source keeps the data: a fetch brings it back.

    Returns:
        ``{"removed": [{"version", "path", "bytes"}], "kept": [{"version", "path", "reason"}], "freed": bytes}``.
    Raises:
        DataError: nothing of `name` (or that version) is in the cache.
    """
    from .config import load_config
    cfg = config if config is not None else load_config()
    root = cache_dir(cfg, cache)
    recs = _pick(name, version, cfg, cache)
    leftovers = sorted((root / name).glob(TMP_PREFIX + "*")) if (root / name).is_dir() else []
    if not recs and not leftovers:
        raise DataError(f"{name}{' ' + version if version else ''} is not in the data cache {root}; "
                        f"'{command('data list')}' shows what is")
    removed, kept = [], []
    for rec in recs:
        p = Path(rec["path"])
        why = _in_use(p, cfg) if p.exists() else None
        if why:
            kept.append({"version": rec["version"], "path": str(p), "reason": why})
            continue
        removed.append({"version": rec["version"], "path": str(p), "bytes": rec["bytes"]})
        if not dry_run:
            # the record goes first: a crash halfway leaves a folder that no record vouches for, never a
            # record for a folder that is half gone
            with contextlib.suppress(OSError):
                os.unlink(_record_path(root, name, rec["version"]))
            shutil.rmtree(p, ignore_errors=True)
    if version is None and not dry_run:
        for p in leftovers:   # interrupted fetches
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        with contextlib.suppress(OSError):
            (root / name).rmdir()
    return {"name": name, "removed": removed, "kept": kept, "freed": sum(r["bytes"] for r in removed),
            "dry_run": dry_run}


def ready(names: Iterable[str], *, config: "Config", cache: str | os.PathLike | None = None) -> dict[str, Path]:
    """The local path of each data set in `names` (the newest intact version fetched, or the declared one).

    Raises:
        DataError: one is missing or fails the check, with the ``%data fetch`` command that fixes it.
    """
    out: dict[str, Path] = {}
    bad = []
    for n in names:
        decl = config.data.get(n)
        want = decl.version if decl is not None else None
        recs = [r for r in records(n, config=config, cache=cache)
                if (want is None or r["version"] == want) and (decl is None or r["source"] == decl.source)]
        fix = f"'{command(f'data fetch {n}')}'"
        if not recs:
            bad.append(f"{n}{' ' + want if want else ''} is not on the local disk: run {fix}")
            continue
        problems = quick_check(recs[0])
        if problems:
            bad.append(f"{n} {recs[0]['version']} fails its check ({'; '.join(problems[:3])}): run {fix}")
            continue
        out[n] = Path(recs[0]["path"])
    if bad:
        raise DataError("train.data: " + "; ".join(bad))
    return out
