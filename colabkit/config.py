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

from .errors import ConfigError

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
    keep: int | None = None                 # remote keep count for checkpoints (None: keep all)


@dataclass(frozen=True)
class RetentionConfig:
    keep_local: int = 3
    require_remote: tuple[str, ...] = ()    # tier names that must hold a verified copy; () = any one remote
    min_free: int = 2 * 10**9


@dataclass(frozen=True)
class ResumeConfig:
    priority: tuple[str, ...] = ("local", "drive", "hub")
    policy: str = "newest"                  # newest | first


@dataclass(frozen=True)
class SyncConfig:
    watch: tuple[str, ...] = ("checkpoints", "logs", "journal.md")
    settle: float = 5.0                     # a file without a manifest is complete once stable this long
    poll: bool | None = None                # force the polling observer (None: auto, poll on FUSE/network)
    poll_interval: float = 10.0
    retry_initial: float = 5.0
    retry_max: float = 600.0
    flush_timeout: float = 600.0            # deadline for the flush at exit / SIGTERM


@dataclass(frozen=True)
class AirlockConfig:
    remote: str | None = None               # tier name; default: the drive tier (first drive tier)
    exclude: tuple[str, ...] = ()
    max_unpacked: int = 2 * 10**9


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
    cooldown: tuple[Mapping[str, Any], ...] = ()

    @property
    def state_dir(self) -> Path:
        """The project's ``.colabkit/`` folder (ledger, logs of background work, job state)."""
        return self.root / STATE_DIR

    def experiment_dir(self, experiment: str) -> Path:
        """``<root>/experiments/<experiment>``."""
        return self.root / self.experiments / experiment

    def experiment_names(self) -> list[str]:
        """The experiments here: the folders under ``experiments/`` (sorted; none when it does not exist)."""
        try:
            return sorted(p.name for p in (self.root / self.experiments).iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []

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
        p = Path(local).resolve()
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

    def as_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain data for ``colabkit config show``; secrets (credential values, tokens) are redacted."""
        from .secrets import redact_config
        d = _plain(self)
        return redact_config(d) if redact else d


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
                raise ConfigError(f"{source}: no such file; create it with 'colabkit init' or pass another path",
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
        unknown = sorted(set(self.data) - self.used - set(allowed_extra))
        if unknown:
            k = self.key(unknown[0])
            allowed = ", ".join(sorted(self.used))
            raise ConfigError(f"{k}: unknown key; allowed here: {allowed}", key=k, value=self.data[unknown[0]])


_REMOTES = ("local", "drive", "hub")


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
        every=r.duration("every", base.every),
        include=r.strings("include", base.include), exclude=r.strings("exclude", base.exclude),
        max_file_size=r.size("max_file_size", base.max_file_size),
        latest_only=r.bool("latest_only", base.latest_only), keep=r.int("keep", base.keep, minimum=1))
    r.done()
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
        chunk_size=d.size("chunk_size", DriveConfig.chunk_size), timeout=d.duration("timeout", DriveConfig.timeout))
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
                          policy=rs.str("policy", "newest", choices=("newest", "first")))
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
        flush_timeout=s.duration("flush_timeout", SyncConfig.flush_timeout))
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
        total_steps=tr.int("total_steps", None, minimum=1))
    tr.done()

    db = top.section("dashboard")
    dashboard = DashboardConfig(refresh=db.duration("refresh", DashboardConfig.refresh),
                                resume_max_age=db.duration("resume_max_age", DashboardConfig.resume_max_age))
    db.done()
    if dashboard.refresh <= 0:
        raise ConfigError(f"dashboard.refresh: {dashboard.refresh:g} must be a positive duration, e.g. 2s",
                          key="dashboard.refresh", value=dashboard.refresh)

    cooldown = top.raw("cooldown", None) or ()
    if not isinstance(cooldown, (list, tuple)) or not all(isinstance(c, Mapping) for c in cooldown):
        raise ConfigError(f"cooldown: {cooldown!r} must be a list of trigger mappings", key="cooldown", value=cooldown)

    cfg = Config(
        root=root, source=source, project=top.str("project", None) or root.name, home=home,
        experiments=top.str("experiments", "experiments"), checkpoints=top.str("checkpoints", "checkpoints"), logs=top.str("logs", "logs"), tiers=tiers,
        drive=drive, hub=hub, retention=retention, resume=resume, sync=sync, airlock=airlock, train=train,
        dashboard=dashboard, cooldown=tuple(cooldown))
    top.done()
    return cfg


def _regex(r: _Reader, name: str) -> str | None:
    v = r.str(name, None)
    if v is not None:
        try:
            re.compile(v)
        except re.error as e:
            raise ConfigError(f"{r.key(name)}: {v!r} is not a valid regular expression ({e})",
                              key=r.key(name), value=v) from None
    return v
