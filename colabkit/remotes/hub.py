"""A private Hugging Face Hub repository as a storage tier (L3), through huggingface_hub.

Every file due in one sync tick goes up in **one commit** (:meth:`HubRemote.put_many`); large files take
whichever transfer the library picks (Xet or LFS); content the repo already holds is not sent again.
Listings come from the repo tree: LFS files carry their sha256, so verification uses sha256 (on the Xet path
too: the commit names the sha256 hf_xet computed, the tree lists it, and a download streams the resolve
redirect, which the Hub's bridge serves rebuilt, and checks it). hf_xet's own errors carry only an HTTP
status; they are classified by it like any other Hub answer (see ``_xet_response``).

Small regular (non-LFS) files have only a git blob oid (a sha1 of ``"blob <size>\\0" + content``) in the
tree. colabkit verifies them by computing that oid from the local bytes (after an upload) or from the
downloaded bytes (on :meth:`get`), and only then fills ``sha256``/``md5`` of the returned
:class:`RemoteFile` from the digest of those same bytes. Within a process the pair git oid -> sha256 is
remembered, so a later :meth:`list` reports sha256 for regular files this process uploaded or downloaded;
other regular files are listed with ``sha256=None`` and their git oid as ``id`` (``get`` still verifies them).

The endpoint (``hub.endpoint``, else ``HF_ENDPOINT``, else https://huggingface.co) is passed explicitly to
every call: huggingface_hub reads ``HF_ENDPOINT`` once at import time.

The token comes from ``HF_TOKEN`` (or ``HUGGING_FACE_HUB_TOKEN``), then huggingface_hub's stored login,
then Colab Secrets ``HF_TOKEN`` (inside the Colab UI). It is passed explicitly, never printed or logged.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..errors import (ConfigError, IntegrityError, MissingDependencyError, RemoteAuthError, RemoteError,
                      RemoteNotFoundError, RemotePermissionError, RemoteQuotaError, TransientRemoteError,
                      UploadCancelled)
from ..fsutil import TMP_PREFIX, FileDigest, replace_copy
from ..secrets import redact
from .base import ACCESS_MARKER, WORKERS_DIR, Progress, Remote, RemoteFile, UploadState, normalize_path

if TYPE_CHECKING:
    from ..config import Config, TierConfig

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
#: files the Hub creates itself; never reported as tier content
_HUB_FILES = (".gitattributes",)
_CHECKPOINT = re.compile(r"^(?P<stem>.*?)(?P<step>\d+)(?P<ext>\.(?:pt|pth|bin|safetensors|ckpt))(?P<side>\.json)?$")
_STEP = re.compile(r"(\d+)\.(?:pt|pth|bin|safetensors|ckpt)$")


def _step_in(path: str) -> int | None:
    """The step of a checkpoint file, or of the checkpoint folder a file lies in (``v01_step_00000100/...``)."""
    m = _STEP.search(path)
    if m:
        return int(m.group(1))
    from ..distributed import folder_step
    for part in path.split("/")[:-1]:
        s = folder_step(part)
        if s is not None:
            return s
    return None
_QUOTA = re.compile(r"storage limit|storage patterns|quota|upgrade your plan|insufficient storage|exceeded your",
                    re.IGNORECASE)
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                   "NetworkError", "RemoteProtocolError", "ReadError", "WriteError", "ConnectionError",
                   "ChunkedEncodingError", "ProtocolError", "Timeout", "CloseError"}
_SMALL = 50 * 1024 * 1024  # regular (non-LFS) files are at most 10 MB on the Hub; bound what we hash for a git oid
_PARALLEL_HASH = 8 * 1024 * 1024  # downloads at least this big are hashed in a helper thread
_PATHS_PER_CALL = 200  # paths per paths-info request (the Hub accepts many; keep each request small)

# git blob oid -> (sha256, md5) of content this process hashed (see module docstring)
_BLOB_DIGESTS: "OrderedDict[str, tuple[str, str | None]]" = OrderedDict()
_BLOB_LOCK = threading.Lock()


def _remember(oid: str | None, sha256: str, md5: str | None) -> None:
    if not oid:
        return
    with _BLOB_LOCK:
        _BLOB_DIGESTS[oid] = (sha256, md5)
        _BLOB_DIGESTS.move_to_end(oid)
        while len(_BLOB_DIGESTS) > 20000:
            _BLOB_DIGESTS.popitem(last=False)


def _recall(oid: str | None) -> tuple[str, str | None] | None:
    if not oid:
        return None
    with _BLOB_LOCK:
        return _BLOB_DIGESTS.get(oid)


# -- library access -------------------------------------------------------------------------------
def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - installed in every supported environment
        raise MissingDependencyError("huggingface_hub", purpose="The Hugging Face Hub tier") from e
    return huggingface_hub


_QUIET_LOCK = threading.Lock()
_QUIET_DEPTH = 0
_QUIET_RESTORE = False


_in_call = threading.local()   # .depth > 0 while this thread is inside a remote call (see _quiet)


class _ToColabkitLog(logging.Filter):
    """On huggingface_hub's own stderr handler: a record logged while this thread is inside a colabkit remote
    call (its retries: "Retrying in 1s [Retry 1/5]") goes to colabkit's log at debug level instead of being
    printed, so a background sync never writes into the notebook cell that happens to be running. Records from
    the user's own huggingface_hub calls print as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(_in_call, "depth", 0) <= 0:
            return True
        log.debug("huggingface_hub: %s", record.getMessage())
        return False


_FILTER = _ToColabkitLog()


def _route_hub_logs() -> None:
    """Put :class:`_ToColabkitLog` on huggingface_hub's handlers (it adds its own StreamHandler on first use)."""
    try:
        from huggingface_hub.utils import logging as hf_logging
        root = hf_logging.get_logger("huggingface_hub")
    except (ImportError, AttributeError):  # pragma: no cover - very old huggingface_hub
        return
    for h in root.handlers:
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence huggingface_hub's progress bars and route its log records to colabkit's log while a remote call
    runs (it may run in a background thread)."""
    _route_hub_logs()
    _in_call.depth = getattr(_in_call, "depth", 0) + 1
    try:
        with _progress_bars_off():
            yield
    finally:
        _in_call.depth -= 1


@contextlib.contextmanager
def _progress_bars_off() -> Iterator[None]:
    global _QUIET_DEPTH, _QUIET_RESTORE
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - very old huggingface_hub
        yield
        return
    with _QUIET_LOCK:
        if _QUIET_DEPTH == 0:
            _QUIET_RESTORE = not are_progress_bars_disabled()
            if _QUIET_RESTORE:
                disable_progress_bars()
        _QUIET_DEPTH += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _QUIET_DEPTH -= 1
            if _QUIET_DEPTH == 0 and _QUIET_RESTORE:
                enable_progress_bars()


# -- token ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Token:
    value: str
    source: str        # "env" | "stored_login" | "colab_secrets" | "explicit"
    detail: str        # the variable name or file path (never the value)

    def __repr__(self) -> str:
        return f"<hub token from {self.describe()}>"

    def describe(self) -> str:
        return {"env": f"the {self.detail} environment variable", "stored_login": f"the stored login ({self.detail})",
                "colab_secrets": f"Colab Secrets ({self.detail})", "explicit": "the token passed in",
                "none": "no token (anonymous)"}[self.source]


def _stored_token_path() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_TOKEN_PATH)
    except Exception:  # pragma: no cover
        home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
        return os.path.join(home, "token")


def _find_token(*, colab: bool = True) -> _Token | None:
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        v = (os.environ.get(var) or "").strip()
        if v:
            return _Token(v, "env", var)
    path = _stored_token_path()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        v = Path(path).read_text().strip()
        if v:
            return _Token(v, "stored_login", path)
    if colab:
        from ..secrets import colab_secret
        v = (colab_secret("HF_TOKEN") or "").strip()
        if v:
            return _Token(v, "colab_secrets", "HF_TOKEN")
    return None


def describe_hub_token() -> dict[str, str] | None:
    """Where the Hub token would come from, for ``colabkit config show``; never the token itself.

    Returns:
        ``{"source": "env", "variable": "HF_TOKEN", "description": ...}``,
        ``{"source": "stored_login", "path": ..., ...}``, ``{"source": "colab_secrets", "name": "HF_TOKEN", ...}``,
        or None when no token is configured.
    """
    t = _find_token()
    if t is None:
        return None
    key = {"env": "variable", "stored_login": "path", "colab_secrets": "name"}[t.source]
    return {"source": t.source, key: t.detail, "description": t.describe()}


def hub_endpoint(configured: str | None = None) -> str:
    """The Hub endpoint: `configured`, else ``HF_ENDPOINT``, else https://huggingface.co (no trailing slash)."""
    return (configured or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


# -- error classification ------------------------------------------------------------------------------
_handling = threading.local()   # per thread: the exceptions being handled when a call to the Hub began


@contextlib.contextmanager
def _calling() -> Iterator[None]:
    """Mark the exception being handled (if any) when a call to the Hub begins: an error the call raises
    has it as its ``__context__`` (Python links them), but it is not the call's own cause. Without this, a
    connection dropped while creating a repo after a lookup answered "not found" read as "not found"."""
    outer = sys.exc_info()[1]
    stack = _handling.__dict__.setdefault("outer", [])
    stack.append(outer)
    try:
        yield
    finally:
        stack.pop()


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e` and the exceptions it was raised from (causes and contexts), not those of a caller (see _calling)."""
    seen: set[int] = {id(x) for x in getattr(_handling, "outer", ()) if x is not None and x is not e}
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack.extend([x.__cause__, x.__context__])


def _response_of(e: BaseException) -> Any:
    for x in _chain(e):
        r = getattr(x, "response", None)
        if r is not None and getattr(r, "status_code", None) is not None:
            return r
    return _xet_response(e)


# hf_xet (the Xet transfer under huggingface_hub) raises builtins.ConnectionError / RuntimeError carrying only a
# line such as "Server error: Request error: HTTP status server error (503 Service Unavailable), domain: <url>"
_XET_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})[^)]*\)(?:, domain: (\S+))?")


@dataclass
class _XetResponse:
    """What an hf_xet error says of the HTTP answer behind it: a status (no headers, no body)."""
    status_code: int
    url: str
    headers: dict[str, str]

    def json(self) -> Any:
        return {}


def _xet_in_use() -> bool:
    """Whether huggingface_hub uploads LFS-sized files through hf_xet in this process."""
    try:
        from huggingface_hub.utils import is_xet_available
    except ImportError:  # a huggingface_hub from before Xet
        return False
    return bool(is_xet_available())


def _xet_response(e: BaseException) -> _XetResponse | None:
    for x in _chain(e):
        if type(x).__module__ not in ("builtins", "hf_xet") and "xet" not in type(x).__name__.lower():
            continue
        m = _XET_STATUS.search(str(x))
        if m:
            url = (m.group(2) or "").split("?", 1)[0]
            where = "Xet storage" if "/api/" not in url else "Xet token endpoint"
            return _XetResponse(int(m.group(1)), url, {"X-Error-Message": where})
        if type(x).__name__ == "XetAuthenticationError":
            return _XetResponse(401, "", {"X-Error-Message": redact(str(x))[:200]})
    return None


def _is_network(e: BaseException) -> bool:
    for x in _chain(e):
        if isinstance(x, (ConnectionError, TimeoutError)):
            return True
        if any(c.__name__ in _NETWORK_ERRORS for c in type(x).__mro__):
            return True
    return False


def _retry_after(headers: Any) -> float | None:
    v = headers.get("Retry-After") if headers is not None else None
    if v:
        try:
            return max(0.0, float(v))
        except ValueError:
            with contextlib.suppress(Exception):
                import time
                return max(0.0, parsedate_to_datetime(v).timestamp() - time.time())
    rl = headers.get("RateLimit") if headers is not None else None  # e.g. "api";r=0;t=55
    if rl:
        m = re.search(r"\bt=(\d+)", rl)
        if m:
            return float(m.group(1))
    return None


def _server_message(resp: Any) -> str:
    msg = resp.headers.get("X-Error-Message") or ""
    if not msg:
        with contextlib.suppress(Exception):
            data = resp.json()
            msg = data.get("error", "") if isinstance(data, dict) else ""
    return redact(str(msg or ""))


# -- helpers --------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> FileDigest:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        sha = hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else None
        if sha is None:  # pragma: no cover - Python < 3.11
            h = hashlib.sha256()
            for buf in iter(lambda: f.read(4 * 1024 * 1024), b""):
                h.update(buf)
            sha = h.hexdigest()
    return FileDigest(size, sha, "")


class _HashingWriter:
    """A file wrapper for huggingface_hub's ``http_get``: hashes bytes as they are written (one pass).

    With ``parallel=True`` the sha256 runs in a helper thread (hashlib releases the GIL on large buffers), so
    hashing overlaps receiving and writing instead of adding to them. :meth:`finish` must be called.
    """

    def __init__(self, f: Any, *, git_size: int | None, progress: Progress | None, parallel: bool = False) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False) if git_size is not None else None
        self.git = hashlib.sha1(b"blob %d\0" % git_size, usedforsecurity=False) if git_size is not None else None
        self.pos = 0
        self.dirty = False  # the library rewound the file (a server ignored Range): hash again at the end
        self.progress = progress
        self._q: Any = None
        self._thread: threading.Thread | None = None
        if parallel:
            import queue
            self._q = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._hash_loop, name="colabkit-hub-hash", daemon=True)
            self._thread.start()

    def _hash_loop(self) -> None:
        while True:
            b = self._q.get()
            if b is None:
                return
            self.sha.update(b)

    def write(self, b: bytes) -> int:
        n = self.f.write(b)
        if not self.dirty:
            if self._q is not None:
                self._q.put(bytes(b))
            else:
                self.sha.update(b)
            if self.md5 is not None:
                self.md5.update(b)
                self.git.update(b)
        self.pos += len(b)
        if self.progress:
            self.progress(len(b))
        return n

    def finish(self) -> None:
        """Wait for the helper thread (safe to call twice)."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        r = self.f.seek(offset, whence)
        if r != self.pos:
            self.dirty = True
        self.pos = r
        return r

    def truncate(self, size: int | None = None) -> int:
        self.dirty = True
        return self.f.truncate(size)

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


@dataclass
class _Local:
    local: Path
    path: str          # remote path, relative to the tier root
    full: str          # path in the repo
    digest: FileDigest


class HubRemote(Remote):
    """A (private) repository on the Hugging Face Hub.

    Args:
        name: the tier name.
        repo_id: ``owner/name``.
        repo_type: ``model`` (default), ``dataset`` or ``space``.
        revision: the branch to write to (created from main when missing).
        private: create the repository as private when it does not exist.
        endpoint: the Hub; default ``HF_ENDPOINT``, else https://huggingface.co.
        path_prefix: a folder inside the repo that is this tier's root (``{project}`` is replaced).
        keep: keep this many checkpoints per series at the tip (older ones are deleted in the upload
            commit; the repo history still holds them). None keeps all.
        token: a token to use instead of looking one up (tests, scripts).
        project: the project name, for commit messages.
        max_attempts: tries per call before a transient failure (5xx, 429, a dropped connection) is raised;
            lookups, listings and downloads are retried, a commit is retried after checking what it already did.
        retry_initial: first back-off delay in seconds (doubles, with jitter, up to `retry_max`; a
            ``Retry-After`` the Hub sends is honoured).
        sleep: how to wait between tries (tests inject one to observe the delays asked for).
        require_token: without a token found, fail (the default: a tier writes); False reads anonymously
            (a public data set).

    Raises:
        ConfigError: `repo_id` is not ``owner/name``.

    Example:
        >>> remote = HubRemote("hub", "alice/v68-checkpoints", keep=3)
        >>> remote.check_access()
        >>> remote.put_many([(Path("checkpoints/v68_step_1200.pt"), "v68/checkpoints/v68_step_1200.pt")])
    """

    kind = "hub"
    supports_claims = True   # create_commit(parent_commit=...): of two commits on the same parent one is refused

    def __init__(self, name: str, repo_id: str, *, repo_type: str = "model", revision: str = "main",
                 private: bool = True, endpoint: str | None = None, path_prefix: str = "", keep: int | None = None,
                 token: str | None = None, project: str = "", max_attempts: int = 6, retry_initial: float = 1.0,
                 retry_max: float = 30.0, sleep: Any = None, require_token: bool = True) -> None:
        super().__init__(name)
        if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id or ""):
            raise ConfigError(f"hub.repo_id: {repo_id!r} must be owner/name, e.g. alice/v68-checkpoints",
                              key="hub.repo_id", value=repo_id)
        if repo_type not in ("model", "dataset", "space"):
            raise ConfigError(f"hub.repo_type: {repo_type!r} is not allowed; use one of model, dataset, space",
                              key="hub.repo_type", value=repo_type)
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ConfigError(f"keep: {keep!r} must be a whole number >= 1", key="keep", value=keep)
        self.repo_id = repo_id
        self.repo_type = repo_type
        self.revision = revision or "main"
        self.private = private
        self.endpoint = hub_endpoint(endpoint)
        prefix = (path_prefix or "").replace("{project}", project or "")
        self.path_prefix = normalize_path(prefix) if prefix.strip("/") else ""
        self.keep = keep
        self.project = project
        self._deleted: list[str] = []   # tier paths `keep` deleted in a commit, until take_deleted()
        self._deleted_lock = threading.Lock()
        self._explicit_token = token
        self._require_token = require_token
        self._token: _Token | None = None
        self._api: Any = None
        self._lock = threading.Lock()
        self._branch_ok = self.revision == "main"
        self.max_attempts = max(1, int(max_attempts))
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._sleep = sleep
        self._stop = threading.Event()

    @classmethod
    def from_config(cls, config: "Config", tier: "TierConfig") -> "HubRemote":
        """The remote for a ``hub`` tier: ``config.hub`` plus the tier's name and ``keep`` (tier first)."""
        h = config.hub
        keep = tier.keep if tier.keep is not None else h.keep
        return cls(tier.name, h.repo_id, repo_type=h.repo_type, revision=h.revision, private=h.private,
                   endpoint=h.endpoint, path_prefix=h.path_prefix, keep=keep, project=config.project)

    def describe(self) -> str:
        where = f"{self.repo_id}@{self.revision}" + (f"/{self.path_prefix}" if self.path_prefix else "")
        kind = "" if self.repo_type == "model" else f"{self.repo_type} "
        return f"Hugging Face Hub {kind}repo {where} at {self.endpoint}"

    # -- plumbing ----------------------------------------------------------------------------------
    def _token_info(self) -> _Token:
        if self._token is None:
            if self._explicit_token:
                self._token = _Token(self._explicit_token, "explicit", "")
            else:
                self._token = _find_token()
            if self._token is None and not self._require_token:
                self._token = _Token("", "none", "")
            if self._token is None:
                raise self.error(RemoteAuthError, f"{self.name}: no Hugging Face token found; create one with write "
                                 f"access at {self.endpoint}/settings/tokens and set it as HF_TOKEN (or run "
                                 "`hf auth login`, or add HF_TOKEN to Colab Secrets)")
        return self._token

    @property
    def api(self) -> Any:
        with self._lock:
            if self._api is None:
                hf = _hf()
                from .. import __version__
                self._api = hf.HfApi(endpoint=self.endpoint, token=self._token_info().value or False,
                                     library_name="colabkit", library_version=__version__)
            return self._api

    def _full(self, rel: str) -> str:
        return f"{self.path_prefix}/{rel}" if self.path_prefix else rel

    def _rel(self, full: str) -> str | None:
        if not self.path_prefix:
            return full
        pre = self.path_prefix + "/"
        return full[len(pre):] if full.startswith(pre) else None

    def _where(self) -> str:
        return f"{self.repo_type} repo {self.repo_id!r}"

    def _wrap(self, e: BaseException, *, action: str, path: str | None = None) -> RemoteError:
        """A colabkit error for a failure of huggingface_hub (or the network under it)."""
        what = f"{self.name}: {action} failed"
        resp = _response_of(e)
        if resp is None:
            if _is_network(e):
                return self.error(TransientRemoteError, f"{what}: the connection to {self.endpoint} broke "
                                  f"({type(e).__name__}); it will be retried", path=path)
            return self.error(RemoteError, f"{what}: {redact(str(e)) or type(e).__name__}", path=path)
        status = int(resp.status_code)
        if isinstance(resp, _XetResponse) and status == 404 and re.search(r"/xet-(write|read)-token/", resp.url):
            return self.error(RemoteError, f"{what}: {self.endpoint} offers no Xet storage for {self._where()} "
                              "(HTTP 404 at its Xet token endpoint), and huggingface_hub uploads through Xet when "
                              "hf_xet is installed; set HF_HUB_DISABLE_XET=1 in the environment (before Python "
                              "starts) to use classic LFS", path=path)
        code = resp.headers.get("X-Error-Code") or ""
        msg = _server_message(resp)
        detail = f" ({msg})" if msg else ""
        tok = self._token.describe() if self._token else "the token"
        if status == 429:
            ra = _retry_after(resp.headers)
            wait = f"after {ra:g}s" if ra is not None else "later"
            return self.error(TransientRemoteError, f"{what}: the Hub is rate-limiting requests (HTTP 429){detail}; "
                              f"retrying {wait}", path=path, retry_after=ra)
        if status in (402, 507) or (status in (403, 400, 422) and _QUOTA.search(msg)):
            return self.error(RemoteQuotaError, f"{what}: the Hub refused to store more data (HTTP {status}){detail}; "
                              f"the {self.name} tier stops until space is freed: delete old checkpoints from "
                              f"{self.repo_id} and squash its history, or upgrade the plan", path=path)
        if status >= 500 or status == 408:
            return self.error(TransientRemoteError, f"{what}: the Hub answered HTTP {status}{detail}; it will be "
                              "retried", path=path, retry_after=_retry_after(resp.headers))
        if status == 401 and code != "RepoNotFound":
            return self.error(RemoteAuthError, f"{what}: the Hugging Face token from {tok} was rejected "
                              f"(HTTP 401{detail}); create a token with write access at {self.endpoint}/settings/tokens "
                              "and set it as HF_TOKEN", path=path)
        if status == 403:
            return self.error(RemotePermissionError, f"{what}: the token from {tok} may not write to {self._where()} "
                              f"(HTTP 403{detail}); use a token with write access to it", path=path)
        if code == "RepoNotFound" or (status in (401, 404) and code == ""):
            return self.error(RemoteNotFoundError, f"{what}: {self._where()} does not exist or the token from {tok} "
                              "cannot see it; run check_access() to create it", path=path)
        if code == "RevisionNotFound":
            return self.error(RemoteNotFoundError, f"{what}: {self._where()} has no revision {self.revision!r}",
                              path=path)
        if code == "EntryNotFound" or status == 404:
            return self.error(RemoteNotFoundError, f"{what}: {path or 'the file'} does not exist in {self._where()}",
                              path=path)
        return self.error(RemoteError, f"{what}: the Hub answered HTTP {status}{detail}", path=path)

    @staticmethod
    def _code(e: BaseException) -> tuple[int | None, str]:
        resp = _response_of(e)
        if resp is None:
            return None, ""
        return int(resp.status_code), resp.headers.get("X-Error-Code") or ""

    def _call(self, fn: Any, *args: Any, action: str, path: str | None = None, **kwargs: Any) -> Any:
        with _calling():
            try:
                with _quiet():
                    return fn(*args, **kwargs)
            except RemoteError:
                raise
            except Exception as e:
                raise self._wrap(e, action=action, path=path) from e

    def close(self) -> None:
        """Stop waiting between retries (a call in flight gives up at its next try). The remote stays usable:
        calls made after close() retry as before."""
        stop, self._stop = self._stop, threading.Event()
        stop.set()

    def _wait(self, seconds: float, stop: threading.Event) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            stop.wait(seconds)

    def _delay(self, attempt: int, err: RemoteError) -> float:
        import random
        delay = min(self.retry_max, self.retry_initial * (2 ** (attempt - 1))) * random.uniform(0.5, 1.0)
        if err.retry_after is not None:
            delay = max(delay, err.retry_after)
        return delay

    def _retrying(self, fn: Any, *, action: str, path: str | None = None) -> Any:
        """Run the idempotent `fn` (a lookup, a listing, a download), retrying transient failures with
        back-off (``Retry-After`` honoured) up to `max_attempts` tries; other failures are raised at once."""
        with _calling():
            return self._retrying_loop(fn, action=action, path=path)

    def _retrying_loop(self, fn: Any, *, action: str, path: str | None) -> Any:
        attempt = 0
        stop = self._stop
        while True:
            try:
                with _quiet():
                    return fn()
            except Exception as e:
                err = e if isinstance(e, RemoteError) else self._wrap(e, action=action, path=path)
                if not err.transient:
                    if err is e:
                        raise
                    raise err from e
                attempt += 1
                if attempt >= self.max_attempts or stop.is_set():
                    if err is e:
                        raise
                    raise err from e
                delay = self._delay(attempt, err)
                log.info("%s: %s (try %d of %d); retrying in %.1fs", self.name, err, attempt, self.max_attempts,
                         delay)
                self._wait(delay, stop)

    def _record(self, f: Any) -> RemoteFile | None:
        rel = self._rel(f.path)
        if rel is None:
            return None
        lfs = getattr(f, "lfs", None)
        blob = getattr(f, "blob_id", None)
        if lfs is not None:
            sha = lfs.sha256 if hasattr(lfs, "sha256") else lfs["sha256"]
            return RemoteFile(rel, int(f.size), sha256=sha, id=blob)
        known = _recall(blob)
        return RemoteFile(rel, int(f.size), sha256=known[0] if known else None, md5=known[1] if known else None,
                          id=blob)

    def _visible(self, rel: str) -> bool:
        base = posixpath.basename(rel)
        return base != ACCESS_MARKER and not (rel in _HUB_FILES and not self.path_prefix)

    def _paths_info(self, fulls: list[str]) -> dict[str, Any]:
        """The tree entries (files only) for exact repo paths; {} when the repo or revision does not exist."""
        if not fulls:
            return {}
        return self._paths_info_at(fulls, self.revision)

    # -- interface ------------------------------------------------------------------------------------
    def list(self, prefix: str = "") -> list[RemoteFile]:
        rel_prefix = normalize_path(prefix) if prefix else ""
        folder = self._full(rel_prefix) if rel_prefix else self.path_prefix
        def tree() -> list[Any] | None:
            try:
                return list(self.api.list_repo_tree(self.repo_id, path_in_repo=folder or None, recursive=True,
                                                    revision=self.revision, repo_type=self.repo_type))
            except Exception as e:
                status, code = self._code(e)
                if code in ("EntryNotFound", "RevisionNotFound") or (status == 404 and code != "RepoNotFound"):
                    return []
                if code == "RepoNotFound":
                    log.info("%s: %s does not exist yet; it holds nothing", self.name, self._where())
                    return []
                raise
        entries = self._retrying(tree, action=f"listing {self._where()}")
        out = []
        for f in entries:
            if type(f).__name__ != "RepoFile" and not hasattr(f, "blob_id"):
                continue
            rec = self._record(f)
            if rec is None or not self._visible(rec.path):
                continue
            if rec.path.startswith(WORKERS_DIR + "/") and not rel_prefix.startswith(WORKERS_DIR):
                continue   # elected-upload records (colabkit.elect) are not tier content
            if rel_prefix and not (rec.path == rel_prefix or rec.path.startswith(rel_prefix + "/")):
                continue
            out.append(rec)
        return sorted(out, key=lambda r: r.path)

    def stat(self, path: str) -> RemoteFile | None:
        rel = normalize_path(path)
        f = self._paths_info([self._full(rel)]).get(self._full(rel))
        return self._record(f) if f is not None else None

    def stat_many(self, paths: Iterable[str]) -> dict[str, RemoteFile | None]:
        """Records for many exact paths in one paths-info call (per :data:`_PATHS_PER_CALL`), retried."""
        rels = [normalize_path(p) for p in paths]
        out: dict[str, RemoteFile | None] = {}
        for i in range(0, len(rels), _PATHS_PER_CALL):
            part = rels[i:i + _PATHS_PER_CALL]
            got = self._paths_info([self._full(r) for r in part])
            for r in part:
                f = got.get(self._full(r))
                out[r] = self._record(f) if f is not None else None
        return out

    def put(self, local: Path, path: str, *, digest: FileDigest | None = None,
            upload_state: UploadState | None = None, progress: Progress | None = None) -> RemoteFile:
        """Upload one file (a one-file :meth:`put_many` commit).

        `upload_state` is not used: huggingface_hub keeps no resumable session across processes (a Xet
        upload does not send again the xorbs the Hub's CAS already holds, nor chunks it knows from an earlier
        upload; an LFS upload is sent again from byte 0: docs/hub.md 5a). `progress` is called
        once, with the file's size, when the upload is verified.
        """
        rel = normalize_path(path)
        rec = self.put_many([(Path(local), rel)], digests={rel: digest} if digest else None)[0]
        if progress:
            progress(rec.size)
        return rec

    def put_many(self, items: Iterable[tuple[Path, str]], *, message: str | None = None,
                 digests: dict[str, FileDigest] | None = None) -> list[RemoteFile]:
        """Upload several files in one commit; files whose content the repo already holds are skipped.

        When `keep` is set, older checkpoints of each series in the folders written to are deleted in
        the same commit (the repo history still holds them).

        Args:
            items: (local file, remote path) pairs.
            message: the commit message; default names the project, experiment and steps.
            digests: the local files' digests by remote path, when the caller already has them.
        Returns:
            The verified records, in the order of `items`.
        Raises:
            ValueError: a remote path is absolute or contains ``..``.
            RemoteError: on failure (TransientRemoteError when a retry may help, RemoteQuotaError when the
                Hub refuses to store more).
            IntegrityError: a file changed while it was uploaded, or the Hub holds other bytes than were sent
                (the bad copy has been removed).
        """
        digests = digests or {}
        pending: dict[str, _Local] = {}
        for local, path in items:
            rel = normalize_path(path)
            pending[rel] = _Local(Path(local), rel, self._full(rel), digests.get(rel) or digests.get(path))
        if not pending:
            return []
        for it in pending.values():
            if it.digest is None:
                it.digest = _sha256_file(it.local)
        existing = self._paths_info([it.full for it in pending.values()])
        results: dict[str, RemoteFile] = {}
        to_add: list[_Local] = []
        for it in pending.values():
            rec = self._verified(it, existing.get(it.full))
            if rec is not None:
                log.debug("%s: %s already holds %s; not uploaded again", self.name, self.repo_id, it.path)
                results[it.path] = rec
            else:
                to_add.append(it)
        deletions = self._keep_deletions([it.full for it in pending.values()]) if self.keep else []
        if to_add or deletions:
            msg = message or self._message([it.path for it in to_add], deletions)
            to_add, deletions = self._commit_retrying(to_add, deletions, msg, results)
            after = self._paths_info([it.full for it in to_add])
            bad = []
            for it in to_add:
                rec = self._verified(it, after.get(it.full))
                if rec is None:
                    bad.append(it)
                else:
                    results[it.path] = rec
            if bad:
                with contextlib.suppress(RemoteError):
                    self._commit([], [it.full for it in bad if it.full in after],
                                 f"colabkit: remove {len(bad)} unverified upload(s)")
                it = bad[0]
                now = _sha256_file(it.local)
                why = ("it changed while it was uploaded; it will be retried" if now.sha256 != it.digest.sha256
                       else "the Hub holds other bytes than were sent; the copy was removed")
                raise IntegrityError(f"{self.name}: {it.path} did not verify after upload: {why}", path=it.path,
                                     expected=it.digest.sha256, actual=now.sha256)
        return [results[rel] for rel in pending]

    def _commit_retrying(self, to_add: list[_Local], deletions: list[str], message: str,
                         results: dict[str, RemoteFile]) -> tuple[list[_Local], list[str]]:
        """Commit, and after a transient failure look (one paths-info call) at what the Hub holds before trying
        again: a commit whose answer was lost went through, and LFS objects sent before a failure stay on the
        Hub (the next try does not send them again). Files found verified go into `results`; returns what the
        successful commit was asked to add and delete."""
        attempt = 0
        stop = self._stop
        while True:
            try:
                self._commit(to_add, deletions, message)
                return to_add, deletions
            except TransientRemoteError as err:
                attempt += 1
                if attempt >= self.max_attempts or stop.is_set():
                    raise
                delay = self._delay(attempt, err)
                log.info("%s: %s (try %d of %d); checking what the Hub holds, then retrying in %.1fs", self.name,
                         err, attempt, self.max_attempts, delay)
                self._wait(delay, stop)
                now = self._paths_info([it.full for it in to_add] + list(deletions))
                still = []
                for it in to_add:
                    rec = self._verified(it, now.get(it.full))
                    if rec is not None:
                        results[it.path] = rec
                    else:
                        still.append(it)
                self._note_deleted([p for p in deletions if p not in now])   # the lost answer's commit did
                to_add, deletions = still, [p for p in deletions if p in now]
                if not to_add and not deletions:
                    return [], []

    def _verified(self, it: _Local, entry: Any) -> RemoteFile | None:
        """The record for `it` when `entry` (a tree entry) holds exactly the local bytes, else None."""
        if entry is None or int(entry.size) != it.digest.size:
            return None
        lfs = getattr(entry, "lfs", None)
        md5 = it.digest.md5 or None
        if lfs is not None:
            sha = lfs.sha256 if hasattr(lfs, "sha256") else lfs["sha256"]
            if sha != it.digest.sha256:
                return None
            return RemoteFile(it.path, it.digest.size, sha256=sha, md5=md5, id=entry.blob_id)
        if it.digest.size > _SMALL:
            return None
        _p, sha, md5, git = self._hash_file(it.local, small=True)
        if git != entry.blob_id or sha != it.digest.sha256:
            return None  # other bytes, or the local file changed since its digest was taken
        # the git oid of these very bytes is the remote file's: their digest is the remote file's digest
        _remember(entry.blob_id, sha, md5)
        return RemoteFile(it.path, it.digest.size, sha256=sha, md5=md5, id=entry.blob_id)

    def _commit(self, adds: list[_Local], deletes: list[str], message: str) -> None:
        hf = _hf()
        ops: list[Any] = []
        xet = _xet_in_use()
        for it in adds:
            op = hf.CommitOperationAdd(path_in_repo=it.full, path_or_fileobj=str(it.local))
            # classic LFS: hand over the sha256 we already have, so the library does not read the file again for
            # it (the LFS storage checks it against the bytes). Not on the Xet path: hf_xet reads the file anyway
            # and would write a given sha256 into the shard unchecked, so bytes that changed since the digest was
            # taken would carry the old sha256 and pass the check after the commit; its own is computed in the
            # same read
            if not xet:
                with contextlib.suppress(Exception):
                    if not getattr(op.upload_info, "is_hashed", True):
                        op.upload_info.sha256 = bytes.fromhex(it.digest.sha256)
            ops.append(op)
        ops.extend(hf.CommitOperationDelete(path_in_repo=p) for p in deletes)
        if not ops:
            return
        action = f"uploading {len(adds)} file(s) to {self._where()}" if adds else f"deleting from {self._where()}"
        path = adds[0].path if len(adds) == 1 else None
        for attempt in (1, 2):
            try:
                self._ensure_branch()
                self._create_commit(ops, message)
                self._note_deleted(deletes)
                return
            except RemoteError:
                raise
            except Exception as e:
                status, code = self._code(e)
                if attempt == 1 and code == "RepoNotFound" and adds:
                    self._create_repo()
                    ops = [hf.CommitOperationAdd(path_in_repo=o.path_in_repo, path_or_fileobj=o.path_or_fileobj)
                           if isinstance(o, hf.CommitOperationAdd) else o for o in ops]
                    continue
                raise self._wrap(e, action=action, path=path) from e

    def _note_deleted(self, fulls: list[str]) -> None:
        with self._deleted_lock:
            self._deleted += [r for r in (self._rel(p) for p in fulls) if r]

    def take_deleted(self) -> list[str]:
        with self._deleted_lock:
            out, self._deleted = self._deleted, []
        return out

    def _create_commit(self, ops: list[Any], message: str) -> None:
        try:
            with _quiet():
                self.api.create_commit(self.repo_id, operations=ops, commit_message=message,
                                       repo_type=self.repo_type, revision=self.revision)
        except ValueError as e:
            if not _url_quirk(e):
                raise
            # huggingface_hub < 1.0 parses the returned commit URL against the endpoint it read at import;
            # with another endpoint that fails *after* the Hub accepted the commit (callers verify the tree)
            log.debug("%s: commit accepted; huggingface_hub could not parse its URL (%s)", self.name, e)

    def _ensure_branch(self) -> None:
        if self._branch_ok:
            return
        try:
            self._retrying(lambda: self.api.create_branch(self.repo_id, branch=self.revision, repo_type=self.repo_type,
                                                          exist_ok=True),
                           action=f"creating branch {self.revision!r} in {self._where()}")
        except Exception as e:
            status, code = self._code(e)
            if code != "RepoNotFound":
                raise self._wrap(e, action=f"creating branch {self.revision!r} in {self._where()}") from e
            return  # the repo is created below and the branch on the next call
        self._branch_ok = True

    def _create_repo(self) -> None:
        log.info("%s: creating %s %s", self.name, "private" if self.private else "public", self._where())
        try:
            # exist_ok: a retry after a lost answer finds the repo made (409) and goes on
            self._retrying(lambda: self.api.create_repo(self.repo_id, repo_type=self.repo_type, private=self.private,
                                                        exist_ok=True), action=f"creating {self._where()}")
        except RemoteError as e:
            if not _url_quirk(e.__cause__):
                raise  # else: created; only the returned URL could not be parsed (see _create_commit)
        self._ensure_branch()

    def _message(self, paths: list[str], deletions: list[str]) -> str:
        exps = sorted({_experiment_of(p) for p in paths} - {""})
        steps = sorted({s for p in paths if (s := _step_in(p)) is not None})
        who = " ".join(x for x in (self.project, ", ".join(exps)) if x) or "sync"
        parts = [f"colabkit {who}:"]
        if steps:
            parts.append("step" + ("s " if len(steps) > 1 else " ") + ", ".join(str(s) for s in steps))
        parts.append(f"({len(paths)} file{'s' if len(paths) != 1 else ''}"
                     + (f", {len(deletions)} old removed" if deletions else "") + ")")
        return " ".join(parts)

    def _keep_deletions(self, fulls: list[str]) -> list[str]:
        """Repo paths of checkpoints beyond `keep` in the folders of `fulls` (with the new ones counted). A
        checkpoint folder goes whole or not at all; one that is being written to in this commit stays."""
        folders = {posixpath.dirname(f) for f in fulls if _CHECKPOINT.match(posixpath.basename(f))}
        unit_parents = {u[0] for f in fulls if (u := _folder_unit_of(f)) is not None}
        present: set[str] = set(fulls)
        for folder in sorted(folders | unit_parents):
            def tree(folder: str = folder) -> list[Any]:
                try:  # a parent of checkpoint folders: their files too
                    return list(self.api.list_repo_tree(self.repo_id, path_in_repo=folder or None,
                                                        recursive=folder in unit_parents,
                                                        revision=self.revision, repo_type=self.repo_type))
                except Exception as e:
                    status, code = self._code(e)
                    if status == 404 or code in ("RepoNotFound", "EntryNotFound", "RevisionNotFound"):
                        return []
                    raise
            for f in self._retrying(tree, action=f"listing {folder or 'the root'} of {self._where()}"):
                if type(f).__name__ == "RepoFile" or hasattr(f, "blob_id"):
                    present.add(f.path)
        adding = set(fulls)
        units = _prune_units(sorted(present), keep=self.keep or 0, only_folders=folders | unit_parents)
        return sorted(p for unit in units if not adding.intersection(unit) for p in unit)

    def prune(self, *, keep: int | None = None) -> list[str]:
        """Delete checkpoints beyond `keep` per series from the tip, in one commit; history keeps them.

        Returns:
            The tier paths removed.
        """
        keep = keep or self.keep
        if not keep:
            return []
        fulls = [self._full(r.path) for r in self.list()]
        doomed = prune_plan(fulls, keep=keep)
        if doomed:
            self._commit([], doomed, f"colabkit: keep the newest {keep} checkpoint(s) ({len(doomed)} removed)")
        return [r for r in (self._rel(p) for p in doomed) if r]

    def get(self, path: str, local: Path, *, expected: RemoteFile | None = None,
            progress: Progress | None = None) -> RemoteFile:
        rel = normalize_path(path)
        full = self._full(rel)
        rec = expected if expected is not None else self.stat(rel)
        if rec is None:
            raise self.error(RemoteNotFoundError, f"{self.name}: {rel} does not exist in {self._where()}", path=rel)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "hub-", dir=local.parent))
        try:
            # a download that broke (5xx, 429, a dropped connection) is tried again, from the start, into the
            # same temporary file; what is kept is verified below either way. An LFS file is verified by its
            # sha256: no git oid or md5 to compute (they cost more than the sha256)
            tmp, sha, md5, git = self._retrying(
                lambda: self._download(full, rel, tmpdir, small=rec.sha256 is None, progress=progress),
                action=f"downloading {rel} from {self._where()}", path=rel)
            size = tmp.stat().st_size
            if rec.sha256 is not None:
                ok, want, got = sha == rec.sha256, rec.sha256, sha
            elif rec.md5 is not None:
                ok, want, got = md5 == rec.md5, rec.md5, md5
            else:
                ok, want, got = git is not None and git == rec.id, rec.id, git
            if size != rec.size or not ok:
                raise IntegrityError(f"{self.name}: {rel} does not match its recorded hash (size {size} vs {rec.size}, "
                                     f"hash {got} vs {want}); the copy was discarded", path=rel, expected=want,
                                     actual=got)
            replace_copy(tmp, local)  # a download: not fsynced (see colabkit.fsutil)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if git:
            _remember(git, sha, md5)
        return RemoteFile(rel, size, sha256=sha, md5=md5, id=rec.id or git)

    def _download(self, full: str, rel: str, tmpdir: Path, *, small: bool,
                  progress: Progress | None) -> tuple[Path, str, str | None, str | None]:
        """Stream the resolve URL into `tmpdir`, hashing on the way: (file, sha256, md5, git oid)."""
        hf = _hf()
        token = self._token_info().value or False
        target = tmpdir / "download"
        action = f"downloading {rel} from {self._where()}"
        try:
            from huggingface_hub.file_download import get_hf_file_metadata, http_get
            from huggingface_hub.utils import build_hf_headers
        except ImportError:  # pragma: no cover - an unexpected huggingface_hub layout: let it download
            return self._download_fallback(full, rel, tmpdir, action=action)
        url = hf.hf_hub_url(self.repo_id, full, repo_type=self.repo_type, revision=self.revision,
                            endpoint=self.endpoint)
        try:
            with _quiet():
                kwargs: dict[str, Any] = {"token": token}
                import inspect
                if "endpoint" in inspect.signature(get_hf_file_metadata).parameters:
                    kwargs["endpoint"] = self.endpoint
                meta = get_hf_file_metadata(url, **kwargs)
                headers = build_hf_headers(token=token, library_name="colabkit")
                location = meta.location or url
                if _origin(location) != _origin(url):
                    headers.pop("authorization", None)  # a signed CDN URL: the token stays on the Hub
                    headers.pop("Authorization", None)
                size = meta.size
                with open(target, "wb") as f:
                    w = _HashingWriter(f, git_size=size if small and size is not None else None, progress=progress,
                                       parallel=(size or 0) >= _PARALLEL_HASH)
                    try:
                        http_get(location, w, headers=headers, expected_size=size)
                    finally:
                        w.finish()
        except Exception as e:
            raise self._wrap(e, action=action, path=rel) from e
        if w.dirty or (small and w.git is None):
            return self._hash_file(target, small=small)
        return target, w.sha.hexdigest(), (w.md5.hexdigest() if w.md5 else None), (w.git.hexdigest() if w.git else None)

    def _download_fallback(self, full: str, rel: str, tmpdir: Path, *, action: str
                           ) -> tuple[Path, str, str | None, str | None]:  # pragma: no cover - see _download
        hf = _hf()
        p = self._call(hf.hf_hub_download, self.repo_id, full, repo_type=self.repo_type, revision=self.revision,
                       local_dir=str(tmpdir / "dl"), cache_dir=str(tmpdir / "cache"), endpoint=self.endpoint,
                       token=self._token_info().value or False, action=action, path=rel)
        return self._hash_file(Path(os.path.realpath(p)), small=True)

    @staticmethod
    def _hash_file(path: Path, *, small: bool) -> tuple[Path, str, str | None, str | None]:
        size = path.stat().st_size
        sha = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False) if small else None
        git = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False) if small else None
        with open(path, "rb") as f:
            for buf in iter(lambda: f.read(4 * 1024 * 1024), b""):
                sha.update(buf)
                if md5 is not None:
                    md5.update(buf)
                    git.update(buf)
        return path, sha.hexdigest(), (md5.hexdigest() if md5 else None), (git.hexdigest() if git else None)

    def delete(self, path: str) -> None:
        rel = normalize_path(path)
        try:
            self._commit([], [self._full(rel)], f"colabkit: delete {rel}")
        except RemoteNotFoundError:
            pass  # no such file (or no repo): nothing to delete

    def check_access(self) -> None:
        """Check the token (valid, may write), the repo (exists, or is created private) and a real write.

        Raises:
            RemoteAuthError: no token, or the token was rejected.
            RemotePermissionError: the token is read-only, or the repo belongs to a namespace it cannot write to.
            RemoteQuotaError: the Hub refuses to store more data.
            RemoteError: anything else (TransientRemoteError for network trouble, 5xx and 429).
        """
        tok = self._token_info()
        try:
            who = self._retrying(lambda: self.api.whoami(token=tok.value), action="checking the Hugging Face token")
        except TransientRemoteError:
            raise
        except Exception as e:
            status, _code = self._code(e)
            if status == 401:
                raise self.error(RemoteAuthError, f"{self.name}: the Hugging Face token from {tok.describe()} was "
                                 f"rejected by {self.endpoint} (invalid or expired); create a token with write access "
                                 f"at {self.endpoint}/settings/tokens and set it as HF_TOKEN") from e
            raise self._wrap(e, action="checking the Hugging Face token") from e
        user = str(who.get("name") or "?")
        orgs = [str(o.get("name")) for o in who.get("orgs") or [] if isinstance(o, dict)]
        role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise self.error(RemotePermissionError, f"{self.name}: the Hugging Face token from {tok.describe()} "
                             f"(user {user!r}) is read-only, so checkpoints cannot be uploaded to {self.repo_id}; "
                             f"create a token with write access at {self.endpoint}/settings/tokens")
        owner = self.repo_id.split("/", 1)[0]
        if owner != user and owner not in orgs:
            can = ", ".join([user, *orgs])
            raise self.error(RemotePermissionError, f"{self.name}: {self.repo_id!r} belongs to {owner!r}, but the token "
                             f"from {tok.describe()} is for user {user!r}, who can write only under: {can}; use a repo "
                             f"such as {user}/{self.repo_id.split('/', 1)[1]} or a token that may write to {owner!r}")
        try:
            info = self._retrying(lambda: self.api.repo_info(self.repo_id, repo_type=self.repo_type),
                                  action=f"looking up {self._where()}")
            if self.private and getattr(info, "private", None) is False:
                log.warning("%s: %s is public; checkpoints uploaded there can be read by anyone", self.name,
                            self._where())
        except Exception as e:
            status, code = self._code(e)
            if code != "RepoNotFound" and status not in (401, 404):
                if isinstance(e, RemoteError):
                    raise
                raise self._wrap(e, action=f"looking up {self._where()}") from e
            self._create_repo()
        self._ensure_branch()
        marker = self._full(ACCESS_MARKER)
        hf = _hf()
        try:
            self._create_commit([hf.CommitOperationAdd(path_in_repo=marker, path_or_fileobj=b"colabkit access check\n")],
                                "colabkit: access check")
            self._create_commit([hf.CommitOperationDelete(path_in_repo=marker)], "colabkit: access check (cleanup)")
        except Exception as e:
            raise self._wrap(e, action=f"writing a test file to {self._where()}", path=ACCESS_MARKER) from e

    # -- elected upload (colabkit.elect) -----------------------------------------------------------------
    def _head(self) -> str | None:
        """The commit the branch points at now (None: the repo or the branch does not exist yet)."""
        def look() -> str | None:
            try:
                info = self.api.repo_info(self.repo_id, repo_type=self.repo_type, revision=self.revision)
            except Exception as e:
                status, code = self._code(e)
                if code in ("RepoNotFound", "RevisionNotFound") or status == 404:
                    return None
                raise
            return getattr(info, "sha", None)
        return self._retrying(look, action=f"looking up the head of {self._where()}")

    def holds(self, items: Iterable[tuple[Path, str, FileDigest]]) -> dict[str, RemoteFile | None]:
        """As :meth:`Remote.holds`, in one paths-info call; a regular (non-LFS) file is compared by its git oid."""
        its = [_Local(Path(local), normalize_path(p), self._full(normalize_path(p)), d) for local, p, d in items]
        got = self._paths_info([it.full for it in its])
        return {it.path: self._verified(it, got.get(it.full)) for it in its}

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """A commit adding `path` on the parent in which it does not exist (``parent_commit``): the Hub refuses
        the second of two such commits (HTTP 412), so only one worker creates it."""
        return self.put_claimed([], claim=path, record=data) is not None

    def put_claimed(self, items: list[tuple[Path, str]], *, claim: str, record: bytes,
                    digests: dict[str, FileDigest] | None = None, progress: Progress | None = None
                    ) -> list[RemoteFile] | None:
        """`items` and the record `claim` in **one commit on the head read before it** (``parent_commit``): if
        another commit landed meanwhile the Hub answers 412 and this looks again: `claim` there (another
        worker's commit won: None, and the LFS objects this call sent are left to the Hub's own collection) or
        not (an unrelated commit: commit again on the new head). The LFS content goes up before the commit
        (``preupload_lfs_files``), and `progress(0)` is called between the two: it may raise to cancel."""
        hf = _hf()
        digests = digests or {}
        its = []
        for local, path in items:
            rel = normalize_path(path)
            d = digests.get(rel) or digests.get(path) or _sha256_file(Path(local))
            its.append(_Local(Path(local), rel, self._full(rel), d))
        claim_full = self._full(normalize_path(claim))
        stop = self._stop
        attempt = 0
        created = False
        while True:
            try:
                head = self._head()
                if head is None:
                    if created:
                        raise self.error(RemoteError, f"{self.name}: {self._where()} has no revision "
                                         f"{self.revision!r} after creating it")
                    self._create_repo()
                    created = True
                    continue
                now = self._paths_info_at([claim_full] + [it.full for it in its], head)
                if claim_full in now:
                    mine = self._claim_is(claim_full, head, record)
                    if not mine:
                        return None
                    recs = [self._verified(it, now.get(it.full)) for it in its]
                    if all(r is not None for r in recs):
                        return recs   # an earlier try of ours went through; its answer was lost
                    return None
                adds = [it for it in its if self._verified(it, now.get(it.full)) is None]
                ops = []
                for it in adds:
                    op = hf.CommitOperationAdd(path_in_repo=it.full, path_or_fileobj=str(it.local))
                    with contextlib.suppress(Exception):
                        if not getattr(op.upload_info, "is_hashed", True):
                            op.upload_info.sha256 = bytes.fromhex(it.digest.sha256)
                    ops.append(op)
                if ops and hasattr(self.api, "preupload_lfs_files"):
                    with _quiet():
                        self.api.preupload_lfs_files(self.repo_id, additions=ops, repo_type=self.repo_type,
                                                     revision=self.revision)
                if progress is not None:
                    progress(0)   # the content is up; the commit decides: a loser may stop here
                ops.append(hf.CommitOperationAdd(path_in_repo=claim_full, path_or_fileobj=record))
                deletions = self._keep_deletions([it.full for it in its]) if self.keep and its else []
                ops.extend(hf.CommitOperationDelete(path_in_repo=p) for p in deletions)
                msg = self._message([it.path for it in adds], deletions) if adds else f"colabkit: claim {claim}"
                try:
                    with _quiet():
                        self.api.create_commit(self.repo_id, operations=ops, commit_message=msg,
                                               repo_type=self.repo_type, revision=self.revision, parent_commit=head)
                except ValueError as e:
                    if not _url_quirk(e):
                        raise
            except RemoteError as err:
                if not err.transient:
                    raise
                attempt += 1
                if attempt >= self.max_attempts or stop.is_set():
                    raise
                self._wait(self._delay(attempt, err), stop)
                continue
            except UploadCancelled:
                raise
            except Exception as e:
                status, _code = self._code(e)
                if status == 412:   # a commit landed since `head`: look again
                    log.info("%s: %s moved while committing %s; looking again", self.name, self._where(), claim)
                    continue
                err = self._wrap(e, action=f"committing {claim} to {self._where()}", path=claim)
                if not err.transient:
                    raise err from e
                attempt += 1
                if attempt >= self.max_attempts or stop.is_set():
                    raise err from e
                self._wait(self._delay(attempt, err), stop)
                continue
            self._note_deleted(deletions)
            after = self._paths_info([it.full for it in its])
            out = []
            for it in its:
                rec = self._verified(it, after.get(it.full))
                if rec is None:
                    raise IntegrityError(f"{self.name}: {it.path} did not verify after upload", path=it.path,
                                         expected=it.digest.sha256, actual=None)
                out.append(rec)
            return out

    def _paths_info_at(self, fulls: list[str], rev: str) -> dict[str, Any]:
        """:meth:`_paths_info` at revision `rev` (a branch or a commit): one paths-info call for all of them
        (the Hub takes many paths per request), retried as a whole."""
        def look() -> Any:
            try:
                return self.api.get_paths_info(self.repo_id, fulls, revision=rev, repo_type=self.repo_type)
            except Exception as e:
                status, code = self._code(e)
                if code in ("RepoNotFound", "RevisionNotFound", "EntryNotFound") or status == 404:
                    return []
                raise
        got = self._retrying(look, action=f"looking up {len(fulls)} file(s) in {self._where()}")
        return {f.path: f for f in got if hasattr(f, "blob_id") or getattr(f, "lfs", None) is not None
                or type(f).__name__ == "RepoFile"}

    def _claim_is(self, full: str, rev: str, record: bytes) -> bool:
        """Whether the claim at `full` (in commit `rev`) holds exactly `record`."""
        entry = self._paths_info_at([full], rev).get(full)
        return entry is not None and getattr(entry, "blob_id", None) == hashlib.sha1(
            b"blob %d\0" % len(record) + record, usedforsecurity=False).hexdigest()

    def read_bytes(self, path: str) -> bytes | None:
        rel = normalize_path(path)
        d = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "hub-read-"))
        try:
            try:
                self.get(rel, d / "record")
            except RemoteNotFoundError:
                return None
            return (d / "record").read_bytes()
        finally:
            shutil.rmtree(d, ignore_errors=True)


def prune_plan(paths: Iterable[str], *, keep: int, only_folders: set[str] | None = None) -> list[str]:
    """Which of `paths` to delete so each checkpoint series keeps its `keep` highest steps.

    A series is the files of one folder whose names differ only in the step number
    (``v68_step_00001200.pt``, ``v68_step_00001400.pt``); a ``.json`` sidecar goes with its checkpoint. A
    checkpoint folder (``v68_step_00001200/``, ``checkpoint-300/``, ``iter_0001200/``: complete by its manifest
    or marker, see :func:`colabkit.distributed.listing_kind`) is one checkpoint of the series of the folders
    beside it with the same name but the step, and all its files go together; a folder that is not complete
    is neither counted nor deleted.
    """
    return sorted(p for unit in _prune_units(paths, keep=keep, only_folders=only_folders) for p in unit)


def _folder_unit_of(path: str) -> tuple[str, str] | None:
    """(parent, folder name) of the checkpoint folder `path` lies in: its first step-named folder."""
    from ..distributed import folder_step
    parts = path.split("/")
    for i in range(len(parts) - 1):
        if folder_step(parts[i]) is not None:
            return "/".join(parts[:i]), parts[i]
    return None


def _prune_units(paths: Iterable[str], *, keep: int, only_folders: set[str] | None = None) -> list[list[str]]:
    """:func:`prune_plan`, one list of paths per checkpoint to delete (a file with its sidecar, or a folder)."""
    from ..distributed import MEGATRON_TRACKER, folder_step, listing_kind
    paths = list(paths)
    have = set(paths)
    series: dict[tuple[str, str, str], dict[int, list[str]]] = {}
    folders: dict[tuple[str, str], list[str]] = {}
    for p in paths:
        unit = _folder_unit_of(p)
        if unit is not None:
            if only_folders is None or unit[0] in only_folders:
                folders.setdefault(unit, []).append(p)
            continue
        folder, base = posixpath.split(p)
        if only_folders is not None and folder not in only_folders:
            continue
        m = _CHECKPOINT.match(base)
        if not m:
            continue
        key = (folder, m.group("stem"), m.group("ext"))
        series.setdefault(key, {}).setdefault(int(m.group("step")), []).append(p)
    for (parent, name), files in folders.items():
        inside = [f[len(name) + 1 + (len(parent) + 1 if parent else 0):] for f in files]
        tracker = f"{parent}/{MEGATRON_TRACKER}" if parent else MEGATRON_TRACKER
        if listing_kind(name, inside, tracked=tracker in have) is None:
            continue  # not complete (or not a checkpoint): neither counted nor removed
        step = folder_step(name)
        stem = re.sub(r"\d+(?!.*\d)", "", name)
        series.setdefault((parent, stem, "/"), {}).setdefault(step, []).extend(files)
    doomed: list[list[str]] = []
    for steps in series.values():
        for step in sorted(steps, reverse=True)[keep:]:
            doomed.append(sorted(steps[step]))
    return doomed


def _url_quirk(e: BaseException | None) -> bool:
    return isinstance(e, ValueError) and "Unable to retrieve user and repo ID" in str(e)


def _experiment_of(path: str) -> str:
    """``v68`` for ``experiments/v68/checkpoints/x.pt`` (or ``v68/checkpoints/x.pt``); "" at the top level."""
    parts = path.split("/")
    if "experiments" in parts[:-1]:
        i = parts.index("experiments")
        return parts[i + 1] if i + 1 < len(parts) - 1 else ""
    return parts[0] if len(parts) > 1 and parts[0] not in ("checkpoints", "logs") else ""


def _origin(url: str) -> tuple[str, str, int]:
    from urllib.parse import urlsplit
    u = urlsplit(url)
    return (u.scheme, (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme, 0))
