"""The storage-tier interface every remote implements (local folder, Google Drive, Hugging Face Hub).

Remote paths are POSIX-style, relative to the remote's root (`"v68/checkpoints/v68_step_00001200.pt"`),
never absolute and never containing `..`. All third-party errors are wrapped into
:class:`colabkit.errors.RemoteError` subclasses at this boundary; `TransientRemoteError` means a retry
with back-off may succeed, `RemoteQuotaError` means the tier must stop.
"""
from __future__ import annotations

import abc
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from ..errors import IntegrityError, RemoteError
from ..fsutil import FileDigest, hash_file

#: name of the marker file `check_access()` writes and deletes
ACCESS_MARKER = ".colabkit-access-check"
#: the folder on a tier holding the records of elected upload (members, leases, claims; see colabkit.elect);
#: never part of what list("") reports
WORKERS_DIR = ".colabkit-workers"

Progress = Callable[[int], None]  # called with the number of bytes just transferred


@dataclass(frozen=True)
class RemoteFile:
    """One file a remote holds.

    Attributes:
        path: POSIX path relative to the remote root.
        size: bytes.
        sha256: hex digest when the remote knows it (local, Hub LFS), else None.
        md5: hex digest when the remote knows it (local, Drive), else None.
        modified: seconds since the epoch, when known.
        id: the remote's own identifier (Drive file id, Hub blob/LFS oid), when it has one.
    """

    path: str
    size: int
    sha256: str | None = None
    md5: str | None = None
    modified: float | None = None
    id: str | None = None

    def matches(self, digest: FileDigest) -> bool:
        """True when this record's size and every hash both sides carry agree (at least one must be compared)."""
        if self.size != digest.size:
            return False
        if self.sha256 is not None and self.sha256 != digest.sha256:
            return False
        md5_compared = self.md5 is not None and digest.md5 is not None
        if md5_compared and self.md5 != digest.md5:
            return False
        return self.sha256 is not None or md5_compared


class UploadState(Protocol):
    """Where a remote may persist the state of an interrupted upload (e.g. a Drive session URI).

    The sync engine passes one backed by its ledger, so a restarted process resumes the upload.
    """

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def clear(self) -> None: ...


def normalize_path(path: str) -> str:
    """Validate and normalise a remote path; raise ValueError for absolute paths or `..`."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"remote path must be a non-empty string, got {path!r}")
    p = path.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":"):
        raise ValueError(f"remote path must be relative, got {path!r}")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if any(x == ".." for x in parts) or not parts:
        raise ValueError(f"remote path must not contain '..' or be empty, got {path!r}")
    return posixpath.join(*parts)


def verify_local(local: Path, expected: RemoteFile, *, remote: str) -> FileDigest:
    """Hash `local` and raise IntegrityError unless it matches `expected`."""
    digest = hash_file(local)
    if not expected.matches(digest):
        want = expected.sha256 or expected.md5
        got = digest.sha256 if expected.sha256 else digest.md5
        raise IntegrityError(
            f"{remote}: {expected.path} does not match its recorded hash "
            f"(size {digest.size} vs {expected.size}, hash {got} vs {want}); the copy was discarded",
            path=expected.path, expected=want, actual=got)
    return digest


class Remote(abc.ABC):
    """A storage tier. Subclasses implement the abstract methods; the rest have working defaults.

    Attributes:
        name: the tier's name from the configuration (`local`, `drive`, `hub`, ...).
        kind: the implementation (`local`, `drive`, `hub`).
    """

    kind: str = "remote"

    def __init__(self, name: str) -> None:
        self.name = name

    # -- required ---------------------------------------------------------------------------
    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[RemoteFile]:
        """Every file whose path starts with `prefix` (a folder prefix; "" for all), sorted by path."""

    @abc.abstractmethod
    def put(self, local: Path, path: str, *, digest: FileDigest | None = None,
            upload_state: UploadState | None = None, progress: Progress | None = None) -> RemoteFile:
        """Upload `local` to `path`, replacing what is there, and verify the remote copy.

        Args:
            local: the file to upload.
            path: the remote path.
            digest: the local file's digest when the caller already computed it.
            upload_state: where to persist resumable-upload state (optional).
            progress: called with byte counts as data is sent.
        Returns:
            The verified remote record.
        Raises:
            RemoteError: on failure (TransientRemoteError when a retry may help);
            IntegrityError: the remote copy did not verify (it has been removed).
        """

    @abc.abstractmethod
    def get(self, path: str, local: Path, *, expected: RemoteFile | None = None,
            progress: Progress | None = None) -> RemoteFile:
        """Download `path` to `local` atomically (temporary name, rename; not fsynced: a copy of what the
        remote keeps, see :mod:`colabkit.fsutil`) and verify it.

        Raises:
            RemoteNotFoundError: no such file.
            IntegrityError: the downloaded bytes do not match the remote's hash (nothing is left at `local`).
        """

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Remove `path`. Deleting a missing file is not an error."""

    @abc.abstractmethod
    def check_access(self) -> None:
        """Write and delete a small marker so missing permission or quota fails now, not hours later.

        Raises:
            RemoteError: with a message naming the fix.
        """

    # -- elected upload (colabkit.elect) ------------------------------------------------------
    #: whether :meth:`create_exclusive` is a real exclusive create on this remote (two callers never both win)
    supports_claims: bool = False

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create the small file `path` holding `data` unless it exists: True when this call created it, False
        when it was already there (another worker's). Two callers never both get True.

        Raises:
            RemoteError: on failure; NotImplementedError: this remote has no exclusive create.
        """
        raise NotImplementedError(f"{self.kind} remotes have no exclusive create")

    def read_bytes(self, path: str) -> bytes | None:
        """The content of the small file `path`, or None when it does not exist."""
        import shutil
        import tempfile
        rec = self.stat(path)
        if rec is None:
            return None
        d = tempfile.mkdtemp(prefix=".colabkit-tmp-read-")
        try:
            local = Path(d) / "record"
            try:
                self.get(path, local, expected=rec)
            except FileNotFoundError:
                return None
            return local.read_bytes()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def holds(self, items: Iterable[tuple[Path, str, FileDigest]]) -> dict[str, RemoteFile | None]:
        """For (local file, remote path, its digest) triples: the remote's record of each path when it holds
        exactly those bytes, else None (one lookup for all where the remote can)."""
        items = list(items)
        recs = self.stat_many([p for _l, p, _d in items])
        out: dict[str, RemoteFile | None] = {}
        for _local, path, digest in items:
            rec = recs.get(normalize_path(path))
            out[normalize_path(path)] = rec if rec is not None and rec.matches(digest) else None
        return out

    def put_claimed(self, items: list[tuple[Path, str]], *, claim: str, record: bytes,
                    digests: dict[str, FileDigest] | None = None, progress: Progress | None = None
                    ) -> list[RemoteFile] | None:
        """Upload `items` and then create the record `claim` exclusively: the records of the uploaded files, or
        None when `claim` already existed (another worker's copy won; what this call wrote is the same content
        at the same paths). Remotes with commits do both in one commit that only one caller can win (the Hub).
        `progress` may raise to stop the upload at the next chunk boundary."""
        digests = digests or {}
        recs = []
        for local, path in items:
            if self.stat(claim) is not None:   # another worker won before this file: stop here
                return None
            recs.append(self.put(local, path, digest=digests.get(path), progress=progress))
        if progress is not None:
            progress(0)
        return recs if self.create_exclusive(claim, record) else None

    # -- defaults -----------------------------------------------------------------------------
    def stat(self, path: str) -> RemoteFile | None:
        """The record for exactly `path`, or None."""
        path = normalize_path(path)
        for f in self.list(posixpath.dirname(path)):
            if f.path == path:
                return f
        return None

    def stat_many(self, paths: Iterable[str]) -> dict[str, RemoteFile | None]:
        """Records for many exact paths ({normalized path: record or None}); remotes that can look many paths up
        in one request (the Hub's paths-info) do so."""
        return {normalize_path(p): self.stat(p) for p in paths}

    def put_many(self, items: Iterable[tuple[Path, str]], *, message: str | None = None,
                 digests: dict[str, FileDigest] | None = None) -> list[RemoteFile]:
        """Upload several files; remotes with commits (the Hub) do it in one commit."""
        digests = digests or {}
        return [self.put(local, path, digest=digests.get(path)) for local, path in items]

    def adopt(self, path: str, record: RemoteFile, digest: FileDigest) -> RemoteFile:
        """Finish what an interrupted upload of `path` left undone, once `record` (what the remote holds) was
        verified against the local file's `digest` (e.g. Drive: record the sha256 that the upload's final
        metadata update would have set). Returns the completed record; the default has nothing to finish."""
        return record

    def take_deleted(self) -> list[str]:
        """Tier paths this remote deleted by itself since the last call (a Hub tier's ``keep``, in its upload
        commits), so that the ledger stops counting them as held. The default deletes nothing by itself."""
        return []

    def describe(self) -> str:
        """A one-line description that is safe to print (no secret)."""
        return f"{self.kind} remote {self.name!r}"

    def close(self) -> None:
        """Release connections. Safe to call twice."""

    def error(self, cls: type[RemoteError], message: str, *, path: str | None = None,
              retry_after: float | None = None) -> RemoteError:
        """Build a RemoteError of `cls` for this remote."""
        return cls(message, remote=self.name, path=path, retry_after=retry_after)

    def __enter__(self) -> "Remote":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
