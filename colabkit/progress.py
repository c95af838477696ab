"""What a run's output says, read once: :class:`LineFeed` takes each line the child prints, parses it once
(:class:`colabkit.events.LineParser`) and hands its events to the run's :class:`Progress` (step, loss, rate,
ETA, the loss history), to every listener (triggers, the dashboard) and to the caller; it keeps the last lines
for error messages and ``status``. The runner (:mod:`colabkit.runner`) owns the process and feeds it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .events import Event, LineParser
from .launch import oom_text, split_rank

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

#: the loss history keeps at most this many (step, loss) points: the whole run, evenly thinned
HISTORY_POINTS = 300
#: --estimate compares the pace once it was measured this long: 5% of the estimate, within these bounds (seconds)
ESTIMATE_MIN_WINDOW = 2.0
ESTIMATE_MAX_WINDOW = 60.0
#: how many of the child's last lines a feed keeps (``%train logs``, error messages, the exit's classification)
TAIL_KEPT = 200

#: a line listener: called with (events, line, attempt)
Listener = Callable[[Sequence[Any], str, Any], None]


class Progress:
    """Progress read from the log lines: step, loss, rate over a sliding window, ETA, last checkpoint."""

    def __init__(self, *, total_steps: int | None = None, window: int = 64,
                 history: Iterable[Sequence[float]] = (), history_points: int = HISTORY_POINTS) -> None:
        self.total_steps = total_steps
        self.step: int | None = None
        self.loss: float | None = None
        self.checkpoint_step: int | None = None
        self.checkpoint_path: str | None = None
        self.updated: float | None = None
        self._samples: deque[tuple[float, int]] = deque(maxlen=window)
        self._first: tuple[float, int] | None = None  # the attempt's first step: how long the pace was measured
        self._lock = threading.Lock()  # the pump thread writes while status() reads
        # (step, loss) of the whole run, across attempts: when it holds `history_points`, every other point is
        # dropped and only every `_stride`-th step is kept from then on, so it covers the run evenly
        self._history_points = max(4, int(history_points))
        self._history: list[tuple[int, float]] = []
        self._stride = 1
        self._newest: tuple[int, float] | None = None
        for point in history:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                self._add_point(int(point[0]), float(point[1]))

    def new_attempt(self) -> None:
        """A restart re-measures the pace (start-up time is not training time)."""
        with self._lock:
            self._samples.clear()
            self._first = None

    def observe(self, events: Iterable[Any], *, base: Path | None = None) -> None:
        with self._lock:
            self._observe(events, base)

    def _observe(self, events: Iterable[Any], base: Path | None) -> None:
        for e in events:
            self.updated = e.time
            if e.kind == "checkpoint":
                self.checkpoint_step = e.step if e.step is not None else self.checkpoint_step
                p = e.path
                if p and base is not None and not os.path.isabs(p):
                    p = str(base / p)
                self.checkpoint_path = p or self.checkpoint_path
            elif e.kind == "step" and e.step is not None:
                self.step = e.step
                total = e.values.get("total")
                if isinstance(total, int) and total > 0 and self.total_steps is None:
                    self.total_steps = total
                if not self._samples or self._samples[-1][1] != e.step:
                    self._samples.append((e.time, e.step))
                    if self._first is None:
                        self._first = (e.time, e.step)
            elif e.kind == "loss" and e.loss is not None:
                self.loss = e.loss
                if self.step is not None:
                    self._add_point(self.step, e.loss)

    def _add_point(self, step: int, loss: float) -> None:
        h = self._history
        if self._newest is not None and step <= self._newest[0]:
            self._newest = None
        if h and step <= h[-1][0]:
            # a resumed attempt repeats the steps after its checkpoint: its points replace the old ones
            while h and h[-1][0] >= step:
                h.pop()
        if h and step - h[-1][0] < self._stride:
            self._newest = (step, loss)  # drawn at the end of the curve until a kept point passes it
            return
        self._newest = None
        h.append((step, loss))
        if len(h) > self._history_points:
            del h[1:-1:2]  # keep the first and the newest point
            self._stride *= 2

    @property
    def history(self) -> list[tuple[int, float]]:
        """The loss curve: (step, loss) points over the whole run (at most ``HISTORY_POINTS``)."""
        with self._lock:
            newest = self._newest
            return list(self._history) + ([newest] if newest is not None else [])

    @property
    def rate(self) -> float | None:
        """Steps per second over the recent window (None until two distinct steps were seen)."""
        with self._lock:
            if len(self._samples) < 2:
                return None
            (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or s1 <= s0:
            return None
        return (s1 - s0) / (t1 - t0)

    @property
    def measured_steps(self) -> int:
        """Steps seen since this attempt's first step (the rate's window is shorter: the recent pace)."""
        with self._lock:
            if self._first is None or not self._samples:
                return 0
            return max(0, self._samples[-1][1] - self._first[1])

    @property
    def measured_seconds(self) -> float:
        """Seconds since this attempt's first step (0 until two distinct steps were seen)."""
        with self._lock:
            if self._first is None or not self._samples:
                return 0.0
            return max(0.0, self._samples[-1][0] - self._first[0])

    @property
    def eta(self) -> float | None:
        """Seconds to ``total_steps`` at the measured rate (None when either is unknown)."""
        r = self.rate
        if r is None or not self.total_steps or self.step is None:
            return None
        return max(0.0, (self.total_steps - self.step) / r)

    def against_estimate(self, estimate: float, *, elapsed: float, first_step: int) -> tuple[bool, str | None]:
        """Compare the measured pace with `estimate` (seconds for the whole run): ``(decided, warning)``.

        Not decided until the pace was measured over 5% of the estimate (at least ESTIMATE_MIN_WINDOW, at most
        ESTIMATE_MAX_WINDOW) and 5% of the steps: a pace read off a fraction of a second of steps says nothing
        about hours, and a toy run that ends before then is not warned about. The warning says the projected
        duration when it is off by more than half."""
        if not self.total_steps:
            return True, ("--estimate needs the total number of steps to compare the pace (pass --total-steps N "
                          "or set train.total_steps)")
        remaining_at_start = self.total_steps - first_step
        window = min(max(0.05 * estimate, ESTIMATE_MIN_WINDOW), ESTIMATE_MAX_WINDOW)
        if self.rate is None or self.measured_steps < max(2, 0.05 * remaining_at_start) or \
                self.measured_seconds < window:
            return False, None
        from .config import format_duration
        projected = elapsed + (self.eta or 0.0)
        if abs(projected - estimate) <= 0.5 * estimate:
            return True, None
        return True, (f"at the measured pace ({self.rate:.3g} steps/s) the run takes about "
                      f"{format_duration(projected)}, against an estimate of {format_duration(estimate)} "
                      "(off by more than 50%); update the estimate and tell whoever is waiting for it")

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "loss": self.loss, "rate": self.rate,
                "eta": self.eta, "checkpoint_step": self.checkpoint_step, "checkpoint": self.checkpoint_path,
                "updated": self.updated, "history": [list(p) for p in self.history]}


class LineFeed:
    """The one reader of a run's output lines.

    Each line is parsed once and its events go to the progress and to every listener, in order; a listener that
    raises is logged and never stops the stream. A tqdm bar's ``\r`` segments are each progress, the last one is
    what the tail and `on_line` get. Under torchrun (`distributed`), the progress and the listeners read global
    rank 0's lines; every rank's line is in the tail, and any rank's out-of-memory is remembered on the child
    as it is printed (torchrun's failure report that follows can push it out of the tail).
    """

    def __init__(self, config: "Config", progress: Progress, *, listeners: Sequence[Listener] = (),
                 on_line: Callable[[str], None] | None = None, base: Path | None = None,
                 distributed: bool = False, experiment: str = "") -> None:
        self.parser = LineParser(config)
        self.progress = progress
        self.listeners: list[Listener] = list(listeners)
        self.on_line = on_line
        self.base = base   # a checkpoint path a line names is relative to the child's working folder
        self.distributed = distributed
        self.experiment = experiment
        self._tail: deque[str] = deque(maxlen=TAIL_KEPT)
        self._lock = threading.Lock()   # the pump thread appends while status() and logs() read

    def line(self, text: str, att: Any, child: Any = None) -> None:
        """One line the child printed (without its newline), during attempt `att` of the process `child`."""
        # a tqdm bar redraws with \r: every segment is progress, the last one is what a terminal shows
        segs = text.split("\r") if "\r" in text else [text]
        parse = True
        if self.distributed:
            # under torchrun: progress, the loss and the listeners read global rank 0 only
            rank, body = split_rank(text)
            parse = rank == 0
            if rank is not None and child is not None and child.oom_seen is None:
                # any rank's OOM, remembered as it is printed (torchrun's failure report can push it out of
                # the tail the exit is classified from)
                child.oom_seen = oom_text(body)
            if parse:
                segs = [split_rank(seg)[1] for seg in segs]
        for seg in segs:
            if seg and parse:
                events = self.parser.parse(seg)
                if events:
                    self.progress.observe(events, base=self.base)
                for fn in self.listeners:
                    self._call(fn, events, seg, att)
        shown = next((s for s in reversed(segs) if s), "")
        with self._lock:
            self._tail.append(shown)
        step = self.progress.step
        if step is not None and att is not None:
            if att.first_step is None:
                att.first_step = step
            att.last_step = step
        if self.on_line is not None:
            self.on_line(shown)

    def state(self, state: str, att: Any, **values: Any) -> None:
        """Tell the listeners the run's state changed (an event of kind ``state``; its line is empty)."""
        if not self.listeners:
            return
        vals = {"state": state, "attempt": att.number if att else None, "step": self.progress.step,
                "path": self.progress.checkpoint_path, **values}
        if att is not None:
            vals.setdefault("exit_code", att.exit_code)
            vals.setdefault("detail", att.detail)
        ev = Event("state", vals, "")
        for fn in list(self.listeners):
            self._call(fn, [ev], "", att)

    def last(self, n: int | None = None) -> list[str]:
        """The last `n` lines kept (all of them by default), newest last."""
        with self._lock:
            lines = list(self._tail)
        return lines[-n:] if n else lines

    def _call(self, fn: Listener, events: Sequence[Any], line: str, att: Any) -> None:
        try:
            fn(events, line, att)
        except Exception:  # a listener never stops the log stream
            log.exception("%s: a line listener failed", self.experiment)
