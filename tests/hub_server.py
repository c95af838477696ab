"""A Hugging Face Hub on 127.0.0.1 that speaks the real HTTP protocol to the real huggingface_hub.

Use it from any test::

    from tests.hub_server import HubServer, hub_server   # noqa: F401  (hub_server is a pytest fixture)

    def test_something(hub_server):                       # started before, stopped and joined after
        api = HfApi(endpoint=hub_server.endpoint, token=hub_server.WRITE_TOKEN)
        api.create_repo("alice/ckpt", private=True)
        ...
        hub_server.inject(method="POST", path=r"/commit/", status=429, headers={"Retry-After": "7"})

or by hand: ``srv = HubServer(tmp_path).start(); ...; srv.stop()`` (``with HubServer(tmp) as srv:`` works too).

What it serves (two ports: ``endpoint`` is the Hub, ``cdn`` the storage the LFS files live on, so that
LFS transfers go to another origin as they do on huggingface.co):

* ``GET /api/whoami-v2`` — users ``alice`` (org ``acme``) and ``bob``; tokens :attr:`HubServer.WRITE_TOKEN`,
  :attr:`HubServer.READ_TOKEN` (alice, read-only), :attr:`HubServer.BOB_TOKEN`; anything else gets a 401.
* ``POST /api/repos/create`` (409 for an existing repo), ``GET /api/{type}s/{repo}[/revision/{rev}]``.
* ``POST /api/{type}s/{repo}/preupload/{rev}`` (upload mode and the oid of the file already there),
  ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer; no actions for content already stored),
  ``PUT`` on the CDN (sha256 checked while receiving), ``POST .../objects/verify``,
  ``POST /api/{type}s/{repo}/commit/{rev}`` (ndjson: header, file, lfsFile, deletedFile, deletedFolder).
* ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]`` with cursor paging in a ``Link`` header
  (:attr:`HubServer.page_size`), ``POST .../paths-info/{rev}``.
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: regular files are served directly (``ETag`` = git blob
  oid), LFS files answer 302 to the CDN with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``; every
  answer carries ``X-Repo-Commit``; errors carry ``X-Error-Code`` / ``X-Error-Message``. The CDN serves
  ``Range`` requests so that a download cut off midway resumes.
* ``PUT``/``GET /plain/{name}`` on the CDN: a plain upload/download of bytes with the same storage code,
  the baseline for benchmarks.

Faults: :meth:`HubServer.inject` answers matching requests with a status (429 with ``Retry-After``, 5xx,
401, 403 with a message such as the storage-quota refusal) or drops the connection, ``times`` times;
:meth:`HubServer.ratio` faults a fraction of every request (lookups, listings, downloads included) at random.
:attr:`HubServer.injected` lists every fault served. ``pause_lfs_at`` holds an LFS upload once that many bytes
arrived (``paused``, released by ``gate``), and ``lfs_bytes_received`` / ``lfs_uploads`` count every LFS byte
received, so a test can measure what a restart after a kill sends again.

Xet (``HubServer(xet=True)``, or ``create_repo(..., xet=True)`` per repo): a third port, ``cas_url``, serves the
Xet CAS API of tests/xet_server.py (:attr:`HubServer.cas`); ``GET /api/{type}s/{repo}/xet-write-token/{rev}``
and ``xet-read-token/{rev}`` hand out CAS tokens (JSON ``casUrl``/``accessToken``/``exp`` and the
``X-Xet-*`` headers); a commit's ``lfsFile`` may name a sha256 that a shard uploaded to the CAS carries (the
file is then Xet-backed: tree entries carry ``xetHash``); ``resolve`` of such a file answers 302 with
``X-Xet-Hash`` and ``Link: <…xet-read-token/{commit}>; rel="xet-auth"`` (so ``hf_xet`` downloads from the CAS),
the ``Location`` being the CDN's ``/xet/{sha256}``, which rebuilds the bytes from the xorbs (the plain download
path; what the Hub's bridge does). Without Xet the client must use classic LFS (tests set
``HF_HUB_DISABLE_XET`` unless they test Xet: huggingface_hub with ``hf_xet`` installed uploads through Xet
whenever it may).
Blobs live on disk under the folder given to the constructor. Every request is recorded in
:attr:`HubServer.requests` as ``(port, method, path, status)``.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

# extensions the Hub's default .gitattributes stores in LFS (a subset)
LFS_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".h5", ".msgpack", ".onnx", ".pkl", ".pickle",
                ".npy", ".npz", ".zip", ".gz", ".tar", ".tgz", ".zst", ".arrow", ".parquet", ".model", ".joblib")
LFS_THRESHOLD = 10 * 1024 * 1024
QUOTA_MESSAGE = "Private repository storage limit reached, please upgrade your plan to increase your storage limit"
_CHUNK = 1024 * 1024


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    oid: str                      # git blob oid (of the content, or of the LFS pointer)
    lfs: str | None = None        # sha256 of an LFS file
    xet: str | None = None        # xet file hash of an LFS file stored in the Xet CAS


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)          # name -> commit oid
    commits: dict[str, tuple[str | None, str, dict[str, Entry]]] = field(default_factory=dict)  # oid -> (parent, msg, tree)
    xet: bool = False             # the repo offers Xet storage (CAS tokens, Xet-backed files)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def tree(self, rev: str) -> tuple[str, dict[str, Entry]] | None:
        oid = self.branches.get(rev) or (rev if rev in self.commits else None)
        if oid is None:
            return None
        return oid, self.commits[oid][2]


@dataclass
class Fault:
    method: str | None
    path: re.Pattern
    port: str | None
    status: int | None
    headers: dict[str, str]
    message: str | None
    drop: bool
    times: int
    drop_after: int | None = None
    hits: int = 0
    lose: bool = False            # carry the request out, then drop the connection instead of answering


@dataclass(frozen=True)
class User:
    name: str
    orgs: tuple[str, ...]
    role: str  # "write" | "read"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, addr, handler, hub: "HubServer", kind: str) -> None:
        self.hub = hub
        self.kind = kind
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._n = 0
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        # as ThreadingMixIn.process_request, with a named thread that server_close() joins (socketserver does
        # not track daemon threads)
        self._n += 1
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name=f"hub-server-{self.kind}-conn-{self._n}", daemon=True)
        with self._conns_lock:
            self._conns.add(request)
            self._conn_threads = [x for x in getattr(self, "_conn_threads", []) if x.is_alive()] + [t]
        t.start()

    def handle_error(self, request, client_address) -> None:
        import sys
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away (killed, or a keep-alive connection reset): nothing to report
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        super().server_close()
        with self._conns_lock:
            threads = list(getattr(self, "_conn_threads", []))
        for t in threads:
            t.join(10)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Unblock handler threads waiting on idle keep-alive connections."""
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class HubServer:
    """The fake Hub. See the module docstring."""

    WRITE_TOKEN = "hf_AliceWriteTokenForTests0123456789ab"
    READ_TOKEN = "hf_AliceReadOnlyTokenForTests012345678"
    BOB_TOKEN = "hf_BobWriteTokenForTests0123456789abcd"
    USERS = {WRITE_TOKEN: User("alice", ("acme",), "write"), READ_TOKEN: User("alice", ("acme",), "read"),
             BOB_TOKEN: User("bob", (), "write")}

    def __init__(self, root: str | os.PathLike | None = None, *, page_size: int = 1000, xet: bool = False) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="hub-server-"))
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        (self.root / "plain").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        self.page_size = page_size
        self.repos: dict[tuple[str, str], Repo] = {}
        (self.root / "git").mkdir(parents=True, exist_ok=True)  # regular files by git blob oid
        self.requests: list[tuple[str, str, str, int]] = []
        self.faults: list[Fault] = []
        self.injected: list[tuple[str, str, str, str]] = []   # (kind, port, method, path) of every fault served
        self._ratio: tuple[float, tuple[str, ...], Any, re.Pattern | None, float] | None = None
        self.lock = threading.RLock()
        #: bytes of LFS content received on the CDN, complete uploads or not (restart cost after a kill)
        self.lfs_bytes_received = 0
        self.lfs_uploads: list[tuple[str, int, bool]] = []   # (oid, bytes received, complete) per LFS PUT, at its end
        #: when set, an LFS upload that has received at least this many bytes sets `paused` and waits on `gate`
        self.pause_lfs_at: int | None = None
        self.paused = threading.Event()
        self.gate = threading.Event()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.endpoint = ""
        self.cdn = ""
        self.cas_url = ""
        #: repos created from now on offer Xet (the CAS port is always served; only Xet repos hand out its tokens)
        self.xet = xet
        from .xet_server import XetCAS
        self.cas = XetCAS(self.root / "xet", self)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        for kind in ("hub", "cdn", "cas"):
            srv = _Server(("127.0.0.1", 0), _Handler, self, kind)
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"hub-server-{kind}", daemon=True)
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        self.cas_url = self.cas.url = f"http://127.0.0.1:{self._servers[2].server_address[1]}"
        return self

    def stop(self) -> None:
        """Stop both ports, close open connections and join every thread. Safe to call twice."""
        for srv in self._servers:
            srv.shutdown()
        for srv in self._servers:
            srv.close_connections()
            srv.server_close()  # joins the connection threads
        for t in self._threads:
            t.join(10)
        self._servers.clear()
        self._threads.clear()
        if self._own_root:
            import shutil
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers ---------------------------------------------------------------------------
    def inject(self, *, path: str, status: int | None = None, method: str | None = None, port: str | None = None,
               headers: dict[str, str] | None = None, message: str | None = None, drop: bool = False,
               drop_after: int | None = None, times: int = 1, lose: bool = False) -> Fault:
        """Answer the next `times` requests whose path matches the regex `path` with `status`, or drop the
        connection (`drop`), or, for downloads from the CDN, cut it after `drop_after` bytes of the body, or
        (`lose`) do what was asked and drop the connection instead of answering (a reply lost on the way)."""
        f = Fault(method, re.compile(path), port, status, dict(headers or {}), message, drop, times, drop_after,
                  lose=lose)
        with self.lock:
            self.faults.append(f)
        return f

    def ratio(self, p: float, *, seed: int = 0, kinds: tuple[str, ...] = ("503", "502", "500", "429", "drop"),
              path: str | None = None, retry_after: float = 0) -> None:
        """Fault a fraction `p` of all requests at random (both ports, every route: whoami, repo info,
        preupload, LFS batch and transfers, commits, tree listings, paths-info, resolve HEAD/GET downloads),
        with a status from `kinds` (429 carries ``Retry-After: retry_after``) or a dropped connection. `path`
        (a regex) limits it to matching paths; ``ratio(0)`` stops it. Queued :meth:`inject` faults go first."""
        import random
        with self.lock:
            self._ratio = (p, kinds, random.Random(seed), re.compile(path) if path else None, retry_after) if p else None

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = True,
                    xet: bool | None = None) -> Repo:
        with self.lock:
            repo = Repo(repo_type, repo_id, private, xet=self.xet if xet is None else xet)
            attrs = b"*.pt filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
            self.store_blob(attrs)
            oid = self._new_commit(repo, None, "initial commit", {".gitattributes": Entry(len(attrs), git_blob_oid(attrs))})
            repo.branches["main"] = oid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        return self.repos.get((repo_type, repo_id))

    def files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> dict[str, Entry]:
        repo = self.repos[(repo_type, repo_id)]
        return dict(repo.tree(revision)[1])

    def commit_messages(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[str]:
        repo = self.repos[(repo_type, repo_id)]
        out, oid = [], repo.branches[revision]
        while oid:
            parent, msg, _ = repo.commits[oid]
            out.append(msg)
            oid = parent
        return out

    def store_blob(self, data: bytes) -> str:
        """Keep a regular (non-LFS) file's bytes on disk under its git blob oid."""
        oid = git_blob_oid(data)
        p = self.root / "git" / oid
        if not p.exists():
            tmp = self.root / "tmp" / uuid.uuid4().hex
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return oid

    def lfs_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256

    def corrupt(self, repo_id: str, path: str, *, repo_type: str = "model") -> None:
        """Flip bytes of the stored LFS object behind `path` (what a broken storage node would serve)."""
        e = self.files(repo_id, repo_type=repo_type)[path]
        assert e.lfs, f"{path} is not an LFS file"
        if e.xet:
            self.cas.corrupt(e.xet)
            with contextlib.suppress(OSError):
                (self.root / "xetfiles" / e.lfs).unlink()
            return
        p = self.lfs_path(e.lfs)
        data = bytearray(p.read_bytes())
        data[: min(16, len(data))] = bytes(b ^ 0xFF for b in data[:16])
        p.write_bytes(bytes(data))

    def count(self, method: str, pattern: str, *, port: str | None = None) -> int:
        rx = re.compile(pattern)
        return sum(1 for (pt, m, p, _s) in list(self.requests)
                   if m == method and rx.search(p) and (port is None or pt == port))

    # -- internals --------------------------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, message: str, tree: dict[str, Entry]) -> str:
        oid = hashlib.sha1(f"{parent}{message}{uuid.uuid4()}".encode(), usedforsecurity=False).hexdigest()
        repo.commits[oid] = (parent, message, tree)
        return oid

    def _take_fault(self, port: str, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.hits >= f.times:
                    continue
                if f.method and f.method != method:
                    continue
                if f.port and f.port != port:
                    continue
                if f.path.search(path):
                    f.hits += 1
                    self.injected.append(("lose" if f.lose else "drop" if f.drop else str(f.status), port, method,
                                          path))
                    return f
            if self._ratio is not None:
                p, kinds, rng, only, ra = self._ratio
                if (only is None or only.search(path)) and rng.random() < p:
                    k = rng.choice(kinds)
                    self.injected.append((k, port, method, path))
                    if k == "drop":
                        return Fault(method, re.compile(""), port, None, {}, None, True, 1)
                    st = int(k)
                    return Fault(method, re.compile(""), port, st, {"Retry-After": f"{ra:g}"} if st == 429 else {},
                                 f"injected {st}", False, 1)
        return None


class _HTTPError(Exception):
    def __init__(self, status: int, code: str | None = None, message: str = "", headers: dict | None = None,
                 body: dict | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.body = body or {}


_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add 40 ms per answer
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def send_response(self, code: int, message: str | None = None) -> None:
        # recorded before the answer goes out: a client that has its answer always finds its request counted
        self._record(code)
        super().send_response(code, message)

    def _record(self, status: int) -> None:
        if not getattr(self, "_recorded", True):  # True outside _dispatch (e.g. a malformed request line)
            self._recorded = True
            with self.hub.lock:
                self.hub.requests.append((self.server.kind, self.command, urlsplit(self.path).path, status))

    def _dispatch(self) -> None:
        self._status = 0
        self._recorded = False
        self._body_read = False
        url = urlsplit(self.path)
        self.url_path, self.query = unquote(url.path), parse_qs(url.query)
        kind = self.server.kind
        fault = self.hub._take_fault(kind, self.command, url.path)
        self._drop_after = None
        if fault is not None and fault.drop_after is not None:
            self._drop_after, fault = fault.drop_after, None
        self._lose = bool(fault is not None and fault.lose)
        if self._lose:
            fault = None
        try:
            if fault is not None:
                if fault.drop:
                    self._status = -1
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._drain()
                raise _HTTPError(fault.status or 500, None, fault.message or f"injected {fault.status}",
                                 fault.headers)
            if kind == "cdn":
                self._cdn()
            elif kind == "cas":
                self.hub.cas.handle(self)
            else:
                self._api()
        except _HTTPError as e:
            self._drain()
            self._error(e)
        except OSError:  # the client went away
            self._status = -2
            self.close_connection = True
        except Exception as e:  # a bug in this server: answer 500 rather than hang the client
            self._drain()
            self._error(_HTTPError(500, None, f"server error: {type(e).__name__}: {e}"))
        finally:
            if self._status >= 0:
                with contextlib.suppress(OSError):
                    self._drain()  # a body no route read must not be taken for the next request
            self._record(self._status)  # no answer was sent (a dropped connection)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _drain(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0 and not getattr(self, "_body_read", False):
            buf = self.rfile.read(min(n, _CHUNK))
            if not buf:
                break
            n -= len(buf)
        self._body_read = True

    def _body(self) -> bytes:
        self._body_read = True
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", *, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        if getattr(self, "_lose", False):   # the work is done; the answer never arrives
            self._lose = False
            self._record(-3)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            raise OSError("answer lost (injected)")
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _error(self, e: _HTTPError) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.message:
            headers["X-Error-Message"] = e.message
        self._json({"error": e.message, **e.body}, e.status, headers)

    def _user(self, *, required: bool = True) -> User | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            if required:
                raise _HTTPError(401, None, "Invalid username or password.")
            return None
        token = auth.split(" ", 1)[-1].strip()
        user = HubServer.USERS.get(token)
        if user is None:
            raise _HTTPError(401, None, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user(required=False)
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (user is None or not _can_read(user, repo))):
            raise _HTTPError(404 if user else 401, "RepoNotFound", "Repository not found")
        if write:
            if user is None:
                raise _HTTPError(401, None, "Invalid username or password.")
            if not _can_read(user, repo) or user.role != "write":
                raise _HTTPError(403, None, "You don't have the rights to write to this repository"
                                 if user.role == "write" else "This token does not have write access")
        return repo

    def _tree(self, repo: Repo, rev: str) -> tuple[str, dict[str, Entry]]:
        t = repo.tree(rev)
        if t is None:
            raise _HTTPError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return t

    # -- the Hub API ------------------------------------------------------------------------------
    def _api(self) -> None:
        p, m = self.url_path, self.command
        if p == "/api/whoami-v2" and m == "GET":
            return self._whoami()
        if p == "/api/repos/create" and m == "POST":
            return self._create_repo()
        mt = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/(.*))?", p)
        if mt:
            rtype, repo_id, rest = _REPO_TYPES[mt.group(1)], mt.group(2), mt.group(3) or ""
            return self._repo_api(rtype, repo_id, rest)
        ml = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify)", p)
        if ml and m == "POST":
            rtype = _REPO_TYPES[ml.group(1)] if ml.group(1) else "model"
            return self._lfs(rtype, ml.group(2), ml.group(3))
        mr = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", p)
        if mr and m in ("GET", "HEAD"):
            rtype = _REPO_TYPES[mr.group(1)] if mr.group(1) else "model"
            return self._resolve(rtype, mr.group(2), mr.group(3), mr.group(4))
        raise _HTTPError(404, None, f"no route for {m} {p}")

    def _whoami(self) -> None:
        user = self._user()
        self._json({"type": "user", "id": f"id-{user.name}", "name": user.name, "fullname": user.name.title(),
                    "orgs": [{"type": "org", "name": o, "roleInOrg": "write"} for o in user.orgs],
                    "auth": {"type": "access_token",
                             "accessToken": {"displayName": f"{user.name}-{user.role}", "role": user.role,
                                             "createdAt": "2026-01-01T00:00:00.000Z"}}})

    def _create_repo(self) -> None:
        user = self._user()
        body = json.loads(self._body() or b"{}")
        name, org = body.get("name"), body.get("organization")
        rtype = body.get("type") or "model"
        ns = org or user.name
        repo_id = f"{ns}/{name}"
        private = body.get("private")
        if private is None:
            private = body.get("visibility", "public") != "public"
        with self.hub.lock:
            if (rtype, repo_id) in self.hub.repos:
                prefix = "" if rtype == "model" else f"{rtype}s/"
                raise _HTTPError(409, None, f"You already created this {rtype} repo",
                                 body={"url": f"{self.hub.endpoint}/{prefix}{repo_id}"})
            if user.role != "write" or (ns != user.name and ns not in user.orgs):
                raise _HTTPError(403, None, f"You don't have the rights to create a {rtype} under the namespace "
                                 f"\"{ns}\"")
            self.hub.create_repo(repo_id, repo_type=rtype, private=bool(private))
        prefix = "" if rtype == "model" else f"{rtype}s/"
        self._json({"url": f"{self.hub.endpoint}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})

    def _repo_api(self, rtype: str, repo_id: str, rest: str) -> None:
        m = self.command
        if rest == "" or rest.startswith("revision/"):
            repo = self._repo(rtype, repo_id)
            rev = unquote(rest[len("revision/"):]) if rest else "main"
            oid, tree = self._tree(repo, rev)
            return self._json({"_id": f"id-{repo_id}", "id": repo_id, "modelId": repo_id, "sha": oid,
                               "private": repo.private, "author": repo.owner, "gated": False, "disabled": False,
                               "downloads": 0, "likes": 0, "tags": [], "library_name": None,
                               "lastModified": "2026-11-22T00:00:00.000Z", "createdAt": "2026-11-22T00:00:00.000Z",
                               "siblings": [{"rfilename": k} for k in sorted(tree)]})
        mt = re.fullmatch(r"tree/([^/]+)(?:/(.*))?", rest)
        if mt and m == "GET":
            return self._list_tree(self._repo(rtype, repo_id), mt.group(1), mt.group(2) or "")
        mp = re.fullmatch(r"paths-info/([^/]+)", rest)
        if mp and m == "POST":
            return self._paths_info(self._repo(rtype, repo_id), mp.group(1))
        mp = re.fullmatch(r"preupload/([^/]+)", rest)
        if mp and m == "POST":
            return self._preupload(self._repo(rtype, repo_id, write=True), mp.group(1))
        mc = re.fullmatch(r"commit/([^/]+)", rest)
        if mc and m == "POST":
            return self._commit(self._repo(rtype, repo_id, write=True), mc.group(1))
        mx = re.fullmatch(r"xet-(read|write)-token/([^/]+)", rest)
        if mx and m == "GET":
            return self._xet_token(self._repo(rtype, repo_id, write=mx.group(1) == "write"), mx.group(1))
        mb = re.fullmatch(r"branch/([^/]+)", rest)
        if mb and m == "POST":
            repo = self._repo(rtype, repo_id, write=True)
            with self.hub.lock:
                if mb.group(1) in repo.branches:
                    raise _HTTPError(409, None, "Reference already exists")
                repo.branches[mb.group(1)] = repo.branches["main"]
            return self._json({})
        raise _HTTPError(404, None, f"no route for {m} {rest}")

    @staticmethod
    def _entry_json(path: str, e: Entry) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
        if e.lfs:
            d["lfs"] = {"oid": e.lfs, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs, e.size))}
        if e.xet:
            d["xetHash"] = e.xet
        return d

    def _xet_token(self, repo: Repo, scope: str) -> None:
        """A short-lived CAS token for the repo (the Hub's xet-read-token / xet-write-token)."""
        if not repo.xet:
            raise _HTTPError(404, None, "This repository does not use Xet storage")
        tok, exp = self.hub.cas.issue_token(scope)
        self._json({"casUrl": self.hub.cas_url, "accessToken": tok, "exp": exp},
                   headers={"X-Xet-Cas-Url": self.hub.cas_url, "X-Xet-Access-Token": tok,
                            "X-Xet-Token-Expiration": str(exp)})

    def _list_tree(self, repo: Repo, rev: str, path: str) -> None:
        rev = unquote(rev)
        oid, tree = self._tree(repo, rev)
        path = path.strip("/")
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("true", "1")
        pre = path + "/" if path else ""
        if path and path in tree:
            items = [self._entry_json(path, tree[path])]
        else:
            items, folders = [], set()
            for p in sorted(tree):
                if not p.startswith(pre):
                    continue
                rest = p[len(pre):]
                parts = rest.split("/")
                for i in range(1, len(parts)):
                    folders.add(pre + "/".join(parts[:i]))
                if recursive or len(parts) == 1:
                    items.append(self._entry_json(p, tree[p]))
            if path and not items and not folders:
                raise _HTTPError(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"",
                                 {"X-Repo-Commit": oid})
            dirs = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                    for d in sorted(folders) if recursive or "/" not in d[len(pre):]]
            items = sorted(dirs + items, key=lambda x: x["path"])
        cursor = int((self.query.get("cursor") or ["0"])[0])
        page = items[cursor:cursor + self.hub.page_size]
        headers = {"X-Repo-Commit": oid}
        if cursor + self.hub.page_size < len(items):
            q = f"recursive={str(recursive).lower()}&expand=false&cursor={cursor + self.hub.page_size}"
            base = f"{self.hub.endpoint}{quote(self.url_path)}"
            headers["Link"] = f"<{base}?{q}>; rel=\"next\""
        self._json(page, headers=headers)

    def _paths_info(self, repo: Repo, rev: str) -> None:
        oid, tree = self._tree(repo, unquote(rev))
        ctype = self.headers.get("Content-Type", "")
        raw = self._body().decode()
        paths = json.loads(raw).get("paths", []) if "json" in ctype else parse_qs(raw).get("paths", [])
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append(self._entry_json(p, tree[p]))
            elif any(k.startswith(p + "/") for k in tree):
                out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        self._json(out, headers={"X-Repo-Commit": oid})

    def _preupload(self, repo: Repo, rev: str) -> None:
        _oid, tree = self._tree(repo, unquote(rev))
        body = json.loads(self._body())
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = (f["path"].lower().endswith(LFS_SUFFIXES) or f["size"] >= LFS_THRESHOLD or b"\0" in sample)
            existing = tree.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.lfs if existing.lfs else existing.oid
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._json({"files": files, "commitOid": _oid})

    def _lfs(self, rtype: str, repo_id: str, op: str) -> None:
        repo = self._repo(rtype, repo_id, write=True)
        body = json.loads(self._body())
        if op == "verify":
            p = self.hub.lfs_path(body["oid"])
            if not p.is_file() or p.stat().st_size != body["size"]:
                raise _HTTPError(404, None, f"object {body['oid']} not found or wrong size")
            return self._json({"success": True})
        objects = []
        for o in body.get("objects", []):
            oid, size = o["oid"], o["size"]
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid"}})
                continue
            p = self.hub.lfs_path(oid)
            if p.is_file() and p.stat().st_size == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions
                continue
            sig = uuid.uuid4().hex
            prefix = "" if rtype == "model" else f"{rtype}s/"
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{self.hub.cdn}/lfs-upload/{oid}?size={size}&X-Amz-Signature={sig}",
                           "header": {}},
                "verify": {"href": f"{self.hub.endpoint}/{prefix}{repo.repo_id}.git/info/lfs/objects/verify",
                           "header": {}}}})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   ctype="application/vnd.git-lfs+json")

    def _commit(self, repo: Repo, rev: str) -> None:
        rev = unquote(rev)
        lines = [json.loads(x) for x in self._body().splitlines() if x.strip()]
        with self.hub.lock:
            parent, tree = self._tree(repo, rev)
            tree = dict(tree)
            summary = ""
            for item in lines:
                key, v = item["key"], item["value"]
                if key == "header":
                    summary = v.get("summary", "")
                    pc = v.get("parentCommit")
                    if pc and pc != parent:
                        raise _HTTPError(412, None, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    data = base64.b64decode(v["content"])
                    oid = git_blob_oid(data)
                    self.hub.store_blob(data)
                    tree[v["path"]] = Entry(len(data), oid)
                elif key == "lfsFile":
                    p = self.hub.lfs_path(v["oid"])
                    xf = self.hub.cas.file_by_sha256(v["oid"]) if repo.xet else None
                    if xf is not None and not p.is_file():
                        size = xf.size
                        tree[v["path"]] = Entry(size, git_blob_oid(lfs_pointer(v["oid"], size)), v["oid"],
                                                xet=xf.file_hash)
                        continue
                    if not p.is_file():
                        raise _HTTPError(422, None, f"LFS object {v['oid']} for {v['path']} was not uploaded")
                    size = p.stat().st_size
                    tree[v["path"]] = Entry(size, git_blob_oid(lfs_pointer(v["oid"], size)), v["oid"])
                elif key == "deletedFile":
                    if v["path"] not in tree:
                        raise _HTTPError(404, "EntryNotFound", "A file with this name doesn't exist")
                    del tree[v["path"]]
                elif key == "deletedFolder":
                    pre = v["path"].rstrip("/") + "/"
                    for k in [k for k in tree if k.startswith(pre)]:
                        del tree[k]
            oid = self.hub._new_commit(repo, parent, summary, tree)
            repo.branches[rev] = oid
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        self._json({"success": True, "commitOid": oid, "commitUrl": f"{self.hub.endpoint}/{prefix}{repo.repo_id}"
                    f"/commit/{oid}", "commitMessage": summary, "pullRequestUrl": None})

    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(rtype, repo_id)
        oid, tree = self._tree(repo, unquote(rev))
        e = tree.get(path)
        if e is None:
            raise _HTTPError(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", {"X-Repo-Commit": oid})
        headers = {"X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
        if e.xet:
            prefix = "" if rtype == "model" else f"{rtype}s/"
            headers.update({"X-Xet-Hash": e.xet,
                            "Link": f"<{self.hub.endpoint}/api/{prefix or 'models/'}{repo.repo_id}/xet-read-token/"
                                    f"{oid}>; rel=\"xet-auth\""})
        if e.lfs:
            where = "xet" if e.xet else "lfs"
            headers.update({"Location": f"{self.hub.cdn}/{where}/{e.lfs}?X-Amz-Signature={uuid.uuid4().hex}",
                            "X-Linked-Etag": f'"{e.lfs}"', "X-Linked-Size": str(e.size), "ETag": f'"{e.oid}"'})
            return self._send(302, b"", headers=headers)
        headers["ETag"] = f'"{e.oid}"'
        self._send(200, (self.hub.root / "git" / e.oid).read_bytes(), ctype="application/octet-stream",
                   headers=headers)

    # -- the CDN ----------------------------------------------------------------------------------
    def _cdn(self) -> None:
        p, m = self.url_path, self.command
        mu = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", p)
        if mu and m == "PUT":
            self._store(self.hub.lfs_path(mu.group(1)), expect=mu.group(1))
            return self._send(200, b"", headers={"ETag": f'"{mu.group(1)}"'})
        mp = re.fullmatch(r"/plain/([\w.-]+)", p)
        if mp and m == "PUT":
            self._store(self.hub.root / "plain" / mp.group(1), expect=None)
            return self._send(200, b"")
        md = re.fullmatch(r"/lfs/([0-9a-f]{64})", p)
        if md and m in ("GET", "HEAD"):
            return self._serve_file(self.hub.lfs_path(md.group(1)))
        mx = re.fullmatch(r"/xet/([0-9a-f]{64})", p)
        if mx and m in ("GET", "HEAD"):
            return self._serve_file(self._xet_bytes(mx.group(1)))
        if mp and m in ("GET", "HEAD"):
            return self._serve_file(self.hub.root / "plain" / mp.group(1))
        raise _HTTPError(404, None, f"no route for {m} {p}")

    def _xet_bytes(self, sha256: str) -> Path:
        """A Xet-backed file's bytes, rebuilt from its xorbs once and kept (the Hub's download bridge)."""
        dst = self.hub.root / "xetfiles" / sha256
        if not dst.is_file():
            fi = self.hub.cas.file_by_sha256(sha256)
            if fi is None:
                raise _HTTPError(404, None, "NoSuchKey")
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.hub.root / "tmp" / uuid.uuid4().hex
            tmp.write_bytes(self.hub.cas.reconstruct(fi.file_hash))
            os.replace(tmp, dst)
        return dst

    def _store(self, dst: Path, *, expect: str | None) -> None:
        """Receive the body to a temporary file while hashing it (as a content-addressed store does)."""
        self._body_read = True
        n = int(self.headers.get("Content-Length") or 0)
        h = hashlib.sha256()
        tmp = self.hub.root / "tmp" / uuid.uuid4().hex
        got = 0
        try:
            with open(tmp, "wb") as f:
                while got < n:
                    buf = self.rfile.read(min(_CHUNK, n - got))
                    if not buf:
                        break
                    h.update(buf)
                    f.write(buf)
                    got += len(buf)
                    if expect is not None:
                        with self.hub.lock:
                            self.hub.lfs_bytes_received += len(buf)
                            hold = self.hub.pause_lfs_at is not None and got >= self.hub.pause_lfs_at
                            if hold:
                                self.hub.pause_lfs_at = None
                        if hold:
                            self.hub.paused.set()
                            while not self.hub.gate.wait(0.05) and self.hub._servers:
                                pass
            if expect is not None:
                with self.hub.lock:
                    self.hub.lfs_uploads.append((expect, got, got == n))
            if got != n:
                raise _HTTPError(400, None, f"incomplete body: {got} of {n} bytes")
            if expect is not None and h.hexdigest() != expect:
                raise _HTTPError(400, None, "The Content-SHA256 you specified did not match what we received")
            os.replace(tmp, dst)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _serve_file(self, path: Path) -> None:
        if not path.is_file():
            raise _HTTPError(404, None, "NoSuchKey")
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{path.name}"'}
        if rng:
            mr = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if mr:
                start = int(mr.group(1))
                end = int(mr.group(2)) if mr.group(2) else size - 1
                if start >= size:
                    raise _HTTPError(416, None, "InvalidRange", {"Content-Range": f"bytes */{size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD" or not length:
            return
        self.wfile.flush()
        with open(path, "rb") as f:
            if self._drop_after is not None:  # a connection that breaks midway
                self.connection.sendfile(f, offset=start, count=min(length, self._drop_after))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.connection.sendfile(f, offset=start, count=length)


def _can_read(user: User, repo: Repo) -> bool:
    return repo.owner == user.name or repo.owner in user.orgs


def isolate_hf_home(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> Path:
    """Point huggingface_hub's import-time paths (cache, stored token) at `hf_home` for one test.

    huggingface_hub reads HF_HOME when it is first imported, so setting the variable in a fixture is not
    enough once another test has imported it.
    """
    from huggingface_hub import constants

    hf_home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"), raising=False)
    monkeypatch.setattr(constants, "HF_XET_CACHE", str(hf_home / "xet"), raising=False)
    return hf_home


def _no_tqdm_monitor() -> None:
    """huggingface_hub creates (disabled) tqdm bars; tqdm's first bar starts a process-long 'tqdm_monitor'
    thread that the leak check would blame on whichever test came first. It only tunes refresh rates."""
    with contextlib.suppress(ImportError):
        from tqdm import tqdm
        tqdm.monitor_interval = 0


@pytest.fixture
def hub_server(tmp_path_factory, monkeypatch) -> HubServer:
    """A started :class:`HubServer` (blobs under a temporary folder), stopped and joined after the test.

    huggingface_hub's cache and stored-token paths point at a fresh temporary HF_HOME for the test.
    """
    isolate_hf_home(monkeypatch, tmp_path_factory.mktemp("hf_home"))
    _no_tqdm_monitor()
    srv = HubServer(tmp_path_factory.mktemp("hub_blobs")).start()
    try:
        yield srv
    finally:
        srv.stop()
