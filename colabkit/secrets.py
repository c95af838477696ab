"""Credentials and the redaction of anything secret.

No key, token or assertion is ever printed, logged, put in an exception message, bundled or synced.
:func:`redact` scrubs free text; :func:`redact_config` scrubs configuration mappings for display.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

log = logging.getLogger(__name__)

REDACTED = "***"

_SECRET_KEYS = re.compile(r"(token|secret|password|private_key|api_key|apikey|assertion|refresh_?token|credential_json)",
                          re.IGNORECASE)
# patterns of secret material that may appear in free text
_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),                       # Hugging Face tokens
    re.compile(r"\bya29\.[A-Za-z0-9_\-.]+"),                      # Google OAuth access tokens
    re.compile(r"\b1//[A-Za-z0-9_\-]{20,}"),                       # Google refresh tokens
    re.compile(r"\beyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}"),  # JWTs (assertions)
    re.compile(r"(?i)(\"?(?:private_key|access_token|refresh_token|client_secret|token|assertion)\"?\s*[:=]\s*\"?)"
               r"[^\s\",}&]+"),
    re.compile(r"(?i)(authorization:\s*(?:bearer|token)\s+)\S+"),
]


def redact(text: str) -> str:
    """Replace anything that looks like a key, token or assertion in `text` with ``***``."""
    if not text:
        return text
    for p in _PATTERNS:
        if p.groups:
            text = p.sub(lambda m: (m.group(1) if m.group(1) and not m.group(1).startswith("-----END") else "") + REDACTED,
                         text)
        else:
            text = p.sub(REDACTED, text)
    return text


def redact_config(data: Any) -> Any:
    """A copy of a configuration mapping with secret-looking values replaced by ``***``."""
    if isinstance(data, Mapping):
        out = {}
        for k, v in data.items():
            if isinstance(k, str) and _SECRET_KEYS.search(k) and v not in (None, "", [], {}):
                out[k] = REDACTED
            else:
                out[k] = redact_config(v)
        return out
    if isinstance(data, list):
        return [redact_config(x) for x in data]
    if isinstance(data, str):
        return redact(data)
    return data


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs secrets from every record colabkit emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string is not ours to fix here
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


_factory_installed = False


def install_log_redaction() -> None:
    """Scrub secrets from every log record a ``colabkit.*`` logger creates (idempotent).

    A filter on the ``colabkit`` logger would not see records of its children, so the record factory is
    wrapped instead (chaining whatever factory was installed before); records of other loggers pass untouched.
    """
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()
    scrub = RedactingFilter()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name == "colabkit" or record.name.startswith("colabkit."):
            scrub.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def colab_secret(name: str, *, timeout: float = 2.0) -> str | None:
    """The value of a Colab Secret, or None when not in the Colab UI or the lookup fails or times out.

    In VS Code's Colab extension `google.colab.userdata.get` fails or blocks: it is treated as absent
    within `timeout` seconds. The value is never logged.
    """
    import sys
    if "google.colab" not in sys.modules:
        try:
            import google.colab  # noqa: F401  (only importable on Colab)
        except Exception:
            return None
    import threading

    result: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            from google.colab import userdata  # type: ignore
            result["value"] = userdata.get(name)
        except Exception as e:  # SecretNotFoundError, NotebookAccessError, TimeoutException, ...
            result["error"] = type(e).__name__
        finally:
            done.set()

    t = threading.Thread(target=lookup, name=f"colabkit-colab-secret-{name}", daemon=True)
    t.start()
    if not done.wait(timeout):
        log.info("Colab Secret %s: lookup timed out after %.1fs; treated as absent", name, timeout)
        return None
    if "error" in result:
        log.info("Colab Secret %s: not available (%s)", name, result["error"])
        return None
    value = result.get("value")
    return value or None


# -- Google credentials -------------------------------------------------------------------------
import json as _json
import os as _os
import stat as _stat
from dataclasses import dataclass as _dataclass, field as _field
from pathlib import Path as _Path

from .errors import CredentialsError

#: where a key file is looked for last
DEFAULT_KEY_FILE = "~/.secrets/colab-service-account.json"
COLAB_SECRET_NAME = "COLAB_SERVICE_ACCOUNT"


@_dataclass(frozen=True)
class GoogleCredentialSource:
    """Where Google credentials were found. `info` holds the key material and is never shown.

    Attributes:
        source: what supplied them: ``config``, ``COLABKIT_SERVICE_ACCOUNT``, ``GOOGLE_APPLICATION_CREDENTIALS``,
            ``Colab Secret COLAB_SERVICE_ACCOUNT`` or ``~/.secrets/colab-service-account.json``.
        kind: ``service_account`` or ``authorized_user``.
        path: the key file, when they came from a file.
        client_email: the service account's email (None for user credentials).
    """

    source: str
    kind: str
    path: str | None = None
    client_email: str | None = None
    info: dict = _field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> dict[str, Any]:
        """Safe to print: never key material."""
        return {"source": self.source, "kind": self.kind, "client_email": self.client_email, "path": self.path}


def _parse_credentials(text: str, *, source: str, path: str | None) -> GoogleCredentialSource:
    where = path or source
    try:
        info = _json.loads(text)
    except ValueError:
        raise CredentialsError(f"{where}: not valid JSON; download the service-account key again "
                               "(IAM → Service accounts → Keys → Add key → JSON)") from None
    if not isinstance(info, dict):
        raise CredentialsError(f"{where}: expected a JSON object (a service-account key or authorized-user file)")
    kind = info.get("type")
    if kind == "service_account":
        missing = [k for k in ("client_email", "private_key", "token_uri") if not info.get(k)]
        if missing:
            raise CredentialsError(f"{where}: the service-account key lacks {', '.join(missing)}; download a new "
                                   "JSON key for the service account")
        return GoogleCredentialSource(source, "service_account", path, str(info["client_email"]), info)
    if kind == "authorized_user":
        missing = [k for k in ("client_id", "client_secret", "refresh_token") if not info.get(k)]
        if missing:
            raise CredentialsError(f"{where}: the authorized-user file lacks {', '.join(missing)}; create it again "
                                   "(e.g. gcloud auth application-default login)")
        return GoogleCredentialSource(source, "authorized_user", path, None, info)
    raise CredentialsError(f"{where}: credentials of type {kind!r} are not supported; use a service-account key "
                           "(type service_account) or user credentials (type authorized_user)")


def check_key_permissions(path: str | _os.PathLike) -> str | None:
    """Warn (log) when a key file is readable by group or others; returns the warning text, or None."""
    try:
        mode = _os.stat(path).st_mode
    except OSError:
        return None
    if mode & (_stat.S_IRWXG | _stat.S_IRWXO):
        msg = (f"{path} is readable by other users (mode {_stat.S_IMODE(mode):o}); restrict it with: "
               f"chmod 600 {path}")
        log.warning("%s", msg)
        return msg
    return None


def _read_key_file(path: str, *, source: str) -> GoogleCredentialSource:
    p = _Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CredentialsError(f"{source}: {p} does not exist; fix the path or remove the setting") from None
    except OSError as e:
        raise CredentialsError(f"{source}: {p} cannot be read ({e.strerror}); check its permissions") from None
    check_key_permissions(p)
    return _parse_credentials(text, source=source, path=str(p))


def find_google_credentials(config: Any = None, *, colab_timeout: float = 2.0) -> GoogleCredentialSource | None:
    """Look up Google credentials; the first found wins.

    Order: the ``credentials:`` path in the config; ``COLABKIT_SERVICE_ACCOUNT`` (a path or the JSON itself);
    ``GOOGLE_APPLICATION_CREDENTIALS``; the Colab Secret ``COLAB_SERVICE_ACCOUNT`` (only inside the Colab UI;
    a failed or slow lookup counts as absent); ``~/.secrets/colab-service-account.json``.

    Args:
        config: a :class:`colabkit.config.Config` (or None).
        colab_timeout: seconds to wait for the Colab Secrets lookup.
    Returns:
        The source, or None when nothing was found.
    Raises:
        CredentialsError: a configured source exists but cannot be read or parsed (the message names it and
            never shows its content).
    """
    drive = getattr(config, "drive", None)
    cfg_path = getattr(drive, "credentials", None)
    if cfg_path:
        p = _Path(cfg_path).expanduser()
        root = getattr(config, "root", None)
        if not p.is_absolute() and root is not None:
            p = _Path(root) / p
        return _read_key_file(str(p), source="config")
    env = _os.environ.get("COLABKIT_SERVICE_ACCOUNT")
    if env and env.strip():
        if env.strip().startswith("{"):
            return _parse_credentials(env, source="COLABKIT_SERVICE_ACCOUNT", path=None)
        return _read_key_file(env.strip(), source="COLABKIT_SERVICE_ACCOUNT")
    gac = _os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if gac and gac.strip():
        return _read_key_file(gac.strip(), source="GOOGLE_APPLICATION_CREDENTIALS")
    value = colab_secret(COLAB_SECRET_NAME, timeout=colab_timeout)
    if value:
        return _parse_credentials(value, source=f"Colab Secret {COLAB_SECRET_NAME}", path=None)
    default = _Path(DEFAULT_KEY_FILE).expanduser()
    if default.is_file():
        return _read_key_file(str(default), source=DEFAULT_KEY_FILE)
    return None


def describe_google_credentials(config: Any = None) -> dict[str, Any] | None:
    """What ``colabkit config show`` / status print about Google credentials; never key material.

    Returns:
        ``{"source", "kind", "client_email", "path"}``, or None when none were found. A source that
        exists but is broken gives ``{"source": ..., "error": ...}``.
    """
    try:
        found = find_google_credentials(config)
    except CredentialsError as e:
        return {"source": None, "kind": None, "client_email": None, "path": None, "error": redact(str(e))}
    return found.describe() if found else None


def load_google_credentials(config: Any = None, *, scopes: tuple[str, ...] | None = None):
    """google-auth credentials from the first source :func:`find_google_credentials` finds.

    The token URI comes from the credentials file, so a test server (or another endpoint) can issue tokens.

    Returns:
        (credentials, GoogleCredentialSource).
    Raises:
        CredentialsError: none found, or they are malformed.
        MissingDependencyError: google-auth is not installed.
    """
    from .errors import MissingDependencyError
    if scopes is None:
        drive = getattr(config, "drive", None)
        scopes = tuple(getattr(drive, "scopes", ()) or ("https://www.googleapis.com/auth/drive.file",))
    found = find_google_credentials(config)
    if found is None:
        raise CredentialsError(
            "no Google credentials found; set drive.credentials in colabkit.yaml to a service-account key file, "
            "or set COLABKIT_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS, or add the Colab Secret "
            f"{COLAB_SECRET_NAME}, or put the key at {DEFAULT_KEY_FILE}")
    try:
        from google.oauth2 import credentials as user_credentials
        from google.oauth2 import service_account
    except ImportError as e:
        raise MissingDependencyError("google-auth", purpose="Google Drive access") from e
    try:
        if found.kind == "service_account":
            creds = service_account.Credentials.from_service_account_info(found.info, scopes=list(scopes))
        else:
            # built directly: from_authorized_user_info ignores the file's token_uri in current google-auth
            info = found.info
            creds = user_credentials.Credentials(
                token=None, refresh_token=info["refresh_token"], client_id=info["client_id"],
                client_secret=info["client_secret"],
                token_uri=info.get("token_uri") or "https://oauth2.googleapis.com/token", scopes=list(scopes),
                quota_project_id=info.get("quota_project_id"))
    except (ValueError, KeyError, TypeError) as e:
        # the library's message may quote the key; say only what kind of problem it is
        raise CredentialsError(f"{found.path or found.source}: the {found.kind} credentials could not be loaded "
                               f"({type(e).__name__}); download a new key") from None
    return creds, found
