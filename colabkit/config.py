"""colabkit.yaml -> frozen dataclasses.

The file is found by walking up from the working directory (or named by ``COLABKIT_CONFIG``, or passed
in). No file at all is a valid configuration: every tier is then a local folder under the colabkit home
(``COLABKIT_HOME``, default ``~/.colabkit``). Errors name the key path, the bad value and what is allowed::

    tiers[1].every: '3 hourz' is not a duration; use e.g. 90m or 2h
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError, UnknownExperimentError

CONFIG_NAME = "colabkit.yaml"
STATE_DIR = ".colabkit"

# -- units --------------------------------------------------------------------------------------
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|secs|seconds?|m|min|mins|minutes?|h|hr|hrs|hours?|d|days?)?\s*$",
                       re.IGNORECASE)
_DUR_FACTOR = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
                "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}


def parse_duration(value: Any, *, key: str = "duration") -> float:
    """Seconds from a number or a string such as ``90m``, ``2h``, ``45s``, ``1.5h``.

    Raises:
        ConfigError: ``{key}: '3 hourz' is not a duration; use e.g. 90m or 2h``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a duration; use e.g. 90m or 2h", key=key, value=value)
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: {value!r} is negative; use e.g. 90m or 2h", key=key, value=value)
        return float(value)
    m = _DURATION.match(str(value)) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a duration; use e.g. 90m or 2h", key=key, value=value)
    unit = (m.group(2) or "s").lower()
    unit = "ms" if unit == "ms" else unit[0]
    return float(m.group(1)) * _DUR_FACTOR[unit]


def check_every(seconds: float, *, key: str = "every") -> float:
    """`seconds` if it is a usable sync interval (longer than 0: a pass scans every watched file, and with no
    pause between passes a sync kept a CPU busy for nothing, as ``every: 0`` did).

    Raises:
        ConfigError: ``tiers[0].every: 0 must be longer than 0 ...``.
    """
    if seconds <= 0:
        from .runtime import command
        raise ConfigError(f"{key}: {duration_setting(seconds)} must be longer than 0 (with no pause between passes "
                          f"a sync keeps a CPU busy scanning); use e.g. 5m, or `{command('sync flush')}` to upload "
                          "now", key=key, value=seconds)
    return seconds


def parse_size(value: Any, *, key: str = "size") -> int:
    """Bytes from a number or a string such as ``20GB``, ``512MiB``, ``100k``.

    Raises:
        ConfigError: ``{key}: 'lots' is not a size; use e.g. 500MB or 20GB``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a size; use e.g. 500MB or 20GB", key=key, value=value)
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{key}: {value!r} is negative; use e.g. 500MB or 20GB", key=key, value=value)
        return int(value)
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a size; use e.g. 500MB or 20GB", key=key, value=value)
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _SIZE_FACTOR[unit])


def format_size(n: int | float | None) -> str:
    """``1.5 GB`` style, for messages."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_duration(seconds: float | None) -> str:
    """``1h 30m`` style, for messages."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if m else f"{h}h"


def duration_setting(seconds: float) -> str:
    """Seconds as a user writes them in colabkit.yaml, and :func:`parse_duration` reads back: 5400 -> ``90m``."""
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        n = seconds / _DUR_FACTOR[unit]
        if n == int(n):
            return f"{int(n)}{unit}"
    ms = seconds * 1000
    return f"{int(ms)}ms" if ms == int(ms) else f"{seconds!r}s"


_SIZE_UNITS = (("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
               ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def size_setting(n: int) -> str | int:
    """Bytes as a user writes them in colabkit.yaml, and :func:`parse_size` reads back: 10**8 -> ``100MB``,
    16 MiB -> ``16MiB``; a number no unit divides stays a number of bytes."""
    for unit, factor in _SIZE_UNITS:
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return int(n)


# -- dataclasses ---------------------------------------------------------------------------------
CHECKPOINT_PATTERNS = ("*.pt", "*.pth", "*.bin", "*.safetensors", "*.ckpt", "*.pt.json")
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive.file"


@dataclass(frozen=True)
class DriveConfig:
    """Google Drive connection (used by tiers whose ``remote`` is ``drive``, and the airlock)."""

    folder_id: str | None = None
    credentials: str | None = None          # path to a service-account or authorized-user JSON
    endpoint: str | None = None             # replaces https://www.googleapis.com/ (or COLABKIT_DRIVE_ENDPOINT)
    scopes: tuple[str, ...] = (DRIVE_SCOPE,)
    chunk_size: int = 16 * 1024 * 1024      # resumable-upload chunk, a multiple of 256 KiB
    timeout: float = 60.0
    #: bytes a Drive tier uploads per rolling 24 h before it pauses (Drive refuses more than ~750 GB a day per
    #: account); 0 turns the count off (Drive's own answer still pauses the tier)
    daily_upload_cap: int = 700 * 10**9

    @property
    def configured(self) -> bool:
        return bool(self.folder_id)


@dataclass(frozen=True)
class HubConfig:
    """Hugging Face Hub connection (used by tiers whose ``remote`` is ``hub``)."""

    repo_id: str | None = None
    repo_type: str = "model"
    private: bool = True
    revision: str = "main"
    endpoint: str | None = None             # else HF_ENDPOINT, else https://huggingface.co
    path_prefix: str = ""                   # a folder inside the repo
    keep: int | None = None                 # keep this many checkpoints at the tip (history keeps the rest)

    @property
    def configured(self) -> bool:
        return bool(self.repo_id)


@dataclass(frozen=True)
class TierConfig:
    """One sync tier.

    ``remote`` is ``local``, ``drive`` or ``hub``. A ``drive``/``hub`` tier whose connection is not
    configured (no ``drive.folder_id`` / ``hub.repo_id``) falls back to a local folder under the
    colabkit home, so the whole loop runs with no credentials.
    """

    name: str
    remote: str = "local"
    path: str | None = None                 # local tiers: the folder (default <home>/remotes/<name>)
    every: float = 5400.0
    include: tuple[str, ...] = ("**",)
    exclude: tuple[str, ...] = ()
    max_file_size: int | None = None
    latest_only: bool = False
    keep: int | None = None                 # hub tiers: checkpoints kept at the tip (None: keep all)


@dataclass(frozen=True)
class RetentionConfig:
    keep_local: int = 3
    require_remote: tuple[str, ...] = ()    # tier names that must hold a verified copy; () = any one remote
    min_free: int = 2 * 10**9


@dataclass(frozen=True)
class ResumeConfig:
    priority: tuple[str, ...] = ("local", "drive", "hub")
    policy: str = "newest"                  # newest | first
    # a source that may hold a newer checkpoint but cannot be reached (transient errors past the deadline):
    # wait (retry until `deadline`, then fail), older (say so loudly and resume from the best reachable one), fail
    on_unreachable: str = "wait"
    deadline: float = 600.0                 # seconds resume retries transient errors (locate, then fetch)


@dataclass(frozen=True)
class WorkersConfig:
    """``sync.workers``: this machine is one of `group` workers holding the same checkpoints (see
    docs/distributed.md, "Elected upload"); a few of them, chosen per checkpoint, upload it."""

    id: int                                 # this worker, 0 .. group-1 (default: GROUP_RANK under torchrun)
    group: int                              # how many workers (default: WORLD_SIZE / LOCAL_WORLD_SIZE)
    uploaders: int                          # elected per checkpoint (default: a third of the group, 1..16)
    takeover_after: float = 1800.0          # the next workers take over when no verified copy appears by then
    run: str = ""                           # what the workers share (default: TORCHELASTIC_RUN_ID, else project)


def default_uploaders(group: int) -> int:
    """A third of the group (rounded down, as Psyche does), at least 1, at most 16."""
    return max(1, min(16, group // 3))


@dataclass(frozen=True)
class SyncConfig:
    watch: tuple[str, ...] = ("checkpoints", "logs", "journal.md")
    settle: float = 5.0                     # a file without a manifest is complete once stable this long
    poll: bool | None = None                # force the polling observer (None: auto, poll on FUSE/network)
    poll_interval: float = 10.0
    retry_initial: float = 5.0
    retry_max: float = 600.0
    flush_timeout: float = 600.0            # deadline for the flush at exit / SIGTERM
    workers: WorkersConfig | None = None    # elected upload among several workers (None: this one uploads all)


@dataclass(frozen=True)
class AirlockConfig:
    remote: str | None = None               # tier name; default: the drive tier (first drive tier)
    exclude: tuple[str, ...] = ()
    max_unpacked: int = 2 * 10**9


@dataclass(frozen=True)
class DataSetConfig:
    """One data set declared under ``data.sets`` (see docs/data.md)."""

    name: str
    source: str
    version: str | None = None              # None: derived from the source's file list (or "unversioned")
    preprocessing: str | None = None        # what was done to it, for the journal
    unpack: str = "none"                    # tar | zip | none
    sha256: Mapping[str, str] | str | None = None   # per file path, or one digest for a one-file source


@dataclass(frozen=True)
class DataConfig:
    cache: str | None = None                # None: /content/data on Colab, /data on the VM when writable, else <home>/data
    min_free: int = 10**9                   # free space a fetch must leave on the cache's disk
    max_unpacked: int = 500 * 10**9         # an archive unpacking to more is refused
    sets: tuple[DataSetConfig, ...] = ()

    def get(self, name: str) -> DataSetConfig | None:
        return next((d for d in self.sets if d.name == name), None)


@dataclass(frozen=True)
class ReleaseConfig:
    command: str | None = None              # None: google.colab.runtime.unassign() on Colab, shutdown -h +2 on a VM
    idle_after: float | None = None         # release an idle VM after this long (None: never)
    tiers: tuple[str, ...] | None = None    # tiers that must hold the final checkpoint and logs (None: all)


@dataclass(frozen=True)
class TrainConfig:
    max_restarts: int = 3
    restart_backoff: float = 10.0
    stall_after: float = 1800.0
    grace: float = 30.0                     # SIGTERM -> SIGKILL
    max_vram: int | None = None             # None: the tier default (20 GB on an L4-class GPU)
    min_free_disk: int = 10 * 10**9
    data_paths: tuple[str, ...] = ()
    step_regex: str | None = None
    loss_regex: str | None = None
    checkpoint_regex: str | None = None
    total_steps: int | None = None
    data: tuple[str, ...] = ()              # data sets (data.sets names) a run needs on the local disk
    nproc_per_node: int | str = 1           # ranks per node under torchrun (1: no torchrun; "auto": one per GPU)


@dataclass(frozen=True)
class DashboardConfig:
    refresh: float = 2.0                    # the live view redraws this often while a run or sync is active
    resume_max_age: float = 600.0           # the resume sources are asked again once their answer is this old


@dataclass(frozen=True)
class Config:
    """The effective configuration. ``root`` is the project folder (where colabkit.yaml is, else cwd)."""

    root: Path
    source: Path | None = None
    project: str = ""
    home: Path = field(default_factory=lambda: default_home())
    experiments: str = "experiments"       # experiments/vXX/{train.py, models/, logs/, checkpoints/}
    checkpoints: str = "checkpoints"        # inside an experiment (or the root, without one)
    logs: str = "logs"
    tiers: tuple[TierConfig, ...] = ()
    drive: DriveConfig = field(default_factory=DriveConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    airlock: AirlockConfig = field(default_factory=AirlockConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    triggers: tuple["TriggerRule", ...] = ()
    #: the ``triggers:`` rules as written in colabkit.yaml, for ``config show`` (not part of equality)
    triggers_written: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    data: DataConfig = field(default_factory=DataConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    @property
    def state_dir(self) -> Path:
        """The project's ``.colabkit/`` folder (ledger, logs of background work, job state)."""
        return self.root / STATE_DIR

    def experiment_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>``.

        Raises:
            ConfigError: `experiment` is a template placeholder nothing filled in (``{{experiment}}``; IPython
                turns it into ``{experiment}`` in a magic's line): the raw template, never a folder name.
        """
        if isinstance(experiment, str) and ("{" in experiment or "}" in experiment):
            raise ConfigError(f"{experiment!r} is a template placeholder left unrendered, not an experiment name: "
                              "this comes from the raw template; run 'colabkit init' and use the notebook.ipynb "
                              "it writes, or put the experiment's folder name (e.g. v01) in its place",
                              key="experiment", value=experiment)
        return self.root / self.experiments / experiment

    def experiment_names(self) -> list[str]:
        """The experiments here: the folders under ``experiments/`` (sorted; none when it does not exist)."""
        try:
            return sorted(p.name for p in (self.root / self.experiments).iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []

    def require_experiment(self, experiment: str) -> Path:
        """The folder of `experiment`, which must exist: the one check every command that takes an experiment
        makes (train, resume, status, airlock export/import/status, journal).

        Raises:
            ConfigError: not a folder name (``'../x' is not an experiment name; ...``).
            UnknownExperimentError: ``unknown experiment 'v99': .../experiments/v99 does not exist (experiments
                here: v01); create it with 'colabkit init --experiment v99' or pull it with 'colabkit airlock
                pull v99'`` (the commands written as the user types them there: ``%airlock pull v99`` in IPython).
        """
        check_experiment_name(experiment)
        d = self.experiment_dir(experiment)
        if not d.is_dir():
            from .runtime import command
            known = self.experiment_names()
            raise UnknownExperimentError(
                f"unknown experiment {experiment!r}: {d} does not exist "
                f"({'experiments here: ' + ', '.join(known) if known else 'no experiments yet'}); "
                f"create it with '{command('init --experiment ' + experiment)}' or pull it with "
                f"'{command('airlock pull ' + experiment)}'", value=experiment, known=tuple(known))
        return d

    def select_experiment(self, experiment: str | None = None, *, env: bool = True) -> "ExperimentChoice":
        """Which experiment a command means: the one named, else ``$COLABKIT_EXPERIMENT``, else the only one
        here, else the one with the newest checkpoint or run (said so in `reason`).

        A project without an ``experiments/`` folder keeps its checkpoints at the root: the choice is then
        ``name=None`` (``<root>/checkpoints``). A folder that no experiment uses is never chosen while
        experiments exist.

        Raises:
            UnknownExperimentError: the named experiment is not here; or several are and none has a checkpoint
                or a run yet (the message lists them and says how to name one).
        """
        if experiment is None and env:
            experiment = os.environ.get("COLABKIT_EXPERIMENT") or None
            if experiment is not None:
                self.require_experiment(experiment)
                return ExperimentChoice(experiment, "from $COLABKIT_EXPERIMENT")
        if experiment is not None:
            self.require_experiment(experiment)
            return ExperimentChoice(experiment, None)
        names = self.experiment_names()
        if not names:
            return ExperimentChoice(None, "no experiments here: the project's own checkpoints folder")
        if len(names) == 1:
            return ExperimentChoice(names[0], "the only experiment here")
        activity = {n: self._last_activity(n) for n in names}
        newest = max(names, key=lambda n: (activity[n], n))
        if activity[newest] <= 0:
            raise UnknownExperimentError(
                f"{len(names)} experiments here ({', '.join(names)}) and none has a checkpoint or a run yet; "
                f"name one with --experiment (-e), e.g. -e {names[-1]}", known=tuple(names))
        others = [n for n in names if n != newest]
        return ExperimentChoice(newest, f"the newest checkpoint or run of {len(names)} experiments; the others: "
                                        f"{', '.join(others)} (name one with -e)")

    def _last_activity(self, experiment: str) -> float:
        """The newest mtime among the experiment's checkpoints and run folders (0: none)."""
        newest = 0.0
        for d in (self.checkpoint_dir(experiment), self.log_dir(experiment)):
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                if e.name.startswith("."):
                    continue
                try:
                    newest = max(newest, e.stat().st_mtime)
                except OSError:
                    continue
        return newest

    def checkpoint_dir(self, experiment: str | None = None) -> Path:
        """Where a run's checkpoints live: ``experiments/vXX/checkpoints``, or ``<root>/checkpoints``."""
        base = self.experiment_dir(experiment) if experiment else self.root
        return base / self.checkpoints

    def log_dir(self, experiment: str | None = None) -> Path:
        """Where a run's logs live: ``experiments/vXX/logs``, or ``<root>/logs``."""
        base = self.experiment_dir(experiment) if experiment else self.root
        return base / self.logs

    def remote_path(self, local: str | os.PathLike) -> str:
        """The remote path of a local file: its path relative to the project root, POSIX style.

        Every tier stores a file under the same relative path, so sync, resume and the airlock agree.
        """
        p = Path(local)
        # the folder resolved, the name kept: a symlink in a watched folder is stored under its own name (its
        # target may be anywhere), and a symlink loop cannot make this fail
        p = p.parent.resolve() / p.name if p.name not in ("", ".", "..") else p.resolve()
        try:
            return p.relative_to(self.root).as_posix()
        except ValueError:
            raise ConfigError(f"{p} is outside the project root {self.root}; keep synced folders inside it",
                              key="sync.watch", value=str(p)) from None

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise ConfigError(f"no tier named {name!r}; configured tiers: {', '.join(t.name for t in self.tiers) or 'none'}",
                          key="tiers", value=name)

    def with_changes(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def as_yaml_data(self) -> dict[str, Any]:
        """The configuration as the keys and values of a colabkit.yaml: durations as ``90m``, sizes as ``100MB``.

        Loading it back (``load_config(data=...)`` at the same root) gives an equal :class:`Config`; ``root`` and
        ``source`` are where the file is, not keys in it.
        """
        out = _settings(self)
        out.pop("root", None)
        out.pop("source", None)
        written = out.pop("triggers_written", None)
        if "triggers" in out and written is not None and len(written) == len(self.triggers):
            out["triggers"] = written  # a rule's parsed form is not what colabkit.yaml accepts: show it as written
        return out

    def as_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain data for ``colabkit config show``; secrets (credential values, tokens) are redacted."""
        from .secrets import redact_config
        d = _plain(self)
        d.pop("triggers_written", None)
        return redact_config(d) if redact else d


@dataclass(frozen=True)
class ExperimentChoice:
    """The answer of :meth:`Config.select_experiment`.

    Attributes:
        name: the experiment, or None for a project without experiments (``<root>/checkpoints``).
        reason: why it was chosen when the user did not name it (None: named), for the output.
    """

    name: str | None
    reason: str | None


def check_experiment_name(experiment: Any) -> str:
    """`experiment` if it can be a folder name under ``experiments/``.

    Raises:
        ConfigError: ``'../x' is not an experiment name; use the folder name under experiments/, e.g. v01``.
    """
    if (not isinstance(experiment, str) or not experiment or "/" in experiment or "\\" in experiment
            or experiment in (".", "..") or experiment.startswith("-")):
        raise ConfigError(f"{experiment!r} is not an experiment name; use the folder name under experiments/, "
                          "e.g. v01", key="experiment", value=experiment)
    return experiment


#: fields written with a unit in colabkit.yaml, by dataclass
_UNITS: dict[str, dict[str, str]] = {
    "TierConfig": {"every": "duration", "max_file_size": "size"},
    "DriveConfig": {"chunk_size": "size", "timeout": "duration"},
    "RetentionConfig": {"min_free": "size"},
    "SyncConfig": {"settle": "duration", "poll_interval": "duration", "retry_initial": "duration",
                   "retry_max": "duration", "flush_timeout": "duration"},
    "AirlockConfig": {"max_unpacked": "size"},
    "TrainConfig": {"restart_backoff": "duration", "stall_after": "duration", "grace": "duration",
                    "max_vram": "size", "min_free_disk": "size"},
    "DataConfig": {"min_free": "size", "max_unpacked": "size"},
    "ReleaseConfig": {"idle_after": "duration"},
}


def _settings(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        units = _UNITS.get(type(obj).__name__, {})
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            unit = units.get(f.name)
            if v is not None and unit == "duration":
                out[f.name] = duration_setting(v)
            elif v is not None and unit == "size":
                out[f.name] = size_setting(v)
            else:
                out[f.name] = _settings(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_settings(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: _settings(v) for k, v in obj.items()}
    return _plain(obj)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def default_home() -> Path:
    return Path(os.environ.get("COLABKIT_HOME") or Path.home() / ".colabkit").expanduser()


def default_tiers() -> tuple[TierConfig, ...]:
    """The protocol's defaults: logs and small assets to Drive every 90 minutes, weights to the Hub every 3 hours."""
    return (
        TierConfig(name="drive", remote="drive", every=5400.0, include=("**",),
                   exclude=CHECKPOINT_PATTERNS, max_file_size=100 * 10**6),
        TierConfig(name="hub", remote="hub", every=10800.0, include=CHECKPOINT_PATTERNS, latest_only=True),
    )


# -- loading -------------------------------------------------------------------------------------
def find_config(start: str | os.PathLike | None = None) -> Path | None:
    """``COLABKIT_CONFIG`` if set, else the first colabkit.yaml walking up from `start` (default cwd)."""
    env = os.environ.get("COLABKIT_CONFIG")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise ConfigError(f"COLABKIT_CONFIG: {env!r} does not exist; point it at a colabkit.yaml or unset it",
                              key="COLABKIT_CONFIG", value=env)
        return p
    d = Path(start or os.getcwd()).resolve()
    for p in (d, *d.parents):
        candidate = p / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def load_config(path: str | os.PathLike | None = None, *, start: str | os.PathLike | None = None,
                data: Mapping[str, Any] | None = None) -> Config:
    """Load the effective configuration.

    Args:
        path: a colabkit.yaml to read; default: :func:`find_config`.
        start: where to start looking when `path` is not given (default: cwd).
        data: an already-parsed mapping (tests, notebooks); `start` is then the root.
    Returns:
        A frozen :class:`Config`.
    Raises:
        ConfigError: naming the key path, the bad value and what is allowed.

    Example:
        >>> cfg = load_config()          # no file: local-folder tiers under ~/.colabkit
        >>> cfg.tier("hub").every
        10800.0
    """
    source: Path | None = None
    if data is None:
        source = Path(path).expanduser() if path is not None else find_config(start)
        if source is not None:
            if not source.is_file():
                from .runtime import command
                raise ConfigError(f"{source}: no such file; create it with '{command('init')}' or pass another path",
                                  key=None, value=str(source))
            data = _read_yaml(source)
        else:
            data = {}
    root = (source.parent if source is not None else Path(start or os.getcwd())).resolve()
    return _build(data, root=root, source=source)


def _read_yaml(path: Path) -> Mapping[str, Any]:
    import yaml
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem}); fix the syntax there",
                          source=str(path)) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror}); check the path and its permissions",
                          source=str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it "
                          "as UTF-8", source=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}",
                          source=str(path), value=data)
    return data


class _Reader:
    """Reads one mapping, tracking the key path for error messages and rejecting unknown keys."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'top level'}: {data!r} must be a mapping of keys",
                              key=path, value=data)
        self.data = dict(data)
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def raw(self, name: str, default: Any) -> Any:
        self.used.add(name)
        v = self.data.get(name, default)
        return default if v is None and default is not None else v

    def str(self, name: str, default: str | None, *, choices: tuple[str, ...] | None = None) -> str | None:
        v = self.raw(name, default)
        if v is None:
            return None
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ConfigError(f"{self.key(name)}: {v!r} must be a string", key=self.key(name), value=v)
        v = str(v)
        if choices and v not in choices:
            raise ConfigError(f"{self.key(name)}: {v!r} is not allowed; use one of {', '.join(choices)}",
                              key=self.key(name), value=v)
        return v

    def bool(self, name: str, default: bool) -> bool:
        v = self.raw(name, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.key(name)}: {v!r} must be true or false", key=self.key(name), value=v)
        return v

    def int(self, name: str, default: int | None, *, minimum: int = 0) -> int | None:
        v = self.raw(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{self.key(name)}: {v!r} must be a whole number >= {minimum}",
                              key=self.key(name), value=v)
        return v

    def duration(self, name: str, default: float | None) -> float | None:
        v = self.raw(name, default)
        return None if v is None else parse_duration(v, key=self.key(name))

    def interval(self, name: str, default: float | None) -> float | None:
        """A tier's `every`: a duration longer than 0 (see :func:`check_every`)."""
        v = self.duration(name, default)
        return None if v is None else check_every(v, key=self.key(name))

    def size(self, name: str, default: int | None) -> int | None:
        v = self.raw(name, default)
        return None if v is None else parse_size(v, key=self.key(name))

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.raw(name, default)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{self.key(name)}: {v!r} must be a list of strings", key=self.key(name), value=v)
        return tuple(v)

    def section(self, name: str) -> "_Reader":
        return _Reader(self.raw(name, None), self.key(name))

    def done(self, allowed_extra: tuple[str, ...] = ()) -> None:
        unknown = sorted(set(self.data) - self.used - set(allowed_extra), key=str)
        if unknown:
            import difflib
            k = self.key(unknown[0])
            names = sorted(self.used | set(allowed_extra))
            close = difflib.get_close_matches(str(unknown[0]), names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{k}: unknown key{hint}; allowed here: {', '.join(names)}", key=k,
                              value=self.data[unknown[0]])


_REMOTES = ("local", "drive", "hub")


def _env_int(*names: str) -> tuple[int | None, str | None]:
    for n in names:
        v = (os.environ.get(n) or "").strip()
        if v:
            try:
                return int(v), n
            except ValueError:
                raise ConfigError(f"{n}={v!r} (the environment) is not a whole number", key=n, value=v) from None
    return None, None


def _workers(w: "_Reader", raw: Any, *, project: str) -> WorkersConfig | None:
    """``sync.workers``: id and group (given, or from torchrun's environment), uploaders, takeover_after."""
    if raw is None:
        return None
    gid, gsrc = _env_int("COLABKIT_WORKER_ID", "GROUP_RANK")
    group_env, _ = _env_int("COLABKIT_WORKER_GROUP")
    if group_env is None:
        ws, _ = _env_int("WORLD_SIZE")
        lws, _ = _env_int("LOCAL_WORLD_SIZE")
        if ws and lws and ws % lws == 0:
            group_env = ws // lws
    group = w.int("group", group_env, minimum=1)
    if group is None:
        raise ConfigError("sync.workers.group: missing; give the number of workers (e.g. torchrun's --nnodes), "
                          "or set COLABKIT_WORKER_GROUP", key="sync.workers.group", value=None)
    wid = w.int("id", gid, minimum=0)
    if wid is None:
        raise ConfigError("sync.workers.id: missing; give this worker's number, 0 to group - 1 (torchrun's "
                          "GROUP_RANK), or set COLABKIT_WORKER_ID", key="sync.workers.id", value=None)
    if wid >= group:
        raise ConfigError(f"sync.workers.id: {wid} must be below sync.workers.group ({group}); workers are numbered "
                          f"0 to {group - 1}", key="sync.workers.id", value=wid)
    up = w.int("uploaders", default_uploaders(group), minimum=1)
    if up > group:
        raise ConfigError(f"sync.workers.uploaders: {up} must be between 1 and sync.workers.group ({group})",
                          key="sync.workers.uploaders", value=up)
    takeover = w.duration("takeover_after", WorkersConfig.takeover_after)
    if takeover <= 0:
        raise ConfigError(f"sync.workers.takeover_after: {w.raw('takeover_after', None)!r} must be longer than 0; "
                          "use e.g. 30m", key="sync.workers.takeover_after", value=takeover)
    run = w.str("run", None) or (os.environ.get("TORCHELASTIC_RUN_ID") or "").strip() or project
    if not run:
        raise ConfigError("sync.workers.run: missing and there is no project name; give the run a name every "
                          "worker shares", key="sync.workers.run", value=None)
    if "/" in run or run.startswith("."):
        raise ConfigError(f"sync.workers.run: {run!r} must be a plain name (no '/', not starting with '.')",
                          key="sync.workers.run", value=run)
    w.done()
    return WorkersConfig(id=wid, group=group, uploaders=up, takeover_after=takeover, run=run)


def _tier(data: Any, index: int, default: TierConfig | None) -> TierConfig:
    r = _Reader(data, f"tiers[{index}]")
    name = r.str("name", default.name if default else None)
    if not name:
        raise ConfigError(f"tiers[{index}].name: missing; give each tier a name such as drive or hub",
                          key=f"tiers[{index}].name", value=None)
    base = default or next((t for t in default_tiers() if t.name == name), None) or TierConfig(name=name)
    remote = r.str("remote", base.remote if base.name == name else name if name in _REMOTES else "local",
                   choices=_REMOTES)
    t = TierConfig(
        name=name, remote=remote, path=r.str("path", base.path),
        every=r.interval("every", base.every),
        include=r.strings("include", base.include), exclude=r.strings("exclude", base.exclude),
        max_file_size=r.size("max_file_size", base.max_file_size),
        latest_only=r.bool("latest_only", base.latest_only), keep=r.int("keep", base.keep, minimum=1))
    r.done()
    if t.keep is not None and t.remote != "hub":
        # only the Hub deletes by itself (from the repo's tip; its history keeps the rest): a keep elsewhere would be
        # silently ignored while the user counts on it
        raise ConfigError(f"tiers[{index}].keep: {t.keep} applies to hub tiers only; a {t.remote} tier keeps every "
                          f"checkpoint it receives. Remove keep from tier {name!r} (retention.keep_local limits the "
                          "local disk)", key=f"tiers[{index}].keep", value=t.keep)
    return t


def _build(data: Mapping[str, Any], *, root: Path, source: Path | None) -> Config:
    top = _Reader(data, "")
    home_s = top.str("home", None)
    home = Path(home_s).expanduser() if home_s else default_home()
    if not home.is_absolute():
        home = root / home

    raw_tiers = top.raw("tiers", None)
    if raw_tiers is None:
        tiers = default_tiers()
    else:
        if not isinstance(raw_tiers, list):
            raise ConfigError(f"tiers: {raw_tiers!r} must be a list of tiers", key="tiers", value=raw_tiers)
        tiers = tuple(_tier(t, i, None) for i, t in enumerate(raw_tiers))
        names = [t.name for t in tiers]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ConfigError(f"tiers: the name {dup!r} is used twice; tier names must be unique", key="tiers", value=dup)
        if "local" in names:
            raise ConfigError("tiers: 'local' is reserved for the local disk (L1); name the tier otherwise",
                              key="tiers", value="local")

    d = top.section("drive")
    drive = DriveConfig(
        folder_id=d.str("folder_id", None), credentials=d.str("credentials", None),
        endpoint=d.str("endpoint", None), scopes=d.strings("scopes", DriveConfig.scopes),
        chunk_size=d.size("chunk_size", DriveConfig.chunk_size), timeout=d.duration("timeout", DriveConfig.timeout),
        daily_upload_cap=d.size("daily_upload_cap", DriveConfig.daily_upload_cap))
    if drive.chunk_size % (256 * 1024):
        raise ConfigError(f"drive.chunk_size: {drive.chunk_size} is not a multiple of 256 KiB; use e.g. 8MiB",
                          key="drive.chunk_size", value=drive.chunk_size)
    d.done()
    # the credentials path may also be given at the top level, as the protocol writes it
    top_creds = top.str("credentials", None)
    if top_creds and not drive.credentials:
        drive = dataclasses.replace(drive, credentials=top_creds)

    h = top.section("hub")
    hub = HubConfig(
        repo_id=h.str("repo_id", None), repo_type=h.str("repo_type", "model", choices=("model", "dataset", "space")),
        private=h.bool("private", True), revision=h.str("revision", "main"), endpoint=h.str("endpoint", None),
        path_prefix=h.str("path_prefix", "") or "", keep=h.int("keep", None, minimum=1))
    if hub.repo_id is not None and not _REPO_ID.fullmatch(hub.repo_id):
        raise ConfigError(f"hub.repo_id: {hub.repo_id!r} is not a Hub repository id; use OWNER/NAME, e.g. "
                          "you/my-project-weights (letters, digits, '-', '_' and '.')", key="hub.repo_id",
                          value=hub.repo_id)
    h.done()

    rt = top.section("retention")
    retention = RetentionConfig(
        keep_local=rt.int("keep_local", RetentionConfig.keep_local, minimum=1),
        require_remote=rt.strings("require_remote", ()), min_free=rt.size("min_free", RetentionConfig.min_free))
    rt.done()
    tier_names = {t.name for t in tiers}
    for n in retention.require_remote:
        if n not in tier_names:
            raise ConfigError(f"retention.require_remote: {n!r} is not a tier; configured tiers: "
                              f"{', '.join(sorted(tier_names)) or 'none'}", key="retention.require_remote", value=n)

    rs = top.section("resume")
    resume = ResumeConfig(priority=rs.strings("priority", ("local", *[t.name for t in tiers])),
                          policy=rs.str("policy", "newest", choices=("newest", "first")),
                          on_unreachable=rs.str("on_unreachable", ResumeConfig.on_unreachable,
                                                choices=("wait", "older", "fail")),
                          deadline=rs.duration("deadline", ResumeConfig.deadline))
    rs.done()
    for n in resume.priority:
        if n != "local" and n not in tier_names:
            raise ConfigError(f"resume.priority: {n!r} is not a source; use local or a tier name "
                              f"({', '.join(sorted(tier_names)) or 'none configured'})", key="resume.priority", value=n)

    s = top.section("sync")
    sync = SyncConfig(
        watch=s.strings("watch", SyncConfig.watch), settle=s.duration("settle", SyncConfig.settle),
        poll=s.raw("poll", None), poll_interval=s.duration("poll_interval", SyncConfig.poll_interval),
        retry_initial=s.duration("retry_initial", SyncConfig.retry_initial),
        retry_max=s.duration("retry_max", SyncConfig.retry_max),
        flush_timeout=s.duration("flush_timeout", SyncConfig.flush_timeout),
        workers=_workers(s.section("workers"), s.raw("workers", None), project=top.str("project", None) or root.name))
    for name in ("poll_interval", "retry_initial", "retry_max", "flush_timeout"):
        if getattr(sync, name) <= 0:
            raise ConfigError(f"sync.{name}: {s.raw(name, None)!r} must be longer than 0; use e.g. 10s",
                              key=f"sync.{name}", value=s.raw(name, None))
    if sync.poll is not None and not isinstance(sync.poll, bool):
        raise ConfigError(f"sync.poll: {sync.poll!r} must be true or false", key="sync.poll", value=sync.poll)
    s.done()

    a = top.section("airlock")
    airlock = AirlockConfig(remote=a.str("remote", None), exclude=a.strings("exclude", ()),
                            max_unpacked=a.size("max_unpacked", AirlockConfig.max_unpacked))
    a.done()
    if airlock.remote is not None and airlock.remote not in tier_names:
        raise ConfigError(f"airlock.remote: {airlock.remote!r} is not a tier; configured tiers: "
                          f"{', '.join(sorted(tier_names)) or 'none'}", key="airlock.remote", value=airlock.remote)

    tr = top.section("train")
    train = TrainConfig(
        max_restarts=tr.int("max_restarts", 3), restart_backoff=tr.duration("restart_backoff", 10.0),
        stall_after=tr.duration("stall_after", 1800.0), grace=tr.duration("grace", 30.0),
        max_vram=tr.size("max_vram", None), min_free_disk=tr.size("min_free_disk", TrainConfig.min_free_disk),
        data_paths=tr.strings("data_paths", ()), step_regex=_regex(tr, "step_regex"),
        loss_regex=_regex(tr, "loss_regex"), checkpoint_regex=_regex(tr, "checkpoint_regex"),
        total_steps=tr.int("total_steps", None, minimum=1), data=tr.strings("data", ()),
        nproc_per_node=_nproc(tr))
    tr.done()

    db = top.section("dashboard")
    dashboard = DashboardConfig(refresh=db.duration("refresh", DashboardConfig.refresh),
                                resume_max_age=db.duration("resume_max_age", DashboardConfig.resume_max_age))
    db.done()
    if dashboard.refresh <= 0:
        raise ConfigError(f"dashboard.refresh: {dashboard.refresh:g} must be a positive duration, e.g. 2s",
                          key="dashboard.refresh", value=dashboard.refresh)

    if "cooldown" in top.data:
        raise ConfigError("cooldown: rules on the training log are written as triggers: now (a list of rules with "
                          "action: {type: cooldown, ...}); see docs/triggers.md", key="cooldown",
                          value=top.data["cooldown"])
    triggers = parse_triggers(top.raw("triggers", None), tiers=tier_names)

    data = _data(top.raw("data", None))
    for i, n in enumerate(train.data):
        if data.get(n) is None:
            raise ConfigError(f"train.data[{i}]: {n!r} is not a declared data set; declared: "
                              f"{', '.join(d.name for d in data.sets) or 'none'} (add it under data.sets)",
                              key=f"train.data[{i}]", value=n)

    rl = top.section("release")
    release = ReleaseConfig(command=rl.str("command", None), idle_after=rl.duration("idle_after", None),
                            tiers=rl.strings("tiers", ()) if rl.raw("tiers", None) is not None else None)
    rl.done()
    for n in release.tiers or ():
        if n not in tier_names:
            raise ConfigError(f"release.tiers: {n!r} is not a tier; configured tiers: "
                              f"{', '.join(sorted(tier_names)) or 'none'}", key="release.tiers", value=n)

    cfg = Config(
        root=root, source=source, project=top.str("project", None) or root.name, home=home,
        experiments=top.str("experiments", "experiments"), checkpoints=top.str("checkpoints", "checkpoints"), logs=top.str("logs", "logs"), tiers=tiers,
        drive=drive, hub=hub, retention=retention, resume=resume, sync=sync, airlock=airlock, train=train,
        dashboard=dashboard, triggers=triggers, triggers_written=tuple(top.raw("triggers", None) or ()), data=data,
        release=release)
    top.done()
    return cfg


_UNPACK = ("tar", "zip", "none")
_DATA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _data(raw: Any) -> DataConfig:
    """``data:`` — a mapping (cache, min_free, max_unpacked, sets), or just the list of sets."""
    if isinstance(raw, list):
        raw = {"sets": raw}
    d = _Reader(raw, "data")
    cache = d.str("cache", None)
    min_free = d.size("min_free", DataConfig.min_free)
    max_unpacked = d.size("max_unpacked", DataConfig.max_unpacked)
    raw_sets = d.raw("sets", None) or []
    d.done()
    if not isinstance(raw_sets, list):
        raise ConfigError(f"data.sets: {raw_sets!r} must be a list of data sets (name, source, version, ...)",
                          key="data.sets", value=raw_sets)
    sets = []
    for i, item in enumerate(raw_sets):
        r = _Reader(item, f"data.sets[{i}]")
        name = r.str("name", None)
        if not name or not _DATA_NAME.match(name):
            raise ConfigError(f"data.sets[{i}].name: {name!r} must be a name of letters, digits, '.', '_' or '-' "
                              "(e.g. pg19)", key=f"data.sets[{i}].name", value=name)
        source = r.str("source", None)
        if not source:
            raise ConfigError(f"data.sets[{i}].source: missing; say where {name} comes from, e.g. "
                              "hub:datasets/USER/REPO, drive:FOLDER_ID, https://... or a path",
                              key=f"data.sets[{i}].source", value=None)
        sha = r.raw("sha256", None)
        if sha is not None and not (isinstance(sha, str) or (isinstance(sha, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in sha.items()))):
            raise ConfigError(f"data.sets[{i}].sha256: {sha!r} must be a hex digest or a mapping of file path to "
                              "hex digest", key=f"data.sets[{i}].sha256", value=sha)
        sets.append(DataSetConfig(name=name, source=source, version=r.str("version", None),
                                  preprocessing=r.str("preprocessing", None),
                                  unpack=r.str("unpack", "none", choices=_UNPACK),
                                  sha256=dict(sha) if isinstance(sha, Mapping) else sha))
        r.done()
    names = [s.name for s in sets]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"data.sets: the name {dup!r} is used twice; data set names must be unique",
                          key="data.sets", value=dup)
    return DataConfig(cache=cache, min_free=min_free, max_unpacked=max_unpacked, sets=tuple(sets))


def _nproc(tr: "_Reader") -> int | str:
    from .launch import parse_nproc
    return parse_nproc(tr.raw("nproc_per_node", 1), key="train.nproc_per_node")


def _regex(r: _Reader, name: str) -> str | None:
    v = r.str(name, None)
    if v is not None:
        try:
            rx = re.compile(v)
        except re.error as e:
            raise ConfigError(f"{r.key(name)}: {v!r} is not a valid regular expression ({e})",
                              key=r.key(name), value=v) from None
        want = {"step_regex": "step", "loss_regex": "loss", "checkpoint_regex": "step"}.get(name)
        if want and want not in rx.groupindex and not (rx.groups and not rx.groupindex):
            # without it every line fails to match: the run would show no progress, and say nothing
            raise ConfigError(f"{r.key(name)}: {v!r} captures no {want}; name the group, e.g. "
                              f"'{want} (?P<{want}>{_EXAMPLE_GROUP[want]})'", key=r.key(name), value=v)
    return v


_EXAMPLE_GROUP = {"step": r"\d+", "loss": "[0-9.eE+-]+"}
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


# -- triggers (rules on the training log; colabkit.triggers runs them) ---------------------------------------
#: built-in events the runner already parses, and the run states it reports
TRIGGER_EVENTS = ("checkpoint", "step", "loss")
TRIGGER_STATES = ("finished", "failed", "oom", "stalled", "restarted", "stopped")
TRIGGER_ACTIONS = ("cooldown", "command", "log", "sync")
TRIGGER_CONDITIONS = ("at", "every", "file_exists", "wait", "max_attempts", "command", "metadata")
TRIGGER_COMPARE = ("equals", "not_equals", "gte", "lte")
#: what every template may use besides the event's own values
TRIGGER_CONTEXT = ("experiment", "step", "path", "output_dir", "run_id", "run", "rule", "attempt")
#: the values each detector provides
_DETECTOR_VALUES = {"checkpoint": ("step", "path"), "step": ("step", "total"), "loss": ("loss",),
                    "inactivity": ("idle", "since")}
_STATE_VALUES = ("state", "exit_code", "attempt", "detail", "step", "path")
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TriggerAction:
    """What a rule does. ``type`` is ``cooldown``, ``command``, ``log`` or ``sync``; the other fields are the
    templates (``{name}`` from the event and the run's context) that type uses."""

    type: str
    args: tuple[str, ...] = ()              # cooldown: train.py argument overrides
    when: str = "after_main"                # cooldown: after_main | now
    folder: str = "cooldown_{step}"         # cooldown: its folder inside the experiment
    triggers: bool = False                  # cooldown: run the experiment's rules in the cooldown run too
    command: tuple[str, ...] = ()           # command: argv
    cwd: str | None = None                  # command: working directory (default: the experiment's folder)
    env: tuple[tuple[str, str], ...] = ()   # command: extra environment variables
    timeout: float | None = None            # command: seconds
    message: str = ""                       # log
    level: str = "info"                     # log: info | warning
    tier: str | None = None                 # sync: flush only this tier (default: every tier)


@dataclass(frozen=True)
class TriggerRule:
    """One rule: a detector, conditions that must all pass, and an action.

    ``detector`` is ``pattern`` (a regex with named groups, or a substring with ``pattern_type: substring``),
    one of :data:`TRIGGER_EVENTS`, one of :data:`TRIGGER_STATES`, or ``inactivity``. ``key`` is where the
    rule was written (``triggers[2]``), for messages.
    """

    name: str
    detector: str
    action: TriggerAction
    key: str = ""
    pattern: str | None = None
    pattern_type: str = "regex"
    inactivity: float | None = None
    extract: tuple[tuple[str, str], ...] = ()
    metadata: tuple[tuple[str, Any], ...] = ()
    at: tuple[int, ...] | None = None
    every: int | None = None
    file_exists: str | None = None
    wait: float | None = None
    max_attempts: int = 1
    command: tuple[str, ...] | None = None
    compare: tuple[tuple[str, str, Any], ...] = ()
    mode: str = "queue"
    retry: bool = False
    source: str | None = None               # the file it came from (None: colabkit.yaml)

    @property
    def values(self) -> tuple[str, ...]:
        """The names an event of this rule carries (groups, extracted and metadata keys, detector values)."""
        names: list[str] = []
        if self.detector == "pattern" and self.pattern_type == "regex" and self.pattern is not None:
            names += list(re.compile(self.pattern).groupindex)
        names += _DETECTOR_VALUES.get(self.detector, ())
        if self.detector in TRIGGER_STATES:
            names += _STATE_VALUES
        names += [k for k, _ in self.extract] + [k for k, _ in self.metadata]
        return tuple(dict.fromkeys(names))


def _strings_or_words(r: _Reader, name: str) -> tuple[str, ...]:
    """A list of strings, or one string split like a shell command line."""
    import shlex
    v = r.raw(name, None)
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(shlex.split(v))
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                   for x in v):
        raise ConfigError(f"{r.key(name)}: {v!r} must be a list of strings (an argv) or one command line",
                          key=r.key(name), value=v)
    return tuple(str(x) for x in v)


def _check_template(text: str, key: str, allowed: set[str], groups: tuple[str, ...]) -> None:
    import string
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConfigError(f"{key}: {text!r} is not a valid template ({e}); write literal braces as {{{{ and }}}}",
                          key=key, value=text) from None
    for f in fields:
        name = re.split(r"[.\[]", f, maxsplit=1)[0]
        if not name or name.isdigit():
            raise ConfigError(f"{key}: {text!r} has an unnamed field {{{f}}}; name what it takes, e.g. {{step}}",
                              key=key, value=text)
        if name not in allowed:
            what = f"a group of the pattern ({', '.join(groups) or 'it has none'})" if groups is not None else \
                "a value of the event"
            raise ConfigError(
                f"{key}: {text!r} uses {{{name}}}, which is neither {what}, an extract or metadata key, nor part "
                f"of the run's context ({', '.join(sorted(TRIGGER_CONTEXT))}); name the group in the pattern "
                f"(?P<{name}>...) or map it with extract: {{{name}: GROUP}}", key=key, value=text)


def _trigger_action(data: Any, key: str, tiers: set[str] | None) -> TriggerAction:
    if isinstance(data, str):
        data = {"type": data}
    r = _Reader(data, key)
    typ = r.raw("type", None)
    if typ is None:
        raise ConfigError(f"{key}.type: missing; use one of {', '.join(TRIGGER_ACTIONS)}", key=f"{key}.type")
    if typ not in TRIGGER_ACTIONS:
        raise ConfigError(f"{key}.type: {typ!r} is not an action; use one of {', '.join(TRIGGER_ACTIONS)}",
                          key=f"{key}.type", value=typ)
    if typ == "cooldown":
        a = TriggerAction(type=typ, args=_strings_or_words(r, "args"),
                          when=r.str("when", "after_main", choices=("after_main", "now")) or "after_main",
                          folder=r.str("folder", "cooldown_{step}") or "cooldown_{step}",
                          triggers=r.bool("triggers", False))
        if "/" in a.folder or a.folder in (".", "..") or a.folder.startswith("."):
            raise ConfigError(f"{key}.folder: {a.folder!r} must be one folder name inside the experiment, "
                              "e.g. cooldown_{{step}}", key=f"{key}.folder", value=a.folder)
    elif typ == "command":
        cmd = _strings_or_words(r, "command")
        if not cmd:
            raise ConfigError(f"{key}.command: missing; give the argv to run, e.g. [python, convert.py, '{{path}}']",
                              key=f"{key}.command")
        env = r.raw("env", None) or {}
        if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, (str, int, float))
                                                   and not isinstance(v, bool) for k, v in env.items()):
            raise ConfigError(f"{key}.env: {env!r} must map variable names to strings", key=f"{key}.env", value=env)
        a = TriggerAction(type=typ, command=cmd, cwd=r.str("cwd", None),
                          env=tuple((k, str(v)) for k, v in env.items()), timeout=r.duration("timeout", None))
    elif typ == "log":
        msg = r.str("message", None)
        if not msg:
            raise ConfigError(f"{key}.message: missing; give the text to log, e.g. 'checkpoint {{step}} saved'",
                              key=f"{key}.message")
        a = TriggerAction(type=typ, message=msg, level=r.str("level", "info", choices=("info", "warning")) or "info")
    else:
        tier = r.str("tier", None)
        if tier is not None and tiers is not None and tier not in tiers:
            raise ConfigError(f"{key}.tier: {tier!r} is not a tier; configured tiers: "
                              f"{', '.join(sorted(tiers)) or 'none'}", key=f"{key}.tier", value=tier)
        a = TriggerAction(type=typ, tier=tier)
    r.done()
    return a


def _trigger_rule(data: Any, key: str, tiers: set[str] | None, source: str | None) -> TriggerRule:
    if isinstance(data, Mapping) and any(isinstance(k, bool) for k in data):
        k = next(k for k in data if isinstance(k, bool))
        raise ConfigError(f"{key}: a key was read as {k} (YAML reads an unquoted on:, yes: or off: as true/false); "
                          "quote it ('on':), or name the detector with event:, state:, pattern: or inactivity:",
                          key=key, value=data[k])
    r = _Reader(data, key)
    name = r.str("name", None)
    if not name:
        raise ConfigError(f"{key}.name: missing; give each rule a name such as cooldown_50k", key=f"{key}.name")
    if not _RULE_NAME.match(name):
        raise ConfigError(f"{key}.name: {name!r} must be letters, digits, '_', '-' or '.'", key=f"{key}.name",
                          value=name)
    given = [d for d in ("pattern", "event", "state", "inactivity") if r.raw(d, None) is not None]
    if not given:
        raise ConfigError(f"{key}: no detector; give one of pattern: (a regex with named groups), event: "
                          f"({', '.join(TRIGGER_EVENTS)}), state: ({', '.join(TRIGGER_STATES)}) or inactivity: "
                          "(a duration such as 30m)", key=key)
    if len(given) > 1:
        raise ConfigError(f"{key}: {' and '.join(given)} are both given; a rule has one detector", key=key)
    kind = given[0]
    pattern = None
    pattern_type = r.str("pattern_type", "regex", choices=("regex", "substring")) or "regex"
    inactivity = None
    groups: tuple[str, ...] | None = None
    if kind == "pattern":
        pattern = r.str("pattern", None)
        if pattern_type == "regex":
            try:
                groups = tuple(re.compile(pattern or "").groupindex)
            except re.error as e:
                raise ConfigError(f"{key}.pattern: {pattern!r} is not a valid regular expression ({e})",
                                  key=f"{key}.pattern", value=pattern) from None
        else:
            groups = ()
        detector = "pattern"
    elif kind == "event":
        detector = r.str("event", None, choices=TRIGGER_EVENTS) or ""
    elif kind == "state":
        detector = r.str("state", None, choices=TRIGGER_STATES) or ""
    else:
        detector = "inactivity"
        inactivity = r.duration("inactivity", None)
        if not inactivity:
            raise ConfigError(f"{key}.inactivity: must be a positive duration, e.g. 30m", key=f"{key}.inactivity",
                              value=r.raw("inactivity", None))
    ex = r.raw("extract", None) or {}
    if not isinstance(ex, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ex.items()):
        raise ConfigError(f"{key}.extract: {ex!r} must map metadata keys to group names, e.g. {{step: iteration}}",
                          key=f"{key}.extract", value=ex)
    for k, g in ex.items():
        if groups is not None and g not in groups:
            raise ConfigError(f"{key}.extract.{k}: {g!r} is not a group of the pattern (its groups: "
                              f"{', '.join(groups) or 'none'}); name it in the pattern as (?P<{g}>...)",
                              key=f"{key}.extract.{k}", value=g)
    meta = r.raw("metadata", None) or {}
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise ConfigError(f"{key}.metadata: {meta!r} must be a mapping of names to values", key=f"{key}.metadata",
                          value=meta)

    action = _trigger_action(r.raw("action", None), f"{key}.action", tiers)
    # a log line costs nothing; anything that may take a while (a run, a command, an upload) is queued, never
    # run in the watcher, where it would hold up the log stream (and a %train child writing to a full pipe)
    default_mode = "inline" if action.type == "log" else "queue"
    mode = r.str("mode", default_mode, choices=("inline", "queue")) or default_mode
    retry = r.bool("retry", False)

    c = _Reader(r.raw("conditions", None), f"{key}.conditions")
    unknown = sorted(str(k) for k in c.data if k not in TRIGGER_CONDITIONS)
    if unknown:
        ck = c.key(unknown[0])
        raise ConfigError(f"{ck}: unknown condition; allowed: {', '.join(sorted(TRIGGER_CONDITIONS))}", key=ck,
                          value=c.data.get(unknown[0]))
    at = c.raw("at", None)
    if at is not None:
        if isinstance(at, int) and not isinstance(at, bool):
            at = [at]
        if not isinstance(at, list) or not at or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in at):
            raise ConfigError(f"{c.key('at')}: {at!r} must be a list of whole numbers (steps), e.g. [10000, 50000]",
                              key=c.key("at"), value=at)
        at = tuple(sorted(set(at)))
    every = c.int("every", None, minimum=1)
    file_exists = c.str("file_exists", None)
    wait = c.duration("wait", None)
    max_attempts = c.int("max_attempts", 3 if retry else 1, minimum=1) or 1
    command = _strings_or_words(c, "command") or None
    compare: list[tuple[str, str, Any]] = []
    cm = c.raw("metadata", None) or {}
    if not isinstance(cm, Mapping):
        raise ConfigError(f"{c.key('metadata')}: {cm!r} must map keys to a test such as {{gte: 1000}}",
                          key=c.key("metadata"), value=cm)
    for mk, test in cm.items():
        tk = f"{c.key('metadata')}.{mk}"
        if not isinstance(test, Mapping) or not test or any(op not in TRIGGER_COMPARE for op in test):
            raise ConfigError(f"{tk}: {test!r} must be a mapping of {', '.join(TRIGGER_COMPARE)} to a value, "
                              "e.g. {gte: 1000}", key=tk, value=test)
        compare += [(str(mk), str(op), v) for op, v in test.items()]
    c.done()

    # what templates may name
    values = set(TRIGGER_CONTEXT) | set(_DETECTOR_VALUES.get(detector, ())) | set(ex) | set(meta)
    if detector in TRIGGER_STATES:
        values |= set(_STATE_VALUES)
    if groups:
        values |= set(groups)
    if (at is not None or every is not None) and detector in ("pattern",):
        if not ({"step", "iteration", "iter"} & (set(groups or ()) | set(ex))):
            k = c.key("at") if at is not None else c.key("every")
            raise ConfigError(f"{k}: needs the event's step, and the pattern captures none; name a group "
                              "(?P<step>...) or (?P<iteration>...), or map one with extract: {step: GROUP}", key=k)
    if (at is not None or every is not None) and detector in ("loss", "inactivity"):
        k = c.key("at") if at is not None else c.key("every")
        raise ConfigError(f"{k}: a {detector} event carries no step; use event: step or event: checkpoint", key=k)
    if mode == "inline" and action.type == "cooldown":
        raise ConfigError(f"{key}.mode: 'inline' runs in the log watcher; a cooldown run must be queued "
                          "(mode: queue)", key=f"{key}.mode", value=mode)
    if wait is not None and file_exists is None:
        raise ConfigError(f"{c.key('wait')}: waits for file_exists, which is not given; add file_exists: PATH",
                          key=c.key("wait"), value=wait)
    if wait and mode == "inline":
        raise ConfigError(f"{key}.mode: 'inline' cannot wait for a file (conditions.wait); use mode: queue",
                          key=f"{key}.mode", value=mode)
    templates: list[tuple[str, str]] = []
    if file_exists:
        templates.append((c.key("file_exists"), file_exists))
    templates += [(f"{c.key('command')}[{i}]", x) for i, x in enumerate(command or ())]
    templates += [(f"{key}.action.args[{i}]", x) for i, x in enumerate(action.args)]
    templates += [(f"{key}.action.command[{i}]", x) for i, x in enumerate(action.command)]
    templates += [(f"{key}.action.env.{k}", v) for k, v in action.env]
    if action.type == "cooldown":
        templates.append((f"{key}.action.folder", action.folder))
    if action.cwd:
        templates.append((f"{key}.action.cwd", action.cwd))
    if action.message:
        templates.append((f"{key}.action.message", action.message))
    for k, text in templates:
        _check_template(text, k, values, groups if detector == "pattern" else None)  # type: ignore[arg-type]
    r.done()
    return TriggerRule(name=name, detector=detector, action=action, key=key, pattern=pattern,
                       pattern_type=pattern_type, inactivity=inactivity, extract=tuple(ex.items()),
                       metadata=tuple(meta.items()), at=at, every=every, file_exists=file_exists, wait=wait,
                       max_attempts=max_attempts, command=command, compare=tuple(compare), mode=mode, retry=retry,
                       source=source)


def parse_triggers(data: Any, *, key: str = "triggers", tiers: set[str] | None = None,
                   source: str | None = None, taken: tuple[str, ...] = ()) -> tuple[TriggerRule, ...]:
    """Validate a ``triggers:`` list (colabkit.yaml, or an experiment's triggers.yaml) into rules.

    Args:
        data: the list of rule mappings (None: no rules).
        key: the key path messages start with.
        tiers: the configured tier names (a ``sync`` action's ``tier`` must be one).
        source: the file the rules came from, named in messages (None: colabkit.yaml).
        taken: rule names already used (a rule name is unique across colabkit.yaml and triggers.yaml).
    Raises:
        ConfigError: naming the key path, the bad value and what is allowed.
    """
    if data is None:
        return ()
    prefix = f"{source}: " if source else ""
    if not isinstance(data, (list, tuple)):
        raise ConfigError(f"{prefix}{key}: {data!r} must be a list of rules", key=key, value=data)
    rules: list[TriggerRule] = []
    names = set(taken)
    for i, item in enumerate(data):
        try:
            rule = _trigger_rule(item, f"{key}[{i}]", tiers, source)
        except ConfigError as e:
            if not prefix:
                raise
            raise ConfigError(f"{prefix}{e}", key=e.key, value=e.value, source=source) from None
        if rule.name in names:
            raise ConfigError(f"{prefix}{key}[{i}].name: {rule.name!r} is used twice; rule names must be unique",
                              key=f"{key}[{i}].name", value=rule.name, source=source)
        names.add(rule.name)
        rules.append(rule)
    return tuple(rules)
