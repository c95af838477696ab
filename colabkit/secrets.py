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

_SECRET_KEYS = re.compile(r"(token|secret|password|private_key|api_key|apikey|assertion|refresh|credential_json)",
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
    import concurrent.futures
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
