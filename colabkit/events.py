"""Log-line detectors: a regular expression with named groups turns a training-log line into an event record.

``%train`` reads progress from what ``train.py`` prints, so any script works unchanged. The defaults match

* ``step 120`` / ``iter 120`` / ``iteration 120`` / ``global_step=120`` / ``step 120/5000`` -> ``step``
  (and ``total`` when written as ``N/M``),
* ``loss 0.4123`` / ``loss=0.41`` / ``loss: 4.1e-01`` -> ``loss``,
* ``saved checkpoint at iteration 1200 to checkpoints/v01_step_00001200.pt`` -> ``checkpoint`` with ``step``
  and ``path``.

Each can be replaced in colabkit.yaml (``train.step_regex``, ``train.loss_regex``, ``train.checkpoint_regex``);
a pattern names what it captures with named groups (``(?P<step>\\d+)``), or its first group is taken.
Cooldown triggers build their own :class:`Detector` the same way.

Example:
    >>> parser = LineParser()
    >>> [(e.kind, e.values) for e in parser.parse("step 20 loss 0.5")]
    [('step', {'step': 20}), ('loss', {'loss': 0.5})]
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"
DEFAULT_STEP_REGEX = (r"(?<![A-Za-z0-9_])(?:global[_ ]?)?(?:step|iter(?:ation)?)(?![A-Za-z])\s*[:=#]?\s*(?P<step>\d+)"
                      r"(?:\s*/\s*(?P<total>\d+))?")
DEFAULT_LOSS_REGEX = rf"(?<![A-Za-z0-9_])loss\b\s*[:=]?\s*(?P<loss>{_NUMBER})"
DEFAULT_CHECKPOINT_REGEX = (r"(?i)sav(?:ed|ing)\s+(?:a\s+)?checkpoint\b.*?\b(?:iteration|iter|step)\s*[:=#]?\s*"
                            r"(?P<step>\d+)\b.*?\bto\s+(?P<path>\S+?)[.,;:]?$")

_INT_GROUPS = {"step", "iter", "iteration", "total", "epoch", "attempt", "n"}


def _convert(name: str, value: str | None) -> Any:
    """Numbers become int/float (steps are ints); other groups stay text."""
    if value is None:
        return None
    if name in _INT_GROUPS:
        try:
            return int(value)
        except ValueError:
            pass
    if name in ("path", "file", "name"):
        return value
    try:
        return int(value) if re.fullmatch(r"[-+]?\d+", value) else float(value)
    except ValueError:
        return value


@dataclass(frozen=True)
class Event:
    """One detected event.

    Attributes:
        kind: the detector's kind (``step``, ``loss``, ``checkpoint`` or a custom name).
        values: the named groups, converted (``step`` -> int, ``loss`` -> float, ``path`` -> str).
        line: the log line it came from (without the newline).
        time: when it was seen (epoch seconds).
    """

    kind: str
    values: Mapping[str, Any]
    line: str
    time: float = field(default_factory=time.time)

    @property
    def step(self) -> int | None:
        v = self.values.get("step")
        return v if isinstance(v, int) else None

    @property
    def loss(self) -> float | None:
        v = self.values.get("loss")
        return float(v) if isinstance(v, (int, float)) else None

    @property
    def path(self) -> str | None:
        v = self.values.get("path")
        return str(v) if v is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": dict(self.values), "line": self.line, "time": self.time}


class Detector:
    """A regular expression with named groups that turns matching lines into :class:`Event` records.

    Args:
        kind: the event kind it produces.
        pattern: the regular expression (searched anywhere in the line).
        key: the value a pattern without named groups captures with its first group (e.g. ``step``).
    Raises:
        ConfigError: the pattern does not compile (``{kind} regex: '(' is not a valid regular expression ...``).
    """

    def __init__(self, kind: str, pattern: str | re.Pattern[str], *, key: str | None = None) -> None:
        self.kind = kind
        self.key = key or kind
        if isinstance(pattern, re.Pattern):
            self.regex = pattern
        else:
            try:
                self.regex = re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{kind} regex: {pattern!r} is not a valid regular expression ({e})",
                                  key=f"train.{kind}_regex", value=pattern) from None
        self.pattern = self.regex.pattern

    def match(self, line: str, *, now: float | None = None) -> Event | None:
        """The event `line` holds, or None."""
        m = self.regex.search(line)
        if m is None:
            return None
        named = m.groupdict()
        if named:
            values = {k: _convert(k, v) for k, v in named.items() if v is not None}
        elif m.groups():
            values = {self.key: _convert(self.key, m.group(1))}
        else:
            values = {}
        if self.key in ("step", "loss") and self.key not in values:
            return None
        return Event(self.kind, values, line, now if now is not None else time.time())

    def __repr__(self) -> str:
        return f"Detector({self.kind!r}, {self.pattern!r})"


def detectors(config: "Config | None" = None, *, step_regex: str | None = None, loss_regex: str | None = None,
              checkpoint_regex: str | None = None) -> list[Detector]:
    """The three progress detectors: arguments, else ``config.train.*_regex``, else the defaults.

    The checkpoint detector comes first: its line usually carries a step too.
    """
    tr = config.train if config is not None else None
    ck = checkpoint_regex or (tr.checkpoint_regex if tr else None) or DEFAULT_CHECKPOINT_REGEX
    st = step_regex or (tr.step_regex if tr else None) or DEFAULT_STEP_REGEX
    lo = loss_regex or (tr.loss_regex if tr else None) or DEFAULT_LOSS_REGEX
    return [Detector("checkpoint", ck, key="step"), Detector("step", st), Detector("loss", lo)]


class LineParser:
    """Runs a set of detectors over lines; every detector that matches yields one event.

    Example:
        >>> LineParser().parse("saved checkpoint at iteration 100 to ck/v01_step_00000100.pt")[0].path
        'ck/v01_step_00000100.pt'
    """

    def __init__(self, config: "Config | None" = None, *, extra: Iterable[Detector] = (),
                 step_regex: str | None = None, loss_regex: str | None = None,
                 checkpoint_regex: str | None = None) -> None:
        self.detectors = [*detectors(config, step_regex=step_regex, loss_regex=loss_regex,
                                     checkpoint_regex=checkpoint_regex), *extra]
        # a cheap pre-filter: most log lines mention none of the words the defaults look for
        self._defaults = (step_regex is None and loss_regex is None and checkpoint_regex is None and not extra
                          and (config is None or not (config.train.step_regex or config.train.loss_regex
                                                      or config.train.checkpoint_regex)))

    def parse(self, line: str, *, now: float | None = None) -> list[Event]:
        line = line.rstrip("\r\n")
        if self._defaults:
            low = line.lower()
            if "step" not in low and "iter" not in low and "loss" not in low:
                return []
        t = now if now is not None else time.time()
        out = []
        for d in self.detectors:
            ev = d.match(line, now=t)
            if ev is not None:
                out.append(ev)
        return out
