"""Google Drive v3 as a storage tier, through google-api-python-client and google-auth.

Remote paths map to folders under one root folder (``drive.folder_id``), created on demand and cached.
There is one file per name per folder: re-uploading a path updates the same file id in place (a growing log
keeps its id), and a create that is retried first looks for a file that now holds the same md5, so retries
never make duplicates.

Uploads are resumable, in chunks that are multiples of 256 KiB, with our own retry loop around
``next_chunk()`` (the library's ``num_retries`` resends an already-consumed stream after a 5xx and hangs):
on 5xx, 429, ``rateLimitExceeded``/``userRateLimitExceeded`` or a dropped connection we back off with jitter
(honouring ``Retry-After``), ask the server for its offset and continue from there. Uploads over 64 MiB save
their session URI through the caller's :class:`~colabkit.remotes.base.UploadState`, so a restarted process
continues where the server is. Every upload is verified against ``md5Checksum``/``size``; every call passes
``supportsAllDrives`` so Shared Drives work. The file's sha256 is kept beside it in ``appProperties`` (see
:data:`APP_SHA256`); downloads stream through google-auth's ``AuthorizedSession``, continue by ``Range`` after a
dropped or truncated answer, and are verified by that sha256 (Drive's md5 for files without one).

``drive.endpoint`` (or ``COLABKIT_DRIVE_ENDPOINT``) replaces ``https://www.googleapis.com/`` for every call:
the service is built from the library's bundled discovery document with its root URLs replaced, without
fetching anything.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import random
import socket
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import (CredentialsError, IntegrityError, MissingDependencyError, RemoteAuthError, RemoteError,
                      RemoteNotFoundError, RemotePermissionError, RemoteQuotaError, RemoteUploadCapError,
                      TransientRemoteError, UploadCancelled)
from ..fsutil import FileDigest, atomic_open, hash_file
from ..secrets import redact
from .base import ACCESS_MARKER, WORKERS_DIR, Progress, Remote, RemoteFile, UploadState, normalize_path

if TYPE_CHECKING:
    from ..config import Config, TierConfig

log = logging.getLogger(__name__)

FOLDER_MIME = "application/vnd.google-apps.folder"
UNIT = 256 * 1024
DEFAULT_ROOT = "https://www.googleapis.com/"
#: uploads larger than this keep their session URI in the caller's upload state
PERSIST_SESSION_OVER = 64 * 1024 * 1024
#: bytes read at a time from a download's stream
DOWNLOAD_BLOCK = 1024 * 1024
#: files up to this size go in one multipart request
MULTIPART_MAX = 5 * 1024 * 1024
FILE_FIELDS = "id,name,mimeType,size,md5Checksum,parents,modifiedTime,createdTime,appProperties"
#: appProperties colabkit sets on each upload: the file's sha256, and the md5 it was computed with. Drive keeps
#: appProperties when another client replaces the content, so the sha256 is believed only while Drive's own
#: md5Checksum still equals the md5 beside it.
APP_SHA256, APP_MD5 = "colabkitSha256", "colabkitMd5"
_TRANSIENT_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "backendError", "internalError",
                      "transientError"}
#: Drive's answer at the daily upload cap (~750 GB per account per rolling 24 h): 403 userRateLimitExceeded with
#: exactly this message; the per-minute rate limit carries the same reason with a longer message
#: ("User Rate Limit Exceeded. Rate of requests for user exceed configured project quota. ...") and is transient.
#: (rclone's --drive-stop-on-upload-limit tells the two apart the same way.)
UPLOAD_CAP_MESSAGE = "User rate limit exceeded."
_QUOTA_REASONS = {"storageQuotaExceeded", "quotaExceeded", "dailyLimitExceeded", "uploadLimitExceeded",
                  "teamDriveFileLimitExceeded", "numChildrenInNonRootLimitExceeded",
                  "activeItemCreationLimitExceeded"}


def _escape_q(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def resolve_endpoint(endpoint: str | None) -> str | None:
    """The Drive API root to use: `endpoint`, else ``COLABKIT_DRIVE_ENDPOINT``, else None (Google's)."""
    ep = endpoint or os.environ.get("COLABKIT_DRIVE_ENDPOINT") or None
    if ep and not ep.endswith("/"):
        ep += "/"
    return ep


class _Failure(Exception):
    """An HTTP-level failure classified once (internal)."""

    def __init__(self, status: int | None, reason: str, message: str, retry_after: float | None,
                 cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.retry_after, self.cause = (status, reason, message,
                                                                                 retry_after, cause)

    @property
    def upload_cap(self) -> bool:
        """Drive's answer at the daily upload cap (see :data:`UPLOAD_CAP_MESSAGE`)."""
        return (self.status == 403 and self.reason in ("userRateLimitExceeded", "rateLimitExceeded")
                and self.message.strip() == UPLOAD_CAP_MESSAGE)

    @property
    def transient(self) -> bool:
        if self.upload_cap:
            return False   # retrying within minutes cannot help: the sync tier pauses instead
        if self.status is None:
            return True  # dropped connection, timeout
        if self.status in (408, 429) or self.status >= 500:
            return True
        return self.status == 403 and self.reason in _TRANSIENT_REASONS


def _classify(e: BaseException) -> _Failure:
    """Turn a googleapiclient / httplib2 / socket error into a _Failure (never holds a secret)."""
    try:
        from googleapiclient.errors import HttpError
    except ImportError:  # pragma: no cover
        HttpError = ()  # type: ignore[assignment]
    if isinstance(e, _Failure):
        return e
    if HttpError and isinstance(e, HttpError):
        status = int(getattr(e.resp, "status", 0) or 0)
        reason, message = "", ""
        try:
            body = json.loads(e.content.decode("utf-8", "replace") if isinstance(e.content, bytes) else e.content)
            err = body.get("error", {}) if isinstance(body, dict) else {}
            if isinstance(err, dict):
                message = str(err.get("message") or "")
                errs = err.get("errors") or []
                if errs and isinstance(errs[0], dict):
                    reason = str(errs[0].get("reason") or "")
            elif isinstance(err, str):
                reason = err
        except (ValueError, AttributeError):
            pass
        retry_after = None
        ra = e.resp.get("retry-after") if hasattr(e.resp, "get") else None
        if ra:
            with contextlib.suppress(ValueError):
                retry_after = float(ra)
        return _Failure(status, reason, redact(message or f"HTTP {status}"), retry_after, e)
    try:
        import google.auth.exceptions as gae
        if isinstance(e, gae.RefreshError):
            msg = redact(str(e.args[0]) if e.args else "token refresh failed")
            if getattr(e, "retryable", False):
                # google-auth marks 500/503/504/408/429 and "temporarily_unavailable" answers of the token
                # endpoint retryable (after its own 3 tries): Google is briefly down, the key is fine
                return _Failure(None, "tokenEndpointUnavailable", f"the token endpoint did not answer: {msg}", None,
                                e)
            return _Failure(401, "refreshError", msg, None, e)
        if isinstance(e, gae.TransportError):
            return _Failure(None, "transport", redact(str(e)), None, e)
    except ImportError:  # pragma: no cover
        pass
    try:
        import httplib2
        if isinstance(e, httplib2.HttpLib2Error):
            return _Failure(None, "transport", redact(f"{type(e).__name__}: {e}"), None, e)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, (OSError, http.client.HTTPException, socket.timeout)):
        return _Failure(None, "connection", f"{type(e).__name__}: {redact(str(e)) or 'connection lost'}", None, e)
    raise e


def _digest_props(digest: FileDigest) -> dict[str, str]:
    return {APP_SHA256: digest.sha256, APP_MD5: digest.md5 or ""}


def _http_error(r: Any, url: str) -> Exception:
    """A requests response with an error status as the HttpError the rest of this module classifies."""
    import httplib2
    from googleapiclient.errors import HttpError
    resp = httplib2.Response({"status": str(r.status_code), **{k.lower(): v for k, v in r.headers.items()}})
    resp.reason = r.reason
    return HttpError(resp, r.content, uri=url)


class _Fanout:
    """Hand every block to several consumers, each on its own thread, in order.

    Used so that md5 and sha256 overlap the reading of a file or the network transfer (hashlib releases the
    GIL). A consumer's exception is re-raised by :meth:`close`. ``close()`` joins the
    threads; always call it (``finally``).
    """

    def __init__(self, name: str, sinks: dict[str, Callable[[Any], Any]]) -> None:
        import queue
        self.size = 0
        self.error: BaseException | None = None
        self._qs: list["queue.Queue[Any]"] = []
        self._ts: list[threading.Thread] = []
        for label, sink in sinks.items():
            q: "queue.Queue[Any]" = queue.Queue(maxsize=4)
            t = threading.Thread(target=self._run, args=(q, sink), name=f"{name}-{label}", daemon=True)
            self._qs.append(q)
            self._ts.append(t)
            t.start()

    def _run(self, q: Any, sink: Callable[[Any], Any]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    sink(item)
                except BaseException as e:  # re-raised in the caller's thread by close()
                    self.error = e

    def update(self, data: Any) -> None:
        if self.error is not None:
            raise self.error
        self.size += len(data)
        for q in self._qs:
            q.put(data)

    def close(self) -> None:
        for q, t in zip(self._qs, self._ts):
            if t.is_alive():
                q.put(None)
        for t in self._ts:
            t.join()
        if self.error is not None:
            raise self.error


class _HashWorker(_Fanout):
    """md5 and/or sha256, each on a worker thread."""

    def __init__(self, name: str, *, sha256: bool = True, md5: bool = True) -> None:
        import hashlib
        self._md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self._sha = hashlib.sha256() if sha256 else None
        sinks: dict[str, Callable[[Any], Any]] = {}
        if self._md5 is not None:
            sinks["md5"] = self._md5.update
        if self._sha is not None:
            sinks["sha256"] = self._sha.update
        super().__init__(name, sinks)

    def digest(self) -> FileDigest:
        """The digest; ``sha256`` is "" and ``md5`` None when not asked for."""
        self.close()
        return FileDigest(self.size, self._sha.hexdigest() if self._sha is not None else "",
                          self._md5.hexdigest() if self._md5 is not None else None)


class _SequentialHasher:
    """md5 + sha256 of a file, fed by the chunks an upload reads, in order; gaps are read from the file.

    With ``enabled=False`` (the caller passed the digest) nothing is hashed.
    """

    def __init__(self, fd: int, size: int, *, name: str, enabled: bool = True) -> None:
        self.fd, self.size = fd, size
        self.enabled = enabled
        self.h = _HashWorker(name) if enabled else None
        self.upto = 0

    def _fill(self, until: int) -> None:
        while self.upto < until:
            buf = os.pread(self.fd, min(8 << 20, until - self.upto), self.upto)
            if not buf:
                break
            self.h.update(buf)  # type: ignore[union-attr]
            self.upto += len(buf)

    def feed(self, begin: int, data: bytes) -> None:
        if not self.enabled:
            return
        if begin > self.upto:
            self._fill(begin)
        end = begin + len(data)
        if begin <= self.upto < end:
            # a copy: `data` may be a view of a buffer the next chunk is read into while this one is hashed
            self.h.update(bytes(memoryview(data)[self.upto - begin:]))  # type: ignore[union-attr]
            self.upto = end

    def digest(self) -> FileDigest | None:
        if not self.enabled:
            return None
        self._fill(self.size)
        return self.h.digest()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.h is not None:
            self.h.close()


class _ChunkReader:
    """An upload's chunks, read from the file into two reusable buffers, the next one ahead on a thread.

    Without the read-ahead the server sat idle while each chunk was read and copied (a 256 MB upload in 8 MiB
    chunks took ~1.0 s here instead of ~0.75 s). The view handed out stays valid until the next :meth:`read`:
    ``next_chunk()`` is sequential, so by then its request has ended (a resend inside it sends the same view).
    """

    def __init__(self, fd: int, chunksize: int, *, name: str) -> None:
        self.fd, self.chunksize, self.name = fd, chunksize, name
        self._bufs: list[bytearray | None] = [None, None]   # the second is made by the first read-ahead
        self._free = 0
        self._ahead: tuple[int, int, threading.Thread, list[Any]] | None = None  # offset, buffer, thread, result

    def _fill(self, i: int, offset: int) -> int:
        buf = self._bufs[i]
        if buf is None:
            buf = self._bufs[i] = bytearray(self.chunksize)
        if hasattr(os, "preadv"):
            return os.preadv(self.fd, [buf], offset)
        data = os.pread(self.fd, len(buf), offset)
        buf[:len(data)] = data
        return len(data)

    def _read_ahead(self, i: int, offset: int, out: list[Any]) -> None:
        try:
            out.append(self._fill(i, offset))
        except BaseException as e:   # re-read in the caller's thread, which raises it there
            out.append(e)

    def _join(self) -> tuple[int, int, Any] | None:
        if self._ahead is None:
            return None
        offset, i, t, out = self._ahead
        self._ahead = None
        t.join()
        return offset, i, out[0] if out else None

    def read(self, begin: int, length: int) -> memoryview | bytes:
        if length != self.chunksize:   # not a chunk (the library never asks this of a resumable upload)
            self._join()
            return os.pread(self.fd, length, begin)
        done = self._join()
        if done is not None and done[0] == begin and isinstance(done[2], int):
            i, n = done[1], done[2]
        else:   # the first chunk, or the server asked for another offset (after an error)
            i = self._free
            n = self._fill(i, begin)
        self._free = 1 - i
        if n == length:   # more may follow
            out: list[Any] = []
            t = threading.Thread(target=self._read_ahead, args=(self._free, begin + n, out),
                                 name=self.name, daemon=True)
            self._ahead = (begin + n, self._free, t, out)
            t.start()
        return memoryview(self._bufs[i])[:n]  # type: ignore[arg-type]

    def close(self) -> None:
        self._join()


def _media_class():
    try:
        from googleapiclient.http import MediaIoBaseUpload
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError("google-api-python-client", purpose="The Google Drive tier") from e

    class _ChunkUpload(MediaIoBaseUpload):
        """Chunks are handed to httplib2 as bytes-like objects (views of the :class:`_ChunkReader`'s buffers), so
        a resend after a dropped connection sends them again (a stream slice would already be consumed and the
        request would hang)."""

        def __init__(self, fh, *, chunksize: int, resumable: bool, hasher: _SequentialHasher | None,
                     reader: _ChunkReader | None = None) -> None:
            super().__init__(fh, mimetype="application/octet-stream", chunksize=chunksize, resumable=resumable)
            self._hasher = hasher
            self._reader = reader

        def has_stream(self) -> bool:
            return False

        def getbytes(self, begin: int, length: int) -> Any:
            if self._reader is not None:
                data = self._reader.read(begin, length)
            else:
                self._fd.seek(begin)
                data = self._fd.read(length)
            if self._hasher is not None:
                self._hasher.feed(begin, data)
            return data

    return _ChunkUpload


class _HashingWriter:
    """Where a download's blocks go: to the hash (sha256 when there is one to compare, else md5) on a worker
    thread, and to the file in the receiving thread (a writer thread of its own measured slower: one more
    hand-off per block for work that is no longer than the hash)."""

    def __init__(self, f: Any, progress: Progress | None, *, name: str, sha256: bool) -> None:
        self.f, self.progress = f, progress
        self.h = _HashWorker(name, sha256=sha256, md5=not sha256)

    def write(self, data: bytes) -> int:
        self.h.update(data)
        # no early writeback: a download is not fsynced (see colabkit.fsutil), and starting writeback per
        # block makes the writer wait for the disk's queue
        self.f.write(data)
        if self.progress:
            self.progress(len(data))
        return len(data)


class DriveRemote(Remote):
    """A Google Drive folder as a storage tier.

    Args:
        name: the tier name.
        folder_id: the root folder's id (``drive.folder_id``).
        credentials: google-auth credentials (see :func:`colabkit.secrets.load_google_credentials`).
        endpoint: replaces ``https://www.googleapis.com/`` (default: ``COLABKIT_DRIVE_ENDPOINT`` or Google).
        chunk_size: resumable-upload chunk in bytes, a multiple of 256 KiB.
        timeout: seconds a single HTTP request may take.
        identity: who the credentials are (a service account's email), for messages.
        source: where the credentials came from, for :meth:`describe`.
        max_attempts: tries per request before giving up on transient errors.
        retry_initial: first back-off delay in seconds (doubles, with jitter, up to `retry_max`).
        retry_max: longest back-off delay in seconds.
        sleep: how to wait (tests inject one to observe the delays asked for).

    Example:
        >>> remote = DriveRemote.from_config(load_config(), "drive")
        >>> remote.check_access()
        >>> remote.put(Path("logs/train.log"), "v68/logs/train.log")
    """

    kind = "drive"

    def __init__(self, name: str, folder_id: str, *, credentials: Any, endpoint: str | None = None,
                 chunk_size: int = 16 * 1024 * 1024, timeout: float = 60.0, identity: str | None = None,
                 is_service_account: bool = False, source: str | None = None, max_attempts: int = 8,
                 retry_initial: float = 1.0, retry_max: float = 60.0,
                 sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(name)
        if not folder_id:
            raise ValueError("folder_id must be a Drive folder id")
        if chunk_size <= 0 or chunk_size % UNIT:
            raise ValueError(f"chunk_size {chunk_size} is not a multiple of 256 KiB; use e.g. 8 MiB")
        self.folder_id = folder_id
        self.endpoint = resolve_endpoint(endpoint)
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.identity = identity
        self.is_service_account = is_service_account
        self.source = source
        self.max_attempts = max(1, max_attempts)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._sleep = sleep
        self._stop = threading.Event()
        self._creds = credentials
        if self.endpoint and hasattr(credentials, "_is_regional_access_boundary_lookup_required"):
            # google-auth >= 2.4x looks up a "regional access boundary" at iamcredentials.googleapis.com in a
            # background thread after each token refresh; with a replaced endpoint nothing may reach Google
            credentials._is_regional_access_boundary_lookup_required = lambda: False
        self._local = threading.local()
        self._all_http: list[Any] = []
        self._lock = threading.Lock()
        self._folders: dict[str, str] = {"": folder_id}

    @classmethod
    def from_config(cls, config: "Config", tier: "TierConfig") -> "DriveRemote":
        """The Drive remote for `tier`, with credentials looked up as :func:`colabkit.secrets.find_google_credentials` says.

        Raises:
            CredentialsError: no credentials were found, or they cannot be read.
            MissingDependencyError: google-auth / google-api-python-client are not installed.
        """
        from ..secrets import load_google_credentials
        d = config.drive
        creds, found = load_google_credentials(config, scopes=tuple(d.scopes))
        return cls(tier.name, d.folder_id or "", credentials=creds, endpoint=d.endpoint, chunk_size=d.chunk_size,
                   timeout=d.timeout, identity=found.client_email, source=found.source,
                   is_service_account=found.kind == "service_account")

    # -- plumbing -------------------------------------------------------------------------------
    def describe(self) -> str:
        who = f" as {self.identity}" if self.identity else ""
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"Google Drive folder {self.folder_id}{who}{where}"

    def _service(self) -> Any:
        svc = getattr(self._local, "service", None)
        if svc is None:
            svc, http_ = self._build()
            self._local.service, self._local.http = svc, http_
            with self._lock:
                self._all_http.append(http_)
        return svc

    def _http(self) -> Any:
        self._service()
        return self._local.http

    def _build(self) -> tuple[Any, Any]:
        try:
            import google_auth_httplib2
            from googleapiclient.discovery import build_from_document
            from googleapiclient.discovery_cache import get_static_doc
            from googleapiclient.http import build_http
        except ImportError as e:
            raise MissingDependencyError("google-api-python-client", purpose="The Google Drive tier",
                                         pip_name="google-api-python-client google-auth-httplib2") from e
        doc = json.loads(get_static_doc("drive", "v3"))
        if self.endpoint:
            # every URL (API, uploads, batch) is built from these; nothing is fetched
            doc["rootUrl"] = self.endpoint
            doc["mtlsRootUrl"] = self.endpoint
            doc["baseUrl"] = self.endpoint + doc["servicePath"]
        raw = build_http()           # httplib2 without 308 redirects (308 means "resume incomplete")
        raw.timeout = self.timeout
        authed = google_auth_httplib2.AuthorizedHttp(self._creds, http=raw)
        return build_from_document(doc, http=authed), authed

    def close(self) -> None:
        """Close the HTTP connections; an upload in flight on another thread stops at its next chunk."""
        self._stop.set()
        with self._lock:
            https, self._all_http = self._all_http, []
        for h in https:
            with contextlib.suppress(Exception):
                h.close()
        self._local = threading.local()

    def _wait(self, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            self._stop.wait(seconds)

    def _backoff(self, attempt: int, failure: _Failure) -> None:
        delay = min(self.retry_max, self.retry_initial * (2 ** attempt)) * random.uniform(0.5, 1.0)
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        log.info("%s: %s (%s); retrying in %.1fs", self.name, failure.reason or failure.status, failure.message,
                 delay)
        self._wait(delay)

    def _who(self) -> str:
        return self.identity or "the account in your credentials"

    def _error(self, f: _Failure, *, action: str, path: str | None) -> RemoteError:
        """The colabkit error for a failure, with a message that names the fix."""
        where = f" {path}" if path else ""
        head = f"{self.name}: {action}{where} failed"
        if f.upload_cap:
            return self.error(RemoteUploadCapError,
                              f"{head}: Drive's daily upload cap is reached (403 {f.reason}: {f.message}); about "
                              "750 GB per account per day can be uploaded. The tier pauses and tries again later; "
                              "nothing local was deleted", path=path)
        if f.reason == "storageQuotaExceeded" and "service account" in f.message.lower():
            return self.error(RemoteQuotaError,
                              f"{head}: storageQuotaExceeded: service accounts have no Drive storage of their own, "
                              f"so {self._who()} cannot upload into a folder in a personal My Drive. Use a folder "
                              "in a Shared Drive (add the service account as a Content manager) or user OAuth "
                              "credentials (an authorized-user JSON) instead", path=path)
        if f.reason in _QUOTA_REASONS:
            return self.error(RemoteQuotaError,
                              f"{head}: {f.reason}: the Drive storage quota is full; free space in Drive or use "
                              "another account. Nothing local was deleted", path=path)
        if f.status == 401 or f.reason == "refreshError":
            return self.error(RemoteAuthError,
                              f"{head}: the credentials were rejected ({f.message}); check the key file "
                              f"({self.source or 'credentials'}) and that the key is not revoked", path=path)
        if f.status == 404:
            return self.error(RemoteNotFoundError, f"{head}: not found ({f.message})", path=path)
        if f.status == 403 and not f.transient:
            return self.error(RemotePermissionError,
                              f"{head}: {f.reason or 'forbidden'}: {f.message} Share the folder {self.folder_id} "
                              f"with {self._who()} as Editor", path=path)
        if f.transient:
            return self.error(TransientRemoteError, f"{head}: {f.reason or f.status or 'error'}: {f.message}; "
                              "it will be retried", path=path, retry_after=f.retry_after)
        return self.error(RemoteError, f"{head}: HTTP {f.status} {f.reason}: {f.message}", path=path)

    def _call(self, fn: Callable[[], Any], *, action: str, path: str | None,
              before_retry: Callable[[], Any] | None = None) -> Any:
        """Run `fn` with retries on transient failures. `before_retry` may return a result that ends the loop."""
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:  # classified below; anything unknown re-raises from _classify
                f = _classify(e)
                if not f.transient:
                    raise self._error(f, action=action, path=path) from None
                attempt += 1
                if attempt >= self.max_attempts:
                    raise self._give_up(f, action=action, path=path) from None
                self._backoff(attempt, f)
                if before_retry is not None:
                    try:
                        found = before_retry()
                    except RemoteError:
                        found = None
                    if found is not None:
                        return found

    def _give_up(self, f: _Failure, *, action: str, path: str | None) -> RemoteError:
        if f.reason == "userRateLimitExceeded" and action.startswith("upload"):
            return self.error(RemoteUploadCapError,
                              f"{self.name}: upload of {path} refused with userRateLimitExceeded after "
                              f"{self.max_attempts} tries: Drive's daily upload cap (750 GB per user per day) is "
                              "probably reached. The tier pauses and tries again later; nothing local was deleted",
                              path=path)
        return self._error(f, action=action, path=path)

    # -- folders and lookups ----------------------------------------------------------------------
    def _list_children(self, folder_id: str, *, extra_q: str = "", action: str = "list",
                       path: str | None = None) -> list[dict[str, Any]]:
        q = f"'{_escape_q(folder_id)}' in parents and trashed = false" + (f" and {extra_q}" if extra_q else "")
        out: list[dict[str, Any]] = []
        token = None
        while True:
            def page(token=token):
                return self._service().files().list(
                    q=q, pageSize=1000, pageToken=token, fields=f"nextPageToken,files({FILE_FIELDS})",
                    supportsAllDrives=True, includeItemsFromAllDrives=True, spaces="drive").execute()
            resp = self._call(page, action=action, path=path)
            out.extend(resp.get("files", []))
            token = resp.get("nextPageToken")
            if not token:
                return out

    def _folder(self, parts: list[str], *, create: bool) -> str | None:
        key = ""
        parent = self.folder_id
        for part in parts:
            key = f"{key}/{part}" if key else part
            with self._lock:
                cached = self._folders.get(key)
            if cached:
                parent = cached
                continue
            fid = self._find_folder(parent, part, key)
            if fid is None:
                if not create:
                    return None
                fid = self._create_folder(parent, part, key)
            with self._lock:
                self._folders[key] = fid
            parent = fid
        return parent

    def _find_folder(self, parent: str, name: str, key: str) -> str | None:
        hits = self._list_children(parent, extra_q=f"name = '{_escape_q(name)}' and mimeType = '{FOLDER_MIME}'",
                                   action="look up folder", path=key)
        if not hits:
            return None
        hits.sort(key=lambda f: f.get("createdTime") or "")
        return hits[0]["id"]

    def _create_folder(self, parent: str, name: str, key: str) -> str:
        def create():
            return self._service().files().create(
                body={"name": name, "mimeType": FOLDER_MIME, "parents": [parent]}, fields="id",
                supportsAllDrives=True).execute()["id"]
        # a create that failed may have succeeded on the server: look before creating again
        made = self._call(create, action="create folder", path=key,
                          before_retry=lambda: self._find_folder(parent, name, key))
        oldest = self._find_folder(parent, name, key) or made
        if oldest != made:  # another client (or a silent resend) made it too: use the first, drop ours
            with contextlib.suppress(RemoteError):
                self._delete_id(made, key)
        return oldest

    def _find_files(self, folder_id: str, name: str, path: str) -> list[dict[str, Any]]:
        hits = self._list_children(folder_id, extra_q=f"name = '{_escape_q(name)}' and mimeType != '{FOLDER_MIME}'",
                                   action="look up", path=path)
        hits.sort(key=lambda f: f.get("modifiedTime") or "", reverse=True)
        return hits

    def _record(self, path: str, f: dict[str, Any]) -> RemoteFile:
        md5 = f.get("md5Checksum")
        props = f.get("appProperties") or {}
        sha = props.get(APP_SHA256) if md5 and props.get(APP_MD5) == md5 else None
        return RemoteFile(path, int(f.get("size") or 0), sha256=sha, md5=md5,
                          modified=_parse_time(f.get("modifiedTime")), id=f.get("id"))

    # -- interface --------------------------------------------------------------------------------
    def list(self, prefix: str = "") -> list[RemoteFile]:
        if prefix:
            base = normalize_path(prefix)
            folder = self._folder(base.split("/"), create=False)
            if folder is None:
                return []
        else:
            base, folder = "", self.folder_id
        out: dict[str, RemoteFile] = {}
        todo = [(base, folder)]
        while todo:
            rel, fid = todo.pop()
            for f in self._list_children(fid, path=rel or None):
                p = f"{rel}/{f['name']}" if rel else f["name"]
                if f.get("mimeType") == FOLDER_MIME:
                    with self._lock:
                        self._folders.setdefault(p, f["id"])
                    if p == WORKERS_DIR:
                        continue   # elected-upload records (colabkit.elect) are not tier content
                    todo.append((p, f["id"]))
                elif f["name"] != ACCESS_MARKER:
                    rec = self._record(p, f)
                    if p not in out or (rec.modified or 0) > (out[p].modified or 0):
                        out[p] = rec
        return sorted(out.values(), key=lambda r: r.path)

    def lookup(self, file_id: str) -> tuple[RemoteFile, bool]:
        """The file or folder `file_id` (anywhere the credentials can see it, not only under this folder).

        Returns:
            (its record, with its name as ``path``; whether it is a folder).
        Raises:
            RemoteNotFoundError: no such id, or it is not shared with these credentials.
        """
        f = self._call(lambda: self._service().files().get(fileId=file_id, fields=FILE_FIELDS,
                                                           supportsAllDrives=True).execute(),
                       action="look up id", path=file_id)
        return self._record(f.get("name") or file_id, f), f.get("mimeType") == FOLDER_MIME

    def stat(self, path: str) -> RemoteFile | None:
        rel = normalize_path(path)
        parts = rel.split("/")
        folder = self._folder(parts[:-1], create=False)
        if folder is None:
            return None
        hits = self._find_files(folder, parts[-1], rel)
        return self._record(rel, hits[0]) if hits else None

    def put(self, local: Path, path: str, *, digest: FileDigest | None = None,
            upload_state: UploadState | None = None, progress: Progress | None = None) -> RemoteFile:
        rel = normalize_path(path)
        local = Path(local)
        if digest is not None and digest.md5 is None:
            digest = None   # Drive verifies by md5: hash the file in the upload's read pass
        self._stop.clear()   # a remote used again after close()
        parts = rel.split("/")
        folder = self._folder(parts[:-1], create=True)
        assert folder is not None
        for attempt in (1, 2):
            existing = self._find_files(folder, parts[-1], rel)
            target = existing[0]["id"] if existing else None
            size = local.stat().st_size
            if size <= min(MULTIPART_MAX, self.chunk_size):
                resp, written = self._put_multipart(local, rel, folder, parts[-1], target, digest, progress)
            else:
                resp, written = self._put_resumable(local, rel, folder, parts[-1], target, size, digest,
                                                    upload_state, progress)
            rec = self._record(rel, resp)
            if resp.get("md5Checksum") == written.md5 and int(resp.get("size") or -1) == written.size:
                dups = existing[1:]   # older copies of the same name (made by another client)
                if target is None:
                    # httplib2 silently resends a request whose answer was lost (a stale-connection retry),
                    # which can create the file twice: keep one file per name
                    dups = self._find_files(folder, parts[-1], rel)
                if getattr(self._local, "shared_writers", False):
                    # elected upload: another worker may be creating the same file right now; deleting each
                    # other's copies could leave none. Keep the first created with these bytes; delete only ours
                    if target is None:
                        same = sorted((d for d in dups if d.get("md5Checksum") == written.md5),
                                      key=lambda d: (d.get("createdTime") or "", d["id"]))
                        if same and same[0]["id"] != rec.id:
                            self._delete_id(rec.id, rel)
                            rec = self._record(rel, same[0])
                    dups = [d for d in dups if d["id"] != rec.id and d.get("md5Checksum") != written.md5]
                for dup in dups:
                    if dup["id"] != rec.id:
                        self._delete_id(dup["id"], rel)
                if rec.sha256 != written.sha256:   # hashed in the upload's read pass: known only now
                    self._set_digest(rec.id, written, rel)
                return RemoteFile(rel, written.size, sha256=written.sha256, md5=written.md5,
                                  modified=rec.modified, id=rec.id)
            self._delete_id(rec.id, rel)
            now = hash_file(local)
            if now.md5 != written.md5 or now.size != written.size:
                # the file changed while it was read: keep no copy that matches nothing
                raise IntegrityError(f"{self.name}: {local} changed while it was uploaded; it will be retried",
                                     path=rel, expected=written.md5, actual=now.md5)
            log.warning("%s: %s arrived with md5 %s, expected %s; deleted the remote copy, retrying",
                        self.name, rel, resp.get("md5Checksum"), written.md5)
        raise IntegrityError(f"{self.name}: {rel} did not verify after upload twice (md5 {resp.get('md5Checksum')} "
                             f"vs local {written.md5}); the remote copy was deleted, it will be retried",
                             path=rel, expected=written.md5, actual=resp.get("md5Checksum"))

    def _upload_request(self, media: Any, folder: str, name: str, target: str | None,
                        digest: FileDigest | None) -> Any:
        files = self._service().files()
        body: dict[str, Any] = {"appProperties": _digest_props(digest)} if digest is not None else {}
        if target:
            return files.update(fileId=target, body=body or None, media_body=media, fields=FILE_FIELDS,
                                supportsAllDrives=True)
        return files.create(body={"name": name, "parents": [folder], **body}, media_body=media, fields=FILE_FIELDS,
                            supportsAllDrives=True)

    def adopt(self, path: str, record: RemoteFile, digest: FileDigest) -> RemoteFile:
        """A file an interrupted upload left without its sha256 (killed between the last chunk and the metadata
        update) gets it now, once its md5 and size were verified against the local file."""
        if record.sha256 is None and record.id and record.md5 == digest.md5 and record.size == digest.size:
            self._set_digest(record.id, digest, normalize_path(path))
            return RemoteFile(record.path, record.size, sha256=digest.sha256, md5=record.md5,
                              modified=record.modified, id=record.id)
        return record

    def _set_digest(self, file_id: str | None, digest: FileDigest, rel: str) -> None:
        """Record the sha256 beside Drive's md5 (see :data:`APP_SHA256`). The upload is verified already: if
        this fails the file stays, and reads of it verify by Drive's md5 instead."""
        def update():
            return self._service().files().update(fileId=file_id, body={"appProperties": _digest_props(digest)},
                                                  fields="id", supportsAllDrives=True).execute()
        try:
            self._call(update, action="upload (record sha256)", path=rel)
        except RemoteError as e:
            log.warning("%s; %s stays uploaded and verified by md5", e, rel)

    def _put_multipart(self, local: Path, rel: str, folder: str, name: str, target: str | None,
                       digest: FileDigest | None, progress: Progress | None) -> tuple[dict[str, Any], FileDigest]:
        cls = _media_class()
        written = digest or hash_file(local)
        if progress:
            progress(0)   # an elected upload may be cancelled here, before a file is created
        with open(local, "rb") as fh:
            def send():
                media = cls(fh, chunksize=self.chunk_size, resumable=False, hasher=None)
                return self._upload_request(media, folder, name, target, written).execute()

            def look():
                # the request may have created the file before the connection dropped
                if target is not None:
                    return None
                for f in self._find_files(folder, name, rel):
                    if f.get("md5Checksum") == written.md5 and int(f.get("size") or -1) == written.size:
                        return f
                return None

            resp = self._call(send, action="upload", path=rel, before_retry=look)
        if progress:
            progress(written.size)
        return resp, written

    def _query_session(self, uri: str, size: int) -> tuple[str, Any]:
        """Ask the server where a resumable session is: ('done', resource) | ('offset', n) | ('gone', None)."""
        from googleapiclient.errors import HttpError

        def ask():
            resp, content = self._http().request(uri, "PUT", headers={"Content-Range": f"bytes */{size}",
                                                                     "Content-Length": "0"})
            if resp.status in (200, 201):
                return "done", json.loads(content)
            if resp.status == 308:
                rng = resp.get("range")
                return "offset", int(rng.split("-")[1]) + 1 if rng else 0
            if resp.status in (404, 410):
                return "gone", None
            raise HttpError(resp, content, uri=uri)
        return self._call(ask, action="upload (status query)", path=None)

    def _put_resumable(self, local: Path, rel: str, folder: str, name: str, target: str | None, size: int,
                       digest: FileDigest | None, upload_state: UploadState | None, progress: Progress | None
                       ) -> tuple[dict[str, Any], FileDigest]:
        made: list[_SequentialHasher | _ChunkReader] = []
        try:
            return self._resumable(local, rel, folder, name, target, size, digest, upload_state, progress,
                                   made.append)
        finally:
            for h in made:   # joins the hashing and read-ahead threads, also after a failure
                h.close()

    def _resumable(self, local: Path, rel: str, folder: str, name: str, target: str | None, size: int,
                   digest: FileDigest | None, upload_state: UploadState | None, progress: Progress | None,
                   keep: Callable[[Any], None]) -> tuple[dict[str, Any], FileDigest]:
        cls = _media_class()
        persist = upload_state is not None and size > PERSIST_SESSION_OVER
        st = local.stat()
        ident = {"kind": "drive-resumable", "remote": self.name, "path": rel, "size": size,
                 "mtime_ns": st.st_mtime_ns, "folder": folder, "target": target}
        uri: str | None = None
        offset = 0
        with open(local, "rb") as fh:
            hasher = _SequentialHasher(fh.fileno(), size, name=f"colabkit-drive-hash-{self.name}",
                                       enabled=digest is None)
            keep(hasher)
            reader = _ChunkReader(fh.fileno(), self.chunk_size, name=f"colabkit-drive-read-{self.name}")
            keep(reader)

            def final() -> FileDigest:
                return digest or hasher.digest()  # type: ignore[return-value]
            saved = upload_state.load() if upload_state is not None else None
            if saved and saved.get("uri") and all(saved.get(k) == v for k, v in ident.items()):
                state, value = self._query_session(saved["uri"], size)
                if state == "done":
                    log.info("%s: %s had already finished uploading before the restart", self.name, rel)
                    upload_state.clear()  # type: ignore[union-attr]
                    return value, final()
                if state == "offset":
                    uri, offset = saved["uri"], value
                    log.info("%s: resuming the upload of %s at byte %d of %d", self.name, rel, offset, size)
            elif saved and upload_state is not None:
                upload_state.clear()   # state for another file or an older version of this one

            def save(uri_: str, off: int) -> None:
                if persist and upload_state is not None:
                    upload_state.save({**ident, "uri": uri_, "offset": off})

            attempt = 0
            sent = offset
            while True:
                media = cls(fh, chunksize=self.chunk_size, resumable=True, hasher=hasher, reader=reader)
                req = self._upload_request(media, folder, name, target, digest)
                if uri:
                    req.resumable_uri, req.resumable_progress = uri, offset
                try:
                    resp = None
                    while resp is None:
                        if self._stop.is_set():
                            raise self.error(TransientRemoteError, f"{self.name}: upload of {rel} interrupted "
                                             "because the remote was closed", path=rel)
                        _, resp = req.next_chunk()
                        if req.resumable_uri and req.resumable_uri != uri:
                            uri = req.resumable_uri
                            save(uri, req.resumable_progress)
                        if req.resumable_progress > sent and resp is None:
                            if progress:
                                progress(req.resumable_progress - sent)
                            sent = req.resumable_progress
                            save(uri, sent)  # type: ignore[arg-type]
                        offset = req.resumable_progress
                        attempt = 0
                    if progress and size > sent:
                        progress(size - sent)
                    if upload_state is not None:
                        upload_state.clear()
                    return resp, final()
                except RemoteError:
                    raise
                except UploadCancelled:
                    # another worker's copy won (colabkit.elect): end the session, forget it
                    self._abort_session(req.resumable_uri or uri, rel)
                    if upload_state is not None:
                        upload_state.clear()
                    raise
                except Exception as e:
                    f = _classify(e)
                    uri = req.resumable_uri or uri
                    if not f.transient:
                        if upload_state is not None and f.status in (404, 410):
                            upload_state.clear()
                        raise self._error(f, action="upload", path=rel) from None
                    attempt += 1
                    if attempt >= self.max_attempts:
                        raise self._give_up(f, action="upload", path=rel) from None
                    self._backoff(attempt, f)
                    if uri is None:
                        offset = 0
                        continue
                    state, value = self._query_session(uri, size)
                    if state == "done":
                        if upload_state is not None:
                            upload_state.clear()
                        return value, final()
                    if state == "gone":
                        log.info("%s: the upload session for %s expired; starting again", self.name, rel)
                        uri, offset = None, 0
                        if upload_state is not None:
                            upload_state.clear()
                    else:
                        offset = value
                        save(uri, offset)

    def get(self, path: str, local: Path, *, expected: RemoteFile | None = None,
            progress: Progress | None = None) -> RemoteFile:
        rel = normalize_path(path)
        rec = self.stat(rel) if expected is None or not expected.id else expected
        if rec is None:
            raise self.error(RemoteNotFoundError, f"{self.name}: {rel} does not exist in Drive folder "
                             f"{self.folder_id}", path=rel)
        local = Path(local)
        with atomic_open(local, "wb", durable=False) as fout:  # a download (see fsutil)
            # verified by sha256 when the record has one (colabkit's uploads do), else by Drive's md5
            writer = _HashingWriter(fout, progress, name=f"colabkit-drive-hash-{self.name}",
                                    sha256=rec.sha256 is not None)
            try:
                self._download(rec, rel, writer)
            finally:
                writer.h.close()
            got = writer.h.digest()
            if not rec.matches(got):
                kind, want, have = (("sha256", rec.sha256, got.sha256) if rec.sha256 is not None
                                    else ("md5", rec.md5, got.md5))
                raise IntegrityError(
                    f"{self.name}: {rel} does not match its recorded hash (size {got.size} vs {rec.size}, {kind} "
                    f"{have} vs {want}); the copy was discarded", path=rel, expected=want, actual=have)
        return RemoteFile(rel, got.size, sha256=got.sha256 or None, md5=got.md5 or rec.md5, modified=rec.modified,
                          id=rec.id)

    def _session(self) -> Any:
        """This thread's google-auth AuthorizedSession, for media downloads: it streams the body (httplib2
        reads each answer whole into memory), and refreshes the token on a 401 as AuthorizedHttp does."""
        sess = getattr(self._local, "session", None)
        if sess is None:
            try:
                from google.auth.transport.requests import AuthorizedSession
            except ImportError as e:  # pragma: no cover
                raise MissingDependencyError("requests", purpose="Google Drive downloads") from e
            sess = AuthorizedSession(self._creds)
            sess.headers["Accept-Encoding"] = "identity"   # Range offsets count the stored bytes
            self._local.session = sess
            with self._lock:
                self._all_http.append(sess)
        return sess

    def _download(self, rec: RemoteFile, rel: str, writer: "_HashingWriter") -> None:
        """Stream ``alt=media`` into `writer`; after a dropped or truncated response, continue by Range."""
        import urllib.parse
        if rec.size == 0:
            return
        url = (f"{self.endpoint or DEFAULT_ROOT}drive/v3/files/{urllib.parse.quote(str(rec.id), safe='')}"
               "?alt=media&supportsAllDrives=true")

        import urllib3.exceptions

        def stream() -> None:
            start = writer.h.size
            headers = {"Range": f"bytes={start}-"} if start else {}
            try:
                with self._session().get(url, headers=headers, stream=True, timeout=self.timeout) as r:
                    if r.status_code >= 400:
                        raise _http_error(r, url)
                    if start and r.status_code != 206:   # the bytes so far are hashed already: start again later
                        raise _Failure(r.status_code, "rangeIgnored", f"the server answered a request for bytes "
                                       f"{start}- with HTTP {r.status_code} instead of 206; nothing was kept", None)
                    while True:
                        block = r.raw.read(DOWNLOAD_BLOCK)
                        if not block:
                            break
                        writer.write(block)
            except urllib3.exceptions.HTTPError as e:   # a broken or timed-out stream: continue from here
                raise ConnectionError(f"{type(e).__name__}: {e}") from None
            if writer.h.size < rec.size:
                raise ConnectionError(f"the download ended at byte {writer.h.size} of {rec.size}")

        self._call(stream, action="download", path=rel)   # each retry asks for the bytes still missing

    def _delete_id(self, file_id: str | None, rel: str | None) -> None:
        if not file_id:
            return

        def rm():
            try:
                self._service().files().delete(fileId=file_id, supportsAllDrives=True).execute()
            except Exception as e:
                f = _classify(e)
                if f.status == 404:
                    return None
                raise
        self._call(rm, action="delete", path=rel)

    def delete(self, path: str) -> None:
        rel = normalize_path(path)
        parts = rel.split("/")
        folder = self._folder(parts[:-1], create=False)
        if folder is None:
            return
        for f in self._find_files(folder, parts[-1], rel):
            self._delete_id(f["id"], rel)

    # -- elected upload (colabkit.elect) ----------------------------------------------------------------
    supports_claims = True
    #: a claim's creator looks again this long after winning, for an earlier claim files.list did not show yet
    claim_settle = 2.0

    def _claims(self, folder: str, name: str, rel: str) -> list[dict[str, Any]]:
        hits = self._find_files(folder, name, rel)
        return sorted(hits, key=lambda f: (f.get("createdTime") or "", f["id"]))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Drive has no exclusive create (two files may share a name), so: create this worker's copy, list the
        copies of that name, and the first created (lowest ``(createdTime, id)``) wins; a loser deletes its own
        copy. The winner looks once more after :attr:`claim_settle`, for a copy created earlier that the listing
        did not show yet, and gives up (deleting its copy) if one appears."""
        import tempfile
        rel = normalize_path(path)
        parts = rel.split("/")
        folder = self._folder(parts[:-1], create=True)
        assert folder is not None
        with tempfile.TemporaryDirectory(prefix=".colabkit-tmp-claim-") as d:
            p = Path(d) / "claim"
            p.write_bytes(data)
            resp, _w = self._put_multipart(p, rel, folder, parts[-1], None, None, None)
        mine = resp.get("id")
        for look in (0, 1):
            if look:
                self._stop.wait(self.claim_settle)
            hits = self._claims(folder, parts[-1], rel)
            if hits and hits[0]["id"] != mine:
                self._delete_id(mine, rel)
                return False
        return True

    def read_bytes(self, path: str) -> bytes | None:
        """The first created copy of `path` (a claim's winner), or None."""
        import shutil
        import tempfile
        rel = normalize_path(path)
        parts = rel.split("/")
        folder = self._folder(parts[:-1], create=False)
        if folder is None:
            return None
        hits = self._claims(folder, parts[-1], rel)
        if not hits:
            return None
        d = tempfile.mkdtemp(prefix=".colabkit-tmp-read-")
        try:
            try:
                self.get(rel, Path(d) / "record", expected=self._record(rel, hits[0]))
            except RemoteNotFoundError:
                return None
            return (Path(d) / "record").read_bytes()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def put_claimed(self, items: list[tuple[Path, str]], *, claim: str, record: bytes,
                    digests: dict[str, FileDigest] | None = None, progress: Progress | None = None
                    ) -> list[RemoteFile] | None:
        """As :meth:`Remote.put_claimed`; a cancelled resumable upload ends its session. While it runs, a copy
        another worker is creating under the same name at the same moment is kept, never deleted."""
        self._local.shared_writers = True
        try:
            return super().put_claimed(items, claim=claim, record=record, digests=digests, progress=progress)
        finally:
            self._local.shared_writers = False

    def _abort_session(self, uri: str | None, rel: str) -> None:
        """Best effort: DELETE the resumable session URI (the Google upload protocol ends a session that way,
        answering 499); an unused session also expires by itself. Nothing partial is ever a file on Drive."""
        if not uri:
            return
        try:
            self._session().delete(uri, timeout=self.timeout)
        except Exception as e:   # the session expires anyway
            log.debug("%s: ending the upload session of %s failed: %s", self.name, rel, e)

    def check_access(self) -> None:
        who = self._who()
        try:
            meta = self._call(lambda: self._service().files().get(
                fileId=self.folder_id, fields="id,name,mimeType,driveId", supportsAllDrives=True).execute(),
                action="open folder", path=None)
        except RemoteNotFoundError:
            raise self.error(RemoteNotFoundError,
                             f"{self.name}: Drive folder {self.folder_id!r} was not found: the folder id is wrong "
                             f"or the folder is not shared with {who}. Check drive.folder_id and share the folder "
                             f"with {who} as Editor") from None
        except RemoteAuthError:
            raise
        if meta.get("mimeType") != FOLDER_MIME:
            raise self.error(RemoteError, f"{self.name}: {self.folder_id!r} is a file, not a folder "
                             f"({meta.get('mimeType')}); set drive.folder_id to a folder's id")
        import tempfile
        with tempfile.TemporaryDirectory(prefix="colabkit-access-") as tmp:
            marker = Path(tmp) / ACCESS_MARKER
            marker.write_bytes(b"colabkit access check\n")
            try:
                rec = self.put(marker, ACCESS_MARKER)
            except RemoteQuotaError:
                raise
            except RemotePermissionError:
                raise self.error(RemotePermissionError,
                                 f"{self.name}: cannot write into Drive folder {self.folder_id!r} "
                                 f"({meta.get('name')!r}): {who} has read-only access. Share the folder with "
                                 f"{who} as Editor") from None
        try:
            self._delete_id(rec.id, ACCESS_MARKER)
        except RemotePermissionError:
            raise self.error(RemotePermissionError,
                             f"{self.name}: could create but not delete a file in Drive folder "
                             f"{self.folder_id!r}: share it with {who} as Editor (Content manager in a Shared "
                             "Drive)") from None


def gdown_fetch(id_or_url: str, dest_dir: str | os.PathLike, *, endpoint: str | None = None,
                timeout: float = 60.0) -> Path:
    """Download a publicly shared Drive file through gdown into `dest_dir`.

    Args:
        id_or_url: a file id or a drive.google.com link (``/file/d/ID/view``, ``uc?id=ID``, ``open?id=ID``).
        dest_dir: the folder to write into (created); the file keeps its Drive name.
        endpoint: an HTTP proxy that stands in for Google's download hosts (tests: tests/drive_server.py);
            TLS certificates are not verified through it.
        timeout: seconds per request.
    Returns:
        The path of the downloaded file.
    Raises:
        RemotePermissionError: the link needs sign-in (the file is not shared with "Anyone with the link").
        RemoteError: the download failed.
        ValueError: `id_or_url` is neither a file id nor a Drive link.

    Example:
        >>> gdown_fetch("https://drive.google.com/file/d/1AbC.../view", "experiments/v68/logs")
    """
    import inspect
    import re
    import warnings
    try:
        import gdown
        from gdown.parse_url import parse_url
    except ImportError as e:
        raise MissingDependencyError("gdown", purpose="Importing a run through a public Drive link") from e
    try:
        from gdown.exceptions import FileURLRetrievalError
    except ImportError:  # gdown < 4.7 raised plain exceptions for a page it could not follow
        FileURLRetrievalError = None  # type: ignore[assignment,misc]
    s = id_or_url.strip()
    if "://" in s:
        file_id, _ = parse_url(s)
    else:
        file_id = s if re.fullmatch(r"[-\w]{10,}", s) else None
    if not file_id:
        raise ValueError(f"{id_or_url!r} is not a Google Drive file id or link; pass the id or the "
                         "https://drive.google.com/file/d/ID/view link")
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    fix = (f"gdown: the link {id_or_url!r} needs sign-in: the file is not shared publicly. In Drive, choose "
           "Share > General access > 'Anyone with the link', or import the run through the Drive tier with "
           "credentials instead")
    extra: dict[str, Any] = {"use_cookies": False, "timeout": timeout}
    if endpoint:
        extra.update(proxy=endpoint, verify=False)
    accepted = inspect.signature(gdown.download).parameters
    extra = {k: v for k, v in extra.items() if k in accepted}   # older gdown releases lack some of these
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # urllib3's InsecureRequestWarning through a test proxy
            out = gdown.download(url=f"https://drive.google.com/uc?id={file_id}", output=str(dest) + os.sep,
                                 quiet=True, **extra)
    except Exception as e:
        if (FileURLRetrievalError is not None and isinstance(e, FileURLRetrievalError)) or \
                "public link" in str(e) or "retrieve file url" in str(e).lower():
            raise RemotePermissionError(fix, remote="gdown", path=file_id) from None
        raise RemoteError(f"gdown: downloading {id_or_url!r} failed ({type(e).__name__}: {redact(str(e))[:300]}); "
                          "check the link and your connection", remote="gdown", path=file_id) from e
    if out is None:  # older gdown returns None when it could not follow the page
        raise RemotePermissionError(fix, remote="gdown", path=file_id)
    path = Path(str(out))
    with open(path, "rb") as f:   # an HTML page instead of the file: a sign-in or error page
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        with contextlib.suppress(OSError):
            path.unlink()
        raise RemotePermissionError(fix, remote="gdown", path=file_id)
    return path


__all__ = ["DriveRemote", "gdown_fetch", "resolve_endpoint", "CredentialsError"]
