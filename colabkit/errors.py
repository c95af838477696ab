"""Every exception colabkit raises, and nothing else.

Each error inherits :class:`ColabkitError` and the builtin that fits, so callers can catch either.
A message says what failed, shows the bad value and names the next step; it never holds a secret.
"""
from __future__ import annotations

from typing import Any


class ColabkitError(Exception):
    """Root of every colabkit error."""


class MissingDependencyError(ColabkitError, ImportError):
    """An optional third-party package is not installed."""

    def __init__(self, package: str, *, purpose: str, pip_name: str | None = None) -> None:
        self.package = package
        self.pip_name = pip_name or package
        super().__init__(f"{purpose} needs the '{package}' package; install it with: pip install {self.pip_name}")


class ConfigError(ColabkitError, ValueError):
    """colabkit.yaml (or a value passed in) is invalid: `key` is the key path, `value` the bad value."""

    def __init__(self, message: str, *, key: str | None = None, value: Any = None, source: str | None = None) -> None:
        self.key = key
        self.value = value
        self.source = source
        super().__init__(message)


class UnknownExperimentError(ConfigError, LookupError):
    """An experiment that is not here (no ``experiments/<name>/`` folder), or none could be chosen.

    `key` is ``experiment``, `value` the name asked for; `known` lists the experiments there are.
    """

    def __init__(self, message: str, *, value: Any = None, known: tuple[str, ...] = ()) -> None:
        self.known = tuple(known)
        super().__init__(message, key="experiment", value=value)


class CredentialsError(ColabkitError):
    """Credentials are missing, unreadable or rejected. The message never contains the secret."""


class IntegrityError(ColabkitError, ValueError):
    """A file's content does not match the hash or size it was recorded with."""

    kind = "integrity"

    def __init__(self, message: str, *, path: str | None = None, expected: str | None = None,
                 actual: str | None = None) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(message)


#: the one classification of remote failures (see :func:`error_kind`)
ERROR_KINDS = ("transient", "auth", "permission", "quota", "not_found", "integrity", "error")


class RemoteError(ColabkitError, OSError):
    """A storage tier failed. `remote` names the tier, `path` the remote path (if any).

    `kind` classifies the failure the same way for every remote, decided where the third-party error is
    wrapped: ``transient`` (5xx, 429, a dropped connection, a token endpoint that is briefly down: retry
    with back-off), ``auth`` (credentials rejected), ``permission`` (valid credentials that may not do
    this), ``quota`` (storage or an upload cap is full), ``not_found``, ``error`` (anything else; retried
    by the sync engine like a transient one). `transient` is ``kind == "transient"``;
    `retry_after` is the server's requested delay in seconds, when it sent one.
    """

    kind = "error"
    transient = False

    def __init__(self, message: str, *, remote: str | None = None, path: str | None = None,
                 retry_after: float | None = None) -> None:
        self.remote = remote
        self.path = path
        self.retry_after = retry_after
        OSError.__init__(self, message)

    def __str__(self) -> str:  # OSError's __str__ would add errno formatting
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):  # keep the keyword fields when pickled (child processes, futures)
        return (_rebuild_remote_error, (type(self), str(self), self.remote, self.path, self.retry_after))


def _rebuild_remote_error(cls, message, remote, path, retry_after):
    return cls(message, remote=remote, path=path, retry_after=retry_after)


class TransientRemoteError(RemoteError):
    """A remote failure worth retrying with back-off (5xx, 429, timeouts, dropped connections)."""

    kind = "transient"
    transient = True


class RemoteAuthError(RemoteError):
    """The credentials were rejected (invalid or expired token, bad key)."""

    kind = "auth"


class RemotePermissionError(RemoteError, PermissionError):
    """The credentials are valid but may not do this (folder not shared, read-only token)."""

    kind = "permission"


class RemoteNotFoundError(RemoteError, FileNotFoundError):
    """The remote path, folder or repository does not exist."""

    kind = "not_found"


class RemoteQuotaError(RemoteError):
    """Storage quota or a daily upload cap is exhausted: the tier stops instead of retrying."""

    kind = "quota"


def error_kind(e: BaseException) -> str:
    """The classification of `e` (one of :data:`ERROR_KINDS`): a RemoteError's `kind`, ``integrity`` for
    an IntegrityError, ``not_found`` for another FileNotFoundError, ``error`` for anything else."""
    k = getattr(e, "kind", None)
    if isinstance(e, (RemoteError, IntegrityError)) and k in ERROR_KINDS:
        return k
    if isinstance(e, FileNotFoundError):
        return "not_found"
    return "error"


class RemoteUploadCapError(RemoteQuotaError):
    """A daily upload cap is reached (Drive: about 750 GB per account per rolling day). Unlike a full quota it
    frees itself: the sync tier pauses and tries again later (``retry_after`` seconds, when known)."""


class UploadCancelled(ColabkitError):
    """An elected upload stopped at a chunk boundary because another worker's verified copy won (see
    :mod:`colabkit.elect`); what it had started is cleaned up. Not a failure: the tier holds the checkpoint."""


class CheckpointError(ColabkitError):
    """A checkpoint could not be written or read."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """No valid checkpoint was found where one was looked for."""


class DiskFullError(CheckpointError, OSError):
    """Not enough free space. `free` and `needed` are in bytes."""

    def __init__(self, message: str, *, path: str | None = None, free: int | None = None,
                 needed: int | None = None) -> None:
        self.path = path
        self.free = free
        self.needed = needed
        OSError.__init__(self, message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SyncError(ColabkitError):
    """The background sync could not start or a flush did not finish."""


class ResumeError(ColabkitError):
    """No source could provide a checkpoint to resume from."""


class AirlockError(ColabkitError):
    """Exporting, pulling or importing an experiment failed."""


class NoBundleError(AirlockError, LookupError):
    """No bundle of the experiment was exported to the airlock remote yet (nothing to pull)."""


class DirtyTreeError(AirlockError):
    """The experiment has uncommitted or untracked files."""


class SecretInBundleError(AirlockError):
    """A file that would be bundled holds or is a secret."""


class UnsafeBundleError(AirlockError):
    """A bundle holds an entry that could escape the target or is not a plain file."""


class TrainError(ColabkitError):
    """A %train run failed."""


class PreflightError(TrainError):
    """A check before training failed; the message says what to do."""


class OutOfMemoryError(TrainError, MemoryError):
    """The run ran out of memory; it is not restarted."""


class TriggerError(ColabkitError):
    """A trigger's queue entry cannot be acted on as asked (unknown id, retry of a running entry), or the
    queue cannot be read or written. Bad rules are :class:`ConfigError`."""


class JournalError(ColabkitError, ValueError):
    """A journal entry cannot be written as asked (an empty name, a package that is not installed, no reason)."""


class InitError(ColabkitError, ValueError):
    """``colabkit init`` cannot scaffold here (a file in the way, a bad experiment name)."""


class DataError(ColabkitError):
    """A data set cannot be fetched, found or evicted as asked (the message names the fix)."""


class ReleaseError(ColabkitError):
    """The runtime was not released: a check failed (the message says which and what may be lost)."""
