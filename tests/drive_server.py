"""A Google Drive v3 server on 127.0.0.1 for tests: the real google-api-python-client, google-auth and gdown
talk to it over HTTP.

Use it from any test module::

    from tests.drive_server import DriveServer, drive_server  # noqa: F401  (the fixture)

    def test_something(drive_server, tmp_path):
        folder = drive_server.create_folder("colabkit", share_with={drive_server.SA_EMAIL: "writer"},
                                            shared_drive=True)
        key = drive_server.write_service_account(tmp_path / "sa.json")
        cfg = load_config(data={"drive": {"folder_id": folder, "credentials": str(key),
                                          "endpoint": drive_server.endpoint}})
        ...

or without pytest: ``with DriveServer(tmp_dir) as srv: ...`` (``start()`` / ``stop()`` also work).

What it speaks (the subset colabkit and gdown use, with Drive's real shapes):

- ``POST /token``: OAuth 2.0 token endpoint. JWT-bearer grants (service accounts) are checked against the
  RSA public key of the test key (:meth:`DriveServer.service_account_info`); refresh_token grants check the
  client id/secret/refresh token of :meth:`DriveServer.authorized_user_info`.
- ``/drive/v3/files``: create (folders, metadata-only files), list (``q`` with ``'<id>' in parents``,
  ``name = '...'``, ``mimeType =/!= '...'``, ``trashed = false`` joined by ``and``; paging through
  ``pageToken``; ``fields`` honoured, so ``md5Checksum``/``size``/``parents`` appear only when asked for),
  get (metadata, ``alt=media`` with ``Range``), update (metadata, ``addParents``/``removeParents``),
  delete; ``/drive/v3/about``. ``appProperties`` are kept from create/update/upload bodies (merged on update,
  a null value removes a key, 124 bytes per key + value) and survive a content update, as on Drive.
- ``/upload/drive/v3/files[/<id>]``: ``uploadType=multipart`` and ``uploadType=resumable`` (200 + Location to
  start; PUT chunks answered 308 with ``Range`` while incomplete; ``Content-Range: bytes */N`` status
  queries). Like Drive, a chunk cut off mid-way keeps only whole 256 KiB units. ``DELETE`` on a session URI
  ends it (499, as Google's upload protocol answers; listed in ``aborted_sessions``).
- ``/uc?id=...&export=download``: drive.google.com's public download page for gdown (the file for a public
  file, an HTML sign-in page otherwise).

Permissions: a file is visible to its owner and to anyone a containing folder is shared with (``reader`` or
``writer``); others get 404 like Drive. Items in a Shared Drive need ``supportsAllDrives=true``.
A service account creating a file outside a Shared Drive gets ``403 storageQuotaExceeded``.

Fault knobs (see :class:`Faults`): ``fail(n, status, reason=..., retry_after=...)``, ``drop(n)`` (close the
connection mid-body), ``truncate(n)`` (cut a media download short), ``ratio(p)`` (fault that fraction of
Drive requests at random; ``token=True`` includes the token endpoint), ``token(n, status)`` (503/500/429 in the
OAuth error shape, or a dropped connection, at the token endpoint); ``upload_cap`` bytes per principal (then 403
userRateLimitExceeded "User rate limit exceeded.", Drive's answer at the 750 GB daily cap; ``daily_cap(n)`` gives
that answer to the next `n` uploads); ``storage_full`` (403 storageQuotaExceeded for every upload); ``pause_at``
(hold an upload mid-way) and ``hold_metadata`` (hold the next metadata update, then drop it unapplied) with
``paused``/``held`` and ``gate``.
Blobs are stored on disk under the server's folder, never held in memory whole.
"""
from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import http.server
import itertools
import json
import os
import random
import re
import secrets as _secrets
import shutil
import socket
import socketserver
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FOLDER_MIME = "application/vnd.google-apps.folder"
#: Drive's message at the daily upload cap, and for the per-minute user rate limit (same reason, userRateLimitExceeded)
DAILY_CAP_MESSAGE = "User rate limit exceeded."
USER_RATE_MESSAGE = ("User Rate Limit Exceeded. Rate of requests for user exceed configured project quota. You may "
                     "consider re-evaluating expected per-user traffic to the API and adjust project quota limits "
                     "accordingly.")
UNIT = 256 * 1024
GOOGLE_TOKEN_AUD = "https://oauth2.googleapis.com/token"

_KEY_CACHE: dict[str, Any] = {}


def test_private_key():
    """A 2048-bit RSA key generated once per process (cryptography); returns (key, pem_text)."""
    if "key" not in _KEY_CACHE:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        _KEY_CACHE["key"], _KEY_CACHE["pem"] = key, pem
    return _KEY_CACHE["key"], _KEY_CACHE["pem"]


test_private_key.__test__ = False  # not a pytest test


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _new_id(n: int = 33) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "1" + "".join(_secrets.choice(alphabet) for _ in range(n - 1))


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


@dataclass
class DFile:
    id: str
    name: str
    mimeType: str
    parents: list[str]
    owner: str
    created: float
    modified: float
    size: int = 0
    md5: str | None = None
    blob: Path | None = None
    drive_id: str | None = None
    trashed: bool = False
    shares: dict[str, str] = field(default_factory=dict)   # email -> reader | writer
    public: bool = False                                   # "anyone with the link"
    app_properties: dict[str, str] = field(default_factory=dict)

    @property
    def is_folder(self) -> bool:
        return self.mimeType == FOLDER_MIME

    def resource(self) -> dict[str, Any]:
        r: dict[str, Any] = {"kind": "drive#file", "id": self.id, "name": self.name, "mimeType": self.mimeType,
                             "parents": list(self.parents), "trashed": self.trashed,
                             "createdTime": _rfc3339(self.created), "modifiedTime": _rfc3339(self.modified)}
        if not self.is_folder:
            r["size"] = str(self.size)
            r["md5Checksum"] = self.md5
        if self.drive_id:
            r["driveId"] = self.drive_id
        if self.app_properties:
            r["appProperties"] = dict(self.app_properties)
        return r

    def set_app_properties(self, meta: dict[str, Any]) -> None:
        """Merge ``meta["appProperties"]`` as Drive does: a key set to null is removed."""
        for k, v in _app_properties(meta).items():
            if v is None:
                self.app_properties.pop(k, None)
            else:
                self.app_properties[k] = v


def _app_properties(meta: dict[str, Any]) -> dict[str, Any]:
    """Validate the appProperties of a request body (a map of strings, 124 bytes per key + value)."""
    props = meta.get("appProperties")
    if props is None:
        return {}
    if not isinstance(props, dict):
        raise HTTPFail(400, "Invalid Value for field appProperties", "invalid")
    for k, v in props.items():
        if v is not None and not isinstance(v, str):
            raise HTTPFail(400, f"Invalid Value for appProperties[{k!r}]", "invalid")
        if len(k.encode()) + len((v or "").encode()) > 124:
            raise HTTPFail(400, "The limit of 124 bytes (UTF-8) for the key and value of a property was exceeded.",
                           "invalidProperty")
    return props


@dataclass
class Session:
    id: str
    principal: str
    total: int | None
    meta: dict[str, Any]
    fields: str | None
    target: str | None            # file id for files.update, None for create
    path: Path
    committed: int = 0
    md5: Any = field(default_factory=lambda: hashlib.md5(usedforsecurity=False))
    done_file: str | None = None
    supports_all: bool = False


class Faults:
    """Fault injection. Every knob is thread-safe; counts are consumed by matching requests in order.

    Attributes:
        injected: a list of (kind, method, path) for every fault served, for assertions.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[dict[str, Any]] = []
        self._ratio = 0.0
        self._ratio_token = False
        self._ratio_kinds: tuple[str, ...] = ()
        self._rng = random.Random(0)
        self.injected: list[tuple[str, str, str]] = []

    def fail(self, n: int = 1, status: int = 503, *, reason: str | None = None, retry_after: float | None = None,
             method: str | None = None, path: str | None = None, message: str | None = None) -> None:
        """Answer the next `n` matching requests with `status` (and a Drive error body with `reason`).

        ``reason="userRateLimitExceeded"`` answers with Drive's per-minute rate-limit message (transient);
        :meth:`daily_cap` gives the daily-cap answer, which carries the same reason with another message."""
        with self._lock:
            self._queue.append(dict(kind="status", n=n, status=status, reason=reason, retry_after=retry_after,
                                    method=method, path=path, message=message))

    def daily_cap(self, n: int = 1) -> None:
        """Answer the next `n` uploads as Drive does once the account's daily upload cap (~750 GB per rolling
        24 h) is reached: ``403 userRateLimitExceeded "User rate limit exceeded."`` (usageLimits)."""
        self.fail(n, 403, reason="userRateLimitExceeded", message=DAILY_CAP_MESSAGE, path="/upload/")

    def drop(self, n: int = 1, *, method: str | None = "PUT", path: str | None = None) -> None:
        """Close the connection half-way through the body of the next `n` matching requests."""
        with self._lock:
            self._queue.append(dict(kind="drop", n=n, method=method, path=path))

    def lose_response(self, n: int = 1, *, method: str | None = None, path: str | None = None) -> None:
        """Carry out the next `n` matching requests, then drop the connection instead of answering."""
        with self._lock:
            self._queue.append(dict(kind="lose", n=n, method=method, path=path))

    def truncate(self, n: int = 1, *, path: str | None = None) -> None:
        """Send only part of the next `n` media downloads, then close the connection."""
        with self._lock:
            self._queue.append(dict(kind="truncate", n=n, method="GET", path=path, media=True))

    def ratio(self, p: float, *, seed: int = 0,
              kinds: tuple[str, ...] = ("503", "500", "429", "drop", "truncate", "rate"),
              token: bool = False) -> None:
        """Fault a fraction `p` of Drive API requests at random; with `token`, the OAuth token endpoint's too
        (503/500/429 answers in the OAuth error shape, dropped connections)."""
        with self._lock:
            self._ratio, self._ratio_kinds, self._rng = p, kinds, random.Random(seed)
            self._ratio_token = token

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._ratio = 0.0

    def token(self, n: int = 1, status: int | None = 503, *, retry_after: float | None = None,
              drop: bool = False) -> None:
        """Fault the next `n` requests to the OAuth token endpoint: `status` (503, 500 or 429 in the OAuth
        error shape; with Retry-After when `retry_after` is given) or, with `drop`, a dropped connection."""
        if drop:
            self.drop(n, method="POST", path="/token")
        else:
            self.fail(n, status or 503, retry_after=retry_after, method="POST", path="/token")

    def pick(self, method: str, path: str, *, media_get: bool, has_body: bool,
             token: bool = False) -> dict[str, Any] | None:
        with self._lock:
            for f in self._queue:
                if f["n"] <= 0:
                    continue
                if f["method"] and f["method"] != method:
                    continue
                if f["path"] and f["path"] not in path:
                    continue
                if token and not (f["path"] and "/token" in f["path"]):
                    continue   # the token endpoint is faulted only when asked for by name
                if f.get("media") and not media_get:
                    continue
                if f["kind"] == "drop" and not has_body:
                    continue
                f["n"] -= 1
                self.injected.append((f["kind"], method, path))
                return f
            if token and not self._ratio_token:
                return None
            if self._ratio and self._rng.random() < self._ratio:
                kinds = [k for k in self._ratio_kinds
                         if not (k == "truncate" and not media_get) and not (k == "drop" and not has_body)]
                k = self._rng.choice(kinds)
                self.injected.append((k, method, path))
                if k in ("drop", "truncate"):
                    return {"kind": k}
                if k == "rate":
                    return {"kind": "status", "status": 403, "reason": "rateLimitExceeded", "retry_after": None}
                return {"kind": "status", "status": int(k), "reason": None,
                        "retry_after": 0 if k == "429" else None}
        return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: a JSON answer goes out as two writes (headers, body); with Nagle on, the body waited for the client's
    #: delayed ACK, ~40 ms per answer, which Drive's front ends do not do
    disable_nagle_algorithm = True
    server: "_HTTPServer"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.owner._track(self.connection, False)

    def do_GET(self) -> None: self.server.owner._dispatch(self, "GET")
    def do_POST(self) -> None: self.server.owner._dispatch(self, "POST")
    def do_PUT(self) -> None: self.server.owner._dispatch(self, "PUT")
    def do_PATCH(self) -> None: self.server.owner._dispatch(self, "PATCH")
    def do_DELETE(self) -> None: self.server.owner._dispatch(self, "DELETE")

    def do_CONNECT(self) -> None:
        """Act as the HTTPS proxy gdown is pointed at: terminate TLS for drive.google.com & co. ourselves."""
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        try:
            tls = self.server.owner._tls_context().wrap_socket(self.connection, server_side=True)
        except OSError:
            return
        try:
            _Handler(tls, self.client_address, self.server)
        finally:
            with contextlib.suppress(OSError):
                tls.close()


class _HTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = False
    block_on_close = True
    owner: "DriveServer"
    _counter = itertools.count(1)

    def process_request(self, request, client_address):  # named threads, joined on server_close
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name=f"drive-server-conn-{next(self._counter)}")
        t.daemon = False
        if self._threads is not None:
            self._threads.append(t)
        t.start()


class _Drop(Exception):
    """Close the connection without an answer."""


class HTTPFail(Exception):
    def __init__(self, status: int, message: str, reason: str, *, domain: str = "global",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.domain = status, message, reason, domain
        self.headers = headers or {}


class DriveServer:
    """A threaded Drive v3 + OAuth server on 127.0.0.1 (see the module docstring).

    Args:
        root: a folder for blobs (default: a new temporary folder, removed by stop()).
    """

    SA_EMAIL = "colabkit-test@colabkit-tests.iam.gserviceaccount.com"
    USER_EMAIL = "user@example.com"
    OWNER_EMAIL = "owner@example.com"
    CLIENT_ID = "test-client.apps.googleusercontent.com"
    # deliberately shaped like real secrets so the leak scans can find them
    CLIENT_SECRET = "GOCSPX-testclientsecret0123456789"
    REFRESH_TOKEN = "1//0testrefreshtoken-abcdefghijklmnopqrstuvwxyz0123456789"

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="drive-server-"))
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, DFile] = {}
        self.sessions: dict[str, Session] = {}
        self.aborted_sessions: list[str] = []   # resumable sessions a client ended with DELETE
        self.tokens: dict[str, tuple[str, float]] = {}          # access token -> (principal, expiry)
        self.principals: dict[str, str] = {}                    # email -> service_account | user
        self.uploaded: dict[str, int] = {}                      # bytes uploaded per principal
        self.upload_cap: int | None = None
        #: public files larger than this get Drive's virus-scan confirmation page first (gdown follows it)
        self.gdown_confirm_over: int | None = None
        self.storage_full = False
        self.faults = Faults()
        self.token_faults = 0                                   # token endpoint answers faulted
        self.requests: list[tuple[str, str]] = []
        self.content_ranges: list[str] = []                     # Content-Range of every upload PUT, in order
        self.assertions: list[str] = []                         # every JWT assertion received (leak scans)
        self.max_page_size = 1000
        #: when set, an upload PUT that has committed at least this many bytes sets `paused` and waits on `gate`
        self.pause_at: int | None = None
        self.paused = threading.Event()
        self.gate = threading.Event()
        #: when set, a metadata update (PATCH /drive/v3/files/<id>) sets `held` and waits on `gate`, then is
        #: dropped unapplied: the client died between an upload's last chunk and its metadata update
        self.hold_metadata = False
        self.held = threading.Event()
        self.issued_tokens: list[str] = []                      # every access token handed out (leak scans)
        self._lock = threading.RLock()
        self._conns: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.signing_key, self.private_key_pem = test_private_key()
        self.private_key_id = "testkeyid0123456789abcdef"

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "DriveServer":
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="drive-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every client connection, join every thread. Safe to call twice."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        httpd.server_close()           # joins the connection threads
        if self._thread:
            self._thread.join(10)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "DriveServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    @property
    def port(self) -> int:
        assert self._httpd is not None, "start() the server first"
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        """The root that replaces https://www.googleapis.com/ (with a trailing slash)."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def token_uri(self) -> str:
        return self.endpoint + "token"

    # -- setup helpers --------------------------------------------------------------------------
    def service_account_info(self, email: str | None = None) -> dict[str, Any]:
        email = email or self.SA_EMAIL
        self.principals[email] = "service_account"
        return {"type": "service_account", "project_id": "colabkit-tests", "private_key_id": self.private_key_id,
                "private_key": self.private_key_pem, "client_email": email, "client_id": "1234567890",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": self.token_uri}

    def write_service_account(self, path: str | os.PathLike, email: str | None = None, *, mode: int = 0o600) -> Path:
        """Write a service-account JSON for the test key (mode 600) and return its path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.service_account_info(email), indent=2))
        os.chmod(p, mode)
        return p

    def authorized_user_info(self, email: str | None = None) -> dict[str, Any]:
        email = email or self.USER_EMAIL
        self.principals[email] = "user"
        self._refresh_owner = email
        return {"type": "authorized_user", "client_id": self.CLIENT_ID, "client_secret": self.CLIENT_SECRET,
                "refresh_token": self.REFRESH_TOKEN, "token_uri": self.token_uri}

    def write_authorized_user(self, path: str | os.PathLike, email: str | None = None) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.authorized_user_info(email), indent=2))
        os.chmod(p, 0o600)
        return p

    def create_folder(self, name: str = "colabkit", *, owner: str | None = None,
                      share_with: dict[str, str] | None = None, shared_drive: bool = False,
                      parent: str | None = None) -> str:
        """A folder owned by `owner` (default: a human owner), shared as given; returns its id.

        With ``shared_drive=True`` the folder is the root of a new Shared Drive whose members are `share_with`.
        """
        with self._lock:
            fid = _new_id()
            now = time.time()
            drive_id = None
            if shared_drive:
                drive_id = "0A" + _new_id(17)
            elif parent:
                drive_id = self.files[parent].drive_id
            f = DFile(fid, name, FOLDER_MIME, [parent] if parent else [], owner or self.OWNER_EMAIL, now, now,
                      drive_id=drive_id, shares=dict(share_with or {}))
            self.files[fid] = f
            return fid

    def add_public_file(self, name: str, data: bytes, *, public: bool = True) -> str:
        """A file for gdown: shared with "anyone with the link" when `public`. Returns its id."""
        with self._lock:
            fid = _new_id()
            blob = self.blobs / fid
            blob.write_bytes(data)
            now = time.time()
            self.files[fid] = DFile(fid, name, "application/octet-stream", [], self.OWNER_EMAIL, now, now,
                                    size=len(data), md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
                                    blob=blob, public=public)
            return fid

    def children(self, folder_id: str, *, trashed: bool = False) -> list[DFile]:
        with self._lock:
            return [f for f in self.files.values() if folder_id in f.parents and f.trashed == trashed]

    def find(self, path: str, *, root: str) -> DFile | None:
        """The non-trashed file at POSIX `path` under folder `root` (tests' view of the store)."""
        cur = root
        parts = path.split("/")
        for i, part in enumerate(parts):
            hits = [f for f in self.children(cur) if f.name == part]
            if not hits:
                return None
            if i == len(parts) - 1:
                return hits[0]
            cur = hits[0].id
        return None

    def content(self, file_id: str) -> bytes:
        f = self.files[file_id]
        return f.blob.read_bytes() if f.blob else b""

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def expire_sessions(self) -> None:
        """Forget every resumable session (a PUT to one then gets 404, as after Drive's one-week expiry)."""
        with self._lock:
            self.sessions.clear()

    # -- permissions ----------------------------------------------------------------------------
    def _role(self, f: DFile, who: str) -> str | None:
        seen = set()
        cur: DFile | None = f
        best = None
        while cur is not None and cur.id not in seen:
            seen.add(cur.id)
            if cur.owner == who:
                return "owner"
            r = cur.shares.get(who)
            if r == "writer" or r == "organizer":
                return "writer"
            if r == "reader":
                best = "reader"
            cur = self.files.get(cur.parents[0]) if cur.parents else None
        return best

    def _visible(self, f: DFile | None, who: str, all_drives: bool) -> bool:
        if f is None:
            return False
        if f.drive_id and not all_drives:
            return False
        return self._role(f, who) is not None

    def _get_visible(self, fid: str, who: str, all_drives: bool) -> DFile:
        f = self.files.get(fid)
        if not self._visible(f, who, all_drives):
            raise HTTPFail(404, f"File not found: {fid}.", "notFound")
        return f  # type: ignore[return-value]

    def _check_write(self, f: DFile, who: str) -> None:
        if self._role(f, who) not in ("owner", "writer"):
            raise HTTPFail(403, "The user does not have sufficient permissions for this file.",
                           "insufficientFilePermissions")

    def _check_create_in(self, parent: DFile, who: str, mime: str) -> None:
        self._check_write(parent, who)
        if mime != FOLDER_MIME and self.principals.get(who) == "service_account" and not parent.drive_id:
            raise HTTPFail(403, "Service Accounts do not have storage quota. Leverage shared drives "
                           "(https://developers.google.com/workspace/drive/api/guides/about-shareddrives), or use "
                           "OAuth delegation (http://support.google.com/a/answer/7281227) instead.",
                           "storageQuotaExceeded", domain="usageLimits")

    def _check_upload_allowed(self, who: str, more: int) -> None:
        if self.storage_full:
            raise HTTPFail(403, "The user's Drive storage quota has been exceeded.", "storageQuotaExceeded",
                           domain="usageLimits")
        if self.upload_cap is not None and self.uploaded.get(who, 0) + more > self.upload_cap:
            raise HTTPFail(403, DAILY_CAP_MESSAGE, "userRateLimitExceeded", domain="usageLimits")

    # -- HTTP plumbing --------------------------------------------------------------------------
    def _dispatch(self, h: _Handler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        path = url.path
        host = (h.headers.get("Host") or "").split(":")[0]
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        self.requests.append((method, h.path))
        h._lose = False
        length = int(h.headers.get("Content-Length") or 0)
        try:
            if path == "/token" and method == "POST":
                fault = self.faults.pick(method, h.path, media_get=False, has_body=length > 0, token=True)
                if fault and fault["kind"] == "drop":
                    h.rfile.read(length // 2)
                    raise _Drop()
                if fault and fault["kind"] == "status":
                    _drain(h, length)
                    return self._token_fault(h, fault)
                h._lose = bool(fault and fault["kind"] == "lose")
                return self._token(h, h.rfile.read(length))
            if path == "/uc" or (host == "drive.usercontent.google.com" and path == "/download"):
                _drain(h, length)
                return self._uc(h, query)
            fault = self.faults.pick(method, h.path, media_get=(query.get("alt") == "media"),
                                     has_body=length > 0)
            if fault and fault["kind"] == "status":
                _drain(h, length)
                st = fault["status"]
                reason = fault.get("reason") or {500: "backendError", 503: "backendError",
                                                 429: "rateLimitExceeded"}.get(st, "error")
                headers = {}
                if fault.get("retry_after") is not None:
                    headers["Retry-After"] = str(int(fault["retry_after"]))
                message = fault.get("message") or (USER_RATE_MESSAGE if reason == "userRateLimitExceeded" else None)
                raise HTTPFail(st, message or {503: "Service Unavailable", 500: "Internal Error",
                                               429: "Rate Limit Exceeded"}.get(st, "Injected error"), reason,
                               headers=headers, domain="usageLimits" if st in (403, 429) else "global")
            if fault and fault["kind"] == "lose":
                h._lose = True
            who = self._auth(h)
            if path.startswith("/upload/drive/v3/files"):
                fid = path[len("/upload/drive/v3/files"):].strip("/") or None
                if method == "DELETE" and "upload_id" in query:   # cancel a resumable session (499, as Google's
                    _drain(h, length)                                  # upload protocol answers)
                    with self._lock:
                        s = self.sessions.pop(query["upload_id"], None)
                        if s is not None:
                            self.aborted_sessions.append(query["upload_id"])
                    if s is not None:
                        with contextlib.suppress(OSError):
                            s.path.unlink()
                    return self._json(h, 499, {"error": {"code": 499, "message": "Client Closed Request"}})
                if method == "PUT" or (method in ("POST", "PATCH") and "upload_id" in query):
                    return self._session_put(h, query, length, who, fault)
                if query.get("uploadType") == "resumable":
                    return self._start_resumable(h, query, h.rfile.read(length), who, fid)
                if query.get("uploadType") in ("multipart", "media"):
                    if fault and fault["kind"] == "drop":
                        h.rfile.read(length // 2)
                        raise _Drop()
                    return self._multipart(h, query, length, who, fid)
                raise HTTPFail(400, f"Unsupported uploadType {query.get('uploadType')!r}", "badRequest")
            if path == "/drive/v3/about":
                _drain(h, length)
                return self._json(h, 200, _select({"kind": "drive#about", "user": {
                    "emailAddress": who, "kind": "drive#user"},
                    "storageQuota": {"limit": "0" if self.principals.get(who) == "service_account" else
                                     str(15 * 10**9), "usage": "0"}}, query.get("fields")))
            if path == "/drive/v3/files":
                if method == "GET":
                    return self._list(h, query, who)
                if method == "POST":
                    return self._create_meta(h, query, h.rfile.read(length), who)
            m = re.fullmatch(r"/drive/v3/files/([^/]+)", path)
            if m:
                fid = m.group(1)
                if method == "GET":
                    return self._get(h, query, who, fid, fault)
                if method == "PATCH":
                    body = h.rfile.read(length)
                    if self.hold_metadata:
                        self.hold_metadata = False
                        self.held.set()
                        while not self.gate.wait(0.05) and self._httpd is not None:
                            pass
                        raise _Drop()
                    return self._update_meta(h, query, body, who, fid)
                if method == "DELETE":
                    _drain(h, length)
                    return self._delete(h, query, who, fid)
            _drain(h, length)
            raise HTTPFail(404, f"Not Found: {method} {path}", "notFound")
        except HTTPFail as e:
            body = {"error": {"code": e.status, "message": e.message,
                              "errors": [{"message": e.message, "domain": e.domain, "reason": e.reason}]}}
            if e.status == 401:
                body["error"]["status"] = "UNAUTHENTICATED"
            self._json(h, e.status, body, headers=e.headers)
        except _Drop:
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
        except (ConnectionError, BrokenPipeError, socket.timeout):
            h.close_connection = True

    def _json(self, h: _Handler, status: int, obj: Any, *, headers: dict[str, str] | None = None) -> None:
        if getattr(h, "_lose", False):
            raise _Drop()
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _auth(self, h: _Handler) -> str:
        auth = h.headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            raise HTTPFail(401, "Request is missing required authentication credential.", "required")
        tok = auth[7:].strip()
        with self._lock:
            hit = self.tokens.get(tok)
        if hit is None or hit[1] < time.time():
            raise HTTPFail(401, "Request had invalid authentication credentials.", "authError")
        return hit[0]

    # -- OAuth ------------------------------------------------------------------------------------
    def _token(self, h: _Handler, body: bytes) -> None:
        form = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode()).items()}
        grant = form.get("grant_type")
        who = None
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            self.assertions.append(form.get("assertion", ""))
            who = self._verify_jwt(form.get("assertion", ""))
        elif grant == "refresh_token":
            if (form.get("refresh_token") == self.REFRESH_TOKEN and form.get("client_id") == self.CLIENT_ID
                    and form.get("client_secret") == self.CLIENT_SECRET):
                who = getattr(self, "_refresh_owner", self.USER_EMAIL)
        if who is None:
            return self._json(h, 400, {"error": "invalid_grant", "error_description": "Invalid grant."})
        token = "ya29.test-" + _secrets.token_urlsafe(24)
        with self._lock:
            self.tokens[token] = (who, time.time() + 3600)
            self.issued_tokens.append(token)
        self._json(h, 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _token_fault(self, h: _Handler, fault: dict[str, Any]) -> None:
        """What Google's token endpoint answers when it is briefly unavailable or rate-limiting (RFC 6749
        error codes; google-auth marks these retryable)."""
        st = int(fault["status"])
        if st == 403:   # the "rate" kind of ratio(): Google's token endpoint has no 403 rate limit; use 429
            st = 429
        err = {503: "temporarily_unavailable", 500: "internal_failure", 429: "rate_limit_exceeded"}.get(st, "server_error")
        headers = {}
        if fault.get("retry_after") is not None:
            headers["Retry-After"] = str(int(fault["retry_after"]))
        with self._lock:
            self.token_faults += 1
        self._json(h, st, {"error": err, "error_description": f"injected token endpoint fault (HTTP {st})"},
                   headers=headers)

    def _verify_jwt(self, assertion: str) -> str | None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        try:
            head_b64, payload_b64, sig_b64 = assertion.split(".")
            header = json.loads(_b64d(head_b64))
            payload = json.loads(_b64d(payload_b64))
            if header.get("alg") != "RS256":
                return None
            self.signing_key.public_key().verify(_b64d(sig_b64), f"{head_b64}.{payload_b64}".encode(),
                                                 padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, InvalidSignature):
            return None
        now = time.time()
        if payload.get("aud") not in (GOOGLE_TOKEN_AUD, self.token_uri) or payload.get("exp", 0) < now - 60:
            return None
        who = payload.get("iss")
        if self.principals.get(who) != "service_account":
            return None
        return who

    # -- files ------------------------------------------------------------------------------------
    def _list(self, h: _Handler, query: dict[str, str], who: str) -> None:
        all_drives = query.get("supportsAllDrives") == "true" and query.get("includeItemsFromAllDrives") == "true"
        preds = _parse_q(query.get("q", ""))
        with self._lock:
            hits = [f for f in self.files.values() if self._visible(f, who, all_drives) and all(p(f) for p in preds)]
        if not any(getattr(p, "trashed", False) for p in preds):
            pass
        hits.sort(key=lambda f: (f.name, f.created))
        size = min(int(query.get("pageSize") or 100), self.max_page_size)
        start = int(_b64d(query["pageToken"]).decode()) if query.get("pageToken") else 0
        page = hits[start:start + size]
        out: dict[str, Any] = {"kind": "drive#fileList", "incompleteSearch": False,
                               "files": [f.resource() for f in page]}
        if start + size < len(hits):
            out["nextPageToken"] = base64.urlsafe_b64encode(str(start + size).encode()).decode().rstrip("=")
        fields = query.get("fields") or "kind,incompleteSearch,nextPageToken,files(kind,id,name,mimeType)"
        self._json(h, 200, _select(out, fields))

    def _create_meta(self, h: _Handler, query: dict[str, str], body: bytes, who: str) -> None:
        meta = json.loads(body or b"{}")
        f = self._new_file(meta, who, query, size=0, md5=hashlib.md5(b"", usedforsecurity=False).hexdigest(),
                           blob=None)
        self._json(h, 200, _select(f.resource(), query.get("fields") or "kind,id,name,mimeType"))

    def _new_file(self, meta: dict[str, Any], who: str, query: dict[str, str], *, size: int, md5: str | None,
                  blob: Path | None, check_only: bool = False) -> DFile:
        all_drives = query.get("supportsAllDrives") == "true"
        parents = meta.get("parents") or []
        if not parents:
            raise HTTPFail(403, "Creating files in the root of My Drive is not allowed in these tests.",
                           "insufficientFilePermissions")
        mime = meta.get("mimeType") or "application/octet-stream"
        _app_properties(meta)
        with self._lock:
            parent = self._get_visible(parents[0], who, all_drives)
            self._check_create_in(parent, who, mime)
            if check_only:
                return parent
            now = time.time()
            f = DFile(_new_id(), meta.get("name") or "Untitled", mime, [parent.id], who, now, now,
                      size=0 if mime == FOLDER_MIME else size, md5=None if mime == FOLDER_MIME else md5,
                      blob=blob, drive_id=parent.drive_id)
            f.set_app_properties(meta)
            self.files[f.id] = f
            return f

    def _get(self, h: _Handler, query: dict[str, str], who: str, fid: str, fault: dict | None) -> None:
        with self._lock:
            f = self._get_visible(fid, who, query.get("supportsAllDrives") == "true")
        if query.get("alt") != "media":
            return self._json(h, 200, _select(f.resource(), query.get("fields") or "kind,id,name,mimeType"))
        if f.is_folder:
            raise HTTPFail(403, "Only files with binary content can be downloaded.", "fileNotDownloadable")
        self._send_blob(h, f, fault)

    def _send_blob(self, h: _Handler, f: DFile, fault: dict | None) -> None:
        if getattr(h, "_lose", False):   # lose_response() on a download: the connection drops before an answer
            raise _Drop()
        total = f.size
        start, end = 0, total - 1
        status = 200
        rng = h.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                raise HTTPFail(400, f"Bad Range {rng!r}", "badRequest")
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else total - 1, total - 1)
            if start >= total:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{total}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        count = max(0, end - start + 1)
        h.send_response(status)
        h.send_header("Content-Type", f.mimeType)
        h.send_header("Content-Length", str(count))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        h.end_headers()
        if count == 0:
            return
        send = count // 2 if fault and fault["kind"] == "truncate" else count
        with open(f.blob, "rb") as fh:  # type: ignore[arg-type]
            h.wfile.flush()
            h.connection.sendfile(fh, start, send)
        if send < count:
            raise _Drop()

    def _update_meta(self, h: _Handler, query: dict[str, str], body: bytes, who: str, fid: str) -> None:
        meta = json.loads(body or b"{}")
        with self._lock:
            f = self._get_visible(fid, who, query.get("supportsAllDrives") == "true")
            self._check_write(f, who)
            if "name" in meta:
                f.name = meta["name"]
            if "trashed" in meta:
                f.trashed = bool(meta["trashed"])
            f.set_app_properties(meta)
            for p in filter(None, (query.get("removeParents") or "").split(",")):
                if p in f.parents:
                    f.parents.remove(p)
            for p in filter(None, (query.get("addParents") or "").split(",")):
                f.parents.append(p)
            f.modified = time.time()
        self._json(h, 200, _select(f.resource(), query.get("fields") or "kind,id,name,mimeType"))

    def _delete(self, h: _Handler, query: dict[str, str], who: str, fid: str) -> None:
        with self._lock:
            f = self._get_visible(fid, who, query.get("supportsAllDrives") == "true")
            if self._role(f, who) != "owner" and not (f.drive_id and self._role(f, who) == "writer"):
                raise HTTPFail(403, "The user does not have sufficient permissions for this file.",
                               "insufficientFilePermissions")
            doomed = [f.id]
            i = 0
            while i < len(doomed):
                doomed.extend(c.id for c in self.files.values() if doomed[i] in c.parents)
                i += 1
            for d in doomed:
                gone = self.files.pop(d, None)
                if gone and gone.blob:
                    with contextlib.suppress(OSError):
                        gone.blob.unlink()
        h.send_response(204)
        h.send_header("Content-Length", "0")
        h.end_headers()

    # -- uploads ----------------------------------------------------------------------------------
    def _multipart(self, h: _Handler, query: dict[str, str], length: int, who: str, fid: str | None) -> None:
        body = h.rfile.read(length)
        ctype = h.headers.get("Content-Type", "")
        if query.get("uploadType") == "media":
            meta, data = {}, body
        else:
            m = re.search(r'boundary="?([^";]+)"?', ctype)
            if not m:
                raise HTTPFail(400, "Multipart body without a boundary", "badRequest")
            meta, data = _split_multipart(body, m.group(1).encode())
        blob = self.blobs / ("u-" + _new_id())
        blob.write_bytes(data)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        try:
            f = self._finish_upload(meta, who, query, fid, blob, len(data), md5)
        except BaseException:
            blob.unlink(missing_ok=True)
            raise
        self._json(h, 200, _select(f.resource(), query.get("fields") or "kind,id,name,mimeType"))

    def _finish_upload(self, meta: dict[str, Any], who: str, query: dict[str, str], fid: str | None, blob: Path,
                       size: int, md5: str) -> DFile:
        with self._lock:
            self._check_upload_allowed(who, size)
            self.uploaded[who] = self.uploaded.get(who, 0) + size
            if fid is None:
                return self._new_file(meta, who, query, size=size, md5=md5, blob=blob)
            f = self._get_visible(fid, who, query.get("supportsAllDrives") == "true")
            self._check_write(f, who)
            old = f.blob
            f.blob, f.size, f.md5, f.modified = blob, size, md5, time.time()
            if meta.get("name"):
                f.name = meta["name"]
            f.set_app_properties(meta)
            if old and old != blob:
                old.unlink(missing_ok=True)
            return f

    def _start_resumable(self, h: _Handler, query: dict[str, str], body: bytes, who: str, fid: str | None) -> None:
        meta = json.loads(body or b"{}")
        total_h = h.headers.get("X-Upload-Content-Length")
        total = int(total_h) if total_h not in (None, "") else None
        with self._lock:
            if fid is None:
                self._new_file(meta, who, query, size=0, md5=None, blob=None, check_only=True)
            else:
                self._check_write(self._get_visible(fid, who, query.get("supportsAllDrives") == "true"), who)
                _app_properties(meta)
            self._check_upload_allowed(who, total or 0)
            sid = "ADPycd" + _secrets.token_urlsafe(24)
            s = Session(sid, who, total, meta, query.get("fields"), fid, self.blobs / ("s-" + sid),
                        supports_all=query.get("supportsAllDrives") == "true")
            s.path.touch()
            self.sessions[sid] = s
        target = f"upload/drive/v3/files{'/' + fid if fid else ''}"
        params = {k: v for k, v in query.items() if k != "upload_id"}
        params["upload_id"] = sid
        loc = f"{self.endpoint}{target}?{urllib.parse.urlencode(params)}"
        h.send_response(200)
        h.send_header("Location", loc)
        h.send_header("X-GUploader-UploadID", sid)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _session_put(self, h: _Handler, query: dict[str, str], length: int, who: str, fault: dict | None) -> None:
        sid = query.get("upload_id", "")
        with self._lock:
            s = self.sessions.get(sid)
        if s is None or s.principal != who:
            _drain(h, length)
            raise HTTPFail(404, "Upload session not found or expired; start a new upload.", "notFound")
        if s.done_file is not None:  # already finished: answer as Drive does, with the file
            _drain(h, length)
            f = self.files.get(s.done_file)
            if f is None:
                raise HTTPFail(404, "Upload session not found or expired; start a new upload.", "notFound")
            return self._json(h, 200, _select(f.resource(), s.fields or "kind,id,name,mimeType"))
        cr = h.headers.get("Content-Range", "")
        self.content_ranges.append(cr)
        m_q = re.fullmatch(r"bytes \*/(\d+|\*)", cr.strip())
        m_c = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", cr.strip())
        if m_q or (not cr and length == 0):
            _drain(h, length)
            if m_q and m_q.group(1) != "*":
                s.total = int(m_q.group(1))
            if s.total is not None and s.committed == s.total and (s.total == 0 or not cr or m_q):
                return self._complete(h, s)
            return self._308(h, s)
        if not m_c:
            _drain(h, length)
            raise HTTPFail(400, f"Invalid Content-Range {cr!r}", "badRequest")
        first, last = int(m_c.group(1)), int(m_c.group(2))
        if m_c.group(3) != "*":
            s.total = int(m_c.group(3))
        if first > s.committed or last - first + 1 != length:
            _drain(h, length)
            return self._308(h, s)
        with self._lock:
            try:
                self._check_upload_allowed(who, 0)
            except HTTPFail:
                _drain(h, length)
                raise
        skip = s.committed - first
        drop_at = length // 2 if fault and fault["kind"] == "drop" else None
        received = 0
        pos = s.committed
        pending = bytearray()        # received bytes not yet a whole 256 KiB unit
        dropped = False
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        with open(s.path, "r+b") as out:
            out.seek(pos)
            while received < length:
                want = min(len(buf), length - received)
                if drop_at is not None:
                    want = min(want, drop_at - received)
                    if want <= 0:
                        dropped = True
                        break
                n = h.rfile.readinto(view[:want])
                if not n:
                    dropped = True
                    break
                received += n
                data = view[:n]
                if skip:
                    cut = min(skip, n)
                    data, skip = data[cut:], skip - cut
                if not len(data):
                    continue
                out.write(data)
                if pending:
                    pending += data
                    whole = len(pending) - len(pending) % UNIT
                    if whole:
                        s.md5.update(memoryview(pending)[:whole])
                        s.committed += whole
                        del pending[:whole]
                else:
                    whole = len(data) - len(data) % UNIT
                    if whole:
                        s.md5.update(data[:whole])
                        s.committed += whole
                    pending = bytearray(data[whole:])
                if self.pause_at is not None and s.committed + len(pending) >= self.pause_at:
                    self.pause_at = None
                    self.paused.set()
                    while not self.gate.wait(0.05) and self._httpd is not None:
                        pass
        final = s.total is not None and first + received == s.total and not dropped
        if final and pending:
            s.md5.update(pending)
            s.committed += len(pending)
            pending = bytearray()
        if dropped:  # like Drive: only whole 256 KiB units of a cut-off chunk are kept
            raise _Drop()
        if s.total is not None and s.committed == s.total:
            return self._complete(h, s)
        return self._308(h, s)

    def _308(self, h: _Handler, s: Session) -> None:
        h.send_response(308)
        if s.committed:
            h.send_header("Range", f"bytes=0-{s.committed - 1}")
        h.send_header("X-GUploader-UploadID", s.id)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _complete(self, h: _Handler, s: Session) -> None:
        blob = self.blobs / ("b-" + s.id)
        os.replace(s.path, blob)
        query = {"supportsAllDrives": "true" if s.supports_all else "false"}
        try:
            f = self._finish_upload(s.meta, s.principal, query, s.target, blob, s.committed, s.md5.hexdigest())
        except HTTPFail:
            os.replace(blob, s.path)
            raise
        s.done_file = f.id
        self._json(h, 200, _select(f.resource(), s.fields or "kind,id,name,mimeType"))

    # -- drive.google.com/uc (gdown) ---------------------------------------------------------------
    def _tls_context(self):
        """A TLS context with a self-signed certificate for Google's download hosts (gdown uses verify=False)."""
        import ssl
        if getattr(self, "_ssl", None) is None:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.x509.oid import NameOID
            import datetime as _dt
            key = self.signing_key
            names = ["drive.google.com", "docs.google.com", "drive.usercontent.google.com"]
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
            now = _dt.datetime.now(_dt.timezone.utc)
            cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                    .public_key(key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - _dt.timedelta(days=1)).not_valid_after(now + _dt.timedelta(days=7))
                    .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
                    .sign(key, hashes.SHA256()))
            pem = self.root / "tls.pem"
            pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.private_key_pem.encode())
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(pem))
            self._ssl = ctx
        return self._ssl

    def _uc(self, h: _Handler, query: dict[str, str]) -> None:
        f = self.files.get(query.get("id", ""))
        if (f is not None and f.public and self.gdown_confirm_over is not None and f.size > self.gdown_confirm_over
                and not query.get("confirm")):
            # Drive's "can't scan this file for viruses" page: gdown submits its form
            page = ("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>"
                    f"<p class=\"uc-warning-caption\">{f.name} is too large for Google to scan for viruses.</p>"
                    "<form id=\"download-form\" action=\"https://drive.usercontent.google.com/download\" "
                    "method=\"get\"><input type=\"submit\" value=\"Download anyway\"/>"
                    f"<input type=\"hidden\" name=\"id\" value=\"{f.id}\">"
                    "<input type=\"hidden\" name=\"export\" value=\"download\">"
                    "<input type=\"hidden\" name=\"confirm\" value=\"t\">"
                    "<input type=\"hidden\" name=\"uuid\" value=\"0f0e0d0c\"></form></body></html>").encode()
            h.send_response(200)
            h.send_header("Content-Type", "text/html; charset=utf-8")
            h.send_header("Content-Length", str(len(page)))
            h.end_headers()
            h.wfile.write(page)
            return
        if f is None or not f.public:
            page = ("<!DOCTYPE html><html><head><title>Google Drive: Sign-in</title></head><body>"
                    "<form action=\"https://accounts.google.com/v3/signin/identifier\">Sign in to continue to "
                    "Google Drive</form></body></html>").encode()
            h.send_response(200)
            h.send_header("Content-Type", "text/html; charset=utf-8")
            h.send_header("Content-Length", str(len(page)))
            h.end_headers()
            h.wfile.write(page)
            return
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Disposition", f'attachment; filename="{f.name}"')
        h.send_header("Last-Modified", email.utils.formatdate(f.modified, usegmt=True))
        h.send_header("Content-Length", str(f.size))
        h.end_headers()
        with open(f.blob, "rb") as fh:  # type: ignore[arg-type]
            shutil.copyfileobj(fh, h.wfile)


def _drain(h: _Handler, length: int) -> None:
    while length > 0:
        buf = h.rfile.read(min(length, 1 << 20))
        if not buf:
            break
        length -= len(buf)


def _split_multipart(body: bytes, boundary: bytes) -> tuple[dict[str, Any], bytes]:
    """The parts of a multipart/related body. Its line ends are those of its first delimiter line (RFC 2046 says
    CRLF; googleapiclient's email generator writes LF): a part's content is everything between its blank line
    and the line end before the next delimiter, so content that itself ends in CR, or holds a blank line, is
    kept byte for byte."""
    dash = b"--" + boundary
    start = body.find(dash)
    if start < 0:
        raise HTTPFail(400, "Empty multipart body", "badRequest")
    after = start + len(dash)
    nl = b"\r\n" if body.startswith(b"\r\n", after) else b"\n"
    found: list[bytes] = []
    pos = after
    while not body.startswith(b"--", pos):   # "--boundary--" closes the body
        if not body.startswith(nl, pos):
            raise HTTPFail(400, "Malformed multipart body", "badRequest")
        head_end = body.find(nl + nl, pos)   # the part's headers end at its first blank line
        if head_end < 0:
            raise HTTPFail(400, "Multipart part without the blank line after its headers", "badRequest")
        content_start = head_end + 2 * len(nl)
        nxt = body.find(nl + dash, content_start - len(nl))
        if nxt < 0:
            raise HTTPFail(400, "Multipart body without its closing delimiter", "badRequest")
        found.append(body[content_start:nxt] if nxt >= content_start else b"")
        pos = nxt + len(nl) + len(dash)
    if not found:
        raise HTTPFail(400, "Empty multipart body", "badRequest")
    meta = json.loads(found[0] or b"{}")
    return meta, found[1] if len(found) > 1 else b""


_TERM = re.compile(r"""\s*(?:
    '(?P<pid>(?:[^'\\]|\\.)*)'\s+in\s+parents |
    (?P<field>name|mimeType)\s*(?P<op>=|!=)\s*'(?P<val>(?:[^'\\]|\\.)*)' |
    trashed\s*=\s*(?P<trashed>true|false)
)\s*(?:and\b|$)""", re.VERBOSE | re.IGNORECASE)


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _parse_q(q: str) -> list[Any]:
    preds: list[Any] = []
    pos = 0
    q = q.strip()
    while pos < len(q):
        m = _TERM.match(q, pos)
        if not m or m.end() == pos:
            raise HTTPFail(400, f"Invalid Value: q={q!r}", "invalid")
        pos = m.end()
        if m.group("pid") is not None:
            pid = _unescape(m.group("pid"))
            preds.append(lambda f, pid=pid: pid in f.parents)
        elif m.group("field"):
            fld, op, val = m.group("field"), m.group("op"), _unescape(m.group("val"))
            if op == "=":
                preds.append(lambda f, fld=fld, val=val: getattr(f, fld) == val)
            else:
                preds.append(lambda f, fld=fld, val=val: getattr(f, fld) != val)
        else:
            want = m.group("trashed").lower() == "true"
            pred = (lambda f, want=want: f.trashed == want)
            preds.append(pred)
    return preds


def _parse_fields(spec: str) -> dict[str, Any]:
    """'nextPageToken, files(id,name)' -> {'nextPageToken': {}, 'files': {'id': {}, 'name': {}}}."""
    out: dict[str, Any] = {}
    stack = [out]
    name = ""
    for ch in spec + ",":
        if ch in ",()":
            name = name.strip()
            if ch == "(":
                node: dict[str, Any] = {}
                stack[-1][name] = node
                stack.append(node)
            elif name:
                cur = stack[-1]
                for part in name.split("/")[:-1]:
                    cur = cur.setdefault(part, {})
                cur[name.split("/")[-1]] = {}
            if ch == ")":
                stack.pop()
            name = ""
        else:
            name += ch
    return out


def _select(obj: Any, spec: str | None) -> Any:
    if not spec or spec.strip() == "*":
        return obj
    return _apply(obj, _parse_fields(spec))


def _apply(obj: Any, tree: dict[str, Any]) -> Any:
    if not tree:
        return obj
    if isinstance(obj, list):
        return [_apply(x, tree) for x in obj]
    if isinstance(obj, dict):
        if "*" in tree:
            return obj
        return {k: _apply(obj[k], sub) for k, sub in tree.items() if k in obj}
    return obj


@pytest.fixture
def drive_server(tmp_path_factory):
    """A started :class:`DriveServer` (blobs in a temporary folder); stopped and joined after the test."""
    srv = DriveServer(tmp_path_factory.mktemp("drive-server")).start()
    try:
        yield srv
    finally:
        srv.stop()
