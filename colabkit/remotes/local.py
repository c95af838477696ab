"""A local folder as a storage tier: the embedded default, and the right remote for a mounted Drive."""
from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path

from ..errors import (IntegrityError, RemoteError, RemoteNotFoundError, RemotePermissionError, RemoteQuotaError,
                      TransientRemoteError)
from ..fsutil import FileDigest, atomic_copy, fsync_dir, hash_file, is_temporary, temp_prefix
from .base import ACCESS_MARKER, WORKERS_DIR, Progress, Remote, RemoteFile, UploadState, normalize_path

# sidecar digests so list() does not re-hash every file; keyed by (size, mtime_ns)
_DIGEST_DIR = ".colabkit-digests"
#: errors a folder gives while it is briefly unusable, e.g. a mounted Drive whose FUSE daemon lost its
#: connection (EIO, ENOTCONN "Transport endpoint is not connected", ETIMEDOUT, EAGAIN): worth retrying
_TRANSIENT_ERRNOS = {getattr(errno, n) for n in ("EIO", "ENOTCONN", "ETIMEDOUT", "EAGAIN", "ECONNABORTED",
                                                 "ECONNRESET", "EHOSTDOWN", "EBUSY") if hasattr(errno, n)}


class LocalRemote(Remote):
    """A folder. Uploads are atomic copies, verified by hashing the copy.

    Args:
        name: the tier name.
        root: the folder (created on first write).
    """

    kind = "local"
    supports_claims = True

    def __init__(self, name: str, root: str | os.PathLike) -> None:
        super().__init__(name)
        self.root = Path(root).expanduser()

    def describe(self) -> str:
        return f"local folder {self.root}"

    # -- helpers ----------------------------------------------------------------------------------
    def _full(self, path: str) -> Path:
        return self.root / normalize_path(path)

    def _digest_file(self, path: str) -> Path:
        return self.root / _DIGEST_DIR / (normalize_path(path) + ".sha")

    def _cached_digest(self, rel: str, st: os.stat_result) -> FileDigest:
        cache = self._digest_file(rel)
        key = f"{st.st_size} {st.st_mtime_ns}"
        with contextlib.suppress(OSError, ValueError):
            k1, k2, sha, md5 = cache.read_text().split()
            if f"{k1} {k2}" == key:
                return FileDigest(st.st_size, sha, None if md5 == "-" else md5)
        digest = hash_file(self.root / rel)
        self._store_digest(rel, digest, st)
        return digest

    def _store_digest(self, rel: str, digest: FileDigest, st: os.stat_result) -> None:
        cache = self._digest_file(rel)
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(temp_prefix(cache.name) + "d")   # one per process: two never share it
            tmp.write_text(f"{st.st_size} {st.st_mtime_ns} {digest.sha256} {digest.md5 or '-'}\n")
            os.replace(tmp, cache)

    def _wrap(self, e: OSError, path: str | None) -> RemoteError:
        if e.errno in _TRANSIENT_ERRNOS:
            return self.error(TransientRemoteError, f"{self.name}: {e.strerror or e} ({self.root}); the folder is "
                              "briefly unusable (a mounted Drive reconnecting?); it will be retried", path=path)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return self.error(RemotePermissionError, f"{self.name}: cannot write {self.root} ({e.strerror}); "
                              "fix the folder's permissions or point the tier at another path", path=path)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return self.error(RemoteQuotaError, f"{self.name}: no space left in {self.root}; free space there "
                              "or point the tier at another path", path=path)
        return self.error(RemoteError, f"{self.name}: {e.strerror or e} ({self.root})", path=path)

    # -- interface --------------------------------------------------------------------------------
    def list(self, prefix: str = "") -> list[RemoteFile]:
        base = self.root / normalize_path(prefix) if prefix else self.root
        if not base.exists():
            return []
        out = []

        def failed(e: OSError) -> None:   # os.walk would skip an unreadable folder and list less, silently
            if not isinstance(e, FileNotFoundError):   # removed while walking: it holds nothing any more
                raise self._wrap(e, prefix or None) from e
        for dirpath, dirnames, filenames in os.walk(base, onerror=failed):
            dirnames[:] = [d for d in dirnames if d != _DIGEST_DIR
                           and not (d == WORKERS_DIR and Path(dirpath) == self.root)]   # elected-upload records
            for fn in filenames:
                if is_temporary(fn) or fn == ACCESS_MARKER:
                    continue
                full = Path(dirpath) / fn
                rel = full.relative_to(self.root).as_posix()
                try:
                    st = full.stat()
                    d = self._cached_digest(rel, st)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise self._wrap(e, rel) from e
                out.append(RemoteFile(rel, st.st_size, d.sha256, d.md5, st.st_mtime, id=rel))
        return sorted(out, key=lambda f: f.path)

    def stat(self, path: str) -> RemoteFile | None:
        rel = normalize_path(path)
        full = self.root / rel
        try:
            st = full.stat()
            d = self._cached_digest(rel, st)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._wrap(e, rel) from e
        return RemoteFile(rel, st.st_size, d.sha256, d.md5, st.st_mtime, id=rel)

    def put(self, local: Path, path: str, *, digest: FileDigest | None = None,
            upload_state: UploadState | None = None, progress: Progress | None = None) -> RemoteFile:
        rel = normalize_path(path)
        dst = self.root / rel
        try:
            # sha256 only: a folder tier needs no md5 (computing it cost more CPU than the copy)
            written = atomic_copy(local, dst, progress=progress, md5=False)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise self._wrap(e, rel) from e
        if digest is not None and (digest.sha256 != written.sha256 or digest.size != written.size):
            # the source changed while it was copied: do not keep a copy that matches nothing
            with contextlib.suppress(OSError):
                dst.unlink()
            raise IntegrityError(f"{self.name}: {local} changed while it was uploaded; it will be retried",
                                 path=rel, expected=digest.sha256, actual=written.sha256)
        st = dst.stat()
        self._store_digest(rel, written, st)
        return RemoteFile(rel, written.size, written.sha256, written.md5, st.st_mtime, id=rel)

    def get(self, path: str, local: Path, *, expected: RemoteFile | None = None,
            progress: Progress | None = None) -> RemoteFile:
        rel = normalize_path(path)
        src = self.root / rel
        rec = expected or self.stat(rel)
        if rec is None or not src.is_file():
            raise self.error(RemoteNotFoundError, f"{self.name}: {rel} does not exist in {self.root}", path=rel)
        local = Path(local)

        def check(written: FileDigest) -> None:   # before the copy takes the name: an older copy there stays
            if not rec.matches(written):
                raise IntegrityError(f"{self.name}: {rel} does not match its recorded hash; the copy was discarded",
                                     path=rel, expected=rec.sha256 or rec.md5, actual=written.sha256)
        try:
            # a download (see fsutil); md5 only when the record has nothing better to check against
            atomic_copy(src, local, progress=progress, durable=False, md5=rec.sha256 is None, check=check)
        except OSError as e:
            raise self._wrap(e, rel) from e
        return rec

    def delete(self, path: str) -> None:
        rel = normalize_path(path)
        full = self.root / rel
        try:
            full.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._wrap(e, rel) from e
        with contextlib.suppress(OSError):
            self._digest_file(rel).unlink()
        # remove folders left empty, up to the root
        parent = full.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        fsync_dir(full.parent if full.parent.exists() else self.root)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write `data` to a temporary file, fsync it, then ``link()`` it to `path`: the link fails when `path`
        exists, so of two workers creating the same record exactly one succeeds, and nobody ever sees a
        partial record."""
        rel = normalize_path(path)
        dst = self.root / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(temp_prefix(dst.name) + uuid.uuid4().hex[:8])
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, dst)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            fsync_dir(dst.parent)
            return True
        except OSError as e:
            raise self._wrap(e, rel) from e

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return (self.root / normalize_path(path)).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise self._wrap(e, normalize_path(path)) from e

    def check_access(self) -> None:
        marker = self.root / ACCESS_MARKER
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            marker.write_bytes(b"colabkit access check\n")
            marker.unlink()
        except OSError as e:
            raise self._wrap(e, None) from e
