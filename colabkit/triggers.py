"""Cooldown triggers: rules on the training log, and the exactly-once action queue.

A rule (``triggers:`` in colabkit.yaml, or ``experiments/vXX/triggers.yaml``; validated by
:func:`colabkit.config.parse_triggers`) has a detector (a regex or substring ``pattern``, a built-in ``event``
the runner parses, a run ``state``, or ``inactivity``), conditions that must all pass (``at``, ``every``,
``file_exists`` + ``wait``, ``max_attempts``, ``command``, ``metadata``) and an action (``cooldown``,
``command``, ``log``, ``sync``)::

    triggers:
      - name: cooldown
        event: checkpoint
        conditions: {at: [50000]}
        action: {type: cooldown, args: [--lr, "1e-4", --steps, "60000"]}

What fires is written down as one JSON file per entry under ``.colabkit/actions/<experiment>/``, named by
what the event *is* (rule, experiment, run, the threshold or the extracted values), never by a uuid or a
line number: the file is created with ``os.link`` (which fails when the name exists), so reading the same
log again after a kernel restart, a second watcher, or a resumed run that prints the same line again, adds
nothing. A worker claims an entry by holding an ``flock`` on its lock file for as long as the action runs;
the kernel drops that lock when the worker dies (kill -9), so a ``running`` entry whose lock is free is
``interrupted``: re-run only when its rule says ``retry: true`` and its attempts allow, otherwise it waits for
:func:`retry`. State changes are made under that lock and written through a temporary file, fsync and rename.

Where rules run: the ``%train`` job hands every parsed line to :meth:`Engine.listener` (the runner's one parse)
and starts a worker thread (``colabkit-triggers-<experiment>``) that lives while the run does and until the
queue of that experiment is drained; ``colabkit triggers watch LOGFILE`` does the same for any log, keeping
its read position; ``colabkit triggers worker`` runs the queue in a terminal.

Example:
    >>> import colabkit.triggers as tg
    >>> tg.check(experiment="v01")["rules"][0]["name"]          # validate and list the rules
    'cooldown'
    >>> tg.list_entries(experiment="v01", state="failed")       # what failed
    >>> tg.retry("cooldown-50000-1a2b3c4d")
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import socket
import string
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from .config import TRIGGER_STATES, TriggerRule, format_duration, parse_triggers
from .errors import ColabkitError, ConfigError, TriggerError
from .fsutil import TMP_PREFIX, atomic_write_json, fsync_dir, sweep_temporaries, temp_prefix
from .runtime import command

if TYPE_CHECKING:
    from .config import Config
    from .events import Event

log = logging.getLogger(__name__)

FORMAT = 1
STATES = ("pending", "waiting", "running", "done", "failed", "interrupted", "cancelled")
FILE_NAME = "triggers.yaml"
#: how often a worker looks at the queue when nothing wakes it (seconds)
POLL = 1.0
#: how many entries status() lists
STATUS_ENTRIES = 20
_RUN_MAIN = "main"
_ANY = float("-inf")   # a rule any event may fire


# -- rules ------------------------------------------------------------------------------------------------
def rules(config: "Config | None" = None, *, experiment: str | None = None) -> tuple[TriggerRule, ...]:
    """The rules that apply to `experiment`: colabkit.yaml's ``triggers:``, then ``experiments/<exp>/triggers.yaml``.

    Raises:
        ConfigError: a bad rule, naming the file, the key path, the value and what is allowed.
    """
    cfg = _config(config)
    base = tuple(cfg.triggers)
    if not experiment:
        return base
    p = cfg.experiment_dir(experiment) / FILE_NAME
    if not p.is_file():
        return base
    from .config import _read_yaml
    rel = _rel(cfg, p)
    try:
        import yaml
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{rel}: cannot be read ({e}); fix the file or remove it", source=str(p)) from None
    except Exception as e:  # yaml.YAMLError: reported like colabkit.yaml's syntax errors
        _read_yaml(p)
        raise ConfigError(f"{rel}: not valid YAML ({e})", source=str(p)) from None
    if isinstance(data, Mapping):
        extra = set(data) - {"triggers"}
        if extra:
            k = sorted(map(str, extra))[0]
            raise ConfigError(f"{rel}: {k}: unknown key; allowed here: triggers", key=k, source=str(p))
        data = data.get("triggers")
    tiers = {t.name for t in cfg.tiers}
    return base + parse_triggers(data, tiers=tiers, source=rel, taken=tuple(r.name for r in base))


def _rel(cfg: "Config", p: Path) -> str:
    try:
        return p.resolve().relative_to(cfg.root).as_posix()
    except ValueError:
        return str(p)


def _config(config: "Config | None") -> "Config":
    if config is not None:
        return config
    from .config import load_config
    return load_config()


def _literal(pattern: str) -> str | None:
    """The longest run of plain characters every match must contain (a cheap `in` test before the regex)."""
    try:
        import re._parser as sre  # type: ignore[import-not-found]
    except ImportError:  # Python < 3.11
        import sre_parse as sre  # type: ignore[no-redef]
    try:
        parsed = sre.parse(pattern)
    except Exception:
        return None
    if parsed.state.flags & (re.IGNORECASE | re.VERBOSE):
        return None
    best, cur = "", ""
    for op, av in parsed:
        if str(op) == "LITERAL":
            cur += chr(av)
            best = cur if len(cur) > len(best) else best
        else:
            cur = ""
    return best if len(best) >= 3 else None


class _Compiled:
    """A rule made ready to match: its regex, a literal pre-filter, the thresholds still to fire."""

    __slots__ = ("rule", "regex", "literal", "substring", "extract", "metadata", "pending_at", "every_last")

    def __init__(self, rule: TriggerRule) -> None:
        self.rule = rule
        self.regex = None
        self.literal = None
        self.substring = None
        if rule.detector == "pattern":
            if rule.pattern_type == "substring":
                self.substring = rule.pattern
            else:
                self.regex = re.compile(rule.pattern or "")
                self.literal = _literal(rule.pattern or "")
        self.extract = rule.extract
        self.metadata = dict(rule.metadata)
        self.pending_at: list[int] = list(rule.at) if rule.at else []
        self.every_last: int | None = None   # the last multiple fired: a restart re-printing steps fires none

    def next_step(self) -> float:
        """The lowest step at which this rule can fire next (-inf: any event may fire it, inf: none can)."""
        r = self.rule
        if self.extract:
            return _ANY  # the step may come from an extracted value
        if r.at is not None:
            return self.pending_at[0] if self.pending_at else float("inf")
        if r.every is not None:
            return (self.every_last + r.every) if self.every_last is not None else r.every
        return _ANY

    def match_line(self, line: str) -> dict[str, Any] | None:
        if self.substring is not None:
            return {} if self.substring in line else None
        if self.literal is not None and self.literal not in line:
            return None
        m = self.regex.search(line)  # type: ignore[union-attr]
        if m is None:
            return None
        from .events import _convert
        return {k: _convert(k, v) for k, v in m.groupdict().items() if v is not None}


def _step_of(values: Mapping[str, Any]) -> int | None:
    for k in ("step", "iteration", "iter"):
        v = values.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str) and v.isdigit():
            return int(v)
    return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _compare(value: Any, op: str, expected: Any) -> bool:
    a, b = _number(value), _number(expected)
    if a is not None and b is not None:
        x, y = a, b
    else:
        x, y = str(value), str(expected)
    if op == "equals":
        return x == y
    if op == "not_equals":
        return x != y
    if value is None:
        return False
    return x >= y if op == "gte" else x <= y  # type: ignore[operator]


class _Values(dict):
    def __missing__(self, key: str) -> Any:
        raise TriggerError(f"{{{key}}} has no value for this event")


def render(template: str, values: Mapping[str, Any]) -> str:
    """``{name}`` fields filled from `values` (None counts as missing).

    Raises:
        TriggerError: a field has no value for this event.
    """
    vals = _Values({k: v for k, v in values.items() if v is not None})
    return string.Formatter().vformat(template, (), vals)


# -- the queue ----------------------------------------------------------------------------------------------
def queue_dir(config: "Config", experiment: str) -> Path:
    """``<root>/.colabkit/actions/<experiment>/``."""
    return config.state_dir / "actions" / experiment


def entry_id(rule: str, experiment: str, run: str, identity: Mapping[str, Any], tag: Any = None) -> str:
    """The entry's name, derived from what the event is: ``<rule>-<tag>-<hash>``."""
    blob = json.dumps([rule, experiment, run, dict(identity)], sort_keys=True, default=str)
    h = hashlib.sha256(blob.encode()).hexdigest()[:8]
    return f"{rule}-{tag}-{h}" if tag is not None else f"{rule}-{h}"


class Queue:
    """The entries of one experiment: ``<id>.json`` (the record) and ``<id>.lock`` (the claim)."""

    def __init__(self, config: "Config", experiment: str) -> None:
        self.config = config
        self.experiment = experiment
        self.dir = queue_dir(config, experiment)

    def path(self, eid: str) -> Path:
        return self.dir / f"{eid}.json"

    def exists(self, eid: str) -> bool:
        return os.path.exists(self.path(eid))

    def create(self, entry: dict[str, Any]) -> bool:
        """Write a new entry; False (and nothing written) when an entry of that id exists already."""
        final = self.path(entry["id"])
        if os.path.exists(final):
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{temp_prefix(entry['id'])}t{threading.get_ident()}"  # names its writer: swept once it is gone
        data = json.dumps(entry, indent=1, sort_keys=True, default=str).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)  # atomic, and refuses an existing name: one creator wins
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        fsync_dir(self.dir)
        return True

    def read(self, eid: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(eid).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, entry: dict[str, Any]) -> None:
        entry["updated"] = time.time()
        atomic_write_json(self.path(entry["id"]), entry)

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return [n[:-5] for n in names if n.endswith(".json") and not n.startswith((TMP_PREFIX, "."))]

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for eid in self.ids():
            e = self.read(eid)
            if e is not None:
                out.append(e)
        out.sort(key=lambda e: (e.get("created") or 0, e.get("id")))
        return out

    @contextlib.contextmanager
    def lock(self, eid: str, *, wait: bool = False) -> Iterator[bool]:
        """Hold the entry's claim (an exclusive flock); yields False when another process or thread holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / f".{eid}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    yield False
                    return
                raise
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def held(self, eid: str) -> bool:
        """True when a live worker holds the entry's claim."""
        with self.lock(eid) as got:
            return not got

    def transition(self, entry: dict[str, Any], state: str, note: str | None = None, **fields: Any) -> None:
        entry["state"] = state
        entry.update(fields)
        hist = entry.setdefault("history", [])
        hist.append({"state": state, "time": time.time(), **({"note": note} if note else {})})
        del hist[:-50]
        self.write(entry)


def _experiments_with_queues(cfg: "Config") -> list[str]:
    d = cfg.state_dir / "actions"
    try:
        return sorted(p.name for p in d.iterdir() if p.is_dir())
    except OSError:
        return []


def _effective_state(q: Queue, e: dict[str, Any]) -> str:
    """A ``running`` entry whose claim nobody holds lost its worker: it reads as ``interrupted``."""
    st = e.get("state")
    if st == "running" and not q.held(e["id"]):
        return "interrupted"
    return str(st)


# -- the engine: events -> conditions -> entries -------------------------------------------------------------
class Engine:
    """Runs the rules of one experiment over a stream of parsed lines and run states.

    Args:
        config: the configuration.
        experiment: ``vXX``; entries go to its queue.
        rules: the rules (default: :func:`rules` for the experiment).
        run: the run's stable identity (``main``, or a cooldown's folder name): part of every entry id, so a
            resumed run or a restarted kernel does not fire again.
        run_id: the current %train run id (a template value; part of a run state's identity).
        output_dir: the run's folder (a template value).
        base: relative checkpoint paths in the log are taken relative to this folder.
        on_enqueue: called after a queued entry was created (wakes a worker).
    """

    def __init__(self, config: "Config", experiment: str, rules_: Sequence[TriggerRule] | None = None, *,
                 run: str = _RUN_MAIN, run_id: str | None = None, output_dir: str | os.PathLike | None = None,
                 base: str | os.PathLike | None = None, on_enqueue: Callable[[], None] | None = None,
                 dry_run: bool = False, args: Sequence[str] = (),
                 checkpoint_dir: str | os.PathLike | None = None) -> None:
        self.config = config
        self.experiment = experiment
        self.rules = tuple(rules(config, experiment=experiment) if rules_ is None else rules_)
        self.run = run
        self.run_id = run_id
        self.output_dir = str(output_dir) if output_dir is not None else str(config.experiment_dir(experiment))
        self.base = Path(base) if base is not None else config.experiment_dir(experiment)
        self.on_enqueue = on_enqueue
        self.dry_run = dry_run
        self.args = [str(a) for a in args]   # the run's train.py arguments: a cooldown starts from them
        self.queue = Queue(config, experiment)
        self.step: int | None = None
        self.path: str | None = None
        self.attempt: int | None = None
        self.last_activity = time.time()
        #: a checkpoint written there counts as activity too (the folder's mtime moves with every save's rename)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.ended = False
        self.fired: list[dict[str, Any]] = []   # what fired through this engine (dry runs keep them here only)
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        compiled = [_Compiled(r) for r in self.rules]
        pats = [c for c in compiled if c.rule.detector == "pattern"]
        # one C-speed search for every pattern's literal: most lines mention none of them
        self._line_rules = [c for c in pats if c.literal is not None or c.substring is not None]
        self._line_always = [c for c in pats if c not in self._line_rules]
        lits = [c.literal if c.literal is not None else c.substring for c in self._line_rules]
        self._line_filter = re.compile("|".join(re.escape(x) for x in lits)) if lits else None  # type: ignore[arg-type]
        self._event_rules: dict[str, list[_Compiled]] = {}
        for c in compiled:
            if c.rule.detector in ("checkpoint", "step", "loss"):
                self._event_rules.setdefault(c.rule.detector, []).append(c)
        self._state_rules = [c for c in compiled if c.rule.detector in TRIGGER_STATES]
        self._idle_rules = [c for c in compiled if c.rule.detector == "inactivity"]
        if not dry_run:  # thresholds already fired by an earlier session are not pending any more
            for c in compiled:
                if c.pending_at:
                    c.pending_at = [t for t in c.pending_at
                                    if not self.queue.exists(self._id(c.rule, {"at": t}, t))]
        self._gate: dict[str, float] = {}
        for k in self._event_rules:
            self._regate(k)

    def _id(self, rule: TriggerRule, identity: Mapping[str, Any], tag: Any) -> str:
        return entry_id(rule.name, self.experiment, self.run, identity, tag)

    # the runner's listener: (events, line, attempt)
    def listener(self, events: Sequence["Event"], line: str, attempt: Any = None) -> None:
        """Feed one parsed line (or a run state event, whose kind is ``state``) to the rules."""
        with self._lock:
            if attempt is not None:
                self.attempt = getattr(attempt, "number", attempt)
            if line and self._idle_rules:
                self.last_activity = time.time()
            gate = self._gate
            for e in events:
                k = e.kind
                step = e.values.get("step")
                if k == "step":
                    if step is not None:
                        self.step = step
                elif k == "checkpoint":
                    if isinstance(step, int) and (self.step is None or step > self.step):
                        self.step = step
                    p = e.values.get("path")
                    if p:
                        self.path = p if os.path.isabs(p) else str(self.base / p)
                elif k == "state":
                    self._on_state(e)
                    continue
                g = gate.get(k)
                # the common case, a step line below every threshold, costs one comparison
                if g is None or (g != _ANY and (step.__class__ is not int or step < g)):
                    continue
                for c in self._event_rules[k]:
                    vals = dict(e.values)
                    if k == "checkpoint" and self.path:
                        vals["path"] = self.path
                    self._consider(c, vals, e.line)
                self._regate(k)
            if line:
                if self._line_filter is not None and self._line_filter.search(line) is not None:
                    for c in self._line_rules:
                        vals = c.match_line(line)
                        if vals is not None:
                            self._consider(c, vals, line)
                for c in self._line_always:
                    vals = c.match_line(line)
                    if vals is not None:
                        self._consider(c, vals, line)

    def _regate(self, kind: str) -> None:
        self._gate[kind] = min(c.next_step() for c in self._event_rules[kind])

    def feed(self, line: str, parser: Any) -> None:
        """Parse `line` with `parser` (a :class:`~colabkit.events.LineParser`) and feed it (``triggers watch``)."""
        line = line.rstrip("\r\n")
        for seg in (line.split("\r") if "\r" in line else (line,)):
            if seg:
                self.listener(parser.parse(seg), seg)

    def tick(self, now: float | None = None) -> None:
        """Fire inactivity rules whose silence has lasted long enough (called by the worker and the watcher)."""
        if not self._idle_rules or self.ended:
            return
        now = time.time() if now is None else now
        if self.checkpoint_dir is not None:
            try:
                saved = os.stat(self.checkpoint_dir).st_mtime
            except OSError:
                saved = 0.0
        with self._lock:
            if self.checkpoint_dir is not None and saved > self.last_activity:
                self.last_activity = saved
            idle = now - self.last_activity
            for c in self._idle_rules:
                if idle >= (c.rule.inactivity or 0):
                    self._consider(c, {"idle": round(idle, 1), "since": round(self.last_activity, 3)}, "",
                                   identity={"since": round(self.last_activity, 3)})

    def _on_state(self, e: "Event") -> None:
        state = e.values.get("state")
        if state in ("finished", "failed", "oom", "stopped"):
            self.ended = True  # a run that ended is not silent: no inactivity rule fires after it
        vals = dict(e.values)
        if vals.get("path"):
            self.path = str(vals["path"])
        for c in self._state_rules:
            if c.rule.detector == state:
                self._consider(c, vals, "", identity={"state": state, "run_id": self.run_id,
                                                      "attempt": vals.get("attempt")})

    def _consider(self, c: _Compiled, values: dict[str, Any], line: str,
                  identity: Mapping[str, Any] | None = None) -> None:
        rule = c.rule
        for k, g in c.extract:
            if g in values:
                values[k] = values[g]
        for k, v in c.metadata.items():
            values.setdefault(k, v)
        step = _step_of(values)
        if rule.compare and not all(_compare(values.get(k), op, v) for k, op, v in rule.compare):
            return
        fire: list[tuple[Mapping[str, Any], Any]] = []
        if rule.at is not None:
            if step is None:
                return
            while c.pending_at and c.pending_at[0] <= step:
                t = c.pending_at.pop(0)
                fire.append(({"at": t}, t))
            if not fire:
                return
        elif rule.every is not None:
            if step is None or step < rule.every:
                return
            m = step // rule.every * rule.every
            if c.every_last is not None and m <= c.every_last:
                return
            c.every_last = m
            fire.append(({"every": m}, m))
        else:
            if identity is None:
                identity = {k: v for k, v in values.items() if k not in ("idle",)} or {"line": line}
            tag = values.get("state") if rule.detector in TRIGGER_STATES else step
            fire.append((identity, tag))
        for ident, tag in fire:
            eid = self._id(rule, ident, tag)
            if eid in self._seen:
                continue
            self._seen.add(eid)
            if not self.dry_run and self.queue.exists(eid):
                continue
            self._fire(rule, eid, values, line, step, tag)

    def context(self, values: Mapping[str, Any], step: int | None) -> dict[str, Any]:
        ctx: dict[str, Any] = {"experiment": self.experiment, "run_id": self.run_id, "run": self.run,
                               "output_dir": self.output_dir, "attempt": self.attempt,
                               "step": step if step is not None else self.step, "path": self.path}
        ctx.update({k: v for k, v in values.items() if v is not None})
        if isinstance(ctx.get("path"), str) and ctx["path"] and not os.path.isabs(ctx["path"]):
            ctx["path"] = str(self.base / ctx["path"])
        return ctx

    def _fire(self, rule: TriggerRule, eid: str, values: dict[str, Any], line: str, step: int | None,
              tag: Any) -> None:
        ctx = self.context(values, step)
        ctx["rule"] = rule.name
        now = time.time()
        entry: dict[str, Any] = {
            "format": FORMAT, "id": eid, "rule": rule.name, "experiment": self.experiment, "run": self.run,
            "run_id": self.run_id, "mode": rule.mode, "retry": rule.retry, "max_attempts": rule.max_attempts,
            "threshold": tag if (rule.at is not None or rule.every is not None) else None,
            "step": ctx.get("step"), "event": {"line": line, "values": _plain(values), "time": now},
            "state": "pending", "attempts": 0, "created": now, "updated": now, "history": [],
            "output": None, "result": None, "error": None, "worker": None}
        try:
            entry["action"] = render_action(rule, ctx, self.config, self.experiment, base_args=self.args)
            if rule.file_exists:
                entry["wait"] = {"file": render(rule.file_exists, ctx),
                                 "until": now + rule.wait if rule.wait is not None else None}
            if rule.command:
                entry["condition"] = [render(x, ctx) for x in rule.command]
        except TriggerError as e:
            entry["action"] = {"type": rule.action.type}
            entry["state"], entry["error"] = "failed", f"rule {rule.name}: {e}"
        if entry.get("wait") and rule.wait is None and not os.path.exists(entry["wait"]["file"]):
            return  # file_exists without wait: a condition checked now, like the others
        if entry["state"] == "pending":
            if entry.get("wait") and rule.wait is not None:
                entry["state"] = "waiting"
            elif rule.action.type == "cooldown" and rule.action.when == "after_main" and self.run == _RUN_MAIN:
                entry["state"] = "waiting"
        entry["history"].append({"state": entry["state"], "time": now})
        self.fired.append(entry)
        if self.dry_run:
            return
        if rule.mode == "inline" and entry["state"] == "pending":
            self._run_inline(rule, entry)
            return
        if self.queue.create(entry):
            log.info("%s: trigger %s fired (%s)", self.experiment, rule.name, eid)
            if self.on_enqueue is not None:
                self.on_enqueue()

    def _run_inline(self, rule: TriggerRule, entry: dict[str, Any]) -> None:
        if entry.get("condition") and not _condition_passes(entry["condition"], self.config, self.experiment):
            return
        with self.queue.lock(entry["id"]) as got:
            if not got:
                return
            entry["state"], entry["attempts"] = "running", 1
            entry["worker"] = {"pid": os.getpid(), "host": socket.gethostname(), "thread": "inline"}
            if not self.queue.create(entry):
                return
            _execute(self.queue, entry, self.config)


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in values.items()}


def render_action(rule: TriggerRule, ctx: Mapping[str, Any], config: "Config", experiment: str, *,
                  base_args: Sequence[str] = ()) -> dict[str, Any]:
    """The rule's action with every template filled in from `ctx` (a cooldown's train.py arguments are the main
    run's `base_args` followed by the rule's, which argparse lets override)."""
    a = rule.action
    if a.type == "cooldown":
        folder = render(a.folder, ctx)
        path = ctx.get("path")
        if not path:
            raise TriggerError("a cooldown needs the checkpoint to start from, and no checkpoint was seen yet")
        overrides = [render(x, ctx) for x in a.args]
        return {"type": "cooldown", "args": [*base_args, *overrides], "overrides": overrides, "when": a.when,
                "folder": folder,
                "output_dir": str(config.experiment_dir(experiment) / folder), "checkpoint": str(path),
                "triggers": a.triggers}
    if a.type == "command":
        return {"type": "command", "command": [render(x, ctx) for x in a.command],
                "cwd": render(a.cwd, ctx) if a.cwd else str(config.experiment_dir(experiment)),
                "env": {k: render(v, ctx) for k, v in a.env}, "timeout": a.timeout}
    if a.type == "log":
        return {"type": "log", "message": render(a.message, ctx), "level": a.level}
    return {"type": "sync", "tier": a.tier}


# -- actions ----------------------------------------------------------------------------------------------
def _condition_passes(argv: Sequence[str], config: "Config", experiment: str, timeout: float = 300.0) -> bool:
    cwd = config.experiment_dir(experiment)
    try:
        rc = subprocess.run(list(argv), cwd=cwd if cwd.is_dir() else config.root, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout).returncode
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s: condition command %s could not run: %s", experiment, shlex.join(argv), e)
        return False
    return rc == 0


def _tail(path: str | os.PathLike | None, n: int = 20) -> list[str]:
    if not path:
        return []
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return [x.rstrip("\n") for x in deque(f, maxlen=n)]
    except OSError:
        return []


_current_procs: dict[int, subprocess.Popen] = {}


def _execute(q: Queue, entry: dict[str, Any], config: "Config", stop: threading.Event | None = None) -> None:
    """Run a claimed entry (its lock is held by the caller) and record how it ended."""
    a = entry.get("action") or {}
    typ = a.get("type")
    q.write(entry)
    try:
        if entry.get("condition") and not _condition_passes(entry["condition"], config, q.experiment):
            q.transition(entry, "cancelled", note="condition command failed", ended=time.time(),
                         result={"condition": "failed"},
                         error=f"condition {shlex.join(entry['condition'])} did not exit 0")
            return
        if typ == "command":
            ok, result, err = _run_command(q, entry, a, stop)
        elif typ == "cooldown":
            ok, result, err = _run_cooldown(q, entry, a, config)
        elif typ == "log":
            getattr(log, "warning" if a.get("level") == "warning" else "info")("%s: %s", q.experiment, a["message"])
            out = q.dir / "triggers.log"
            with open(out, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {entry['rule']}: {a['message']}\n")
            ok, result, err = True, {"message": a["message"]}, None
        elif typ == "sync":
            ok, result, err = _run_sync(config, a)
        else:
            ok, result, err = False, None, f"unknown action {typ!r}"
    except ColabkitError as e:
        ok, result, err = False, None, str(e)
    except Exception as e:  # an action never takes its worker down
        log.exception("%s: action %s failed", q.experiment, entry.get("id"))
        ok, result, err = False, None, f"{type(e).__name__}: {e}"
    state = "done" if ok else "failed"
    if not ok and entry.get("retry") and entry.get("attempts", 0) < entry.get("max_attempts", 1):
        q.transition(entry, "pending", note=f"failed ({err}); retried (attempt {entry['attempts']} of "
                     f"{entry['max_attempts']})", result=result, error=err)
        return
    q.transition(entry, state, ended=time.time(), result=result, error=err)


def _run_command(q: Queue, entry: dict[str, Any], a: Mapping[str, Any],
                 stop: threading.Event | None) -> tuple[bool, dict[str, Any] | None, str | None]:
    out = q.dir / f"{entry['id']}.log"
    entry["output"] = str(out)
    q.write(entry)
    env = dict(os.environ)
    env.update(a.get("env") or {})
    env.update({"COLABKIT_TRIGGER_ENTRY": entry["id"], "COLABKIT_EXPERIMENT": q.experiment})
    cwd = a.get("cwd") or str(q.config.root)
    start = time.time()
    with open(out, "ab") as f:
        f.write(f"# colabkit trigger {entry['id']} attempt {entry.get('attempts')}: "
                f"{shlex.join(a['command'])}\n".encode())
        f.flush()
        try:
            proc = subprocess.Popen(a["command"], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return False, None, f"cannot run {a['command'][0]!r}: {e.strerror} (cwd {cwd})"
        _current_procs[proc.pid] = proc
        try:
            timeout = a.get("timeout")
            deadline = start + timeout if timeout else None
            while True:
                try:
                    rc = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if (deadline is not None and time.time() > deadline) or (stop is not None and stop.is_set()):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(proc.pid, signal.SIGKILL)
                        rc = proc.wait()
                        if stop is not None and stop.is_set() and not (deadline and time.time() > deadline):
                            return False, {"exit_code": rc}, "stopped with its worker"
                        return False, {"exit_code": rc}, (f"timed out after {format_duration(timeout)} "
                                                          f"(killed; output in {out})")
        finally:
            _current_procs.pop(proc.pid, None)
    res = {"exit_code": rc, "seconds": round(time.time() - start, 3)}
    if rc != 0:
        tail = _tail(out, 5)
        return False, res, f"exited with code {rc}" + (f": {tail[-1]}" if tail else "")
    return True, res, None


def _run_sync(config: "Config", a: Mapping[str, Any]) -> tuple[bool, dict[str, Any] | None, str | None]:
    from . import sync
    tiers = [a["tier"]] if a.get("tier") else None
    if sync.status(config=config).get("groups"):
        res = sync.flush()
    else:
        res = sync.once(config=config, tiers=tiers)
    ok = bool(res.get("ok"))
    return ok, {"tiers": sorted((res.get("tiers") or {}).keys())}, None if ok else "a tier did not upload everything"


def _run_cooldown(q: Queue, entry: dict[str, Any], a: Mapping[str, Any],
                  config: "Config") -> tuple[bool, dict[str, Any] | None, str | None]:
    from . import runner
    from .checkpoints import latest_valid
    out = Path(a["output_dir"])
    ck_dir = out / config.checkpoints
    resume_from = a["checkpoint"]
    with contextlib.suppress(ColabkitError, OSError):
        found = latest_valid(ck_dir)  # a cooldown interrupted earlier resumes from its own newest checkpoint
        if found is not None:
            info = found[0] if isinstance(found, tuple) else found
            resume_from = str(getattr(info, "path", info))
    entry["result"] = {"resume_from": resume_from, "output_dir": str(out)}
    q.write(entry)
    res = runner.train(q.experiment, config=config, resume=resume_from, args=list(a.get("args") or []),
                       output_dir=out, name=f"{q.experiment}.{a['folder']}", triggers=bool(a.get("triggers")),
                       run=a["folder"])
    assert not isinstance(res, runner.Job)
    entry["output"] = str(res.log) if res.log else None
    result = {"resume_from": resume_from, "output_dir": str(out), "run_id": res.run_id, "state": res.state,
              "first_step": res.attempts[0].first_step if res.attempts else None, "last_step": res.step,
              "log_dir": str(res.log_dir), "last_checkpoint": res.last_checkpoint}
    return res.ok, result, None if res.ok else f"the cooldown run ended {res.state}"


# -- the worker --------------------------------------------------------------------------------------------
def _main_active(config: "Config", experiment: str) -> bool:
    """Whether the experiment's main %train run is going on (in this process, or another one on this machine)."""
    from . import runner
    with runner._jobs_lock:
        job = runner._jobs.get(experiment)
    if job is not None and job.running:
        return True
    data = runner._read_job_file(config.state_dir / "jobs" / f"{experiment}.json")
    return bool(data and data.get("live"))


class Worker:
    """Runs the queued entries of one experiment (or of all), one at a time.

    Args:
        config: the configuration.
        experiment: the experiment whose queue it runs (None: every queue of the project).
        until_idle: return (the thread ends) once nothing is pending or waiting and no main run is active.
        poll: seconds between looks at the queue when nothing wakes it.
        engines: engines whose inactivity rules it ticks.
    """

    def __init__(self, config: "Config", *, experiment: str | None = None, until_idle: bool = False,
                 poll: float = POLL) -> None:
        self.config = config
        self.experiment = experiment
        self.until_idle = until_idle
        self.poll = poll
        self.engines: list[Engine] = []
        self.jobs: list[Any] = []   # this kernel's main runs: running until their final sync flush is done
        self.ran: list[str] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None

    def _queues(self) -> list[Queue]:
        exps = [self.experiment] if self.experiment else _experiments_with_queues(self.config)
        return [Queue(self.config, e) for e in exps]

    def wake(self) -> None:
        self._idle.clear()
        self._wake.set()

    def run_once(self) -> tuple[int, int]:
        """One pass over the queue: settle interrupted and waiting entries, run every runnable one.

        Returns:
            (entries run, entries still pending or waiting)
        """
        ran, left = 0, 0
        for q in self._queues():
            for e in q.entries():
                if self._stop.is_set():
                    return ran, left + 1
                st = e.get("state")
                if st == "running":
                    self._settle_running(q, e)
                elif st == "waiting":
                    left += 1
                    self._check_waiting(q, e)
                if (q.read(e["id"]) or {}).get("state") == "pending":
                    if self._claim_and_run(q, e["id"]):
                        ran += 1
                    elif (q.read(e["id"]) or {}).get("state") in ("pending", "waiting"):
                        left += 1
        return ran, left

    def _settle_running(self, q: Queue, e: dict[str, Any]) -> None:
        with q.lock(e["id"]) as got:
            if not got:
                return  # a live worker runs it
            e = q.read(e["id"]) or e
            if e.get("state") != "running":
                return
            who = e.get("worker") or {}
            note = f"its worker (pid {who.get('pid')} on {who.get('host')}) stopped while it ran"
            if e.get("retry") and e.get("attempts", 0) < e.get("max_attempts", 1):
                q.transition(e, "pending", note=note + "; retried (retry: true)")
            else:
                q.transition(e, "interrupted", note=note, error=note + "; run it again with "
                             f"'{command('triggers retry ' + e['id'])}' if that is safe")

    def _check_waiting(self, q: Queue, e: dict[str, Any]) -> None:
        w = e.get("wait")
        a = e.get("action") or {}
        ready, fail = True, None
        if w:
            if not os.path.exists(w["file"]):
                ready = False
                if w.get("until") is not None and time.time() > w["until"]:
                    fail = f"{w['file']} did not appear within the wait ({e['rule']}: conditions.wait)"
        if ready and a.get("type") == "cooldown" and a.get("when") == "after_main" and e.get("run") == _RUN_MAIN:
            ready = not self._main_running(q.experiment)
        if not ready and fail is None:
            return
        with q.lock(e["id"]) as got:
            if not got:
                return
            e = q.read(e["id"]) or e
            if e.get("state") != "waiting":
                return
            if fail:
                q.transition(e, "failed", note="wait timed out", error=fail, ended=time.time())
            else:
                q.transition(e, "pending", note="ready")

    def _claim_and_run(self, q: Queue, eid: str) -> bool:
        with q.lock(eid) as got:
            if not got:
                return False
            e = q.read(eid)
            if e is None or e.get("state") != "pending":
                return False
            e["attempts"] = int(e.get("attempts") or 0) + 1
            e["worker"] = {"pid": os.getpid(), "host": socket.gethostname(), "thread": threading.current_thread().name}
            q.transition(e, "running", started=time.time())
            _execute(q, e, self.config, self._stop)
            self.ran.append(eid)
            return True

    def loop(self) -> None:
        """Run until stopped (or, with `until_idle`, until nothing is left to do)."""
        for q in self._queues():  # what a writer killed mid-write left behind
            sweep_temporaries(q.dir)
        while not self._stop.is_set():
            self._wake.clear()
            try:
                ran, left = self.run_once()
                self.engines = [eng for eng in self.engines if not eng.ended]
                for eng in self.engines:
                    eng.tick()
            except (OSError, ColabkitError) as e:
                log.warning("triggers worker: %s", e)
                ran, left = 0, 1
            if ran:
                continue
            if self.until_idle and left == 0 and not self._main_running():
                self._idle.set()
                return
            self._wake.wait(self.poll)

    def _main_running(self, experiment: str | None = None) -> bool:
        exp = experiment or self.experiment
        if exp is None:
            return False
        self.jobs = [j for j in self.jobs if j.running]
        if any(j.experiment == exp for j in self.jobs):
            return True  # ended, perhaps, but still flushing its sync: a cooldown would miss its own sync
        return _main_active(self.config, exp)

    def start(self) -> "Worker":
        t = threading.Thread(target=self._loop_safely, name=f"colabkit-triggers-{self.experiment or 'all'}",
                             daemon=True)
        self._thread = t
        t.start()
        return self

    def _loop_safely(self) -> None:
        try:
            self.loop()
        except BaseException:  # a background thread logs, never raises into nothing
            log.exception("triggers worker for %s stopped", self.experiment)
        finally:
            self._idle.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish its queue (until_idle); True when it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, *, timeout: float | None = 30.0) -> None:
        """Stop after the current action (a running command is killed, a cooldown run stopped). Safe twice."""
        self._stop.set()
        self._wake.set()
        from . import runner
        if self.experiment:
            for j in runner._jobs_here(self.config, self.experiment):
                if getattr(j, "key", j.experiment) != j.experiment:  # a cooldown run this worker started
                    with contextlib.suppress(Exception):
                        j.stop(timeout=timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


_workers: dict[tuple[str, str], Worker] = {}
_workers_lock = threading.Lock()
_atexit_installed = False


def _ensure_worker(config: "Config", experiment: str, engine: Engine | None = None, job: Any = None) -> Worker:
    """The kernel's worker for this experiment: started when missing or finished, woken otherwise."""
    global _atexit_installed
    key = (str(config.root), experiment)
    with _workers_lock:
        w = _workers.get(key)
        if w is None or not w.alive or w._stop.is_set():
            w = Worker(config, experiment=experiment, until_idle=True)
            if engine is not None:
                w.engines.append(engine)
            if job is not None:
                w.jobs.append(job)
            _workers[key] = w
            w.start()
        else:
            if engine is not None and engine not in w.engines:
                w.engines.append(engine)
            if job is not None and job not in w.jobs:
                w.jobs.append(job)
        if not _atexit_installed:
            atexit.register(stop_workers, timeout=10.0)
            _atexit_installed = True
    w.wake()
    return w


def join(*, experiment: str | None = None, timeout: float | None = None) -> bool:
    """Wait until the kernel's workers (of `experiment`, or all) have drained their queues and ended.

    Returns:
        True when every one ended within `timeout` seconds.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with _workers_lock:
        ws = [w for (_, e), w in _workers.items() if experiment is None or e == experiment]
    ok = True
    for w in ws:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = w.join(left) and ok
    return ok


def stop_workers(*, timeout: float | None = 30.0) -> None:
    """Stop every worker thread of this kernel (at exit; tests)."""
    with _workers_lock:
        ws = list(_workers.values())
        _workers.clear()
    for w in ws:
        w.stop(timeout=timeout)


def attach(job: Any) -> Engine | None:
    """Register the rules engine of `job` (a :class:`colabkit.runner.Job`) as one of its line listeners, and
    make sure a worker runs the queue. Returns the engine (None: the experiment has no rules).

    Raises:
        ConfigError: an experiment's triggers.yaml holds a bad rule (before the run starts).
    """
    rs = rules(job.config, experiment=job.experiment)
    if not rs:
        return None
    run = getattr(job, "run_name", None) or _RUN_MAIN
    eng = Engine(job.config, job.experiment, rs, run=run, run_id=job.run_id,
                 output_dir=getattr(job, "output_dir", None) or job.config.experiment_dir(job.experiment),
                 base=job.cwd, args=job.args, checkpoint_dir=getattr(job, "checkpoint_dir", None))
    main = job if run == _RUN_MAIN else None  # after_main waits for the experiment's main run only
    eng.on_enqueue = lambda: _ensure_worker(job.config, job.experiment, eng, main)
    job.listeners.append(eng.listener)
    _ensure_worker(job.config, job.experiment, eng, main)
    return eng


# -- watching a log file -------------------------------------------------------------------------------------
def _position_file(cfg: "Config", experiment: str, logfile: Path) -> Path:
    h = hashlib.sha256(str(logfile).encode()).hexdigest()[:16]
    return queue_dir(cfg, experiment) / "watch" / f"{h}.json"


def watch(logfile: str | os.PathLike, *, config: "Config | None" = None, experiment: str | None = None,
          run: str = _RUN_MAIN, once: bool = False, worker: bool = True, poll: float = POLL,
          stop_event: threading.Event | None = None, on_entry: Callable[[dict[str, Any]], None] | None = None
          ) -> dict[str, Any]:
    """Follow `logfile` (any training log: one colabkit did not start, a SLURM log) and feed its lines to the
    rules, in the foreground. The read position is kept in ``.colabkit/actions/<exp>/watch/``, so a restart
    neither misses nor repeats lines; a last line without its newline is not read until it ends.

    Args:
        logfile: the log to follow.
        experiment: whose rules and queue (default: the only experiment of the project).
        run: the run's identity in entry ids (``main``).
        once: read to the end, run the queue until it is drained, and return (instead of following).
        worker: run the queue in this process as well (a thread), as ``triggers worker`` does.
        poll: seconds between looks at the file.
        stop_event: set it to stop following.
    Returns:
        {"log", "experiment", "offset", "lines", "fired": [entry ids], "ran": [entry ids]}
    Raises:
        TriggerError: the file does not exist.
    """
    from .events import LineParser
    cfg = _config(config)
    exp = _pick_experiment(cfg, experiment, must_exist=False)
    path = Path(logfile).expanduser().resolve()
    if not path.is_file():
        raise TriggerError(f"{logfile}: no such log file; pass the training log to watch")
    rs = rules(cfg, experiment=exp)
    if not rs:
        raise TriggerError(f"{exp}: no trigger rules (triggers: in colabkit.yaml or experiments/{exp}/{FILE_NAME}); "
                           f"add a rule first ('{command('triggers check')}' validates them)")
    # the worker may only call it a day once the reading is done (until then more entries may come)
    wk = Worker(cfg, experiment=exp, until_idle=False, poll=poll) if worker else None
    exp_dir = cfg.experiment_dir(exp)
    eng = Engine(cfg, exp, rs, run=run, base=exp_dir if exp_dir.is_dir() else path.parent,
                 on_enqueue=wk.wake if wk else None,
                 checkpoint_dir=cfg.checkpoint_dir(exp) if exp_dir.is_dir() else None)
    if wk is not None:
        wk.engines.append(eng)
    parser = LineParser(cfg)
    posf = _position_file(cfg, exp, path)
    pos = _read_json(posf) or {}
    offset = int(pos.get("offset") or 0)
    stop = stop_event or threading.Event()
    lines = 0
    n_fired = 0
    if wk is not None:
        wk.start()
    try:
        while not stop.is_set():
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and (pos.get("inode") not in (None, st.st_ino) or st.st_size < offset):
                offset = 0  # rotated or truncated: a new file, read from its start
            pos["inode"] = st.st_ino if st is not None else pos.get("inode")
            got = 0
            if st is not None and st.st_size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        end = chunk.rfind(b"\n")
                        if end < 0:
                            if len(chunk) < (1 << 20):
                                break  # a partial last line: read again once it ends
                            end = len(chunk) - 1
                        for raw in chunk[:end + 1].split(b"\n")[:-1]:
                            eng.feed(raw.decode("utf-8", "replace"), parser)
                            lines += 1
                            got += 1
                        offset += end + 1
                        f.seek(offset)
                        atomic_write_json(posf, {"format": FORMAT, "log": str(path), "inode": pos["inode"],
                                                 "offset": offset, "updated": time.time()})
            if on_entry is not None:
                for e in eng.fired[n_fired:]:
                    on_entry(e)
            n_fired = len(eng.fired)
            if wk is None:
                eng.tick()
            if once and not got:
                break
            if not got:
                stop.wait(poll)
        if wk is not None and once:
            wk.until_idle = True
            wk.wake()
            while wk.alive and not stop.is_set():
                wk.join(poll)
    finally:
        if wk is not None:
            wk.stop(timeout=30.0)
    return {"log": str(path), "experiment": exp, "offset": offset, "lines": lines,
            "fired": [e["id"] for e in eng.fired], "ran": list(wk.ran) if wk else []}


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _pick_experiment(cfg: "Config", experiment: str | None, *, must_exist: bool = True) -> str:
    """The experiment named (checked like every command's: an unknown one is an error that lists those here), else
    the only one. `must_exist` False: ``triggers watch`` of a log that no experiment folder belongs to (a run
    colabkit did not start) only names its queue."""
    if experiment:
        if must_exist:
            cfg.require_experiment(experiment)
        return experiment
    names = cfg.experiment_names()
    if len(names) == 1:
        return names[0]
    raise TriggerError("name the experiment with --experiment vXX (" +
                       (f"experiments here: {', '.join(names)}" if names else "no experiments/ folder here") + ")")


# -- the public API behind %triggers ---------------------------------------------------------------------------
def _rule_dict(r: TriggerRule) -> dict[str, Any]:
    a = r.action
    d: dict[str, Any] = {"name": r.name, "detector": r.detector, "action": a.type, "mode": r.mode,
                         "at": list(r.at) if r.at is not None else None, "every": r.every,
                         "pattern": r.pattern, "source": r.source or "colabkit.yaml", "key": r.key,
                         "retry": r.retry, "max_attempts": r.max_attempts}
    if r.file_exists:
        d["file_exists"], d["wait"] = r.file_exists, r.wait
    if r.command:
        d["condition"] = list(r.command)
    if r.compare:
        d["metadata"] = [list(x) for x in r.compare]
    if r.inactivity:
        d["inactivity"] = r.inactivity
    if a.type == "cooldown":
        d["args"], d["when"], d["folder"] = list(a.args), a.when, a.folder
    elif a.type == "command":
        d["command"] = list(a.command)
    elif a.type == "log":
        d["message"] = a.message
    elif a.type == "sync":
        d["tier"] = a.tier
    return d


def check(*, config: "Config | None" = None, experiment: str | None = None) -> dict[str, Any]:
    """Validate the rules and return them.

    Returns:
        {"experiment": ..., "rules": [{name, detector, action, mode, at, every, ...}]}
    Raises:
        ConfigError: a bad rule (key path, value, what is allowed).
    """
    cfg = _config(config)
    if experiment:
        cfg.require_experiment(experiment)
    rs = rules(cfg, experiment=experiment)
    return {"experiment": experiment, "rules": [_rule_dict(r) for r in rs]}


def test(logfile: str | os.PathLike, *, config: "Config | None" = None, experiment: str | None = None,
         run: str = _RUN_MAIN) -> dict[str, Any]:
    """Which rules would fire on an existing log, with their rendered actions; nothing is run or queued.

    Returns:
        {"log", "experiment", "lines", "fired": [{"id", "rule", "step", "state", "action", "queued"}]}
        (``queued``: an entry of that id exists already, so a real run would not fire it again).
    """
    from .events import LineParser
    cfg = _config(config)
    exp = _pick_experiment(cfg, experiment)
    path = Path(logfile).expanduser()
    if not path.is_file():
        raise TriggerError(f"{logfile}: no such log file; pass the training log to test the rules on")
    rs = rules(cfg, experiment=exp)
    eng = Engine(cfg, exp, rs, run=run, base=cfg.experiment_dir(exp), dry_run=True)
    parser = LineParser(cfg)
    n = 0
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            eng.feed(line, parser)
            n += 1
    from .secrets import redact_config
    q = Queue(cfg, exp)
    fired = [{"id": e["id"], "rule": e["rule"], "step": e["step"], "state": e["state"],
              "action": redact_config(e["action"]),
              "error": e.get("error"), "queued": q.exists(e["id"])} for e in eng.fired]
    return {"log": str(path), "experiment": exp, "lines": n, "rules": len(rs), "fired": fired}


def _find(cfg: "Config", eid: str) -> tuple[Queue, dict[str, Any]]:
    matches: list[tuple[Queue, str]] = []
    for exp in _experiments_with_queues(cfg):
        q = Queue(cfg, exp)
        ids = q.ids()
        if eid in ids:
            e = q.read(eid)
            if e is not None:
                return q, e
        matches += [(q, i) for i in ids if i.startswith(eid)]
    if len(matches) == 1:
        q, i = matches[0]
        e = q.read(i)
        if e is not None:
            return q, e
    if len(matches) > 1:
        raise TriggerError(f"{eid!r} matches {len(matches)} entries ({', '.join(i for _, i in matches[:5])}); "
                           "give more of the id")
    raise TriggerError(f"no queue entry {eid!r}; '{command('triggers list')}' shows the entries")


def _entry_view(q: Queue, e: dict[str, Any]) -> dict[str, Any]:
    st = _effective_state(q, e)
    return {"id": e.get("id"), "experiment": q.experiment, "rule": e.get("rule"),
            "action": (e.get("action") or {}).get("type"), "state": st, "step": e.get("step"),
            "attempts": int(e.get("attempts") or 0), "updated": float(e.get("updated") or 0.0),
            "created": e.get("created"), "error": e.get("error")}


def list_entries(*, config: "Config | None" = None, experiment: str | None = None,
                 state: str | None = None) -> list[dict[str, Any]]:
    """The queue entries (of `experiment`, or all), newest first; `state` filters (``interrupted`` includes
    running entries whose worker is gone)."""
    if state is not None and state not in STATES:
        raise TriggerError(f"--state {state!r} is not a state; use one of {', '.join(STATES)}")
    cfg = _config(config)
    if experiment:
        cfg.require_experiment(experiment)
    exps = [experiment] if experiment else _experiments_with_queues(cfg)
    out = []
    for exp in exps:
        q = Queue(cfg, exp)
        for e in q.entries():
            v = _entry_view(q, e)
            if state is None or v["state"] == state:
                out.append(v)
    out.sort(key=lambda v: (-(v["created"] or 0), v["id"] or ""))
    return out


def show(entry: str, *, config: "Config | None" = None, lines: int = 20) -> dict[str, Any]:
    """One entry: the whole record, its effective state, and the tail of its output log."""
    cfg = _config(config)
    q, e = _find(cfg, entry)
    from .secrets import redact, redact_config
    out = redact_config(dict(e))  # an env: TOKEN of a command is never shown
    out["state"] = _effective_state(q, e)
    out["path"] = str(q.path(e["id"]))
    out["output_tail"] = [redact(x) for x in _tail(e.get("output"), lines)]
    return out


def retry(entry: str, *, config: "Config | None" = None) -> dict[str, Any]:
    """Put a failed, interrupted or cancelled entry back into the queue (a worker runs it again).

    Raises:
        TriggerError: unknown id, or the entry is pending, waiting, running or done.
    """
    cfg = _config(config)
    q, e = _find(cfg, entry)
    with q.lock(e["id"]) as got:
        e = q.read(e["id"]) or e
        st = _effective_state(q, e) if got else "running"
        if st in ("pending", "waiting"):
            raise TriggerError(f"{e['id']} is {st} already; a worker will run it ('colabkit triggers worker' "
                               "runs the queue in a terminal)")
        if st == "running":
            raise TriggerError(f"{e['id']} is running (worker pid {(e.get('worker') or {}).get('pid')}); wait for "
                               "it, or cancel it")
        if st == "done":
            raise TriggerError(f"{e['id']} is done; it ran once as it should. To run the action again, run its "
                               f"command by hand ('{command('triggers show ' + e['id'])}' prints it)")
        q.transition(e, "pending", note=f"retried by hand (was {st})", error=None)
    _wake_local(cfg, q.experiment)
    return _entry_view(q, e)


def cancel(entry: str, *, config: "Config | None" = None) -> dict[str, Any]:
    """Cancel a pending, waiting, failed or interrupted entry (it is never run).

    Raises:
        TriggerError: unknown id, or it is running (a worker holds it) or already done.
    """
    cfg = _config(config)
    q, e = _find(cfg, entry)
    with q.lock(e["id"]) as got:
        if not got:
            raise TriggerError(f"{e['id']} is running (worker pid {(e.get('worker') or {}).get('pid')}); it cannot "
                               "be cancelled while it runs")
        e = q.read(e["id"]) or e
        st = _effective_state(q, e)
        if st == "done":
            raise TriggerError(f"{e['id']} is done already; nothing to cancel")
        if st == "cancelled":
            return _entry_view(q, e)
        q.transition(e, "cancelled", note=f"cancelled by hand (was {st})", ended=time.time())
    return _entry_view(q, e)


def _wake_local(cfg: "Config", experiment: str) -> None:
    with _workers_lock:
        w = _workers.get((str(cfg.root), experiment))
    if w is not None and w.alive:
        w.wake()


def worker(*, config: "Config | None" = None, experiment: str | None = None, once: bool = False,
           poll: float = POLL, stop_event: threading.Event | None = None) -> dict[str, Any]:
    """Run the queue in the foreground (``colabkit triggers worker``): until Ctrl-C, or with `once` until
    nothing is pending or waiting.

    Returns:
        {"ran": [entry ids]}
    """
    cfg = _config(config)
    w = Worker(cfg, experiment=experiment, until_idle=once, poll=poll)
    if stop_event is not None:
        threading.Thread(target=lambda: (stop_event.wait(), w.stop(timeout=0)), daemon=True,
                         name="colabkit-triggers-stopper").start()
    try:
        w.loop()
    except KeyboardInterrupt:
        w.stop(timeout=0)
        raise
    finally:
        w._stop.set()
        if stop_event is not None:
            stop_event.set()
    return {"ran": list(w.ran)}


def status(*, config: "Config | None" = None, experiment: str | None = None, step: int | None = None
           ) -> dict[str, Any]:
    """The triggers section of a status snapshot: each rule with its thresholds against the current step, and the
    queue by state. Cheap (small files under ``.colabkit/actions/``, no log is read); never raises for a project
    without rules.

    Returns:
        {"version": 1, "configured": bool, "step": int | None,
         "rules": [{"name", "detector", "action", "mode", "at", "every", "fired": [int], "next": int | None}],
         "queue": {state: count, ...}, "entries": [{"id", "rule", "action", "state", "step", "attempts",
         "updated"}]}  (entries newest first, at most 20)
    """
    out: dict[str, Any] = {"version": 1, "configured": False, "step": step, "rules": [],
                           "queue": {s: 0 for s in STATES}, "entries": []}
    try:
        cfg = _config(config)
    except ColabkitError as e:
        out["error"] = str(e)
        return out
    try:
        exps = [experiment] if experiment else (cfg.experiment_names() or [])
        rs: dict[str, tuple[TriggerRule, str | None]] = {r.name: (r, None) for r in cfg.triggers}
        for exp in exps:
            for r in rules(cfg, experiment=exp):
                rs.setdefault(r.name, (r, exp))
    except ColabkitError as e:
        out["error"] = str(e)
        rs = {r.name: (r, None) for r in cfg.triggers}
    if step is None:
        step = _current_step(cfg, experiment)
        out["step"] = step
    views: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for exp in ([experiment] if experiment else _experiments_with_queues(cfg)):
        q = Queue(cfg, exp)
        for e in q.entries():
            v = _entry_view(q, e)
            views.append((v, e))
            if v["state"] in out["queue"]:
                out["queue"][v["state"]] += 1
    for name, (r, _) in rs.items():
        fired = sorted({int(e["threshold"]) for _, e in views if e.get("rule") == name
                        and isinstance(e.get("threshold"), int)})
        nxt: int | None = None
        if r.at is not None:
            nxt = next((t for t in r.at if t not in fired and (step is None or t > step)), None)
        elif r.every is not None:
            base = max([step or 0, *fired])
            nxt = (base // r.every + 1) * r.every
        out["rules"].append({"name": r.name, "detector": r.detector, "action": r.action.type, "mode": r.mode,
                             "at": list(r.at) if r.at is not None else None, "every": r.every, "fired": fired,
                             "next": nxt})
    out["configured"] = bool(out["rules"])
    views.sort(key=lambda ve: -(ve[0]["updated"] or 0))
    out["entries"] = [{k: v[k] for k in ("id", "rule", "action", "state", "step", "attempts", "updated")}
                      for v, _ in views[:STATUS_ENTRIES]]
    return out


def _current_step(cfg: "Config", experiment: str | None) -> int | None:
    try:
        from . import runner
        jobs = runner.status(config=cfg, experiment=experiment)["jobs"]
    except (ColabkitError, OSError, ImportError):
        return None
    for j in jobs:
        if isinstance(j.get("step"), int) and j.get("key", j.get("experiment")) == j.get("experiment"):
            return j["step"]
    return None
